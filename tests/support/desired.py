"""The control plane's desired-state computation over a fixed set of objects, for translation tests."""

from __future__ import annotations

from typing import Any

from controlplane.desired import Desired, Report
from controlplane.kinds import Kind, Obj, ObjKey


def desired_over(
    objects: dict[Kind, dict[ObjKey, Obj]], report: Report, *, pepper: bytes = b"p" * 16, **overrides: Any
) -> Desired:
    """A ``Desired`` reading ``objects`` (edits to them are seen), with the control plane's default names."""
    settings: dict[str, Any] = {
        "default_tier": "free",
        "tier_configmap": "tier-to-group-mapping",
        "tier_limits_configmap": "maas-tier-limits",
        **overrides,
    }
    return Desired(objects=lambda kind: objects.get(kind, {}), report=report, pepper=pepper, **settings)
