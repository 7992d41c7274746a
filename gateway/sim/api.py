"""What the simulator answers, as vLLM's OpenAI server would: request parsing, full bodies and SSE chunks.

Pure code; ``gateway.sim.server`` paces the chunks and writes them. Chat chunks are serialised like vLLM's
``model_dump_json(exclude_unset=True)`` (no ``usage`` key unless continuous usage was asked for); completion
chunks like ``exclude_unset=False`` (``"usage":null``); the final usage chunk drops ``None`` fields.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.sim import engine
from gateway.sim.engine import Generation, SimRequestError, dumps

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    prompt: int
    generation: Generation


@dataclass(slots=True)
class Job:
    kind: Kind
    model: str
    prompts: list[int]
    choices: list[Choice]
    stream: bool
    include_usage: bool
    continuous: bool
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.generation.tokens) for c in self.choices)

    @property
    def steps(self) -> int:
        return max((len(c.generation.tokens) for c in self.choices), default=0)


MAX_CHOICES = 128
"""The most choices (``n``) one request may ask for (the meter refuses more too)."""


def _model(body: dict[str, Any], served: tuple[str, ...]) -> str:
    model = body.get("model")
    if model is None:
        return served[0]
    if not isinstance(model, str) or model not in served:
        raise SimRequestError(f"The model `{model}` does not exist.", status=404, param="model")
    return model


def _generation_params(body: dict[str, Any], *, chat: bool) -> tuple[int | None, int, bool, int]:
    max_tokens = engine.int_param(body, "max_tokens", minimum=1)
    if chat:
        newer = engine.int_param(body, "max_completion_tokens", minimum=1)
        max_tokens = newer if newer is not None else max_tokens
    n = engine.int_param(body, "n", minimum=1) or 1
    if n > MAX_CHOICES:  # a million choices had held the simulator's loop for seconds and taken half a gigabyte
        raise SimRequestError(f"n must be at most {MAX_CHOICES}, got {n}.", param="n")
    min_tokens = engine.int_param(body, "min_tokens") or 0
    if max_tokens is not None and min_tokens > max_tokens:  # as vLLM's sampling parameters refuse it
        raise SimRequestError(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.", param="min_tokens"
        )
    return max_tokens, n, body.get("ignore_eos") is True, min_tokens


def parse_chat(body: dict[str, Any], *, served: tuple[str, ...], max_model_len: int) -> Job:
    model = _model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise SimRequestError("messages must be a non-empty list of message objects", param="messages")
    max_tokens, n, ignore_eos, min_tokens = _generation_params(body, chat=True)
    stream, include, continuous = engine.stream_flags(body)
    prompt = engine.chat_prompt_tokens(messages, body.get("tools"))
    budget = engine.completion_budget(prompt=prompt, max_tokens=max_tokens, max_model_len=max_model_len)
    seed = dumps(messages)
    choices = [
        Choice(
            index=i,
            prompt=prompt,
            generation=engine.generate(
                model=model, seed_text=f"{seed}#{i}", max_tokens=budget, ignore_eos=ignore_eos, min_tokens=min_tokens
            ),
        )
        for i in range(n)
    ]
    return Job("chat", model, [prompt], choices, stream, include, continuous)


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [list(v) for v in value]
    raise SimRequestError("prompt must be a string, a list of strings or a list of token ids", param="prompt")


def parse_completion(body: dict[str, Any], *, served: tuple[str, ...], max_model_len: int) -> Job:
    model = _model(body, served)
    prompts = _prompts(body.get("prompt"))
    max_tokens, n, ignore_eos, min_tokens = _generation_params(body, chat=False)
    if max_tokens is None:
        max_tokens = 16  # vLLM's CompletionRequest default, like OpenAI's
    stream, include, continuous = engine.stream_flags(body)
    counts: list[int] = []
    choices: list[Choice] = []
    for p_index, prompt in enumerate(prompts):
        tokens = engine.prompt_tokens(prompt)
        counts.append(tokens)
        budget = engine.completion_budget(
            prompt=tokens, max_tokens=max_tokens, max_model_len=max_model_len, where="prompt"
        )
        seed = prompt if isinstance(prompt, str) else dumps(prompt)
        for i in range(n):
            gen = engine.generate(
                model=model, seed_text=f"{seed}#{i}", max_tokens=budget, ignore_eos=ignore_eos, min_tokens=min_tokens
            )
            choices.append(Choice(index=p_index * n + i, prompt=tokens, generation=gen))
    return Job("completion", model, counts, choices, stream, include, continuous)


# --- full responses -----------------------------------------------------------------------------------------


def full_response(job: Job) -> str:
    use = engine.usage(job.prompt_tokens, job.completion_tokens)
    if job.kind == "chat":
        chat_choices: list[dict[str, Any]] = [
            {
                "index": c.index,
                "message": {
                    "role": "assistant",
                    "reasoning_content": None,
                    "content": c.generation.text,
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": c.generation.finish_reason,
                "stop_reason": None,
            }
            for c in job.choices
        ]
        return dumps(
            {
                "id": f"chatcmpl-{job.request_id}",
                "object": "chat.completion",
                "created": job.created,
                "model": job.model,
                "choices": chat_choices,
                "usage": use,
                "prompt_logprobs": None,
            }
        )
    text_choices = [
        {
            "index": c.index,
            "text": c.generation.text,
            "logprobs": None,
            "finish_reason": c.generation.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        for c in job.choices
    ]
    return dumps(
        {
            "id": f"cmpl-{job.request_id}",
            "object": "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": text_choices,
            "usage": use,
        }
    )


# --- streaming ----------------------------------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> str:
    return f"data: {dumps(payload)}\n\n"


def stream_steps(job: Job) -> Iterator[str]:
    """One string per generation step (step 0 carries the role chunks and the first tokens; each later step one
    more token per unfinished choice), then the final usage chunk (if asked for) and ``[DONE]`` as one step."""
    chat = job.kind == "chat"
    head: dict[str, Any] = (
        {
            "id": f"chatcmpl-{job.request_id}",
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": job.model,
        }
        if chat
        else {"id": f"cmpl-{job.request_id}", "object": "text_completion", "created": job.created, "model": job.model}
    )
    for step in range(job.steps):
        out: list[str] = []
        for c in job.choices:
            tokens = c.generation.tokens
            if step >= len(tokens):
                continue
            if chat and step == 0:
                role = {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                out.append(_event(_chunk(head, role, job=job, prompt=c.prompt, done=0, chat=chat)))
            last = step == len(tokens) - 1
            out.append(
                _event(
                    _chunk(
                        head, _choice(c, step, last=last, chat=chat), job=job, prompt=c.prompt, done=step + 1, chat=chat
                    )
                )
            )
        yield "".join(out)
    tail = ""
    if job.include_usage:
        final = {**head, "choices": [], "usage": engine.usage(job.prompt_tokens, job.completion_tokens, details=False)}
        tail = _event(final)
    yield tail + "data: [DONE]\n\n"


def _choice(c: Choice, step: int, *, last: bool, chat: bool) -> dict[str, Any]:
    token = c.generation.tokens[step]
    finish = c.generation.finish_reason if last else None
    if chat:
        out: dict[str, Any] = {"index": c.index, "delta": {"content": token}, "logprobs": None, "finish_reason": finish}
        if last:
            out["stop_reason"] = None
        return out
    return {"index": c.index, "text": token, "logprobs": None, "finish_reason": finish, "stop_reason": None}


def _chunk(
    head: dict[str, Any], choice: dict[str, Any], *, job: Job, prompt: int, done: int, chat: bool
) -> dict[str, Any]:
    chunk = {**head, "choices": [choice]}
    if job.continuous:
        chunk["usage"] = engine.usage(prompt, done, details=not chat)
    elif not chat:
        chunk["usage"] = None
    return chunk


# --- embeddings and models ----------------------------------------------------------------------------------


def embeddings_response(body: dict[str, Any], *, served: tuple[str, ...], max_model_len: int, dimensions: int) -> str:
    model = _model(body, served)
    raw = body.get("input")
    messages = body.get("messages")
    if raw is None and isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        # vLLM's EmbeddingChatRequest: a request without an input (or a null one) embeds its rendered messages
        items = [(dumps(messages), engine.chat_prompt_tokens(messages))]
        return _embedding_answer(model, items, body, dimensions=dimensions, max_model_len=max_model_len)
    try:
        inputs = _prompts(raw)
    except SimRequestError as exc:
        raise SimRequestError(
            "input must be a string, a list of strings or a list of token ids", param="input"
        ) from exc
    items = [(item if isinstance(item, str) else dumps(item), engine.prompt_tokens(item)) for item in inputs]
    return _embedding_answer(model, items, body, dimensions=dimensions, max_model_len=max_model_len)


def _embedding_answer(
    model: str, items: list[tuple[str, int]], body: dict[str, Any], *, dimensions: int, max_model_len: int
) -> str:
    """One vector per (text, prompt tokens) item; an item over ``max_model_len`` is vLLM's 400."""
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise SimRequestError("encoding_format must be 'float' or 'base64'", param="encoding_format")
    dims = engine.int_param(body, "dimensions", minimum=1) or dimensions
    data = []
    total = 0
    for index, (text, tokens) in enumerate(items):
        if tokens > max_model_len:
            raise SimRequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{tokens} tokens in the input for embedding generation. Please reduce the length of the input.",
                param="input",
            )
        total += tokens
        vector = engine.embedding(model=model, text=text, dimensions=dims)
        data.append({"index": index, "object": "embedding", "embedding": engine.encode_embedding(vector, str(fmt))})
    return dumps(
        {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": engine.usage(total, 0),
        }
    )


def models_response(served: tuple[str, ...], *, max_model_len: int, created: int) -> str:
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in served
    ]
    return dumps({"object": "list", "data": data})
