"""The README's promises: the two commands at the top, and a configuration table that matches the flags."""

from __future__ import annotations

from pathlib import Path

from controlplane.docs import config_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_two_commands_first() -> None:
    head = README.split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_configuration_table_is_current() -> None:
    assert config_table() in README, "README's configuration table is stale: run python -m controlplane.docs"
