"""Kubernetes label and field selectors: parsing for validation, and matching for the directory source.

Supports the equality- and set-based forms: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``,
``a notin (x,y)``; requirements separated by commas are ANDed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from gateway.errors import ConfigError

Matcher = Callable[[Mapping[str, str]], bool]

_SET_RE = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _requirement(text: str) -> Matcher:
    set_match = _SET_RE.match(text)
    if set_match:
        key, op, values_text = set_match.groups()
        values = {v.strip() for v in values_text.split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in text:
            key, _, value = (s.strip() for s in text.partition(op))
            if not key:
                break
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    else:
        if text.startswith("!") and text[1:].strip():
            key = text[1:].strip()
            return lambda labels: key not in labels
        if re.fullmatch(r"[^\s!=(),]+", text):
            return lambda labels: text in labels
    raise ConfigError(f"invalid selector requirement {text!r}")


def compile_selector(selector: str) -> Matcher:
    """A matcher for ``selector``; the empty selector matches everything. ConfigError when malformed."""
    requirements = [_requirement(part) for part in _split(selector)]
    return lambda labels: all(req(labels) for req in requirements)


def split_union(value: str) -> tuple[str, ...]:
    """``--secret-selectors``: selectors separated by ``;`` (a Secret matching any one of them is selected)."""
    selectors = tuple(s.strip() for s in value.split(";") if s.strip())
    for selector in selectors:
        compile_selector(selector)
    return selectors
