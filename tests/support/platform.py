"""A small platform written straight into a store: tiers, models, routes and API keys of every kind."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from gateway import contract
from gateway.contract import KeyRecord, KeyStatus, Limit, Limits, ModelRecord, RecordKind, RouteRecord
from gateway.store.base import Store
from gateway.store.redis import RedisStore


@dataclass(frozen=True)
class Key:
    plaintext: str
    user: str
    groups: tuple[str, ...] = ()
    tier: str | None = None
    models: tuple[str, ...] = ()
    status: KeyStatus = KeyStatus.ACTIVE
    expires_at: float | None = None
    limits: Limits | None = None

    def record(self, pepper: bytes) -> KeyRecord:
        digest = contract.digest_key(self.plaintext, pepper)
        return KeyRecord(
            key_id=contract.key_id_of(digest),
            digest=digest,
            user=self.user,
            groups=self.groups,
            tier=self.tier,
            models=self.models,
            status=self.status,
            expires_at=self.expires_at,
            limits=self.limits,
            source="test",
        )

    def key_id(self, pepper: bytes) -> str:
        return contract.key_id_of(contract.digest_key(self.plaintext, pepper))


QWEN = "qwen3-0-6b-instruct"
GRANITE = "granite-code"
MISTRAL = "mistral"

ADMIN = Key("admin-key-12345", "admin", ("enterprise",))
FREE = Key("sk-free-alice-0001", "alice", ("free",))
PREMIUM = Key("sk-premium-bob-0001", "bob", ("premium",))
GRANITE_ONLY = Key("sk-granite-only-0001", "carol", ("premium",), models=(GRANITE,))
REVOKED = Key("sk-revoked-0001", "dave", ("free",), status=KeyStatus.REVOKED)
DISABLED = Key("sk-disabled-0001", "erin", ("free",), status=KeyStatus.DISABLED)
EXPIRED = Key("sk-expired-0001", "frank", ("free",), expires_at=time.time() - 60)
BIG = Key(
    "sk-big-limits-0001", "gina", tier="enterprise", limits=Limits(requests=Limit(limit=1_000_000_000, window="1m"))
)

ALL_KEYS = (ADMIN, FREE, PREMIUM, GRANITE_ONLY, REVOKED, DISABLED, EXPIRED, BIG)


def routes(prefixes: dict[str, str | None]) -> list[RouteRecord]:
    return [RouteRecord(id=contract.route_id("*", p), prefix=p, model=m) for p, m in prefixes.items()]


DEFAULT_ROUTES = {"/qwen3": QWEN, "/granite": GRANITE, "/mistral": MISTRAL, "/v1/models": None}


async def seed(store: Store, pepper: bytes, *, keys: tuple[Key, ...] = ALL_KEYS) -> int:
    changes = [contract.put(t) for t in contract.DEFAULT_TIERS]
    changes += [
        contract.put(ModelRecord(id=QWEN, ready=True)),
        contract.put(ModelRecord(id=GRANITE, ready=True)),
        contract.put(ModelRecord(id=MISTRAL, ready=False, reason="PredictorReady is False: pod pending")),
    ]
    changes += [contract.put(r) for r in routes(DEFAULT_ROUTES)]
    changes += [contract.put(k.record(pepper)) for k in keys]
    return await store.apply(changes)


def seed_afresh(
    url: str, pepper: bytes, *, keys: tuple[Key, ...] = ALL_KEYS, hosts: dict[str, str] | None = None
) -> None:
    """Redis at ``url`` emptied and seeded (``seed``) for a module's processes, with a route for every path of each
    host in ``hosts`` to its model; synchronous, for fixtures."""

    async def run() -> None:
        store = RedisStore(url, timeout=2.0)
        await store._client.flushall()
        await seed(store, pepper, keys=keys)
        named = [
            RouteRecord(id=contract.route_id(host, "/"), host=host, prefix="/", model=model)
            for host, model in (hosts or {}).items()
        ]
        if named:
            await store.apply([contract.put(r) for r in named])
        await store.close()

    asyncio.run(run())


async def records(store: Store) -> dict[RecordKind, dict[str, dict[str, Any]]]:
    """Every record in the store, decoded, by kind and id."""
    out: dict[RecordKind, dict[str, dict[str, Any]]] = {}
    for kind in RecordKind:
        out[kind] = {k: json.loads(v) async for batch in store.scan_records(kind) for k, v in batch}
    return out
