"""A self-service HTTPRoute (label ``maas.io/self-service: "true"``) becomes model-less route entries."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.demo import self_service_route
from controlplane.translate.httproute import translate_route

MODELS = {("llm", "qwen3"): "qwen3"}


def _route(*, labels: dict[str, str], hostnames: list[str] | None = None, backend: str = "maas-controlplane"):
    route: dict[str, Any] = self_service_route()
    route["metadata"]["labels"] = labels
    route["spec"]["rules"][0]["backendRefs"][0]["name"] = backend
    if hostnames is not None:
        route["spec"]["hostnames"] = hostnames
    return route


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        pytest.param(
            self_service_route(),
            [
                ("*|/v1/models", None, "maas-controlplane.maas-system:8700"),
                ("*|/v1/me", None, "maas-controlplane.maas-system:8700"),
            ],
            id="demo-route",
        ),
        pytest.param(
            _route(labels={"maas.io/self-service": "true"}, hostnames=["api.example.com"]),
            [
                ("api.example.com|/v1/models", None, "maas-controlplane.maas-system:8700"),
                ("api.example.com|/v1/me", None, "maas-controlplane.maas-system:8700"),
            ],
            id="named-host",
        ),
        pytest.param(_route(labels={}), [], id="unlabelled-route-to-a-non-model-service-is-ignored"),
        pytest.param(_route(labels={"maas.io/self-service": "false"}), [], id="label-false"),
        pytest.param(
            _route(labels={"maas.io/self-service": "true"}, backend="qwen3-predictor"),
            [
                ("*|/v1/models", None, "qwen3-predictor.maas-system:8700"),
                ("*|/v1/me", None, "qwen3-predictor.maas-system:8700"),
            ],
            id="self-service-label-wins-over-a-model-backend",
        ),
    ],
)
def test_self_service_routes(route: dict[str, Any], expected: list[tuple[str, str | None, str]]) -> None:
    got = [(r.id, r.model, r.backend) for r in translate_route(route, models_by_isvc=MODELS)]
    assert got == expected
