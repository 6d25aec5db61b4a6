"""The OpenAI error envelope, for every error the server returns.

``{"error": {"message", "type", "param", "code"}}``. Validation errors are 400 and name the field
(FastAPI's 422 is converted); overload is 429 and loading 503, both with ``Retry-After``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "envelope", "error_response", "install_error_handlers"]

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "unavailable_error"}


class APIError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def envelope(status: int, message: str, *, type: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(envelope(err.status, err.message, type=err.type, param=err.param),
                        status_code=err.status, headers=headers)


def _field_name(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # pydantic adds the union member tried ("str", "list[int]") to the location: keep field names
    parts = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "function-after"))]
    return ".".join(parts) or None


# what a field whose type is a union accepts (pydantic reports one error per union member)
_ACCEPTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    field = _field_name(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
    if field is None and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    same = [e for e in errors if _field_name(tuple(e.get("loc", ()))) == field]
    accepts = _ACCEPTS.get((field or "").split(".")[-1]) if field else None
    if accepts and len(same) > 1 and first.get("type") != "missing":
        msg = f"must be {accepts}; got {type(first.get('input')).__name__} {str(first.get('input'))[:40]!r}"
        errors = [e for e in errors if e not in same] + [first]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{field}: {msg}{more}" if field else f"{msg}{more}"), field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, field = validation_message(exc)
        return error_response(APIError(400, message, param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(envelope(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: log it, answer in the envelope
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(envelope(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)
