"""HTTPRoute -> route table entries, table-tested."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.errors import TranslateError
from controlplane.translate.httproute import translate_route

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
