"""Outbound connections that a cancel cannot leave open.

``loop.create_connection`` hands its transport back through the awaiting task. A cancel (a caller's timeout, a
client gone) that lands after the connection is made but before the task resumes throws ``CancelledError`` in place
of the result: the transport then stays open with nobody holding it, until the garbage collector finds it (a
``ResourceWarning``, and a socket held open that long). ``connect`` keeps what the protocol factory made and closes it
when the call ends in any exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

P = TypeVar("P", bound=asyncio.BaseProtocol)


async def connect(
    make: Callable[[], P],
    dial: Callable[[Callable[[], P]], Awaitable[tuple[asyncio.BaseTransport, P]]],
    *,
    close: Callable[[P], None],
) -> P:
    """``dial(factory)`` (``loop.create_connection`` or ``create_unix_connection`` with its address bound), the
    protocol ``make`` made returned; on any exception every protocol made is passed to ``close`` (it closes its
    transport, if it got one) before the exception goes on."""
    made: list[P] = []

    def factory() -> P:
        protocol = make()
        made.append(protocol)
        return protocol

    try:
        _, protocol = await dial(factory)
    except BaseException:
        for protocol in made:
            close(protocol)
        raise
    return protocol
