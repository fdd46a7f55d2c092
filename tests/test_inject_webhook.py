"""The sidecar-injection webhook (agent/inject, the chart's `injector`), without a cluster.

Real parts: the chart rendered by Helm's Go SDK (helm-python-sdk) and validated strictly for
Kubernetes 1.29 and 1.31; the webhook server (`python -m agent.inject`) over real HTTPS on
127.0.0.1 with an openssl certificate; the injected pod's config loaded by a real
`mlsidecar run`. Played by the test: the API server's part, i.e. sending the AdmissionReview
and applying the JSON Patch it gets back (RFC 6902 "add", the only operation the webhook
uses), and the kubelet's env resolution (`pod_env` from test_helm_chart).
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from conftest import free_port, mlsidecar_command, subprocess_env
from test_helm_chart import (
    HARDENED,
    KUBE_VERSIONS,
    MODEL,
    Rendered,
    all_containers,
    http_get,
    merged,
    pod_env,
    render,
    wait_ready,
)
from tls import self_signed

from agent.inject import SidecarTemplate, pod_patch

ROOT = Path(__file__).resolve().parent.parent
BASE_DEPLOYMENT = ROOT / "examples" / "kubernetes" / "kustomize" / "deployment.yaml"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The webhook's serving certificate (self-signed, for 127.0.0.1) and its CA bundle."""
    directory = tmp_path_factory.mktemp("injector-tls")
    self_signed(directory, "injector", "IP:127.0.0.1,DNS:fraud-mlsidecar-injector.ml.svc")
    return directory


def injector_values(tls_dir: Path, **over: Any) -> dict[str, Any]:
    ca_bundle = base64.b64encode((tls_dir / "tls.crt").read_bytes()).decode()
    values = {
        "workload": {"enabled": False},
        "model": {"processName": "^gunicorn$"},
        "injector": {
            "enabled": True,
            "tls": {"existingSecret": "mlsidecar-injector-tls", "caBundle": ca_bundle},
        },
        "agent": {
            "store": {"backend": "redis", "redis": {"existingSecret": "mlsidecar-redis"}},
            "api": {"token": {"existingSecret": "mlsidecar-api"}},
        },
    }
    return merged(merged(MODEL, values), over)


@pytest.fixture(scope="module")
def chart(tls_dir: Path) -> Rendered:
    values = injector_values(tls_dir)
    return Rendered(values, render(values))


@pytest.fixture(scope="module")
def template_path(chart: Rendered, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config_map = next(
        o for o in chart.of_kind("ConfigMap") if o["metadata"]["name"].endswith("-injector")
    )
    path = tmp_path_factory.mktemp("template") / "template.json"
    path.write_text(config_map["data"]["template.json"])
    return path


@pytest.fixture(scope="module")
def template(template_path: Path) -> SidecarTemplate:
    return SidecarTemplate.load(template_path)


@pytest.fixture(scope="module")
def webhook(template_path: Path, tls_dir: Path) -> Iterator[str]:
    """`python -m agent.inject` on a free port: its base URL."""
    port = free_port()
    python = str(Path(mlsidecar_command()).parent / "python")
    proc = subprocess.Popen(
        [python, "-m", "agent.inject", "--listen", f"127.0.0.1:{port}",
         "--template", str(template_path),
         "--tls-cert", str(tls_dir / "tls.crt"), "--tls-key", str(tls_dir / "tls.key")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "mlsidecar injector on https://127.0.0.1:" in line, line + proc.stderr.read()
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def post_review(webhook: str, tls_dir: Path, review: Any) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(tls_dir / "tls.crt"))  # as the API server
    request = urllib.request.Request(
        f"{webhook}/mutate",
        data=json.dumps(review).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def model_pod(labels: dict[str, str] | None = None, **annotations: str) -> dict[str, Any]:
    """The kustomize example's model pod, as the API server would send it."""
    deployment = yaml.safe_load(BASE_DEPLOYMENT.read_text())
    template = deployment["spec"]["template"]
    metadata = {
        "name": "fraud-scorer-7d9c5-x2kqz",
        "namespace": "payments",
        "labels": {
            **template["metadata"]["labels"],
            "app.kubernetes.io/name": "fraud-scorer",
            "app.kubernetes.io/version": "1.4.0",
            **(labels or {}),
        },
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def review_of(obj: dict[str, Any], kind: str = "Pod") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": kind.lower() + "s"},
            "operation": "CREATE",
            "namespace": "payments",
            "object": obj,
        },
    }


def apply_patch(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 "add" (what the API server does with the webhook's patch)."""
    out = copy.deepcopy(document)
    for op in ops:
        assert op["op"] == "add", op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = out
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
        else:
            parent[last] = op["value"]
    return out


def mutated(webhook: str, tls_dir: Path, pod: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    status, body = post_review(webhook, tls_dir, review_of(pod))
    assert status == 200
    response = body["response"]
    assert body["kind"] == "AdmissionReview" and response["allowed"] is True
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    if "patch" not in response:
        return pod, response
    assert response["patchType"] == "JSONPatch"
    return apply_patch(pod, json.loads(base64.b64decode(response["patch"]))), response


# -- the chart's injector objects -----------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_injector_objects_are_valid_strictly(chart: Rendered, kube_version: str) -> None:
    kinds = set()
    for obj in chart.objects:
        kinds.add(obj["kind"])
        kubernetes_validate.validate(obj, kube_version, strict=True)
    assert {"MutatingWebhookConfiguration", "Deployment", "Service", "ConfigMap"} <= kinds


def test_webhook_configuration_selects_labelled_pods_and_namespaces(chart: Rendered) -> None:
    (config,) = chart.of_kind("MutatingWebhookConfiguration")
    pods, namespaces = config["webhooks"]
    service = next(
        o for o in chart.of_kind("Service") if o["metadata"]["name"].endswith("-injector")
    )
    for hook in (pods, namespaces):
        assert hook["clientConfig"]["service"] == {
            "name": service["metadata"]["name"],
            "namespace": "ml",
            "path": "/mutate",
            "port": service["spec"]["ports"][0]["port"],
        }
        assert hook["rules"][0]["resources"] == ["pods"] and hook["sideEffects"] == "None"
        assert hook["failurePolicy"] == "Ignore"
        assert base64.b64decode(hook["clientConfig"]["caBundle"]).startswith(b"-----BEGIN")
    assert pods["objectSelector"] == {"matchLabels": {"mlsidecar.io/inject": "true"}}
    assert namespaces["namespaceSelector"] == {"matchLabels": {"mlsidecar.io/inject": "true"}}
    deployment = next(
        o for o in chart.of_kind("Deployment") if o["metadata"]["name"].endswith("-injector")
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    # The workload's selectors (Service, PDB, monitors) never pick the injector's pods.
    workload = Rendered(chart.values, render(merged(chart.values, {"workload": {"enabled": True}})))
    workload_selector = next(
        o for o in workload.of_kind("Service") if not o["metadata"]["name"].endswith("-injector")
    )["spec"]["selector"]
    assert not workload_selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert labels["mlsidecar.io/inject"] == "false"  # never injected into itself
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "agent.inject"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert HARDENED.items() <= container["securityContext"].items()
    assert container["securityContext"]["runAsUser"] > 0
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()


def test_injector_needs_its_certificate(tls_dir: Path) -> None:
    values = injector_values(tls_dir, injector={"tls": {"existingSecret": ""}})
    with pytest.raises(helm_python.HelmError, match=r"injector\.tls\.existingSecret"):
        render(values)
    values = injector_values(tls_dir, injector={"tls": {"caBundle": ""}})
    with pytest.raises(helm_python.HelmError, match=r"injector\.tls\.caBundle"):
        render(values)


# -- the webhook over HTTPS -------------------------------------------------------------------


def test_labelled_pod_gets_the_charts_sidecar(
    webhook: str, tls_dir: Path, template: SidecarTemplate, tls_values_chart: Rendered
) -> None:
    pod = model_pod({"mlsidecar.io/inject": "true"}, **{"mlsidecar.io/model-cmdline": "gunicorn"})
    patched, _ = mutated(webhook, tls_dir, pod)
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(patched, kube_version, strict=True)
    spec = patched["spec"]
    (sidecar,) = spec["initContainers"]
    charted = tls_values_chart.sidecar  # the same values, rendered as the chart's own Deployment
    for key in ("image", "command", "args", "restartPolicy", "resources", "securityContext"):
        assert sidecar[key] == charted[key], key
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe] == charted[probe]
    assert spec["shareProcessNamespace"] is True
    assert patched["metadata"]["annotations"]["mlsidecar.io/injected"] == "0.1.0"
    assert "mlsidecar-config" not in {v["name"] for v in spec["volumes"]}

    env = pod_env(spec, sidecar)
    assert "MLSIDECAR_CONFIG" not in env
    assert env["MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES"] == "2000"  # model: "2"
    assert env["OTEL_SERVICE_NAME"] == "fraud-scorer"
    attributes = dict(kv.split("=", 1) for kv in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    assert attributes["service.name"] == "fraud-scorer"
    assert attributes["service.version"] == "1.4.0"
    assert attributes["k8s.pod.name"] and attributes["k8s.namespace.name"]
    assert json.loads(env["MLSIDECAR_RESOURCES"]) == {"model": {"cmdline": "gunicorn"}}
    model_env = pod_env(spec, spec["containers"][0])
    assert model_env["MLSIDECAR_TARGET"] == json.loads(env["MLSIDECAR_INGEST"])["listen"]
    # Secrets stay references: the pod's namespace holds them.
    secret_env = {e["name"] for e in sidecar["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env == {"MLSIDECAR_API__TOKEN", "MLSIDECAR_STORE__REDIS__URL"}


@pytest.fixture(scope="module")
def tls_values_chart(tls_dir: Path) -> Rendered:
    """The injector's values in workload mode: the sidecar the chart itself would deploy."""
    values = injector_values(tls_dir, workload={"enabled": True}, injector={"enabled": False})
    return Rendered(values, render(values))


def test_webhook_leaves_opted_out_and_injected_pods_alone(webhook: str, tls_dir: Path) -> None:
    opted_out = model_pod({"mlsidecar.io/inject": "false"})
    pod, response = mutated(webhook, tls_dir, opted_out)
    assert pod == opted_out and "patch" not in response
    once, _ = mutated(webhook, tls_dir, model_pod({"mlsidecar.io/inject": "true"}))
    twice, response = mutated(webhook, tls_dir, once)  # a second webhook call: no second sidecar
    assert twice == once and "patch" not in response


def test_webhook_allows_what_it_cannot_inject_with_a_warning(webhook: str, tls_dir: Path) -> None:
    pod = model_pod({"mlsidecar.io/inject": "true"}, **{"mlsidecar.io/model-container": "nope"})
    same, response = mutated(webhook, tls_dir, pod)
    assert same == pod
    assert "mlsidecar.io/model-container" in response["warnings"][0]
    assert "'nope'" in response["warnings"][0]
    status, body = post_review(webhook, tls_dir, review_of({"metadata": {}}, kind="ConfigMap"))
    assert status == 200 and body["response"] == {"uid": body["response"]["uid"], "allowed": True}
    assert post_review(webhook, tls_dir, {"kind": "Pod"})[0] == 400


def test_patch_puts_the_sidecar_first_and_keeps_the_pods_own_env(
    template: SidecarTemplate,
) -> None:
    pod = model_pod({"mlsidecar.io/inject": "true"})
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "registry.example.com/m:1"}]
    pod["spec"]["containers"][0]["env"] = [{"name": "MLSIDECAR_TARGET", "value": "10.0.0.9:4320"}]
    patched = apply_patch(pod, pod_patch(pod, template))
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["mlsidecar", "migrate"]
    model_env = {e["name"]: e.get("value") for e in patched["spec"]["containers"][0]["env"]}
    assert model_env["MLSIDECAR_TARGET"] == "10.0.0.9:4320"
    assert "MLSIDECAR_API_URL" in model_env


# -- the real agent runs with the injected env -------------------------------------------------


@pytest.mark.slow
def test_real_agent_starts_from_the_injected_env(
    webhook: str, tls_dir: Path, agent_process: Any, tmp_path: Path, redis_server: Any
) -> None:
    patched, _ = mutated(webhook, tls_dir, model_pod({"mlsidecar.io/inject": "true"}))
    spec = patched["spec"]
    sidecar = next(c for c in all_containers(spec) if c["name"] == "mlsidecar")
    secrets = {"MLSIDECAR_API__TOKEN": "api-token", "MLSIDECAR_STORE__REDIS__URL": redis_server.url}
    env = {
        **pod_env_without_secrets(spec, sidecar),
        **secrets,
        "MLSIDECAR_STORE__DATA_DIR": str(tmp_path / "data"),
        "MLSIDECAR_UPSTREAM__LISTEN": f"127.0.0.1:{free_port()}",
    }
    process = agent_process(env=subprocess_env(**env))  # no --config: everything from env
    process.wait_started()
    assert wait_ready(process.api_url) == 200
    status, body = http_get(f"{process.api_url}/v1/models", "api-token")
    assert status == 200 and body == {"models": []}


def pod_env_without_secrets(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """pod_env for the entries that are not secretKeyRefs (the test supplies those)."""
    plain = copy.deepcopy(container)
    plain["env"] = [e for e in plain["env"] if "secretKeyRef" not in e.get("valueFrom", {})]
    return pod_env(spec, plain)
