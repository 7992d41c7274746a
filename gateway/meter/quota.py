"""Token reservations in a key's token bucket: reserve before forwarding, commit the real usage after.

A reservation takes ``prompt_estimate + choices x wanted`` in ``RESERVE`` mode with a minimum of
``prompt_estimate + choices`` (one completion token per choice): the bucket gives what it has, up to the cost,
and the meter clamps ``max_tokens`` to what it got. A chat request that sets no limit, to a model whose context
length is known, reserves ``choices x context`` instead (prompt and completion of a choice fit in the context) and
goes upstream unchanged when granted in full, so the model server applies its own default (the rest of the context);
the meter then never asks for more than the context holds. The commit debits ``actual - reserved`` in ``FORCE`` mode (a
negative cost refunds; ``gateway.meter.accounting`` makes it); an upstream failure commits ``0 - reserved``.
Both go under one random reservation id (the store's reservation script), so each can be made again when its answer
is lost and counts once, and a reservation whose answer was lost can be released (``Store.release``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateway.contract import TOKENS, format_duration
from gateway.identity import Identity
from gateway.limits import BucketMode, BucketOp, BucketResult
from gateway.meter.errors import TokensExhausted
from gateway.store import Store
from gateway.store.base import new_id, outcome_into, send_reserve

log = logging.getLogger("maas.meter")


class Outcome(StrEnum):
    GRANTED = "granted"
    CLAMPED = "clamped"
    DENIED = "denied"
    UNLIMITED = "unlimited"
    STORE_ERROR = "store_error"


@dataclass(frozen=True, slots=True)
class Reservation:
    key_id: str
    limit: int
    window_ms: int
    reserved: int
    max_tokens: int | None
    """Per-choice completion limit to send upstream (None: leave the request as it is)."""
    clamped: bool
    outcome: Outcome
    remaining: int = 0
    reset_ms: int = 0
    ident: str = ""
    """The reservation id its commit is made under, so a commit made again counts once ("": none was sent)."""


def unlimited(key_id: str, *, outcome: Outcome = Outcome.UNLIMITED) -> Reservation:
    return Reservation(key_id=key_id, limit=0, window_ms=0, reserved=0, max_tokens=None, clamped=False, outcome=outcome)


def untaken(identity: Identity, ident: str = "") -> Reservation:
    """The reservation of a request forwarded although its bucket operation did not run (the store could not be
    reached), or was released (its answer was lost): nothing reserved, so the commit debits what the request served
    in full (under the reservation id ``ident``)."""
    if identity.token_limit is None or identity.token_window_ms is None:
        return unlimited(identity.key_id, outcome=Outcome.STORE_ERROR)
    return Reservation(
        key_id=identity.key_id,
        limit=identity.token_limit,
        window_ms=identity.token_window_ms,
        reserved=0,
        max_tokens=None,
        clamped=False,
        outcome=Outcome.STORE_ERROR,
        ident=ident,
    )


def plan(*, prompt_estimate: int, choices: int, wanted: int, context: int | None = None) -> tuple[int, int]:
    """(cost, min_cost) of the reservation. Without choices (embeddings) nothing can be clamped: the whole input is
    the least the request costs. With ``context`` (no limit asked, the model's context length known), each choice's
    prompt and completion fit in the context."""
    if choices <= 0:
        cost = max(prompt_estimate, 1)
        return cost, cost
    least = prompt_estimate + choices
    if context is not None:
        return max(choices * context, least), least
    return prompt_estimate + choices * wanted, least


def rate_headers(result: BucketResult) -> dict[str, str]:
    return {
        "x-ratelimit-limit-tokens": str(result.limit),
        "x-ratelimit-remaining-tokens": str(result.remaining),
        "x-ratelimit-reset-tokens": format_duration(result.reset_ms),
    }


class Reserving:
    """A reservation on its way: constructing it sends the bucket operation at once when the store can (the Redis
    pipe), so the caller can build the upstream request while Redis answers; ``outcome`` waits for the answer
    (``TokensExhausted`` when the key cannot afford even one token per choice)."""

    def __init__(
        self,
        identity: Identity,
        *,
        prompt_estimate: int,
        choices: int,
        wanted: int,
        clamp: bool,
        store: Store,
        context: int | None = None,
    ) -> None:
        self._identity = identity
        self._prompt = prompt_estimate
        self._choices = choices
        self._wanted = wanted
        self._clamp = clamp
        self._context = context
        self._cost = 0
        self._waiting: asyncio.Future[list[list[BucketResult]]] | None = None
        self._on_full_grant: Callable[[], None] | None = None
        self._min_cost = 0
        self.sent: tuple[BucketOp, str] | None = None
        """The bucket operation and the reservation id sent (None: the key has no token limit): what to release when
        the answer is lost."""
        if identity.token_limit is None or identity.token_window_ms is None:
            return
        cost, self._min_cost = plan(prompt_estimate=prompt_estimate, choices=choices, wanted=wanted, context=context)
        self._cost = cost
        op = _token_op(
            identity.key_id, identity.token_limit, identity.token_window_ms, cost, BucketMode.RESERVE, self._min_cost
        )
        self._waiting = asyncio.get_running_loop().create_future()
        self._settle = outcome_into(self._waiting)
        self.sent = (op, new_id())
        send_reserve(store, op, self.sent[1], self._answered)

    def when_granted_in_full(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` from the store's reply callback (before ``outcome`` wakes) when the bucket grants the
        whole reservation, so the request can go upstream without waiting for the caller's next turn."""
        self._on_full_grant = hook

    def _answered(self, results: list[list[BucketResult]] | None, error: BaseException | None) -> None:
        hook, self._on_full_grant = self._on_full_grant, None  # once: it holds the request that holds this
        if hook is not None and error is None and results and len(results[0]) == 1:
            result = results[0][0]
            if result.allowed and self._limits_of(result.debited)[0] == self.expected_max_tokens:
                try:
                    hook()
                except Exception:  # the caller sends the request itself then
                    log.exception("early upstream send failed")
        self._settle(results, error)

    def _limits_of(self, granted: int) -> tuple[int | None, bool]:
        """``max_tokens`` for the upstream and whether it is below what was wanted, for ``granted`` tokens."""
        if self._choices <= 0:
            return None, False
        per_choice = (granted - self._prompt) // self._choices
        if not self._clamp:
            return None, False
        if self._context is not None:
            if granted >= self._cost:
                return None, False  # the whole context is paid for: the request goes as the client sent it
            # never more than the context leaves after the prompt (an upper bound of it): vLLM refuses that
            return max(1, min(per_choice, self._context - self._prompt)), True
        return min(per_choice, self._wanted), per_choice < self._wanted

    @property
    def expected_max_tokens(self) -> int | None:
        """The ``max_tokens`` the outcome carries when the bucket grants the whole reservation."""
        if self._waiting is None or self._choices <= 0 or not self._clamp or self._context is not None:
            return None
        return self._wanted

    async def outcome(self) -> Reservation:
        """The reservation, or ``TokensExhausted``; ``StoreError`` propagates."""
        identity = self._identity
        if self._waiting is None or identity.token_limit is None or identity.token_window_ms is None:
            return unlimited(identity.key_id)
        [[result]] = await self._waiting
        return self._reservation(result)

    def granted_in_full(self) -> Reservation:
        """The reservation, once the ``when_granted_in_full`` hook has run (the store's reply is in)."""
        assert self._waiting is not None and self._waiting.done()
        [[result]] = self._waiting.result()
        return self._reservation(result)

    def _reservation(self, result: BucketResult) -> Reservation:
        identity = self._identity
        assert identity.token_limit is not None and identity.token_window_ms is not None
        if not result.allowed and self._min_cost > identity.token_limit:
            # more than the bucket ever holds: waiting cannot help, so no retry-after (as OpenAI's "request too large")
            raise TokensExhausted(
                f"request too large: it needs at least {self._min_cost} tokens, more than this key's limit of "
                f"{identity.token_limit} per {format_duration(identity.token_window_ms)}; shorten the input or ask "
                "for fewer completions",
                headers=rate_headers(result),
            )
        if not result.allowed:
            retry = max(1, -(-result.retry_ms // 1000))
            raise TokensExhausted(
                f"token quota exhausted: this request needs at least {self._min_cost} tokens, {result.remaining} "
                f"left; retry in {format_duration(result.retry_ms)}",
                headers={**rate_headers(result), "retry-after": str(retry)},
            )
        granted = result.debited
        max_tokens, clamped = self._limits_of(granted)
        return Reservation(
            key_id=identity.key_id,
            limit=identity.token_limit,
            window_ms=identity.token_window_ms,
            reserved=granted,
            max_tokens=max_tokens,
            clamped=clamped,
            outcome=Outcome.CLAMPED if clamped else Outcome.GRANTED,
            remaining=result.remaining,
            reset_ms=result.reset_ms,
            ident=self.sent[1] if self.sent is not None else "",
        )


async def adjust(store: Store, reservation: Reservation, delta: int) -> None:
    """Debit ``delta`` tokens (negative: refund) from the reservation's bucket, whatever it holds: once per
    reservation id, however often it is made."""
    op = _token_op(reservation.key_id, reservation.limit, reservation.window_ms, delta, BucketMode.FORCE)
    if reservation.ident:
        await store.commit(op, reservation.ident)
    else:
        await store.check_buckets([[op]])


def _token_op(key_id: str, limit: int, window_ms: int, cost: int, mode: BucketMode, min_cost: int = 0) -> BucketOp:
    return BucketOp(
        key_id=key_id, dimension=TOKENS, limit=limit, window_ms=window_ms, cost=cost, mode=mode, min_cost=min_cost
    )
