"""The simulator's model: a toy tokenizer, deterministic generation and vLLM-shaped JSON bodies. No I/O.

Tokens: a prompt is cut into words and single punctuation marks (``\\w+|[^\\w\\s]``), so a token is never longer
than its UTF-8 bytes. A chat prompt costs 3 tokens plus, per message, 4 tokens of template and the tokens of every
string in it (except ``role`` and content-part ``type``), like a chat template would add. Output is chosen from a
fixed vocabulary by a hash of the model name and the prompt, so the same request always gets the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_VOCAB = [
    "the",
    "model",
    "answers",
    "every",
    "question",
    "with",
    "a",
    "calm",
    "and",
    "steady",
    "voice",
    "while",
    "tokens",
    "flow",
    "through",
    "the",
    "gateway",
    "each",
    "request",
    "is",
    "metered",
    "counted",
    "and",
    "charged",
    "exactly",
    "once",
    "quotas",
    "refill",
    "over",
    "time",
    "and",
    "keys",
    "stay",
    "safe",
    "streams",
    "arrive",
    "chunk",
    "by",
    "chunk",
    "until",
    "the",
    "final",
    "usage",
    "is",
    "known",
]
CHAT_BASE_TOKENS = 3
CHAT_MESSAGE_TOKENS = 4
NATURAL_MIN = 16
NATURAL_SPREAD = 48


class SimRequestError(ValueError):
    """A request vLLM would refuse; ``status`` and ``param`` go into vLLM's error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def _strings(value: Any, *, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in skip:
                yield from _strings(item, skip=skip)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, skip=skip)


_MESSAGE_SKIP = frozenset({"role", "type"})


def chat_prompt_tokens(messages: list[Any], tools: Any = None) -> int:
    total = CHAT_BASE_TOKENS
    for message in messages:
        total += CHAT_MESSAGE_TOKENS + sum(count_tokens(s) for s in _strings(message, skip=_MESSAGE_SKIP))
    if tools:
        total += count_tokens(json.dumps(tools))
    return total


def prompt_tokens(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else count_tokens(prompt)


def _seed(model: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{model}\x00{text}".encode("utf-8", "surrogatepass")).digest()[:8], "big")


@dataclass(frozen=True, slots=True)
class Generation:
    tokens: tuple[str, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def generate(
    *, model: str, seed_text: str, max_tokens: int, ignore_eos: bool = False, min_tokens: int = 0
) -> Generation:
    """The answer to ``seed_text``: its natural length (16..63 tokens) unless ``max_tokens`` cuts it
    (``length``) or ``ignore_eos`` makes it run to ``max_tokens``."""
    seed = _seed(model, seed_text)
    natural = NATURAL_MIN + seed % NATURAL_SPREAD
    natural = max(natural, min_tokens)
    count = max_tokens if ignore_eos else min(natural, max_tokens)
    finish = "length" if ignore_eos or natural > max_tokens else "stop"
    step = 1 + (seed >> 8) % (len(_VOCAB) - 1)
    start = (seed >> 16) % len(_VOCAB)
    words = [_VOCAB[(start + i * step) % len(_VOCAB)] for i in range(count)]
    tokens = tuple(w if i == 0 else " " + w for i, w in enumerate(words))
    return Generation(tokens=tokens, finish_reason=finish)


def embedding(*, model: str, text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = hashlib.sha256(f"{model}\x00{counter}\x00{text}".encode("utf-8", "surrogatepass")).digest()
        values += [(b - 127.5) / 127.5 for b in block]
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def encode_embedding(values: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def usage(prompt: int, completion: int, *, details: bool = True) -> dict[str, Any]:
    """vLLM's ``UsageInfo`` field order: prompt, total, completion (then ``prompt_tokens_details``)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if details:
        out["prompt_tokens_details"] = None
    return out


def dumps(value: Any) -> str:
    """Compact JSON like pydantic's ``model_dump_json`` (what vLLM writes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- parameters ---------------------------------------------------------------------------------------------


def int_param(body: dict[str, Any], name: str, *, minimum: int = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimRequestError(f"{name} must be an integer", param=name)
    if value < minimum:
        raise SimRequestError(f"{name} must be at least {minimum}, got {value}.", param=name)
    return value


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats) with vLLM's rules: stream options need ``stream``, and
    continuous usage needs ``include_usage``."""
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise SimRequestError("stream_options must be an object", param="stream_options")
    if not stream:
        raise SimRequestError("Stream options can only be defined when `stream=True`.", param="stream_options")
    include = options.get("include_usage") is True
    return stream, include, include and options.get("continuous_usage_stats") is True


def completion_budget(*, prompt: int, max_tokens: int | None, max_model_len: int, where: str = "messages") -> int:
    """The completion limit vLLM would apply, or the error it would give for a context that does not fit."""
    if max_tokens is None:
        if prompt >= max_model_len:
            raise SimRequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{prompt} input tokens. Please reduce the length of the input {where}."
            )
        return max_model_len - prompt
    if prompt + max_tokens > max_model_len:
        raise SimRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt + max_tokens} tokens ({prompt} in the {where}, {max_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion."
        )
    return max_tokens


def error_body(message: str, *, status: int, param: str | None = None) -> str:
    """vLLM's ``ErrorResponse``: the OpenAI envelope with the HTTP status as an integer ``code``."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed"}.get(status, "InternalServerError")
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})
