"""Requests a key's holder could shape to get more from the model server than its token bucket paid for at
admission: each is reserved for what vLLM makes of it, or refused with a 400 naming the field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from gateway.contract import ledger_day
from gateway.meter.estimate import Estimator
from tests.test_meter_quota import wait_until_settled
from tests.test_meter_stack import CHAT, MODEL, raw_post, running_stack

pytestmark = pytest.mark.redis

EMBEDS = base64.b64encode(b"PK\x03\x04 a torch.save()d tensor").decode()
"""What a client sends as ``prompt_embeds`` (base64 of ``torch.save``), which vLLM loads with
``--enable-prompt-embeds`` (``OpenAIServing._load_prompt_embeds``): its length is known only once loaded."""
TEMPLATE = "{% for _ in range(100000) %}tokens {% endfor %}"
"""A few bytes that a chat template renders into a prompt of 100,000 words."""


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        # vLLM (serving_engine._tokenize_prompt_input_or_inputs) makes every tensor a prompt of its own, before the
        # text prompts: 50 of them generate 50 completions of max_tokens, the meter had reserved for the one prompt
        pytest.param(
            "/v1/completions",
            {"prompt": "Once", "prompt_embeds": [EMBEDS] * 50, "max_tokens": 16},
            "prompt_embeds",
            id="completion-prompt-embeds",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"messages": CHAT, "chat_template": TEMPLATE, "max_tokens": 5},
            "chat_template",
            id="chat-template",
        ),
        # vLLM merges chat_template_kwargs into the template's arguments: its chat_template replaces the template
        pytest.param(
            "/v1/chat/completions",
            {"messages": CHAT, "chat_template_kwargs": {"chat_template": TEMPLATE}, "max_tokens": 5},
            "chat_template",
            id="chat-template-in-kwargs",
        ),
        pytest.param(
            "/v1/embeddings", {"messages": CHAT, "chat_template": TEMPLATE}, "chat_template", id="embeddings-template"
        ),
    ],
)
async def test_a_prompt_the_meter_cannot_bound_is_refused_before_anything_is_reserved(
    redis_url: str, path: str, body: dict[str, Any], param: str
) -> None:
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="unbounded", limit=(1000, 86_400_000)), "content-type": "application/json"}
        status, _, raw = await raw_post(stack.meter_url + path, {"model": MODEL, **body}, headers)
        metrics = await wait_until_settled(stack)
        rows = await stack.store.read_usage("unbounded", [ledger_day()])
    error = json.loads(raw)["error"]
    assert (status, error["code"], error["param"]) == (400, "invalid_request", param)
    assert metrics[("maas_meter_rejected_total", (("reason", "invalid_request"),))] == 1
    assert metrics[("maas_meter_reservations_total", (("outcome", "granted"),))] == 0 and rows == []


async def test_embeddings_of_messages_with_a_null_input_are_reserved_for_the_messages(redis_url: str) -> None:
    """vLLM reads an embeddings request whose ``input`` is null as a chat one (``EmbeddingChatRequest``) and embeds
    the messages; the meter had estimated the null input (a few tokens) and reserved that."""
    messages = [{"role": "user", "content": " ".join(["metering"] * 60)}]
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="emb-chat", limit=(1000, 86_400_000)), "content-type": "application/json"}
        body = {"model": MODEL, "input": None, "messages": messages}
        status, answer_headers, raw = await raw_post(stack.meter_url + "/v1/embeddings", body, headers)
        await wait_until_settled(stack)
    served = json.loads(raw)["usage"]["prompt_tokens"]
    assert status == 200 and served > 60
    assert int(answer_headers["x-ratelimit-remaining-tokens"]) <= 1000 - served  # the reservation paid for it


async def test_chat_best_of_is_reserved_for_every_sequence_vllm_generates(redis_url: str) -> None:
    """vLLM's chat request takes ``best_of`` as its completion request does (``ChatCompletionRequest.best_of``, passed
    to ``SamplingParams``: V0 engines generate ``best_of`` sequences and return ``n``): the meter refused it, and with
    ``--unknown-fields allow`` passed it on reserved for ``n`` sequences only."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 100, "n": 1, "best_of": 4, "ignore_eos": True}
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="chat-best", limit=(300, 600_000)), "content-type": "application/json"}
        status, answer_headers, raw = await raw_post(stack.meter_url + "/v1/chat/completions", body, headers)
        await wait_until_settled(stack)
    per_sequence = (300 - Estimator().prompt_tokens("chat", body)) // 4
    assert status == 200 and per_sequence < 100
    assert answer_headers["x-maas-max-tokens-clamped"] == str(per_sequence)
    assert json.loads(raw)["usage"]["completion_tokens"] == per_sequence
