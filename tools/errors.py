"""The one exception type the tools raise for problems the model caused or can fix."""

from __future__ import annotations


class ToolError(Exception):
    """A failure whose message is shown to the model verbatim.

    Messages start with the tool name and say what went wrong and, where possible, what to do
    instead, e.g. ``"calculator: division by zero in '5/0'"``. Anything else a tool raises is a
    bug in hone, not in the model's call.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
