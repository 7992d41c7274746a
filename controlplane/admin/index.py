"""Sorted key-id indexes for listing keys a page at a time: one over every key and one per filter value (user,
effective tier, status). A page costs a binary search plus the page, whatever the number of keys."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

Facet = tuple[str, str]
"""(filter name, value), e.g. ("user", "alice")."""


class KeyIndex:
    def __init__(self) -> None:
        self.all: list[str] = []
        self._by: dict[Facet, list[str]] = {}
        self._facets: dict[str, tuple[Facet, ...]] = {}

    def __len__(self) -> int:
        return len(self.all)

    def put(self, key_id: str, facets: Iterable[Facet]) -> None:
        new = tuple(facets)
        old = self._facets.get(key_id)
        if old == new:
            return
        if old is None:
            _insert(self.all, key_id)
        else:
            for facet in old:
                self._remove_from(facet, key_id)
        for facet in new:
            _insert(self._by.setdefault(facet, []), key_id)
        self._facets[key_id] = new

    def remove(self, key_id: str) -> None:
        old = self._facets.pop(key_id, None)
        if old is None:
            return
        _discard(self.all, key_id)
        for facet in old:
            self._remove_from(facet, key_id)

    def _remove_from(self, facet: Facet, key_id: str) -> None:
        ids = self._by.get(facet)
        if ids is not None:
            _discard(ids, key_id)
            if not ids:
                del self._by[facet]

    def count(self, facet: Facet) -> int:
        return len(self._by.get(facet, ()))

    def page(
        self,
        *,
        facets: Iterable[Facet],
        after: str,
        limit: int,
        accept: Callable[[str], bool],
        max_examined: int,
    ) -> tuple[list[str], bool, str | None]:
        """Up to ``limit`` key ids after ``after`` that are in every facet's list and that ``accept`` admits (the
        smallest list is walked, the others are looked up).

        Returns (ids, has_more, resume cursor). At most ``max_examined`` candidates are examined: a very selective
        combination of filters may then return a short page with ``has_more`` and a cursor to go on from."""
        lists = sorted((self._by.get(f, []) for f in facets), key=len)
        candidates, others = (lists[0], lists[1:]) if lists else (self.all, [])
        start = bisect.bisect_right(candidates, after) if after else 0
        out: list[str] = []
        examined = 0
        for position in range(start, len(candidates)):
            key_id = candidates[position]
            if examined >= max_examined:
                return out, True, out[-1] if out else candidates[position - 1]
            examined += 1
            if not all(_holds(ids, key_id) for ids in others) or not accept(key_id):
                continue
            if len(out) == limit:
                return out, True, out[-1]
            out.append(key_id)
        return out, False, None


def _holds(ids: list[str], key_id: str) -> bool:
    position = bisect.bisect_left(ids, key_id)
    return position < len(ids) and ids[position] == key_id


def _insert(ids: list[str], key_id: str) -> None:
    position = bisect.bisect_left(ids, key_id)
    if position == len(ids) or ids[position] != key_id:
        ids.insert(position, key_id)


def _discard(ids: list[str], key_id: str) -> None:
    position = bisect.bisect_left(ids, key_id)
    if position < len(ids) and ids[position] == key_id:
        del ids[position]
