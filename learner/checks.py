"""Answer checkers: did a reply get the expected answer? The learner's verifiers and `hone eval` use
this same code, so a task scored as solved in an eval is labelled a success in training.

Rules (also in docs/learner.md):
- numeric: the LAST number in the reply (commas as thousands separators allowed, a trailing "%" or
  unit ignored, "3/4" read as a fraction) equals the expected number within a relative tolerance
  of 1e-6 (absolute 1e-9 when the expected value is 0).
- contains: the expected text appears in the reply, ignoring case and runs of whitespace.
- exact: the reply equals the expected text, ignoring case, surrounding whitespace and one
  trailing period.
Without an explicit check, a numeric expected answer (a number, or a string that is exactly one
number as written above, e.g. "1,234" or "3/4") is checked numerically and anything else with
`contains`. An empty expected answer is an error (CheckError), never a match.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Literal

Check = Literal["numeric", "contains", "exact"]
CHECKS: tuple[str, ...] = ("numeric", "contains", "exact")
REL_TOL = 1e-6
ABS_TOL = 1e-9

# A number: optional sign, digits with optional thousands commas, optional decimals; or a fraction.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|(?<![\w.])-?\.\d+")
_WS = re.compile(r"\s+")


class CheckError(ValueError):
    """The expected answer or the check name is unusable."""


def last_number(text: str) -> float | None:
    """The last number `text` spells (e.g. "1,234.5", "-3", "3/4", "$12"), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "").replace(" ", "")
    try:
        if "/" in raw:
            num, den = raw.split("/")
            if float(den) == 0:
                return None
            return float(Fraction(num) / Fraction(den))
        return float(raw)
    except (ValueError, ZeroDivisionError):
        return None


def default_check(expected: Any) -> Check:
    if isinstance(expected, bool):
        return "contains"
    if isinstance(expected, (int, float)):
        return "numeric"
    if isinstance(expected, str) and _is_number(expected.strip()):
        return "numeric"
    return "contains"


def _is_number(s: str) -> bool:
    # Exactly the numbers `last_number` reads (not Python's float(): "1,2,3" or "1e3" or "nan" must
    # not be checked numerically against the last digits they contain).
    return _NUMBER.fullmatch(s) is not None and last_number(s) is not None


def _norm(text: str) -> str:
    return _WS.sub(" ", str(text)).strip().casefold()


def check_answer(reply: str, expected: Any, check: str | None = None) -> bool:
    """Whether `reply` gets `expected` right under `check` (default: chosen from `expected`)."""
    kind = check or default_check(expected)
    if kind not in CHECKS:
        raise CheckError(f"unknown check {kind!r}; use one of {', '.join(CHECKS)}")
    if expected is None:
        raise CheckError("expected answer is missing")
    if kind == "numeric":
        if isinstance(expected, bool):
            raise CheckError(f"expected answer {expected!r} is not a number")
        want = float(expected) if isinstance(expected, (int, float)) else last_number(str(expected))
        if want is None or not math.isfinite(want):
            raise CheckError(f"expected answer {expected!r} is not a number")
        got = last_number(reply or "")
        if got is None:
            return False
        return math.isclose(got, want, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    want_text = _norm(str(expected))
    if not want_text:
        raise CheckError("expected answer is empty")  # "" is contained in every reply
    if kind == "contains":
        return want_text in _norm(reply or "")
    return _norm(reply or "").removesuffix(".") == want_text.removesuffix(".")
