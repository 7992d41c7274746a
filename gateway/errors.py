"""The data path's errors. Each has a stable snake_case ``code``: the ``code`` of the OpenAI error body and the
only value of the ``reason`` metric label. Only adapters catch third-party exceptions and re-raise these."""

from __future__ import annotations


class MaasError(Exception):
    code = "internal_error"


class ConfigError(MaasError):
    code = "invalid_configuration"


class StoreError(MaasError):
    """The store (Redis) failed or timed out."""

    code = "store_unavailable"


class StoreTimeout(StoreError):
    code = "store_timeout"


class StoreNotSent(StoreError):
    """The call never reached the store (no connection could be made): it certainly did not happen, so it can be
    made again later without counting twice."""


class RecordError(MaasError):
    """A record in the store that this version cannot read (malformed, or of another schema version)."""

    code = "invalid_record"
