"""The prompt-token estimator the meter reserves with, before vLLM has tokenised anything.

The meter cannot run the model's tokenizer, so it bounds the prompt from above:

    estimate = ceil(text_bytes / bytes_per_token) + overhead x (messages + 1)

``text_bytes`` is the UTF-8 length of every string in the messages (chat), the prompt(s) (completions) or the
input(s) (embeddings), plus the JSON of ``tools``/``functions`` (a chat template renders them into the prompt).
Token-id prompts count exactly, one token per id. ``overhead`` (default 8) covers the chat template's special
tokens per message and the generation prompt (or a BOS token). With the default ``bytes_per_token`` of 1.0 the
estimate is an upper bound for byte-level BPE tokenizers (every token covers at least one byte), so the
reservation plus the clamp never let a key overshoot; a larger value (English text averages ~4 bytes per token)
reserves less up front but the commit may then debit more than was reserved. Images referenced by URL are counted
by the URL's bytes only, which under-estimates them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["chat", "completion", "embeddings"]


EXTRAS = ("tools", "functions", "documents", "chat_template", "chat_template_kwargs")
"""Chat fields besides the messages that vLLM renders into the prompt."""


@dataclass(frozen=True, slots=True)
class Estimator:
    bytes_per_token: float = 1.0
    overhead: int = 8

    def prompt_tokens(self, kind: Kind, body: dict[str, Any]) -> int:
        if kind == "chat":
            return self._chat(body)
        field = "prompt" if kind == "completion" else "input"
        if kind == "embeddings" and body.get("input") is None and isinstance(body.get("messages"), list):
            # vLLM's embeddings request is either kind: one whose input is null (not just absent) is a chat one
            return self._chat(body)
        return self._prompts(body.get(field))

    def _tokens(self, n_bytes: int) -> int:
        return math.ceil(n_bytes / self.bytes_per_token)

    def _chat(self, body: dict[str, Any]) -> int:
        messages = body.get("messages")
        items = messages if isinstance(messages, list) else []
        # (a lone surrogate, half an emoji cut by a client, is valid JSON: counted, not a crash)
        n_bytes = sum(len(s.encode("utf-8", "surrogatepass")) for s in strings(items))
        for extra in EXTRAS:
            if body.get(extra):
                n_bytes += len(json.dumps(body[extra]))  # (escaped: an upper bound of its UTF-8 size)
        return self._tokens(n_bytes) + self.overhead * (len(items) + 1)

    def _prompts(self, value: Any) -> int:
        if isinstance(value, str):
            return self._tokens(len(value.encode("utf-8", "surrogatepass"))) + self.overhead
        if isinstance(value, list) and value and all(_is_int(v) for v in value):
            return len(value) + self.overhead
        if isinstance(value, list):
            return sum(self._prompts(v) for v in value)
        return self.overhead


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (keys excluded), depth-first."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
