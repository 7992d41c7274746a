"""HTTPRoute -> route table entries, table-tested."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import kinds
from controlplane.errors import NotServed, TranslateError
from controlplane.kinds import key_of
from controlplane.translate.httproute import translate_route
from gateway.contract import RecordKind
from tests.support.desired import desired_over

SEED = Path(__file__).parent / "fixtures" / "seed"
ROUTE: dict[str, Any] = yaml.safe_load((SEED / "05-model-routing.yaml").read_text())
MODELS = {("llm", "qwen3-0-6b-instruct"): "qwen3-0-6b-instruct", ("llm", "granite-code"): "granite"}


def _route(*, hostnames: list[str] | None = None, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    obj = copy.deepcopy(ROUTE)
    if hostnames is not None:
        obj["spec"]["hostnames"] = hostnames
    if rules is not None:
        obj["spec"]["rules"] = rules
    return obj


def _rule(
    prefix: str | None, backend: str, *, rewrite: str | None = None, match_type: str = "PathPrefix"
) -> dict[str, Any]:
    rule: dict[str, Any] = {"backendRefs": [{"name": backend, "port": 80}]}
    if prefix is not None:
        rule["matches"] = [{"path": {"type": match_type, "value": prefix}}]
    if rewrite is not None:
        rule["filters"] = [
            {
                "type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": rewrite}},
            }
        ]
    return rule


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        pytest.param(
            ROUTE,
            [("*|/qwen3", "qwen3-0-6b-instruct", "/", "qwen3-0-6b-instruct-predictor.llm:80")],
            id="seed-qwen-route",
        ),
        pytest.param(
            _route(
                hostnames=["qwen3.maas.local", "api.maas.local"], rules=[_rule(None, "qwen3-0-6b-instruct-predictor")]
            ),
            [
                ("qwen3.maas.local|/", "qwen3-0-6b-instruct", None, "qwen3-0-6b-instruct-predictor.llm:80"),
                ("api.maas.local|/", "qwen3-0-6b-instruct", None, "qwen3-0-6b-instruct-predictor.llm:80"),
            ],
            id="host-based-no-match",
        ),
        pytest.param(
            _route(
                rules=[
                    _rule("/granite", "granite-code-predictor", rewrite="/v1"),
                    _rule("/qwen3", "qwen3-0-6b-instruct"),
                ]
            ),
            [
                ("*|/granite", "granite", "/v1", "granite-code-predictor.llm:80"),
                ("*|/qwen3", "qwen3-0-6b-instruct", None, "qwen3-0-6b-instruct.llm:80"),
            ],
            id="two-rules-rewrite-to-v1-and-bare-isvc-service",
        ),
        pytest.param(_route(rules=[_rule("/x", "unrelated-service")]), [], id="service-without-model"),
        pytest.param(
            _route(rules=[_rule("/exact", "granite-code-predictor", match_type="Exact")]), [], id="exact-match-ignored"
        ),
        pytest.param(_route(rules=[]), [], id="no-rules"),
    ],
)
def test_routes(route: dict[str, Any], expected: list[tuple[str, str, str | None, str]]) -> None:
    records = translate_route(route, models_by_isvc=MODELS)
    assert [(r.id, r.model, r.rewrite, r.backend) for r in records] == expected


def test_backend_in_other_namespace() -> None:
    rule = _rule("/q", "qwen3-0-6b-instruct-predictor")
    rule["backendRefs"][0]["namespace"] = "models"
    route = _route(rules=[rule])
    assert translate_route(route, models_by_isvc={("models", "qwen3-0-6b-instruct"): "q"})[0].model == "q"
    assert translate_route(route, models_by_isvc=MODELS) == []


@pytest.mark.parametrize(
    "route",
    [
        pytest.param({**ROUTE, "spec": None}, id="no-spec"),
        pytest.param(_route(rules=[_rule("qwen3", "granite-code-predictor")]), id="relative-path"),
    ],
)
def test_invalid_routes(route: dict[str, Any]) -> None:
    with pytest.raises(TranslateError):
        translate_route(route, models_by_isvc=MODELS)


GATEWAYS = frozenset({"kuadrant-gateway"})


def test_a_route_of_another_gateway_does_not_count() -> None:
    """maas authz guards one gateway's paths: an HTTPRoute attached only to another must not stand for them (an
    older route of an internal gateway had won /code over the guarded gateway's own route)."""
    other = _route(rules=[_rule("/code", "granite-code-predictor")])
    other["spec"]["parentRefs"] = [{"name": "internal-gateway"}]
    with pytest.raises(TranslateError) as info:
        translate_route(other, models_by_isvc=MODELS, gateways=GATEWAYS)
    assert info.value.reason == "other_gateway"
    other["spec"]["parentRefs"] = [{"name": "internal-gateway"}, {"name": "kuadrant-gateway", "namespace": "gw"}]
    assert translate_route(other, models_by_isvc=MODELS, gateways=GATEWAYS)
    assert translate_route(other, models_by_isvc=MODELS, gateways=frozenset({"gw/kuadrant-gateway"}))
    with pytest.raises(TranslateError):  # the seed route's parentRef has no namespace: the route's own, llm
        translate_route(_route(), models_by_isvc=MODELS, gateways=frozenset({"x/kuadrant-gateway"}))
    assert translate_route(_route(), models_by_isvc=MODELS, gateways=frozenset({"llm/kuadrant-gateway"}))
    del other["spec"]["parentRefs"]
    assert translate_route(other, models_by_isvc=MODELS, gateways=GATEWAYS)  # none given: counts


def test_weights_and_header_matches_that_split_a_path_between_models_are_refused() -> None:
    """authz checks host and path only: a path whose traffic goes to two models would be checked against the
    first one's allow-list (a granite-only key was admitted to mistral)."""
    split = _route(
        rules=[
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/code"}}],
                "backendRefs": [
                    {"name": "qwen3-0-6b-instruct-predictor", "port": 80, "weight": 0},
                    {"name": "granite-code-predictor", "port": 80, "weight": 100},
                ],
            }
        ]
    )
    [only] = translate_route(split, models_by_isvc=MODELS)
    assert only.model == "granite"  # weight 0 gets no traffic
    split["spec"]["rules"][0]["backendRefs"][0]["weight"] = 1
    with pytest.raises(TranslateError) as info:
        translate_route(split, models_by_isvc=MODELS)
    assert info.value.reason == "ambiguous_backend"
    by_header = _route(rules=[_rule("/v1", "granite-code-predictor"), _rule("/v1", "qwen3-0-6b-instruct-predictor")])
    by_header["spec"]["rules"][0]["matches"][0]["headers"] = [{"name": "x-model", "value": "granite"}]
    with pytest.raises(TranslateError) as info:
        translate_route(by_header, models_by_isvc=MODELS)
    assert info.value.reason == "ambiguous_backend"
    same = _route(rules=[_rule("/v1", "granite-code-predictor"), _rule("/v1", "granite-code")])
    assert [r.model for r in translate_route(same, models_by_isvc=MODELS)] == ["granite"]


def test_a_mesh_route_attached_only_to_services_does_not_count() -> None:
    mesh = _route(rules=[_rule("/mesh", "granite-code-predictor")])
    mesh["spec"]["parentRefs"] = [{"kind": "Service", "group": "", "name": "granite-code-predictor"}]
    for gateways in (GATEWAYS, frozenset()):
        with pytest.raises(NotServed) as info:
            translate_route(mesh, models_by_isvc=MODELS, gateways=gateways)
        assert info.value.reason == "other_gateway"


def _status(*parents: tuple[str, str]) -> dict[str, Any]:
    """status.parents as the gateway controller writes it: (gateway name, Accepted status)."""
    return {
        "parents": [
            {
                "parentRef": {"name": name},
                "controllerName": "istio.io/gateway-controller",
                "conditions": [{"type": "Accepted", "status": accepted, "reason": "NotAllowedByListeners"}],
            }
            for name, accepted in parents
        ]
    }


def test_a_route_its_gateway_refused_does_not_count() -> None:
    """A route the gateway does not serve had taken /qwen3 from the route it does serve (it was older)."""
    refused = _route(rules=[_rule("/qwen3", "granite-code-predictor")])
    refused["status"] = _status(("kuadrant-gateway", "False"))
    with pytest.raises(NotServed) as info:
        translate_route(refused, models_by_isvc=MODELS, gateways=GATEWAYS)
    assert info.value.reason == "not_accepted"
    refused["status"] = _status(("kuadrant-gateway", "True"))
    assert translate_route(refused, models_by_isvc=MODELS, gateways=GATEWAYS)
    refused["status"] = _status(("other-gateway", "False"))  # refused elsewhere only
    assert translate_route(refused, models_by_isvc=MODELS, gateways=GATEWAYS)
    del refused["status"]  # not reconciled yet: counts
    assert translate_route(refused, models_by_isvc=MODELS, gateways=GATEWAYS)


def test_a_trailing_slash_names_the_same_prefix() -> None:
    """Gateway API ignores a trailing '/': '/alpha' and '/alpha/' are one prefix, so one route record (two records
    had left authz to pick one by Redis hash order)."""
    [record] = translate_route(_route(rules=[_rule("/alpha/", "granite-code-predictor")]), models_by_isvc=MODELS)
    assert (record.id, record.prefix) == ("*|/alpha", "/alpha")


def test_matches_and_backends_authz_cannot_check_are_reported_and_the_rest_counts() -> None:
    rules = [
        _rule("/mistral/v1/chat/completions", "granite-code-predictor", match_type="Exact"),
        _rule("^/re/.*", "granite-code-predictor", match_type="RegularExpression"),
        _rule("/code", "granite-code-predictor"),
        {"matches": [{"path": {"value": "/pool"}}], "backendRefs": [{"kind": "InferencePool", "name": "p"}]},
    ]
    rules[3]["backendRefs"][0]["group"] = "inference.networking.x-k8s.io"
    notes: list[TranslateError] = []
    records = translate_route(_route(rules=rules), models_by_isvc=MODELS, notes=notes)
    assert [r.id for r in records] == ["*|/code"]
    assert [n.reason for n in notes] == ["unsupported_match", "unsupported_match", "unsupported_backend"]


def test_a_route_that_stops_counting_loses_its_records_a_malformed_one_keeps_them() -> None:
    """Level-triggered: a route moved to another gateway has no records at once (its last good records had kept
    serving until a restart dropped them); a malformed edit keeps the last good ones, as documented."""
    isvc = yaml.safe_load((SEED / "qwen3-0.6b-vllm-raw.yaml").read_text())
    runtime = yaml.safe_load((SEED / "vllm-latest-runtime.yaml").read_text())
    route = copy.deepcopy(ROUTE)
    objects: dict[kinds.Kind, dict[tuple[str, str], dict[str, Any]]] = {
        kinds.ISVC: {key_of(isvc): isvc},
        kinds.RUNTIME: {key_of(runtime): runtime},
        kinds.HTTPROUTE: {key_of(route): route},
    }
    reported: list[str] = []
    desired = desired_over(objects, lambda kind, obj, exc: reported.append(exc.reason), gateways=GATEWAYS)
    desired.update_models()
    assert set(desired.records[RecordKind.ROUTE]) == {"*|/qwen3"}
    route["spec"]["parentRefs"] = [{"name": "internal-gateway"}]
    desired.update_models()
    assert (desired.records[RecordKind.ROUTE], reported) == ({}, ["other_gateway"])
    route["spec"]["parentRefs"] = [{"name": "kuadrant-gateway", "namespace": "llm"}]
    desired.update_models()
    assert set(desired.records[RecordKind.ROUTE]) == {"*|/qwen3"}
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = "qwen3"  # relative: malformed
    desired.update_models()
    assert set(desired.records[RecordKind.ROUTE]) == {"*|/qwen3"} and reported[-1] == "invalid_spec"


def test_two_routes_that_split_a_path_between_models_by_headers_leave_it_unrecorded() -> None:
    """Within one route such a split was refused, across two it was not: the older route's model was checked for
    requests Envoy sent to the other route's (a granite-only key reached qwen3 by sending the header)."""
    qwen = yaml.safe_load((SEED / "qwen3-0.6b-vllm-raw.yaml").read_text())
    granite = copy.deepcopy(qwen)
    granite["metadata"]["name"] = "granite-code"
    runtime = yaml.safe_load((SEED / "vllm-latest-runtime.yaml").read_text())
    older = _route(rules=[_rule("/v1", "granite-code-predictor")])
    older["metadata"].update(name="plain", creationTimestamp="2024-01-01T00:00:00Z")
    newer = _route(rules=[_rule("/v1", "qwen3-0-6b-instruct-predictor")])
    newer["metadata"].update(name="by-header", creationTimestamp="2025-01-01T00:00:00Z")
    newer["spec"]["rules"][0]["matches"][0]["headers"] = [{"name": "x-model", "value": "qwen"}]
    objects: dict[kinds.Kind, dict[tuple[str, str], dict[str, Any]]] = {
        kinds.ISVC: {key_of(qwen): qwen, key_of(granite): granite},
        kinds.RUNTIME: {key_of(runtime): runtime},
        kinds.HTTPROUTE: {key_of(older): older, key_of(newer): newer},
    }
    reported: list[tuple[str, str]] = []
    desired = desired_over(objects, lambda kind, obj, exc: reported.append((obj["metadata"]["name"], exc.reason)))
    desired.update_models()
    assert "*|/v1" not in desired.records[RecordKind.ROUTE]
    assert sorted(reported) == [("by-header", "ambiguous_backend"), ("plain", "ambiguous_backend")]
    newer["spec"]["rules"][0]["backendRefs"][0]["name"] = "granite-code-predictor"  # both to one model: fine
    reported.clear()
    desired.update_models()
    assert "*|/v1" in desired.records[RecordKind.ROUTE] and not reported
    del newer["spec"]["rules"][0]["matches"][0]["headers"]  # plain paths: the older route wins, as documented
    newer["spec"]["rules"][0]["backendRefs"][0]["name"] = "qwen3-0-6b-instruct-predictor"
    desired.update_models()
    assert '"model":"granite-code"' in desired.records[RecordKind.ROUTE]["*|/v1"].replace(" ", "")
