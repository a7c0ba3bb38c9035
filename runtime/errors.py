"""HTTP errors as JSON in OpenAI's shape: {"error": {"message", "type", "code"}}. Never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hone.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, **extra) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.headers = headers
        self.extra = extra


def error_response(status: int, message: str, type_: str, headers: dict[str, str] | None = None,
                   **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": status, **extra}},
                        status_code=status, headers=headers)


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return f"{where or 'body'}: {err.get('msg', 'invalid')}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.headers, **e.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        msgs = [_describe(err) for err in e.errors()[:5]]
        return error_response(422, "; ".join(msgs), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error ({type(e).__name__}); see the server log", "internal_error")
