"""A cap on the client connections one listener keeps open (``--max-connections`` of ``maas authz``'s check port and
``maas meter``'s proxy port).

Without it only the descriptor limit and the pod's memory bounded them: a client (or a misconfigured Envoy) holding
tens of thousands of idle connections took every descriptor, and then the ops port and the Redis connection failed
too. Past the cap a new connection is accepted, answered at once with a 503 in the OpenAI envelope
(``connection: close``) and closed; connections already open are served as before, and a new one is served again as
soon as one of them closes.

Why answer instead of pausing the listening socket: a paused listener leaves new connections in the kernel's
backlog, where their handshake completes, so Envoy sends its check on them and waits for its ext_authz timeout (then,
with the backlog full, its connect timeout) before it answers ``statusOnError``; every request through the gateway
would wait that long, and nothing would say why. Answered at once, Envoy turns the 503 into ``statusOnError`` (503)
without waiting, drops that connection from its pool (``connection: close``), and the refusal is counted and logged.
A refused connection costs an accept, one write and a close.

The count moves once per connection, in the listener's protocol factory and the admitted protocol's
``connection_lost``: nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar, cast

from gateway.logs import RateLimitedLog

P = TypeVar("P", bound=asyncio.BaseProtocol)

LINGER_SECONDS = 1.0
"""How long a refused connection is kept, its input read and dropped, for the client to read the 503 and close:
closed with input unread, the kernel resets the connection, and a client still sending its request (a body) gets a
broken pipe instead of the answer."""


class ConnectionCap:
    """At most ``limit`` open connections on one listener; past it, a 503 ``body`` and a close."""

    def __init__(
        self, limit: int, *, body: bytes, refused: Callable[[], None], logger: logging.Logger, port: str
    ) -> None:
        self.limit = limit
        self.open = 0
        """Admitted connections not closed yet."""
        self.lingering = 0
        """Refused connections waiting for their client to close."""
        self._answer = (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        self._refused = refused
        self._log = RateLimitedLog(logger, interval=10.0)
        self._port = port

    def protocol(self, make: Callable[[], P]) -> P | asyncio.Protocol:
        """For the listener's protocol factory: ``make()``'s protocol while fewer than ``limit`` connections are open
        (it must call ``release`` from its ``connection_lost``), else one that refuses the connection. Counted here,
        not in ``connection_made``: one loop turn may accept a burst of connections before any of them is made."""
        if self.open >= self.limit:
            return self._refuse()
        protocol = make()
        self.open += 1
        return protocol

    def release(self) -> None:
        """An admitted connection closed."""
        self.open -= 1

    def _refuse(self) -> asyncio.Protocol:
        self._refused()
        self._log.warning(
            "refused a connection to the %s: %d connections open, the cap (--max-connections)", self._port, self.open
        )
        return _Refusal(self, self._answer, linger=self.lingering < self.limit)


class _Refusal(asyncio.Protocol):
    """Answers the 503, shuts its side, drops what the client sends, and closes when the client does (or after
    ``LINGER_SECONDS``). Refused connections lingering at once are bounded by the cap too: past it, one is closed
    right after the answer."""

    def __init__(self, cap: ConnectionCap, answer: bytes, *, linger: bool) -> None:
        self._cap = cap
        self._answer = answer
        self._linger = linger
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        transport.write(self._answer)
        if not self._linger or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._cap.lingering += 1
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        return None

    def eof_received(self) -> bool:
        return False  # the client has read the answer and is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._cap.lingering -= 1
