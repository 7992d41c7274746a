"""The connection to the upstream (vLLM): one pooled aiohttp session, a timeout on every step, and aiohttp's
exceptions turned into the meter's errors (503 unreachable, 504 too slow, 502 broken) with a metric per reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter

from gateway.logs import RateLimitedLog
from gateway.meter.errors import MeterError, UpstreamBroken, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("maas.meter.upstream")
_warn = RateLimitedLog(log)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def request_headers(headers: Mapping[str, str], *, metered: bool) -> CIMultiDict[str]:
    """Client headers for the upstream: hop-by-hop ones dropped; metered requests ask for an unencoded body."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (metered and lower == "accept-encoding"):
            continue
        out.add(name, value)
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        idle_timeout: float,
        max_connections: int,
        errors: Mapping[str, Counter],
    ) -> None:
        self.base_url = base_url
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._errors = errors
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30, ttl_dns_cache=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self._connect_timeout, sock_read=None),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session not started")
        return self._session

    def _fail(self, reason: str, exc: MeterError) -> MeterError:
        self._errors[reason].inc()
        _warn.warning("upstream %s: %s", reason, exc)
        return exc

    async def open(
        self, method: str, path_qs: str, *, headers: CIMultiDict[str], data: bytes | aiohttp.StreamReader | None
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the response headers (connect and first-byte timeouts)."""
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                return await self.session.request(
                    method, self.base_url + path_qs, headers=headers, data=data, allow_redirects=False
                )
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._fail(
                "connect_timeout",
                UpstreamTimeout(f"upstream did not accept a connection within {self._connect_timeout:g}s"),
            ) from exc
        except TimeoutError as exc:
            raise self._fail(
                "first_byte_timeout", UpstreamTimeout(f"upstream sent no response within {self.first_byte_timeout:g}s")
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._fail(
                "connect", UpstreamUnavailable(f"upstream is not reachable: {exc.strerror or exc}")
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._fail(
                "broken", UpstreamBroken(f"upstream failed before responding: {type(exc).__name__}")
            ) from exc

    async def chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The response body as it arrives; a silence longer than the idle timeout ends it with UpstreamTimeout."""
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await response.content.readany()
            except TimeoutError as exc:
                raise self._fail(
                    "idle_timeout", UpstreamTimeout(f"upstream went silent for {self.idle_timeout:g}s mid-response")
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise self._fail(
                    "broken", UpstreamBroken(f"upstream response broke off: {type(exc).__name__}")
                ) from exc
            if not data:
                return
            yield data

    async def read(self, response: aiohttp.ClientResponse, *, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for data in self.chunks(response):
            size += len(data)
            if size > limit:
                response.close()
                raise self._fail("broken", UpstreamBroken(f"upstream response exceeds {limit} bytes"))
            parts.append(data)
        return b"".join(parts)

    def count(self, reason: str) -> None:
        self._errors[reason].inc()

    async def healthy(self, *, within: float) -> tuple[bool, str]:
        """The upstream's own readiness: ``GET /health`` answering 200."""
        try:
            async with asyncio.timeout(within):
                async with self.session.get(self.base_url + "/health") as response:
                    await response.read()
                    return response.status == 200, f"upstream /health answered {response.status}"
        except TimeoutError:
            return False, f"upstream /health did not answer within {within:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"upstream /health failed: {type(exc).__name__}"
