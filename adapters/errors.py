"""API errors and their JSON bodies in each dialect (native Kobold, OpenAI, Ollama, Anthropic)."""
from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client as `status` with a JSON body in the route's dialect."""

    status = 500
    type = "server_error"

    def __init__(self, msg: str, status: int | None = None, type: str | None = None, extra: dict | None = None,
                 param: str | None = None):
        super().__init__(msg)
        self.msg = msg
        self.param = param  # the request field at fault (OpenAI's `param`)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.extra = extra or {}  # route-specific fields merged into the body (e.g. tokencount's "value": -1)


class BadRequest(ApiError):
    status = 400
    type = "bad_input"


class Unauthorized(ApiError):
    status = 401
    type = "unauthorized"

    def __init__(self, msg: str = "Authentication key is missing or invalid."):
        super().__init__(msg)


class NotFound(ApiError):
    status = 404
    type = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = "bad_input"

    def __init__(self, limit_mb: int):
        super().__init__(f"Payload is too big. Max payload size is {limit_mb}MB.")


class NotImplementedHere(ApiError):
    status = 501
    type = "not_implemented"


class Busy(ApiError):
    status = 503
    type = "service_unavailable"

    def __init__(self, msg: str = "Server is busy; please try again later."):
        super().__init__(msg)


# OpenAI error types by status, as the official SDKs map them
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


# Anthropic's error types by status (its SDK maps them back to exception classes)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(dialect: str, err: ApiError) -> dict:
    """The JSON body for `err` in `dialect` ("kobold", "openai", "ollama" or "anthropic")."""
    if dialect == "anthropic":
        body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"),
                                           "message": err.msg}}
    elif dialect == "openai":
        body = {"error": {"message": err.msg, "type": _OPENAI_TYPES.get(err.status, err.type),
                          "param": err.param, "code": err.type}}
    elif dialect == "ollama":
        body = {"error": err.msg}
    else:
        detail = {"msg": err.msg, "type": err.type}
        if isinstance(err, Unauthorized):
            # KoboldCpp's exact 401 body; clients match on it
            detail = {"error": "Unauthorized", "msg": err.msg, "type": "unauthorized"}
        body = {"detail": detail}
    body.update(err.extra)
    return body
