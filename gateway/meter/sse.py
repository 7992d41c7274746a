"""Server-sent events from vLLM: splitting the byte stream into events, reading their ``usage`` and removing the
usage the client did not ask for. Pure code, no I/O.

The meter asks vLLM for usage on every chunk (``continuous_usage_stats``) and for the final usage chunk, so it
always knows what the client has been sent. What the client gets is what vLLM would have sent for the client's
own ``stream_options``: without ``include_usage`` the final usage chunk is dropped; without continuous usage the
per-chunk usage is removed (chat chunks) or set back to ``null`` (completion chunks, which vLLM serialises with
``"usage":null``). Events that need no change are passed on byte for byte; a changed one is cut in place (the
usage object is the last member of vLLM's chunk) and re-encoded only if its layout is unexpected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gateway.meter.errors import stream_error_status

_DECODER = json.JSONDecoder()
_USAGE = b'"usage":'
_INDEX = b'"choices":[{"index":'
_EMPTY_CHOICES = b'"choices":[]'
_CHOICES = b'"choices":['
# vLLM writes compact JSON; an upstream that does not ("choices": [], as json.dumps writes it) is read slowly
_INDEX_RE = re.compile(rb'"choices"\s*:\s*\[\s*\{\s*"index"\s*:\s*(\d+)')
_EMPTY_RE = re.compile(rb'"choices"\s*:\s*\[\s*\]')
DONE = b"[DONE]"


class SseError(ValueError):
    """The upstream's event stream is malformed or an event exceeds the size bound."""


class Splitter:
    """Cuts a byte stream into complete events (each with its blank-line terminator)."""

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        self._buf = b""
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        events: list[bytes] = []
        start = 0
        # each terminator is searched for again only once the cut has passed it: a read of many events is cut in
        # one pass (searching the whole rest for both at every event made a read of n events cost n^2)
        lf = buf.find(b"\n\n")
        crlf = buf.find(b"\r\n\r\n")
        while lf >= 0 or crlf >= 0:
            end = crlf + 4 if lf < 0 or 0 <= crlf < lf else lf + 2
            events.append(buf[start:end])
            start = end
            if 0 <= lf < start:
                lf = buf.find(b"\n\n", start)
            if 0 <= crlf < start:
                crlf = buf.find(b"\r\n\r\n", start)
        self._buf = buf[start:]
        if len(self._buf) > self._max:
            raise SseError(f"an upstream event exceeds {self._max} bytes")
        return events

    @property
    def pending(self) -> bytes:
        return self._buf


def payload(event: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(prefix, data, suffix)`` of a one-line ``data:`` event, so ``prefix + data + suffix == event``."""
    if not event.startswith(b"data:"):
        return None
    start = 6 if event[5:6] == b" " else 5
    stripped = event.rstrip(b"\r\n")
    if b"\n" in stripped[start:]:
        return None
    return event[:start], stripped[start:], event[len(stripped) :]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@dataclass(frozen=True, slots=True)
class _Found:
    usage: Usage
    key_at: int
    value_at: int
    value_end: int


def find_usage(data: bytes) -> _Found | None:
    """The top-level ``usage`` object of a chunk, located in the raw bytes (None if absent or null)."""
    at = data.rfind(_USAGE)
    if at < 0:
        return None
    value_at = at + len(_USAGE)
    while data[value_at : value_at + 1] == b" ":
        value_at += 1
    if data[value_at : value_at + 1] != b"{":
        return None
    try:
        text = data[value_at:].decode()
        obj, consumed = _DECODER.raw_decode(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value_end = value_at + len(text[:consumed].encode())
    if data[value_end:].strip() != b"}" or not isinstance(obj, dict):
        return _find_slow(data)
    return _Found(_usage_of(obj), at, value_at, value_end)


def _find_slow(data: bytes) -> _Found | None:
    try:
        chunk = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    usage = chunk.get("usage") if isinstance(chunk, dict) else None
    return _Found(_usage_of(usage), -1, -1, -1) if isinstance(usage, dict) else None


def _usage_of(obj: dict[str, object]) -> Usage:
    prompt = obj.get("prompt_tokens")
    completion = obj.get("completion_tokens")
    return Usage(
        prompt=prompt if isinstance(prompt, int) and prompt > 0 else 0,
        completion=completion if isinstance(completion, int) and completion > 0 else 0,
    )


def _choice_index(data: bytes) -> int:
    at = data.find(_INDEX)
    if at < 0:
        spaced = _INDEX_RE.search(data) if _CHOICES not in data else None
        return int(spaced.group(1)) if spaced is not None else 0
    at += len(_INDEX)
    end = at
    while data[end : end + 1].isdigit():
        end += 1
    return int(data[at:end]) if end > at else 0


def strip_usage(data: bytes, found: _Found, *, null: bool) -> bytes:
    """``data`` without its usage: the member removed, or its value set to ``null``."""
    if found.key_at > 0 and null:
        return data[: found.value_at] + b"null" + data[found.value_end :]
    if found.key_at > 0 and data[found.key_at - 1 : found.key_at] == b",":
        return data[: found.key_at - 1] + data[found.value_end :]
    chunk = json.loads(data)
    if null:
        chunk["usage"] = None
    else:
        chunk.pop("usage", None)
    return json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(slots=True)
class StreamMeter:
    """Follows one stream: what to forward of each event, and the usage of what has been forwarded."""

    want_usage: bool
    want_continuous: bool
    null_usage: bool
    """Completion chunks: vLLM writes ``"usage":null`` when it sends no per-chunk usage."""
    per_prompt: int
    """Choices per prompt (``n``): vLLM numbers a completion's choices prompt by prompt, ``index = prompt * n + i``."""
    final: Usage | None = None
    done: bool = False
    error_status: int | None = None
    """The HTTP status of the error event the upstream ended the stream with (vLLM's ``code``), if it did."""
    _per_choice: dict[int, Usage] = field(default_factory=dict)

    def usage(self) -> Usage:
        """The final usage if seen, else the sum of the last usage seen per choice, each prompt counted once (a
        completion request with several prompts reports each prompt's own count on its choices)."""
        if self.final is not None:
            return self.final
        prompts: dict[int, int] = {}
        for index, usage in self._per_choice.items():
            group = index // self.per_prompt
            prompts[group] = max(prompts.get(group, 0), usage.prompt)
        return Usage(prompt=sum(prompts.values()), completion=sum(u.completion for u in self._per_choice.values()))

    @property
    def reported(self) -> bool:
        """Some event carried usage (vLLM's do, asked for it: the meter always asks)."""
        return self.final is not None or bool(self._per_choice)

    def event(self, event: bytes) -> bytes:
        parts = payload(event)
        if parts is None:
            return event
        prefix, data, suffix = parts
        if data == DONE:
            self.done = True
            return event
        found = find_usage(data)
        if found is None:
            if data.startswith(b'{"error"') or b'"object":"error"' in data[:64]:
                self.error_status = stream_error_status(data)
            return event
        if _EMPTY_CHOICES in data or (_CHOICES not in data and _EMPTY_RE.search(data) is not None):
            self.final = found.usage
            return event if self.want_usage else b""
        self._per_choice[_choice_index(data)] = found.usage
        if self.want_continuous:
            return event
        return prefix + strip_usage(data, found, null=self.null_usage) + suffix


def response_usage(body: bytes) -> Usage | None:
    """The ``usage`` of a complete (non-streaming) response body. OpenAI bodies have one ``usage`` member and no
    unescaped quote can occur inside a string, so the last ``"usage":`` is it; no need to parse the whole body."""
    at = body.rfind(_USAGE)
    if at < 0:
        return None
    try:
        text = body[at + len(_USAGE) :].decode()
        obj, _ = _DECODER.raw_decode(text.lstrip())
    except (ValueError, UnicodeDecodeError):
        return None
    return _usage_of(obj) if isinstance(obj, dict) else None
