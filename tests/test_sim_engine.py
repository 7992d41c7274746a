"""Unit tests of the simulator's model: determinism, max_tokens, usage consistency, vLLM errors."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from gateway.sim import api, engine
from gateway.sim.engine import SimRequestError

SERVED = ("m", "other")
CHAT = [{"role": "user", "content": "tell me about quotas"}]


def chat(**body: object) -> api.Job:
    return api.parse_chat({"model": "m", "messages": CHAT, **body}, served=SERVED, max_model_len=200)


def test_generation_is_deterministic_and_honours_max_tokens() -> None:
    assert chat().choices[0].generation == chat().choices[0].generation
    natural = chat().choices[0].generation
    assert natural.finish_reason == "stop" and engine.NATURAL_MIN <= len(natural.tokens) < 64
    short = chat(max_tokens=3).choices[0].generation
    assert short.tokens == natural.tokens[:3] and short.finish_reason == "length"
    assert len(chat(max_completion_tokens=2, max_tokens=9).choices[0].generation.tokens) == 2
    long = chat(max_tokens=150, ignore_eos=True).choices[0].generation
    assert len(long.tokens) == 150 and long.finish_reason == "length"


def test_streamed_text_and_usage_match_the_full_response() -> None:
    job = chat(n=2, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    events = [
        json.loads(line[6:]) for line in "".join(api.stream_steps(job)).split("\n\n") if line.startswith("data: {")
    ]
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get("content", "")
    assert texts == {c.index: c.generation.text for c in job.choices}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == job.completion_tokens
    assert events[-1]["usage"]["prompt_tokens"] == engine.chat_prompt_tokens(CHAT)
    full = json.loads(api.full_response(chat(n=2)))
    assert full["usage"]["completion_tokens"] == job.completion_tokens


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        pytest.param({"model": "nope", "messages": CHAT}, 404, "model", id="unknown-model"),
        pytest.param({"model": "m", "messages": []}, 400, "messages", id="no-messages"),
        pytest.param({"model": "m", "messages": CHAT, "max_tokens": 500}, 400, None, id="context-too-long"),
        pytest.param(
            {"model": "m", "messages": CHAT, "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            id="options-no-stream",
        ),
        pytest.param({"model": "m", "messages": CHAT, "max_tokens": "5"}, 400, "max_tokens", id="max-tokens-type"),
        pytest.param({"model": "m", "messages": CHAT, "n": 1_000_000}, 400, "n", id="a-million-choices"),
        pytest.param(
            {"model": "m", "messages": CHAT, "max_tokens": 5, "min_tokens": 9}, 400, "min_tokens", id="min-over-max"
        ),
    ],
)
def test_vllm_refusals(body: dict[str, object], status: int, param: str | None) -> None:
    with pytest.raises(SimRequestError) as caught:
        api.parse_chat(body, served=SERVED, max_model_len=200)
    assert (caught.value.status, caught.value.param) == (status, param)
    error = json.loads(engine.error_body(str(caught.value), status=status, param=param))["error"]
    assert error["code"] == status


def test_completions_batch_and_token_id_prompts() -> None:
    job = api.parse_completion({"model": "m", "prompt": ["a b", "c"], "n": 2}, served=SERVED, max_model_len=100)
    assert [c.index for c in job.choices] == [0, 1, 2, 3] and job.prompts == [2, 1]
    ids = api.parse_completion({"prompt": [5, 6, 7], "max_tokens": 2}, served=SERVED, max_model_len=100)
    assert ids.prompt_tokens == 3 and ids.model == "m" and ids.completion_tokens == 2


def test_embeddings_are_deterministic_unit_vectors_in_float_or_base64() -> None:
    plain = json.loads(
        api.embeddings_response({"model": "m", "input": ["x", "y"]}, served=SERVED, max_model_len=9, dimensions=8)
    )
    vector = plain["data"][0]["embedding"]
    assert len(vector) == 8 and abs(sum(v * v for v in vector) - 1) < 1e-3
    packed = json.loads(
        api.embeddings_response(
            {"model": "m", "input": "x", "encoding_format": "base64"}, served=SERVED, max_model_len=9, dimensions=8
        )
    )
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)
    assert plain["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 2,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
