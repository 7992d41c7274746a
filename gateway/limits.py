"""Token-bucket arithmetic, pure and clock-injected.

The Redis store runs the same rules in Lua (``store/buckets.lua``) with Redis's own clock; the in-memory store and
the ``local`` failure policy run them here. A bucket of capacity ``limit`` refills continuously at
``limit / window`` units per millisecond. Several operations on the buckets of one key are all-or-nothing: if any
operation that can be denied is denied, no bucket changes.

Modes:
- ``TAKE``: debit ``cost`` if at least ``cost`` is available (request admission).
- ``GATE``: allowed while at least ``cost`` is available, debits nothing (the token gate at admission: a key whose
  token bucket is in debt or empty is refused until it refills).
- ``RESERVE``: debit ``min(cost, available)``; allowed only if that is at least ``min_cost`` (the meter's
  reservation: it then clamps ``max_tokens`` to what it got).
- ``FORCE``: debit ``cost`` unconditionally (negative is a refund, capped at capacity); may leave the bucket in
  debt (the meter's commit of real usage).

A state stamped later than ``now`` (written under a clock that was ahead: a Redis primary before a failover to a
node whose clock is behind, or this clock before it stepped back) refills from ``now``, and is stamped ``now`` even
by a check that takes nothing. Left as it was, nothing would refill it until the clock caught up with the stamp,
and a key with an empty bucket would be refused for that long (minutes), whatever its ``retry-after`` said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum


class BucketMode(IntEnum):
    TAKE = 0
    GATE = 1
    RESERVE = 2
    FORCE = 3


@dataclass(frozen=True, slots=True)
class BucketOp:
    key_id: str
    dimension: str
    limit: int
    window_ms: int
    cost: int
    mode: BucketMode = BucketMode.TAKE
    min_cost: int = 0
    wire: tuple[bytes, tuple[bytes, ...]] = field(init=False, repr=False, compare=False)
    resp: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The Redis key and script arguments, encoded once (and once more as RESP bulk strings): hot-path ops are
        # memoised and sent many times.
        key = f"maas:b:{{k:{self.key_id}}}:{self.dimension}".encode()
        args = tuple(b"%d" % a for a in (self.limit, self.window_ms, self.cost, int(self.mode), self.min_cost))
        object.__setattr__(self, "wire", (key, args))
        resp_args = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        object.__setattr__(self, "resp", (b"$%d\r\n%s\r\n" % (len(key), key), resp_args))


@dataclass(slots=True)
class BucketResult:
    allowed: bool
    limit: int
    remaining: int
    reset_ms: int
    retry_ms: int
    debited: int


@dataclass(slots=True)
class BucketState:
    tokens: float
    ts_ms: float


def refill(state: BucketState | None, *, limit: int, window_ms: int, now_ms: float) -> float:
    if state is None:
        return float(limit)
    if limit <= 0:
        return min(state.tokens, 0.0)
    elapsed = max(0.0, now_ms - state.ts_ms)
    return min(float(limit), state.tokens + elapsed * limit / window_ms)


def _time_to(target: float, tokens: float, *, limit: int, window_ms: int) -> int:
    if tokens >= target:
        return 0
    if limit <= 0:
        return window_ms
    return math.ceil((target - tokens) * window_ms / limit - 1e-6)


def evaluate(
    ops: tuple[BucketOp, ...] | list[BucketOp],
    states: list[BucketState | None],
    *,
    now_ms: float,
) -> tuple[list[BucketResult], list[BucketState | None]]:
    """Apply ``ops`` (one key's buckets) to ``states``; return the results and the states to store
    (None where a bucket is full again and can be forgotten; a bucket nothing was taken from keeps its state)."""
    levels = [
        refill(s, limit=op.limit, window_ms=op.window_ms, now_ms=now_ms) for op, s in zip(ops, states, strict=True)
    ]
    debits: list[float] = []
    all_ok = True
    for op, level in zip(ops, levels, strict=True):
        if op.mode == BucketMode.TAKE:
            ok = level >= op.cost and op.limit > 0
            debit = float(op.cost) if ok else 0.0
        elif op.mode == BucketMode.GATE:
            ok = level >= op.cost and op.limit > 0
            debit = 0.0
        elif op.mode == BucketMode.RESERVE:
            debit = float(max(0, min(op.cost, math.floor(level))))
            ok = debit >= op.min_cost and debit > 0
        else:
            ok = True
            debit = float(op.cost)
        all_ok = all_ok and ok
        debits.append(debit)
    results: list[BucketResult] = []
    new_states: list[BucketState | None] = []
    for op, level, debit, state in zip(ops, levels, debits, states, strict=True):
        taken = debit if all_ok else 0.0
        after = min(float(op.limit), level - taken)
        retry = 0
        if not all_ok and op.mode != BucketMode.FORCE:
            need = float(op.cost) if op.mode != BucketMode.RESERVE else float(max(op.min_cost, 1))
            retry = _time_to(max(need, 1.0), after, limit=op.limit, window_ms=op.window_ms)
        results.append(
            BucketResult(
                allowed=all_ok,
                limit=op.limit,
                remaining=max(0, math.floor(after)),
                reset_ms=_time_to(float(op.limit), after, limit=op.limit, window_ms=op.window_ms),
                retry_ms=retry,
                debited=int(taken),
            )
        )
        if taken == 0 and (state is None or state.ts_ms <= now_ms):
            new_states.append(state)  # a gate, or a denied group: the stored state already refills to the same level
        else:
            new_states.append(None if after >= op.limit else BucketState(tokens=after, ts_ms=now_ms))
    return results, new_states
