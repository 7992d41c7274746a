"""The configuration table of the README, generated from the settings classes: ``python -m controlplane.docs``.

A test compares the README with this output, so the table cannot drift from the flags."""

from __future__ import annotations

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from controlplane.settings import ControlPlaneSettings
from gateway.authz.settings import AuthzSettings
from gateway.meter.settings import MeterSettings
from gateway.settings import CommonSettings
from gateway.sim.main import SimSettings


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "`on`" if value else "`off`"
    if isinstance(value, tuple):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def _rows(cls: type[BaseSettings], *, skip: set[str]) -> list[str]:
    rows = []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        flag = name.replace("_", "-")
        meaning = (field.description or "").replace("|", "/")
        rows.append(f"| `--{flag}` | `MAAS_{name.upper()}` | {_default(field)} | {meaning} |")
    return rows


def config_table() -> str:
    common = set(CommonSettings.model_fields)
    lines = ["| flag | env | default | meaning |", "|---|---|---|---|", "| **every server** | | | |"]
    lines += _rows(CommonSettings, skip=set())
    for title, cls in (
        ("authz", AuthzSettings),
        ("meter", MeterSettings),
        ("controlplane", ControlPlaneSettings),
    ):
        lines.append(f"| **`maas {title}`** | | | |")
        lines += _rows(cls, skip=common)
    lines.append("| **`maas sim`** | | | |")
    lines += _rows(SimSettings, skip=set())
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_table())
