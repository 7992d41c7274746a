"""The meter's errors: each has an HTTP status, an OpenAI error ``type`` and a stable snake_case ``code`` (the only
value of the ``reason`` metric label). ``body()`` is the OpenAI error envelope the client gets."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from gateway.errors import MaasError


class MeterError(MaasError):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return envelope(str(self), type_=self.type, code=self.code, param=self.param)


def envelope(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class InvalidJson(MeterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_json"


class InvalidRequest(MeterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnknownParameter(MeterError):
    status = 400
    type = "invalid_request_error"
    code = "unknown_parameter"


class MethodNotAllowed(MeterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UnsupportedEndpoint(MeterError):
    status = 404
    type = "invalid_request_error"
    code = "unsupported_endpoint"


class UnsupportedMediaType(MeterError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class BodyTooLarge(MeterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class IdentityRejected(MeterError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class ModelMismatch(MeterError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class TokensExhausted(MeterError):
    status = 429
    type = "tokens"
    code = "rate_limit_exceeded"


class StoreUnavailable(MeterError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class UpstreamUnavailable(MeterError):
    status = 503
    type = "server_error"
    code = "upstream_unavailable"


class UpstreamBusy(MeterError):
    status = 503
    type = "server_error"
    code = "upstream_busy"


class UpstreamTimeout(MeterError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamBroken(MeterError):
    status = 502
    type = "server_error"
    code = "upstream_error"


def normalise_upstream_error(status: int, raw: bytes) -> bytes:
    """An upstream (vLLM) error body in the OpenAI envelope with a string ``code``: vLLM puts the HTTP status in
    ``code`` (an integer), older versions use a flat ``{"object": "error", ...}`` body."""
    message = ""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    param: str | None = None
    code: Any = None
    inner = _error_object(raw)
    if inner is not None:
        message = str(inner.get("message") or "")
        type_ = str(inner.get("type") or type_)
        param = inner.get("param") if isinstance(inner.get("param"), str) else None
        code = inner.get("code")
    if not message:
        message = raw[:512].decode(errors="replace").strip() or _phrase(status)
    if not isinstance(code, str) or not code:
        code = _phrase(status).lower().replace(" ", "_").replace("-", "_")
    return envelope(message, type_=type_, code=code, param=param)


STREAM_ERROR_STATUS = 502
"""The status a streamed error event is counted with when it carries no HTTP status of its own: the upstream failed
the response after its ``200``, as a stream that breaks (``upstream_error``) is counted."""


def stream_error_status(raw: bytes) -> int:
    """The HTTP status an upstream error event (the ``data`` of ``data: {"error": ...}``) stands for: vLLM's integer
    ``code``, else ``STREAM_ERROR_STATUS``. The response's own status went out with its head, as ``200``."""
    inner = _error_object(raw)
    code = inner.get("code") if inner is not None else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return STREAM_ERROR_STATUS


def _error_object(raw: bytes) -> dict[str, Any] | None:
    """The error object of an upstream error body: ``{"error": {...}}``, or the flat ``{"object": "error", ...}``."""
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    inner = parsed.get("error")
    return inner if isinstance(inner, dict) else parsed


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
