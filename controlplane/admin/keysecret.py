"""Admin-issued keys as Secrets: only the digest (``data.digest``) and metadata in the ``maas/*`` annotations that
the Secret translator reads (DESIGN §7), labelled ``maas.io/api-key=true`` so the normal sync path picks them up.

A key is *managed* (writable through the API) when its record came from the Secret this module names for it:
``<key namespace>/maas-key-<key_id>``. Every other key (Kuadrant Secrets, hand-written ones) is read-only here.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Mapping
from typing import Any

from controlplane import kinds
from controlplane.admin.models import LimitOverrides
from controlplane.kinds import Obj, annotations_of, meta
from controlplane.translate import secret as tr
from gateway.contract import KeyRecord

SECRET_PREFIX = "maas-key-"
API_KEY_LABEL = "maas.io/api-key"
MANAGED_BY = "app.kubernetes.io/managed-by"
ROTATED_TO = "maas.io/rotated-to"
KEY_PREFIX = "sk-maas-"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_BYTES = 32
BASE62_CHARS = 43
"""ceil(256 / log2(62)): every 256-bit value fits in 43 base62 digits."""


def new_api_key() -> str:
    """``sk-maas-`` and 256 random bits in base62 (43 characters)."""
    number = int.from_bytes(secrets.token_bytes(RANDOM_BYTES), "big")
    digits = []
    for _ in range(BASE62_CHARS):
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    return KEY_PREFIX + "".join(reversed(digits))


def secret_name(key_id: str) -> str:
    return SECRET_PREFIX + key_id


def is_managed(record: KeyRecord, namespace: str) -> bool:
    return record.source == f"secret:{namespace}/{secret_name(record.key_id)}"


def stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(-(-epoch // 1))))


def limit_annotations(limits: LimitOverrides | None) -> dict[str, str | None]:
    if limits is None:
        return {tr.MAAS_REQUEST_LIMIT: None, tr.MAAS_TOKEN_LIMIT: None, tr.MAAS_WINDOW: None}
    return {
        tr.MAAS_REQUEST_LIMIT: str(limits.requests) if limits.requests is not None else None,
        tr.MAAS_TOKEN_LIMIT: str(limits.tokens) if limits.tokens is not None else None,
        tr.MAAS_WINDOW: limits.window,
    }


def key_secret(
    *,
    digest: str,
    namespace: str,
    key_id: str,
    annotations: Mapping[str, str | None],
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(key_id),
            "namespace": namespace,
            "labels": {API_KEY_LABEL: "true", MANAGED_BY: "maas-controlplane"},
            "annotations": {k: v for k, v in annotations.items() if v is not None},
        },
        "data": {tr.DIGEST: base64.b64encode(digest.encode()).decode()},
    }


def with_annotations(obj: Obj, updates: Mapping[str, str | None]) -> Obj:
    """A copy of the Secret for writing back, its annotations updated (None removes one)."""
    current = annotations_of(obj)
    for name, value in updates.items():
        if value is None:
            current.pop(name, None)
        else:
            current[name] = value
    metadata: dict[str, Any] = {
        k: v for k, v in meta(obj).items() if k in ("name", "namespace", "labels", "resourceVersion")
    }
    metadata["annotations"] = current
    return {
        "apiVersion": "v1",
        "kind": kinds.SECRET.name,
        "type": obj.get("type", "Opaque"),
        "metadata": metadata,
        "data": dict(obj.get("data") or {}),
    }
