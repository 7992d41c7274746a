"""The OpenAPI 3.1 document of the main port, built from the same pydantic models the handlers use."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from controlplane.admin import models as m
from gateway import __version__

REF = "#/components/schemas/{model}"
ERRORS = {
    400: "invalid request (code: invalid_request, invalid_json, invalid_duration, invalid_cursor, page_too_large, "
    "unknown_tier; invalid_json also for a body that does not decompress, invalid_request for malformed HTTP)",
    401: "missing or wrong credentials (missing_admin_token, invalid_admin_token; invalid_api_key for self-service)",
    403: "a read-only admin token on a change (read_only_token)",
    404: "no such key or tier (key_not_found, tier_not_found, not_found)",
    405: "method not allowed on this path",
    406: "unsupported Accept (not_acceptable)",
    409: "read-only key, revoked or expired key, or tier in use, by keys or by the windows their limits take from it "
    "(read_only_key, key_revoked, key_expired, tier_in_use); the object kept changing under the change (conflict); "
    "a tier change half written because another writer changed the ConfigMap to restore (partial_change)",
    413: "body over 64 KiB (body_too_large)",
    415: "body is not application/json, or in a Content-Encoding other than gzip and deflate (unsupported_media_type)",
    431: "the request line or a header over 8190 bytes (request_header_too_large)",
    503: "store or cluster unavailable (with Retry-After when the API server throttles), or the view of Redis not "
    "loaded yet (store_unavailable, source_unavailable, not_synced); a tier change half written because the API "
    "server failed to restore the first ConfigMap (partial_change)",
}
READ = (400, 401, 404, 405, 431, 503)
WRITE = (400, 401, 403, 404, 405, 409, 413, 415, 431, 503)
KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}
TIER = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,63}$"},
}


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    op_id: str
    summary: str
    ok: tuple[int, type[BaseModel] | None]
    errors: tuple[int, ...] = READ
    body: type[BaseModel] | None = None
    body_optional: bool = False
    params: tuple[dict[str, Any], ...] = ()
    security: str = "admin"
    extra: dict[int, Any] = field(default_factory=dict)


OPS: tuple[Op, ...] = (
    Op(
        "post",
        "/admin/v1/keys",
        "createKey",
        "Issue an API key (the plaintext key is in this response only)",
        (201, m.KeyCreated),
        WRITE,
        body=m.KeyCreate,
    ),
    Op(
        "get",
        "/admin/v1/keys",
        "listKeys",
        "List keys, a page at a time, in key id order",
        (200, m.KeyPage),
        params=(
            _query("user", "only keys of this user"),
            _query("tier", "only keys whose effective tier is this"),
            _query("status", "only keys in this state", enum=["active", "disabled", "revoked", "expired"]),
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": "page size (1-1000, default 100)",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
            _query("cursor", "next_cursor of the previous page", maxLength=200),
        ),
    ),
    Op("get", "/admin/v1/keys/{key_id}", "getKey", "Show a key", (200, m.KeyView), params=(KEY_ID,)),
    Op(
        "patch",
        "/admin/v1/keys/{key_id}",
        "updateKey",
        "Change tier, models, limits, expiry, name or disabled",
        (200, m.KeyUpdated),
        WRITE,
        body=m.KeyPatch,
        params=(KEY_ID,),
    ),
    Op(
        "delete",
        "/admin/v1/keys/{key_id}",
        "revokeKey",
        "Revoke a key (kept, with status revoked)",
        (200, m.KeyUpdated),
        WRITE,
        params=(KEY_ID,),
    ),
    Op(
        "post",
        "/admin/v1/keys/{key_id}/rotate",
        "rotateKey",
        "Issue a replacement key; the old one keeps working for the grace period",
        (200, m.Rotated),
        WRITE,
        body=m.RotateRequest,
        body_optional=True,
        params=(KEY_ID,),
    ),
    Op(
        "get",
        "/admin/v1/keys/{key_id}/quota",
        "getQuota",
        "Limits, remaining and reset, from the live buckets",
        (200, m.Quota),
        params=(KEY_ID,),
    ),
    Op(
        "post",
        "/admin/v1/keys/{key_id}/quota/reset",
        "resetQuota",
        "Refill the key's buckets",
        (200, m.Quota),
        WRITE,
        params=(KEY_ID,),
    ),
    Op(
        "get",
        "/admin/v1/usage",
        "getUsage",
        "Usage from the ledger, filtered and grouped; JSON or CSV",
        (200, m.UsageReport),
        (*READ, 406),
        params=(
            _query("key_id", "one key", maxLength=64),
            _query("user", "keys of this user"),
            _query("tier", "keys of this tier"),
            _query("model", "one model"),
            _query("from", "first day (YYYY-MM-DD, UTC), default 29 days before 'to'", format="date"),
            _query("to", "last day (YYYY-MM-DD, UTC), default today", format="date"),
            _query("group_by", "comma-separated: key, user, model, day"),
        ),
    ),
    Op("get", "/admin/v1/tiers", "listTiers", "List tiers", (200, m.TierList)),
    Op("get", "/admin/v1/tiers/{name}", "getTier", "Show a tier", (200, m.TierView), params=(TIER,)),
    Op(
        "put",
        "/admin/v1/tiers/{name}",
        "putTier",
        "Create or replace a tier",
        (200, m.TierUpdated),
        WRITE,
        body=m.TierPut,
        params=(TIER,),
        extra={201: m.TierUpdated},
    ),
    Op(
        "delete",
        "/admin/v1/tiers/{name}",
        "deleteTier",
        "Delete a tier no key uses",
        (200, m.TierDeleted),
        WRITE,
        params=(TIER,),
    ),
    Op(
        "get",
        "/admin/v1/models",
        "listCatalog",
        "Every model: readiness, url, runtime, GPUs, replicas, routes",
        (200, m.ModelList),
    ),
    Op(
        "get",
        "/v1/models",
        "myModels",
        "The models this API key may use (OpenAI list shape)",
        (200, m.OpenAIModelList),
        (400, 401, 405, 431, 503),
        security="apiKey",
    ),
    Op(
        "get",
        "/v1/me",
        "me",
        "This API key: user, tier, limits, remaining quota, usage this month",
        (200, m.Me),
        (400, 401, 405, 431, 503),
        security="apiKey",
    ),
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel] | None, description: str) -> dict[str, Any]:
    if model is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _operation(op: Op) -> dict[str, Any]:
    responses: dict[str, Any] = {str(op.ok[0]): _json(op.ok[1], "success")}
    for status, model in op.extra.items():
        responses[str(status)] = _json(model, "success (created)")
    if op.op_id == "getUsage":
        responses["200"]["content"]["text/csv"] = {"schema": {"type": "string"}}
    for status in op.errors:
        responses[str(status)] = _json(m.ErrorEnvelope, ERRORS[status])
    out: dict[str, Any] = {
        "operationId": op.op_id,
        "summary": op.summary,
        "parameters": list(op.params),
        "responses": responses,
        "security": [{"adminToken": []}] if op.security == "admin" else [{"apiKeyBearer": []}, {"apiKeyHeader": []}],
    }
    if op.body is not None:
        out["requestBody"] = {
            "required": not op.body_optional,
            "content": {"application/json": {"schema": _ref(op.body)}},
        }
    return out


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    models: set[type[BaseModel]] = {m.ErrorEnvelope}
    for op in OPS:
        models.update(x for x in (op.ok[1], op.body, *op.extra.values()) if x is not None)
    inputs = {op.body for op in OPS if op.body is not None}
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "validation" if model in inputs else "serialization") for model in models
    ]
    _, defs = models_json_schema(
        sorted(pairs, key=lambda p: p[0].__name__),
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maas-gateway admin and self-service API",
            "version": __version__,
            "description": "Quota admin API (admin bearer tokens) and self-service for API-key holders.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "a token of --admin-token-file"},
                "apiKeyBearer": {"type": "http", "scheme": "bearer", "description": "the API key"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
