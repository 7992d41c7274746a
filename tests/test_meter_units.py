"""Unit tests of the meter's pure parts: estimator, request parsing and rewriting, SSE usage handling, errors."""

from __future__ import annotations

import argparse
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.meter import errors, quota
from gateway.meter import request as req
from gateway.meter.estimate import Estimator
from gateway.meter.settings import MeterSettings
from gateway.meter.sse import Splitter, StreamMeter, Usage, find_usage, response_usage
from gateway.settings import load
from gateway.sim import api, engine
from gateway.sim import main as sim_main

EST = Estimator()


def parse(body: object, kind: req.Kind = "chat", *, allow_unknown: bool = False) -> req.Parsed:
    return req.parse(json.dumps(body).encode(), kind=kind, estimator=EST, allow_unknown=allow_unknown)


# --- estimator ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([{"role": "user", "content": "hello there, how are you?"}], id="ascii"),
        pytest.param([{"role": "user", "content": "a b c d e f g h"}], id="one-letter-words"),
        pytest.param([{"role": "user", "content": "日本語のテキスト、とても長い文章です。"}], id="cjk"),
        pytest.param(
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "what is 2+2?"}]},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "!!!???...", "name": "bob"},
            ],
            id="multi-turn-parts",
        ),
    ],
)
def test_estimate_bounds_the_simulators_count_from_above(messages: list[dict[str, object]]) -> None:
    estimate = EST.prompt_tokens("chat", {"messages": messages})
    assert estimate >= engine.chat_prompt_tokens(messages)


def test_estimate_counts_token_ids_exactly_and_scales_with_bytes_per_token() -> None:
    assert EST.prompt_tokens("completion", {"prompt": [1, 2, 3, 4]}) == 4 + EST.overhead
    assert EST.prompt_tokens("completion", {"prompt": [[1, 2], [3]]}) == 3 + 2 * EST.overhead
    assert EST.prompt_tokens("embeddings", {"input": ["abcd", "ef"]}) == 6 + 2 * EST.overhead
    assert Estimator(bytes_per_token=4.0, overhead=0).prompt_tokens("completion", {"prompt": "x" * 10}) == 3
    with_tools = EST.prompt_tokens("chat", {"messages": [], "tools": [{"type": "function"}]})
    assert with_tools > EST.prompt_tokens("chat", {"messages": []})


# --- request parsing ----------------------------------------------------------------------------------------


def test_parse_reads_what_the_meter_acts_on() -> None:
    parsed = parse(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "n": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert (parsed.model, parsed.max_tokens, parsed.choices, parsed.stream) == ("m", 20, 3, True)
    assert parsed.want_usage and not parsed.want_continuous
    batch = parse({"prompt": ["a", "b"], "n": 2}, "completion")
    assert batch.choices == 4
    assert req.wanted_completion(batch, default_max_tokens=999) == req.COMPLETIONS_DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    ("raw", "error", "param"),
    [
        pytest.param(b"{not json", errors.InvalidJson, None, id="invalid-json"),
        pytest.param(b"[1, 2]", errors.InvalidJson, None, id="not-an-object"),
        pytest.param(
            b'{"messages": [], "max_tokens": "10"}', errors.InvalidRequest, "max_tokens", id="max-tokens-string"
        ),
        pytest.param(b'{"messages": [], "max_tokens": 0}', errors.InvalidRequest, "max_tokens", id="max-tokens-zero"),
        pytest.param(b'{"messages": [], "n": 1000}', errors.InvalidRequest, "n", id="too-many-choices"),
        pytest.param(b'{"messages": [], "stream": "yes"}', errors.InvalidRequest, "stream", id="stream-string"),
        pytest.param(b'{"messages": [], "model": 7}', errors.InvalidRequest, "model", id="model-number"),
        pytest.param(b'{"messages": [], "stream_options": 1}', errors.InvalidRequest, "stream_options", id="options"),
        pytest.param(b'{"messages": [], "bogus": 1}', errors.UnknownParameter, "bogus", id="unknown-field"),
    ],
)
def test_parse_rejects_bad_input(raw: bytes, error: type[errors.MeterError], param: str | None) -> None:
    with pytest.raises(error) as caught:
        req.parse(raw, kind="chat", estimator=EST, allow_unknown=False)
    assert caught.value.param == param
    body = json.loads(caught.value.body())
    assert body["error"]["code"] == error.code and 400 <= error.status < 500


@pytest.mark.parametrize(
    ("best_of", "message"),
    [
        pytest.param(1, "greater than or equal to n", id="fewer-than-n"),
        pytest.param("4", "must be an integer", id="string"),
        pytest.param(True, "must be an integer", id="bool"),
        pytest.param(0, "at least 1", id="zero"),
        pytest.param(req.MAX_CHOICES + 1, "at most", id="too-many"),
    ],
)
def test_best_of_must_be_an_integer_of_at_least_n(best_of: object, message: str) -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        parse({"prompt": "x", "n": 2, "best_of": best_of}, "completion")
    assert caught.value.param == "best_of" and message in str(caught.value)
    assert json.loads(caught.value.body())["error"]["param"] == "best_of"


def test_best_of_sequences_are_reserved_and_n_choices_returned() -> None:
    batch = parse({"prompt": ["a", "b"], "n": 2, "best_of": 3}, "completion")
    assert (batch.choices, batch.sequences, batch.n) == (4, 6, 2)
    assert parse({"prompt": "a", "n": 2, "best_of": None}, "completion").sequences == 2
    assert parse({"messages": [], "n": 2}).sequences == 2
    assert parse({"messages": [], "n": 2, "best_of": 5}).sequences == 5  # vLLM's chat request takes it too
    assert parse({"input": "a"}, "embeddings").sequences == 0


def test_unknown_fields_pass_when_allowed_and_vllm_extras_are_known() -> None:
    assert parse({"messages": [], "bogus": 1}, allow_unknown=True).body["bogus"] == 1
    assert parse({"messages": [], "top_k": 5, "ignore_eos": True, "chat_template_kwargs": {}}).body["top_k"] == 5


def test_upstream_body_is_untouched_unless_the_meter_must_change_it() -> None:
    raw = b'{"model": "m", "messages": [], "max_tokens": 5}'
    parsed = req.parse(raw, kind="chat", estimator=EST, allow_unknown=False)
    assert req.upstream_body(raw, parsed, max_tokens=5, inject_usage=False) is raw
    assert req.upstream_body(raw, parsed, max_tokens=5, inject_usage=False, model="routed") is raw  # it names one
    unnamed = parse({"messages": [], "max_tokens": 5})
    assert json.loads(req.upstream_body(b"", unnamed, max_tokens=5, inject_usage=False, model="routed")) == {
        "messages": [],
        "max_tokens": 5,
        "model": "routed",
    }
    clamped = json.loads(req.upstream_body(raw, parsed, max_tokens=3, inject_usage=False))
    assert clamped["max_tokens"] == 3
    newer = parse(
        {"messages": [], "max_completion_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
    )
    out = json.loads(req.upstream_body(b"", newer, max_tokens=4, inject_usage=newer.can_inject_usage))
    assert out["max_completion_tokens"] == 4 and "max_tokens" not in out
    assert out["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_completion_limit_the_body_holds_is_the_one_the_meter_sets(kind: req.Kind) -> None:
    """vLLM up to 0.10 obeys ``max_completion_tokens or max_tokens`` on completions too (``get_max_tokens`` reads the
    newer field with ``getattr``, which finds an unknown field pydantic kept): with ``--unknown-fields allow`` a
    completion's ``max_completion_tokens`` went upstream unread and unclamped, the clamp only on ``max_tokens``."""
    body = {"prompt": "x", "messages": [], "max_tokens": 10, "max_completion_tokens": 500}
    parsed = parse(body, kind, allow_unknown=True)
    assert parsed.max_tokens == 500  # what is reserved for: what vLLM obeys
    for enforced in (500, 40, 5):  # (never raised: a field below the limit stays as the client wrote it)
        sent = json.loads(req.upstream_body(b"", parsed, max_tokens=enforced, inject_usage=False) or b"{}")
        assert (sent.get("max_tokens", 10), sent.get("max_completion_tokens", 500)) == (min(10, enforced), enforced)


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        pytest.param({"prompt": "x", "prompt_embeds": "AAAA"}, "completion", "prompt_embeds", id="prompt-embeds"),
        pytest.param({"prompt_embeds": ["AAAA", "BBBB"]}, "completion", "prompt_embeds", id="prompt-embeds-only"),
        pytest.param({"messages": [], "chat_template": "{{ 1 }}"}, "chat", "chat_template", id="chat-template"),
        pytest.param(
            {"messages": [], "chat_template_kwargs": {"chat_template": "x"}}, "chat", "chat_template", id="in-kwargs"
        ),
        pytest.param({"messages": [], "chat_template": "x"}, "embeddings", "chat_template", id="embeddings"),
    ],
)
def test_a_prompt_the_meter_cannot_bound_is_refused(body: dict[str, object], kind: req.Kind, param: str) -> None:
    for allow_unknown in (False, True):
        with pytest.raises(errors.InvalidRequest) as caught:
            parse(body, kind, allow_unknown=allow_unknown)
        assert caught.value.param == param
    assert parse({"messages": [], "chat_template_kwargs": {"enable_thinking": False}}).body["chat_template_kwargs"]


def test_embeddings_with_a_null_input_are_estimated_by_their_messages() -> None:
    messages = [{"role": "user", "content": "word " * 50}]
    chat = EST.prompt_tokens("chat", {"messages": messages})
    assert EST.prompt_tokens("embeddings", {"input": None, "messages": messages}) == chat
    assert EST.prompt_tokens("embeddings", {"messages": messages}) == chat
    assert EST.prompt_tokens("embeddings", {"input": "hi", "messages": messages}) < chat  # vLLM embeds the input


def test_reservation_plan_needs_one_token_per_choice_beyond_the_prompt() -> None:
    assert quota.plan(prompt_estimate=30, choices=2, wanted=100) == (230, 32)
    assert quota.plan(prompt_estimate=30, choices=0, wanted=0) == (30, 30)  # embeddings: all or nothing


# --- SSE ----------------------------------------------------------------------------------------------------


def test_splitter_reassembles_events_cut_anywhere() -> None:
    stream = b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        splitter = Splitter()
        events = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert b"".join(events) == stream and len(events) == 3 and splitter.pending == b""


def _reference_events(stream: bytes) -> tuple[list[bytes], bytes]:
    """Events cut the slow, obvious way: the earliest terminator, searched from scratch after every cut."""
    events, start = [], 0
    while True:
        found = [(at, len(t)) for t in (b"\n\n", b"\r\n\r\n") if (at := stream.find(t, start)) >= 0]
        if not found:
            return events, stream[start:]
        at, length = min(found)
        events.append(stream[start : at + length])
        start = at + length


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.sampled_from([b"data: x", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r", b"y"]), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=5),
)
def test_splitter_cuts_any_stream_in_any_pieces_like_the_reference(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    splitter = Splitter()
    events: list[bytes] = []
    last = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        events += splitter.feed(stream[last:cut])
        last = cut
    assert (events, splitter.pending) == _reference_events(stream)


def test_splitter_bounds_a_runaway_event() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Splitter(max_event_bytes=1024).feed(b"data: " + b"x" * 2000)


def _sim_stream(*, chat: bool, include: bool, continuous: bool, n: int = 1, prompts: int = 1) -> list[bytes]:
    body: dict[str, object] = {"model": "m", "max_tokens": 4, "n": n, "stream": True}
    if include or continuous:
        body["stream_options"] = {"include_usage": include, "continuous_usage_stats": continuous}
    if chat:
        body["messages"] = [{"role": "user", "content": "hello world"}]
        job = api.parse_chat(body, served=("m",), max_model_len=100)
    else:
        body["prompt"] = ["hello world" * (i + 1) for i in range(prompts)] if prompts > 1 else "hello world"
        job = api.parse_completion(body, served=("m",), max_model_len=100)
    job.request_id, job.created = "fixed", 1
    text = "".join(api.stream_steps(job)).encode()
    return Splitter().feed(text)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
@pytest.mark.parametrize(("include", "continuous"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("n", [1, 2])
def test_stream_meter_gives_the_client_what_vllm_would_send(
    chat: bool, include: bool, continuous: bool, n: int
) -> None:
    upstream = _sim_stream(chat=chat, include=True, continuous=True, n=n)
    expected = _sim_stream(chat=chat, include=include, continuous=continuous, n=n)
    meter = StreamMeter(want_usage=include, want_continuous=continuous, null_usage=not chat, per_prompt=n)
    assert b"".join(meter.event(e) for e in upstream) == b"".join(expected)
    assert meter.done
    final = json.loads(upstream[-2][6:])["usage"]
    assert meter.usage() == Usage(final["prompt_tokens"], final["completion_tokens"])


def test_stream_meter_usage_mid_stream_is_what_was_forwarded() -> None:
    events = _sim_stream(chat=True, include=True, continuous=True, n=2)
    meter = StreamMeter(want_usage=False, want_continuous=False, null_usage=False, per_prompt=2)
    for event in events[:5]:  # two role chunks, then first tokens of both choices, then one more
        meter.event(event)
    assert meter.usage().completion == 3
    assert meter.usage().prompt == engine.chat_prompt_tokens([{"role": "user", "content": "hello world"}])


@pytest.mark.parametrize("n", [1, 2])
def test_stream_meter_usage_mid_stream_counts_every_prompt_of_a_completion(n: int) -> None:
    """A completion request with several prompts: each prompt's choices report that prompt's own count, so a
    stream cut short is charged the sum over the prompts (it was charged the largest one alone)."""
    events = _sim_stream(chat=False, include=True, continuous=True, n=n, prompts=3)
    final = json.loads(events[-2].removeprefix(b"data: "))["usage"]
    meter = StreamMeter(want_usage=False, want_continuous=False, null_usage=True, per_prompt=n)
    for event in events[:-2]:  # everything but the final usage chunk and [DONE]: a client that left just before
        meter.event(event)
    assert meter.final is None
    assert meter.usage() == Usage(final["prompt_tokens"], final["completion_tokens"])


def test_usage_is_found_in_raw_bytes_and_falls_back_on_odd_layouts() -> None:
    chunk = b'{"id":"x","choices":[{"index":0}],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}'
    found = find_usage(chunk)
    assert found is not None and found.usage == Usage(3, 2)
    spaced = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "id": "x"}'
    odd = find_usage(spaced)
    assert odd is not None and odd.usage == Usage(1, 1)
    assert find_usage(b'{"id":"x","usage":null}') is None
    body = (
        b'{"choices":[{"message":{"content":"say \\"usage\\": 5"}}],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":1},"x":null}'
    )
    assert response_usage(body) == Usage(7, 1)


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "raw", "code", "message"),
    [
        pytest.param(
            404,
            b'{"error":{"message":"nope","type":"NotFoundError","param":null,"code":404}}',
            "not_found",
            "nope",
            id="vllm",
        ),
        pytest.param(
            400,
            b'{"object":"error","message":"bad","type":"BadRequestError","code":400}',
            "bad_request",
            "bad",
            id="old-vllm",
        ),
        pytest.param(502, b"<html>gateway</html>", "bad_gateway", "<html>gateway</html>", id="html"),
        pytest.param(500, b"", "internal_server_error", "Internal Server Error", id="empty"),
    ],
)
def test_upstream_errors_are_normalised_to_the_openai_envelope(
    status: int, raw: bytes, code: str, message: str
) -> None:
    error = json.loads(errors.normalise_upstream_error(status, raw))["error"]
    assert error["code"] == code and error["message"] == message and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b'{"error": {"message": "x", "type": "InternalServerError", "code": 500}}', 500, id="vllm"),
        pytest.param(b'{"object":"error","message":"x","type":"BadRequestError","code":400}', 400, id="old-vllm"),
        pytest.param(b'{"error": {"message": "x", "code": "upstream_error"}}', 502, id="string-code"),
        pytest.param(b'{"error": {"message": "x", "code": true}}', 502, id="bool-code"),
        pytest.param(b'{"error": {"message": "x", "code": 200}}', 502, id="not-an-error-status"),
        pytest.param(b'{"error": "x"}', 502, id="no-object"),
        pytest.param(b'{"error": ', 502, id="malformed"),
    ],
)
def test_a_streamed_error_event_stands_for_its_code_or_502(raw: bytes, status: int) -> None:
    assert errors.stream_error_status(raw) == status
    meter = StreamMeter(want_usage=False, want_continuous=False, null_usage=False, per_prompt=1)
    assert meter.event(b"data: " + raw + b"\n\n") == b"data: " + raw + b"\n\n"
    assert meter.error_status == status


# --- settings -----------------------------------------------------------------------------------------------


def test_meter_settings_name_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="--upstream / MAAS_UPSTREAM"):
        load(MeterSettings, identity_secret="s" * 16)
    with pytest.raises(ConfigError, match="identity_secret is required"):
        load(MeterSettings, upstream="http://vllm:8080")
    with pytest.raises(ConfigError, match="http"):
        load(MeterSettings, upstream="vllm:8080", dev=True, key_pepper=None)
    assert load(MeterSettings, upstream="http://vllm:8080/", dev=True, key_pepper=None).upstream == "http://vllm:8080"


def test_sim_served_model_names_from_repeated_flags_or_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = argparse.ArgumentParser()
    sim_main.configure(parser)
    args = parser.parse_args(["--served-model-name", "a", "--served-model-name", "b", "--ttft-ms", "5"])
    settings = load(sim_main.SimSettings, args)  # type: ignore[type-var]
    assert (settings.served_model_name, settings.ttft_ms) == (("a", "b"), 5.0)
    monkeypatch.setenv("MAAS_SERVED_MODEL_NAME", "x, y")
    assert load(sim_main.SimSettings).served_model_name == ("x", "y")  # type: ignore[type-var]


def test_stream_meter_reads_an_upstream_that_writes_spaced_json() -> None:
    """The final usage chunk and the choice index were found only in compact JSON: an upstream writing
    ``"choices": []`` got that chunk forwarded, stripped, to a client that never asked for usage, and every choice
    of a cut stream counted as choice 0."""
    events = [
        json.loads(e[6:]) if e.startswith(b"data: {") else e
        for e in _sim_stream(chat=True, include=True, continuous=True, n=2)
    ]
    spaced = [b"data: " + json.dumps(e).encode() + b"\n\n" if isinstance(e, dict) else e for e in events]
    meter = StreamMeter(want_usage=False, want_continuous=False, null_usage=False, per_prompt=2)
    out = [meter.event(e) for e in spaced[:-2]]  # all but the final usage chunk and [DONE]
    assert meter.usage() == Usage(events[-2]["usage"]["prompt_tokens"], events[-2]["usage"]["completion_tokens"])
    assert all(b'"usage"' not in o or b'"usage": null' in o for o in out)
    assert meter.event(spaced[-2]) == b"" and meter.final is not None  # usage not asked for: dropped
