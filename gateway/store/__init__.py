"""Stores: the I/O behind the data path, one Protocol with a Redis and an in-memory implementation."""

from __future__ import annotations

from gateway.errors import ConfigError
from gateway.store.base import Store, Subscription, UsageDelta, UsageRow

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def open_store(url: str, *, timeout: float = 0.25) -> Store:
    """``memory://`` (one process only) or ``redis://``, ``rediss://``, ``unix://``; ``redis+cluster://`` and
    ``rediss+cluster://`` for Redis Cluster. ``timeout`` bounds every call, in seconds."""
    if url.startswith("memory://"):
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith(REDIS_SCHEMES):
        from gateway.store.redis import RedisStore

        return RedisStore(url, timeout=timeout)
    scheme = url.partition("://")[0] + "://" if "://" in url else "none"  # never the URL: it may hold a password
    raise ConfigError(f"unsupported store url scheme {scheme}: use {', '.join(('memory://', *REDIS_SCHEMES))}")


__all__ = ["Store", "Subscription", "UsageDelta", "UsageRow", "open_store"]
