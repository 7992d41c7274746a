"""The control plane's errors: one hierarchy under the gateway's ``MaasError``, each with a stable ``code``."""

from __future__ import annotations

from gateway.errors import MaasError


class ControlPlaneError(MaasError):
    code = "controlplane_error"


class SourceError(ControlPlaneError):
    """The source (API server, directory) failed; the caller retries with backoff."""

    code = "source_unavailable"


class GoneError(SourceError):
    """The resourceVersion a watch started from is too old (HTTP 410): the caller must re-list."""

    code = "resource_expired"


class ConflictError(SourceError):
    """A write lost a race (HTTP 409): the object changed or already exists."""

    code = "conflict"


class ThrottledError(SourceError):
    """The API server kept answering 429 Too Many Requests (API Priority and Fairness) after the retries."""

    code = "throttled"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFoundError(SourceError):
    code = "not_found"


class TranslateError(ControlPlaneError):
    """A cluster object that cannot be turned into a record. ``reason`` is the ``reason`` metric label and the
    Kubernetes Event reason suffix; it is one of a small fixed set."""

    code = "malformed_object"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotServed(TranslateError):
    """An object that is well formed but, as it stands, stands for nothing maas authz can decide on (a route of
    another gateway, one the gateway rejected, one that splits a path between models). Unlike a malformed object,
    whose last good records keep serving, it has no records: the state follows the object, and a restart gives the
    same records as a running control plane."""
