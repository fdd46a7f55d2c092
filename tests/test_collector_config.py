"""The Collector configs in collector-config/, proven statically (no Collector binary runs here).

Each config parses; every component a pipeline uses is defined; every component *type*
exists in the pinned otelcol-contrib release, whose component list (its builder manifest)
is committed as tests/data/otelcol-contrib-0.136.0-components.txt, so a misspelt type fails
here rather than at start-up; the receivers listen where the agent sends by default; the
Kubernetes variant's manifests pass the real Kubernetes schemas (kubernetes-validate).

    .venv/bin/pytest tests/test_collector_config.py -q
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import TelemetrySettings
from agent.telemetry.providers import otlp_endpoint

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_CONFIG = ROOT / "collector-config" / "otel-collector.yaml"
K8S_DIR = ROOT / "collector-config" / "k8s"
K8S_CONFIG = K8S_DIR / "otel-collector.yaml"
CONFIGS = [COMPOSE_CONFIG, K8S_CONFIG]
VERSION = "0.136.0"
COMPONENTS = Path(__file__).parent / "data" / f"otelcol-contrib-{VERSION}-components.txt"
IMAGE = f"otel/opentelemetry-collector-contrib:{VERSION}"

KINDS = {"receivers": "receiver", "processors": "processor", "exporters": "exporter"}
KINDS |= {"extensions": "extension", "connectors": "connector"}
# A component's type is its module's directory name without the kind suffix
# (otlpreceiver -> otlp), except where its metadata.yaml says otherwise:
TYPE_EXCEPTIONS = {
    ("extension", "health_check"): "healthcheckextension",  # extension/healthcheckextension
    ("extension", "file_storage"): "filestorage",  # extension/storage/filestorage
    ("processor", "memory_limiter"): "memorylimiterprocessor",  # core
}


def release_modules() -> dict[str, set[str]]:
    """kind -> last path element of every component module of the pinned release."""
    modules: dict[str, set[str]] = {}
    for line in COMPONENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, module, version = line.split()
            assert version == "v" + VERSION, line
            modules.setdefault(kind, set()).add(module.rsplit("/", 1)[1])
    return modules


def type_exists(kind: str, component_id: str, modules: dict[str, set[str]]) -> bool:
    """Whether ``type[/name]`` names a component of ``kind`` in the pinned release."""
    component_type = component_id.split("/", 1)[0]
    module = TYPE_EXCEPTIONS.get((kind, component_type))
    if module is None:
        module = component_type + kind
        if module in TYPE_EXCEPTIONS.values():  # "healthcheck": the type is health_check
            return False
    return module in modules.get(kind, set())


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), path
    return config


def env_default(value: str) -> str:
    """``${env:NAME:-default}`` -> default; other strings unchanged."""
    match = re.fullmatch(r"\$\{env:[A-Z0-9_]+(?::-(.*))?\}", value)
    return value if match is None else (match.group(1) or "")


def test_the_component_list_is_the_pinned_release_manifest() -> None:
    modules = release_modules()
    assert sum(len(found) for found in modules.values()) > 200
    assert "prometheusremotewriteexporter" in modules["exporter"]
    assert "k8sattributesprocessor" in modules["processor"]
    # Components removed from contrib before 0.136.0 are not there.
    assert "loggingexporter" not in modules["exporter"]
    assert "spanmetricsprocessor" not in modules["processor"]


def test_a_misspelt_or_missing_type_is_caught() -> None:
    modules = release_modules()
    assert type_exists("exporter", "prometheusremotewrite", modules)
    assert type_exists("extension", "health_check", modules)
    assert not type_exists("exporter", "prometheusremotewrit", modules)
    assert not type_exists("exporter", "logging", modules)  # removed in 0.111
    assert not type_exists("processor", "otlp", modules)  # a receiver, not a processor
    assert not type_exists("extension", "healthcheck", modules)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pipeline_component_is_defined_and_exists_in_the_release(path: Path) -> None:
    config = load(path)
    modules = release_modules()
    for section, kind in KINDS.items():
        for component_id in config.get(section) or {}:
            assert type_exists(kind, component_id, modules), f"{section}.{component_id}"

    service = config["service"]
    for extension in service["extensions"]:
        assert extension in config["extensions"], f"service.extensions: {extension}"
    pipelines = service["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    for name, pipeline in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            for component_id in pipeline.get(section, []):
                assert component_id in config[section], (
                    f"pipelines.{name}.{section}: {component_id}"
                )
        processors = pipeline["processors"]
        # memory_limiter first, batch last (after anything that changes the data).
        assert processors[0] == "memory_limiter", name
        assert processors[-1] == "batch", name
        assert "resourcedetection" in processors
        # debug is defined but off by default.
        assert "debug" not in pipeline["exporters"]
    assert config["exporters"]["debug"]["verbosity"] == "basic"
    assert config["processors"]["resourcedetection"]["detectors"] == ["env", "system"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_exporters_persist_and_retry(path: Path) -> None:
    config = load(path)
    exporters = config["exporters"]
    storage_dir = config["extensions"]["file_storage"]["directory"]
    tempo = exporters["otlp/tempo"]
    assert tempo["sending_queue"] == tempo["sending_queue"] | {"enabled": True}
    assert tempo["sending_queue"]["storage"] == "file_storage"
    assert tempo["retry_on_failure"]["enabled"] is True
    prw = exporters["prometheusremotewrite"]
    assert prw["retry_on_failure"]["enabled"] is True
    # Remote write has no sending_queue; its WAL sits on the same persistent volume.
    assert "sending_queue" not in prw
    wal_root = Path(prw["wal"]["directory"]).parent
    assert Path(storage_dir).parent == wal_root == Path("/var/lib/otelcol")
    assert prw["add_metric_suffixes"] is True
    assert prw["resource_to_telemetry_conversion"] == {"enabled": True}
    assert config["extensions"]["health_check"]["endpoint"].endswith(":13133")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_receivers_listen_where_the_agent_sends_by_default(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", raising=False)
    protocols = load(path)["receivers"]["otlp"]["protocols"]
    for protocol, key in (("grpc", "grpc"), ("http/protobuf", "http")):
        sent_to = otlp_endpoint(TelemetrySettings(protocol=protocol), "metrics")
        assert sent_to is not None
        agent_port = urllib.parse.urlsplit(sent_to).port
        host, port = protocols[key]["endpoint"].rsplit(":", 1)
        assert int(port) == agent_port, (protocol, protocols[key]["endpoint"], sent_to)
        # Reachable from other containers and pods, not only the Collector's own loopback.
        assert host == "0.0.0.0"


def test_the_two_variants_differ_only_by_k8sattributes_and_endpoints() -> None:
    compose, k8s = load(COMPOSE_CONFIG), load(K8S_CONFIG)
    assert "k8sattributes" not in compose["processors"]
    k8s_processors = dict(k8s["processors"])
    k8sattributes = k8s_processors.pop("k8sattributes")
    assert k8s_processors == compose["processors"]
    for name, pipeline in k8s["service"]["pipelines"].items():
        processors = list(pipeline["processors"])
        # Right after memory_limiter: later processors see the pod's attributes.
        assert processors.pop(1) == "k8sattributes"
        assert processors == compose["service"]["pipelines"][name]["processors"]
    assert k8sattributes["filter"]["node_from_env_var"] == "K8S_NODE_NAME"
    assert {"k8s.namespace.name", "k8s.pod.name", "k8s.node.name"} <= set(
        k8sattributes["extract"]["metadata"]
    )
    assert {"from": "connection"} in [
        s for a in k8sattributes["pod_association"] for s in a["sources"]
    ]
    assert (
        k8s["exporters"]["prometheusremotewrite"]["endpoint"]
        == "${env:PROMETHEUS_REMOTE_WRITE_URL}"
    )
    assert k8s["exporters"]["otlp/tempo"]["endpoint"] == "${env:TEMPO_OTLP_ENDPOINT}"


def _k8s_documents() -> list[dict[str, Any]]:
    documents = []
    for name in ("rbac.yaml", "daemonset.yaml"):
        documents += [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d]
    return documents


def test_the_daemonset_runs_the_pinned_image_with_the_config_and_env_it_needs() -> None:
    documents = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_documents()}
    daemonset = documents[("DaemonSet", "otel-collector")]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    env = {e["name"] for e in container["env"]}
    used = set(re.findall(r"\$\{env:([A-Z0-9_]+)", K8S_CONFIG.read_text()))
    assert used and used <= env, used - env
    # The config the kustomization turns into a ConfigMap is the one the container reads.
    kustomization = load(K8S_DIR / "kustomization.yaml")
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [K8S_CONFIG.name]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == generator["name"]
    assert container["args"] == [f"--config={mounts['config']}/{K8S_CONFIG.name}"]
    assert mounts["state"] == "/var/lib/otelcol"
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file()
    # Ports: container, Service and the config agree.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    protocols = load(K8S_CONFIG)["receivers"]["otlp"]["protocols"]
    assert ports["otlp-grpc"] == int(protocols["grpc"]["endpoint"].rsplit(":", 1)[1])
    assert ports["otlp-http"] == int(protocols["http"]["endpoint"].rsplit(":", 1)[1])
    assert ports["health"] == 13133
    service = documents[("Service", "otel-collector")]
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    # RBAC: the DaemonSet's account may read what k8sattributes watches.
    assert pod["serviceAccountName"] == "otel-collector"
    role = documents[("ClusterRole", "mlsidecar-otel-collector")]
    granted = {
        (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert {("", "pods"), ("", "namespaces"), ("apps", "replicasets")} <= granted
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}
    binding = documents[("ClusterRoleBinding", "mlsidecar-otel-collector")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.31.0"])  # as the Helm chart's
def test_the_kubernetes_manifests_pass_the_kubernetes_schemas(kube_version: str) -> None:
    """kubernetes-validate ships the real Kubernetes JSON schemas; --strict rejects unknown
    fields (a misspelt key), offline."""
    command = [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict"]
    command += ["-k", kube_version, str(K8S_DIR / "rbac.yaml"), str(K8S_DIR / "daemonset.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every document was checked: 3 in rbac.yaml, 2 in daemonset.yaml.
    assert result.stdout.count(" passed for resource ") == len(_k8s_documents()) == 5
