"""The admin API's errors: one hierarchy, each class with a stable snake_case ``code`` and an HTTP status, answered
in the OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from controlplane.errors import ControlPlaneError


class AdminError(ControlPlaneError):
    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(
            self.status,
            message=self.message,
            code=self.code,
            error_type=self.error_type,
            param=self.param,
            headers=self.headers,
        )


def error_response(
    status: int,
    *,
    message: str,
    code: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=json.dumps)


class InvalidRequest(AdminError):
    code = "invalid_request"


class InvalidJSON(AdminError):
    code = "invalid_json"


class UndecodableBody(InvalidJSON):
    """A body that cannot be read to its end (it does not decompress): the connection cannot carry another
    request."""

    def response(self) -> web.Response:
        response = super().response()
        response.force_close()
        return response


class InvalidDuration(AdminError):
    code = "invalid_duration"


class InvalidCursor(AdminError):
    code = "invalid_cursor"


class PageTooLarge(AdminError):
    code = "page_too_large"


class MissingToken(AdminError):
    status = 401
    code = "missing_admin_token"
    error_type = "authentication_error"


class InvalidToken(AdminError):
    status = 401
    code = "invalid_admin_token"
    error_type = "authentication_error"


class ReadOnlyToken(AdminError):
    status = 403
    code = "read_only_token"
    error_type = "permission_error"


class NotFound(AdminError):
    status = 404
    code = "not_found"


class KeyNotFound(NotFound):
    code = "key_not_found"


class TierNotFound(NotFound):
    code = "tier_not_found"


class Conflict(AdminError):
    status = 409
    code = "conflict"


class ReadOnlyKey(Conflict):
    code = "read_only_key"


class KeyRevoked(Conflict):
    code = "key_revoked"


class KeyExpired(Conflict):
    code = "key_expired"


class TierInUse(Conflict):
    code = "tier_in_use"


class PartialChangeConflict(Conflict):
    """A change of two objects of which one was written and could not be taken back because another writer has
    changed it since (its version is kept): the message says what each object holds."""

    code = "partial_change"


class UnknownTier(AdminError):
    code = "unknown_tier"


class BodyTooLarge(AdminError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(AdminError):
    status = 415
    code = "unsupported_media_type"


class NotAcceptable(AdminError):
    status = 406
    code = "not_acceptable"


class Unavailable(AdminError):
    status = 503
    code = "unavailable"
    error_type = "server_error"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class SourceUnavailable(Unavailable):
    code = "source_unavailable"


class PartialChange(Unavailable):
    """As ``PartialChangeConflict``, but the API server failed the taking back."""

    code = "partial_change"


class NotSynced(Unavailable):
    code = "not_synced"
