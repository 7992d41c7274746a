"""Tier ConfigMaps -> TierRecords.

``tier-to-group-mapping`` (data key ``tiers``): a YAML list of ``{name, displayName, level, groups}``, the
format of the Kuadrant MaaS samples. Our tier limits ConfigMap (default name ``maas-tier-limits``, data key
``limits``) is a YAML mapping from tier name to limits::

    free:
      requests: {limit: 5, window: 2m}
      tokens: {limit: 100, window: 1m}
      models: [qwen3-0-6b-instruct]     # optional allow-list; empty or absent = every model

A tier gets its limits from the limits ConfigMap, else from the built-in tier of the same name, else none.
Without a mapping ConfigMap the built-in tiers (free, premium, enterprise) are used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from controlplane.errors import TranslateError
from controlplane.kinds import Obj
from controlplane.translate.common import MAX_LIMIT, as_dict, as_list, csv
from gateway.contract import DEFAULT_TIERS, Limits, TierRecord

TIERS_KEY = "tiers"
LIMITS_KEY = "limits"
LIMIT_FIELDS = frozenset({"requests", "tokens", "models"})


def _load_yaml(configmap: Obj, key: str) -> Any:
    text = as_dict(configmap.get("data")).get(key)
    if text is None:
        raise TranslateError(f"ConfigMap has no data.{key}", reason="missing_data")
    try:
        return yaml.safe_load(str(text))
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a timestamp-looking scalar that is no date (2025-02-30)
        raise TranslateError(f"data.{key} is not valid YAML: {exc}", reason="invalid_yaml") from exc


def parse_mapping(configmap: Obj) -> list[TierRecord]:
    """The tiers of a ``tier-to-group-mapping`` ConfigMap (limits filled in later by ``merge``)."""
    entries = _load_yaml(configmap, TIERS_KEY)
    if not isinstance(entries, list):
        raise TranslateError("data.tiers must be a YAML list", reason="invalid_tiers")
    tiers: dict[str, TierRecord] = {}
    for raw in entries:
        entry = as_dict(raw)
        name = str(entry.get("name") or "").strip()
        if not name:
            raise TranslateError("a tier has no name", reason="invalid_tiers")
        level = entry.get("level") or 0
        if not isinstance(level, int) or isinstance(level, bool):  # 2.9 had become 2
            raise TranslateError(f"tier {name!r}: level must be an integer, not {level!r}", reason="invalid_tiers")
        groups = entry.get("groups")
        # a comma-separated string is read as the list it means (it had become no groups at all)
        listed = csv(groups) if isinstance(groups, str) else tuple(str(g) for g in as_list(groups))
        try:
            tiers[name] = TierRecord(
                name=name,
                display_name=str(entry.get("displayName") or entry.get("description") or name),
                level=level,
                groups=listed,
            )
        except (ValidationError, ValueError, TypeError) as exc:
            raise TranslateError(f"tier {name!r}: {exc}", reason="invalid_tiers") from exc
    return list(tiers.values())


def parse_limits(configmap: Obj) -> dict[str, tuple[Limits, tuple[str, ...]]]:
    """Tier name -> (limits, allowed models) from our tier limits ConfigMap."""
    document = _load_yaml(configmap, LIMITS_KEY)
    if not isinstance(document, dict):
        raise TranslateError("data.limits must be a YAML mapping of tier name to limits", reason="invalid_limits")
    out: dict[str, tuple[Limits, tuple[str, ...]]] = {}
    for name, raw in document.items():
        if not isinstance(raw, dict) or set(raw) - LIMIT_FIELDS:
            # "free:" with nothing under it, or "request:" for "requests": the tier would run without limits
            raise TranslateError(
                f"limits of tier {name!r} must be a mapping of {', '.join(sorted(LIMIT_FIELDS))}, not {raw!r}",
                reason="invalid_limits",
            )
        entry = as_dict(raw)
        try:
            limits = Limits.model_validate({k: entry[k] for k in ("requests", "tokens") if entry.get(k)})
            for limit in (limits.requests, limits.tokens):
                if limit is not None and limit.limit > MAX_LIMIT:
                    raise TranslateError(f"limits of tier {name!r}: above {MAX_LIMIT}", reason="invalid_limits")
        except ValidationError as exc:
            raise TranslateError(f"limits of tier {name!r}: {exc.errors()[0]['msg']}", reason="invalid_limits") from exc
        out[str(name)] = (limits, tuple(str(m) for m in as_list(entry.get("models"))))
    return out


def merge(
    mapping: Sequence[TierRecord] | None, limits: Mapping[str, tuple[Limits, tuple[str, ...]]] | None
) -> list[TierRecord]:
    """The effective tiers: the mapping's (or the built-in ones) with limits from the limits ConfigMap, else the
    built-in tier of the same name."""
    builtin = {t.name: t for t in DEFAULT_TIERS}
    base = list(mapping) if mapping is not None else list(DEFAULT_TIERS)
    out = []
    for tier in base:
        own = (limits or {}).get(tier.name)
        if own is not None:
            tier = tier.model_copy(update={"limits": own[0], "models": own[1]})
        elif tier.name in builtin and tier is not builtin[tier.name]:
            tier = tier.model_copy(update={"limits": builtin[tier.name].limits, "models": builtin[tier.name].models})
        out.append(tier)
    return sorted(out, key=lambda t: (t.level, t.name))
