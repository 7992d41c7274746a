"""What a metered request leaves behind: nothing for the garbage collector. The data-path processes run young
collections rarely (gateway/runtime.py), so a reference cycle per request would pile up between collections."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from gateway.identity import Identity, sign
from tests.test_meter_stack import CHAT, MODEL, SECRET, running_stack

pytestmark = pytest.mark.redis

IDENTITY = Identity(
    key_id="cycles", user="u", groups="", tier="t", model=MODEL, token_limit=10**9, token_window_ms=60_000
)


async def _post(port: int, body: bytes) -> bytes:
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: meter\r\ncontent-type: application/json\r\n"
    head += f"content-length: {len(body)}\r\nconnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in sign(IDENTITY, SECRET.encode()).items())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + b"\r\n" + body)
    async with asyncio.timeout(10):
        answer = await reader.read()  # until the meter closes
    writer.close()
    return answer


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"model": MODEL, "messages": CHAT, "max_tokens": 3}, b"200", id="whole"),
        pytest.param({"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True}, b"200", id="streamed"),
        pytest.param({"model": MODEL, "messages": CHAT, "bogus": 1}, b"400", id="unknown-field"),
        pytest.param({"model": "other-model", "messages": CHAT}, b"403", id="model-mismatch"),
        pytest.param("{not json", b"400", id="invalid-json"),
    ],
)
async def test_a_metered_request_leaves_nothing_for_the_collector(redis_url: str, body: object, status: bytes) -> None:
    """The early hook's work, the reservation's callback and a refusal's traceback all point back at the request;
    each is unlinked once the request is answered (each case kept a cycle per request before)."""
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    async with running_stack(redis_url) as stack:
        port = int(stack.meter_url.rsplit(":", 1)[1])
        await _post(port, raw)  # warm: first-use caches and connections are not per request
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                assert (await _post(port, raw)).split(b" ", 2)[1] == status
            await asyncio.sleep(0.05)
            gc.collect()
            left = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("gateway.")})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert not left, left
