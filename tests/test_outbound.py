"""A cancel that lands after an outbound connection is made, before its caller resumes, leaves nothing open."""

from __future__ import annotations

import asyncio

import pytest

from gateway import outbound


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def test_a_connection_made_as_its_caller_is_cancelled_is_closed() -> None:
    ended = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client's side is closed
        ended.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    caller: asyncio.Task[_Client] | None = None

    async def dial(factory: object) -> tuple[asyncio.BaseTransport, _Client]:
        made = await loop.create_connection(factory, "127.0.0.1", port)  # type: ignore[arg-type]
        assert caller is not None
        caller.cancel()  # lands now, with the connection made: its result never reaches the caller
        await asyncio.sleep(0)
        return made

    try:
        caller = asyncio.create_task(outbound.connect(_Client, dial, close=_Client.close))
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(ended.wait(), 5)  # the server saw the connection closed
    finally:
        server.close()
        await server.wait_closed()
