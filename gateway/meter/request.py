"""Reading an OpenAI request body and rewriting it for the upstream. Pure code, no I/O.

The meter validates only what it acts on (``model``, ``stream``, ``stream_options``, ``n``, ``best_of``,
``max_tokens``, ``max_completion_tokens``) and, unless unknown fields are allowed, refuses parameters that neither
OpenAI nor vLLM define for that route; everything else is left to the upstream. It also refuses what vLLM would turn
into a prompt the meter cannot bound before it runs (``UNBOUNDED``): reserved for less than it costs, such a request
would take its key past its quota. The body is re-encoded only when the meter must change it (usage options added
for streams, ``max_tokens`` clamped or set); otherwise the client's bytes go upstream untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.meter.errors import InvalidJson, InvalidRequest, UnknownParameter
from gateway.meter.estimate import Estimator, Kind

PATHS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embeddings",
}
MAX_CHOICES = 128
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""vLLM's (and OpenAI's) default ``max_tokens`` for ``/v1/completions``."""

_SAMPLING = frozenset(
    [
        "model",
        "stream",
        "stream_options",
        "n",
        "max_tokens",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "seed",
        "stop",
        "user",
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "allowed_token_ids",
        "bad_words",
        "use_beam_search",
        "add_special_tokens",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
        "structural_tag",
        "structured_outputs",
        "priority",
        "request_id",
        "logits_processors",
        "return_tokens_as_token_ids",
        "return_token_ids",
        "cache_salt",
        "kv_transfer_params",
        "vllm_xargs",
        "response_format",
        "thinking_token_budget",
    ]
)
KNOWN_FIELDS: dict[Kind, frozenset[str]] = {
    "chat": _SAMPLING
    | frozenset(
        [
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "functions",
            "function_call",
            "store",
            "metadata",
            "modalities",
            "audio",
            "prediction",
            "reasoning_effort",
            "service_tier",
            "web_search_options",
            "verbosity",
            "prompt_cache_key",
            "safety_identifier",
            "echo",
            "add_generation_prompt",
            "continue_final_message",
            "documents",
            "best_of",
            "chat_template",
            "chat_template_kwargs",
            "mm_processor_kwargs",
            "media_io_kwargs",
        ]
    ),
    "completion": _SAMPLING | frozenset(["prompt", "best_of", "echo", "suffix", "prompt_embeds"]),
    "embeddings": frozenset(
        [
            "model",
            "input",
            "encoding_format",
            "dimensions",
            "user",
            "truncate_prompt_tokens",
            "additional_data",
            "add_special_tokens",
            "priority",
            "normalize",
            "embed_dtype",
            "messages",
            "chat_template",
            "chat_template_kwargs",
            "mm_processor_kwargs",
            "add_generation_prompt",
            "continue_final_message",
            "request_id",
        ]
    ),
}


LIMITS = ("max_tokens", "max_completion_tokens")
"""The fields that bound a completion. vLLM obeys ``max_completion_tokens or max_tokens`` on chat (and, up to 0.10,
on completions too, where the newer field can only arrive as an unknown field; later versions read ``max_tokens``
there), so the meter reserves for them in that order and, when it sets a limit, lowers every one the body holds
above it: whichever the model server obeys is within what was paid for."""
UNBOUNDED = {
    "prompt_embeds": "prompt_embeds cannot be metered: how many tokens a tensor holds is known only once the model "
    "server has loaded it, so no reservation can cover it; send the prompt as text or token ids",
    "chat_template": "a chat_template in the request cannot be metered: a template can render a prompt of any "
    "length from a few bytes, so no reservation can cover it; the model server's own template applies",
}
"""Request fields refused (400, ``param`` the field) because vLLM makes of them a prompt of a length the meter
cannot bound before it runs: ``prompt_embeds`` (completions, each tensor one more prompt of its own length) and a
request ``chat_template`` (chat and embeddings, also as a key of ``chat_template_kwargs``, which vLLM merges into
the template's arguments). Recent vLLM refuses request templates itself unless ``--trust-request-chat-template``."""


@dataclass(frozen=True, slots=True)
class Parsed:
    kind: Kind
    body: dict[str, Any]
    model: str | None
    stream: bool
    want_usage: bool
    """The client asked for the final usage chunk (``stream_options.include_usage``)."""
    want_continuous: bool
    """The client asked for usage on every chunk (vLLM honours it only together with ``include_usage``)."""
    max_tokens: int | None
    """The client's per-choice completion limit (``max_completion_tokens`` wins over ``max_tokens``)."""
    choices: int
    """Completions returned: ``n`` times the number of prompts."""
    n: int
    """Completions per prompt."""
    sequences: int
    """Sequences generated, each up to ``max_tokens``: what is reserved for. ``choices``, but with ``best_of``: vLLM
    generates ``best_of`` per prompt and returns the ``n`` best."""
    prompt_estimate: int

    @property
    def generates(self) -> bool:
        return self.kind != "embeddings"

    @property
    def can_inject_usage(self) -> bool:
        options = self.body.get("stream_options")
        return self.stream and self.generates and (options is None or isinstance(options, dict))


def parse(raw: bytes, *, kind: Kind, estimator: Estimator, allow_unknown: bool) -> Parsed:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise InvalidJson("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidJson("request body must be a JSON object")
    if not allow_unknown:
        unknown = sorted(k for k in body if k not in KNOWN_FIELDS[kind])
        if unknown:
            raise UnknownParameter(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string", param="model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    _refuse_unbounded(body)
    want_usage, want_continuous = _stream_options(body.get("stream_options"))
    n = _int(body, "n", minimum=1) or 1
    if n > MAX_CHOICES:
        raise InvalidRequest(f"n must be at most {MAX_CHOICES}", param="n")
    limits = {name: _int(body, name, minimum=1) for name in LIMITS} if kind != "embeddings" else {}
    max_tokens = limits.get("max_completion_tokens") or limits.get("max_tokens")
    prompts = _prompt_count(body.get("prompt")) if kind == "completion" else 1
    best_of = _best_of(body, n=n) if kind != "embeddings" else n
    return Parsed(
        kind=kind,
        body=body,
        model=model,
        stream=bool(stream) and kind != "embeddings",
        want_usage=want_usage,
        want_continuous=want_usage and want_continuous,
        max_tokens=max_tokens,
        choices=n * prompts if kind != "embeddings" else 0,
        n=n,
        sequences=best_of * prompts if kind != "embeddings" else 0,
        prompt_estimate=estimator.prompt_tokens(kind, body),
    )


def _refuse_unbounded(body: dict[str, Any]) -> None:
    kwargs = body.get("chat_template_kwargs")
    nested = kwargs.get("chat_template") if isinstance(kwargs, dict) else None
    for name, message in UNBOUNDED.items():
        if body.get(name) is not None or (name == "chat_template" and nested is not None):
            raise InvalidRequest(message, param=name)


def _stream_options(value: Any) -> tuple[bool, bool]:
    if value is None:
        return False, False
    if not isinstance(value, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    include = value.get("include_usage", False)
    continuous = value.get("continuous_usage_stats", False)
    if include is not None and not isinstance(include, bool):
        raise InvalidRequest("stream_options.include_usage must be a boolean", param="stream_options")
    if continuous is not None and not isinstance(continuous, bool):
        raise InvalidRequest("stream_options.continuous_usage_stats must be a boolean", param="stream_options")
    return bool(include), bool(continuous)


def _int(body: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer", param=name)
    if value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}", param=name)
    return value


def _best_of(body: dict[str, Any], *, n: int) -> int:
    """Sequences generated per prompt of a completion (``best_of``, at least ``n``; ``n`` without it)."""
    best_of = _int(body, "best_of", minimum=1)
    if best_of is None:
        return n
    if best_of < n:  # as vLLM refuses it
        raise InvalidRequest(
            f"best_of must be greater than or equal to n, got n={n} and best_of={best_of}", param="best_of"
        )
    if best_of > MAX_CHOICES:
        raise InvalidRequest(f"best_of must be at most {MAX_CHOICES}", param="best_of")
    return best_of


def _prompt_count(prompt: Any) -> int:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def wanted_completion(parsed: Parsed, *, default_max_tokens: int) -> int:
    """Per-choice completion tokens the request may produce, as the meter reserves them."""
    if not parsed.generates:
        return 0
    if parsed.max_tokens is not None:
        return parsed.max_tokens
    return COMPLETIONS_DEFAULT_MAX_TOKENS if parsed.kind == "completion" else default_max_tokens


def upstream_body(
    raw: bytes, parsed: Parsed, *, max_tokens: int | None, inject_usage: bool, model: str | None = None
) -> bytes:
    """The body to send upstream: ``raw`` unless the meter has to set ``max_tokens``, ask for usage, or name
    ``model`` (the routed model, set when the body names none: vLLM would serve whatever model it has)."""
    body = parsed.body
    changes: dict[str, Any] = {}
    if model and not parsed.model:
        changes["model"] = model
    if max_tokens is not None:
        given = [name for name in LIMITS if body.get(name) is not None]
        changes.update((name, max_tokens) for name in given if body[name] > max_tokens)
        if not given:
            changes["max_tokens"] = max_tokens
    if inject_usage and not (parsed.want_usage and parsed.want_continuous):
        options = dict(body.get("stream_options") or {})
        options.update(include_usage=True, continuous_usage_stats=True)
        changes["stream_options"] = options
    if not changes:
        return raw
    text = json.dumps({**body, **changes}, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (half an emoji): sent escaped, as the client wrote it
        return json.dumps({**body, **changes}, separators=(",", ":")).encode()
