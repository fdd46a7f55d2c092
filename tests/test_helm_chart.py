"""The Helm chart helm/mlsidecar, proven without a cluster.

Real parts: Helm's own Go SDK (PyPI helm-python-sdk) lints, renders and packages the chart;
every rendered object is validated with kubernetes-validate in strict mode (unknown fields
fail) against the Kubernetes 1.29 and 1.31 schemas it bundles; the rendered agent config is
checked by the real `mlsidecar config validate` and loaded by a real `mlsidecar run`, whose
/readyz and exec probe are then asked. What cannot run here is the kubelet: a container's env
is resolved as the kubelet would (fieldRef, resourceFieldRef, secretKeyRef, $(VAR)) by
`pod_env` below, with made-up pod facts and the secret values of `SECRETS`.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
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
from tls import self_signed

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "mlsidecar"
SCRIPTS = ROOT / "scripts"
PARENT = ROOT / "tests" / "data" / "helm-parent"
# kubernetes-validate 1.37.0 bundles 1.25 ... 1.37; 1.29 and 1.31 are there exactly.
KUBE_VERSIONS = ("1.29.0", "1.31.0")
RELEASE, NAMESPACE = "fraud", "ml"

# What the Secrets the values name would hold (the kubelet reads them; here, this table).
SECRETS = {
    ("mlsidecar-redis", "url"): "redis://:redis-s3cret@redis.ml.svc:6379/0",
    ("mlsidecar-api", "token"): "api-s3cret-token",
    ("mlsidecar-api", "admin-token"): "admin-s3cret-token",
    ("mlsidecar-ingest", "token"): "ingest-s3cret-token",
    ("alert-hooks", "slack"): "https://hooks.slack.example.com/services/T0/B0/slack-s3cret",
    ("otel-headers", "headers"): "api-key=otel-s3cret",
}
SECRET_VALUES = [value for value in SECRETS.values()] + ["s3cret"]

MODEL = {"model": {"image": {"repository": "registry.example.com/fraud-scorer", "tag": "1.4.0"}}}
UPSTREAMS_AND_ALERTS: dict[str, Any] = {
    "agent": {
        "upstream": {
            "policies": {
                "fast": {
                    "timeout_s": 0.5,
                    "retries": {"max": 1},
                    "breaker": {"consecutive_failures": 3, "open_s": 10},
                }
            },
            "targets": {
                "features": {"url": "http://feature-store.ml.svc:8080", "policy": "fast"},
                "slack": {"existingSecret": "alert-hooks", "key": "slack"},
            },
        },
        "alerts": {
            "rules": {
                "fraud-psi": {
                    "signal": "features.*.drift.psi",
                    "op": ">",
                    "threshold": 0.25,
                    "for_s": 60,
                    "severity": "critical",
                    "channels": ["log", "team-slack"],
                },
                "health_score_low": None,
            },
            "channels": {"team-slack": {"type": "webhook", "upstream": "slack", "format": "slack"}},
        },
    }
}
ADMIN_EXPOSED: dict[str, Any] = {
    "agent": {
        "api": {
            "expose": True,
            "token": {"existingSecret": "mlsidecar-api"},
            "adminToken": {"existingSecret": "mlsidecar-api"},
        },
        "ingest": {"token": {"existingSecret": "mlsidecar-ingest"}},
        "telemetry": {
            "otlpEndpoint": "http://otel-collector.observability:4317",
            "headers": {"existingSecret": "otel-headers"},
        },
        "store": {"persistence": {"enabled": True, "size": "2Gi"}},
    },
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
    "podDisruptionBudget": {"enabled": True},
    "autoscaling": {"enabled": True},
}

# The matrix of values rendered once each (workload mode); "include" is the parent chart.
MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "classic": {
        "sidecar": {
            "mode": "classic",
            "extraEnv": [{"name": "MLSIDECAR_ENGINE__WINDOW_S", "value": "60"}],
        },
        "model": {"processName": "^gunicorn$"},
        "agent": {"config": {"engine": {"min_window_rows": 50}, "shutdown_timeout_s": 20}},
    },
    "native": {"sidecar": {"mode": "native"}, "model": {"cmdline": "gunicorn .*fraud_scorer"}},
    "no-shared-pid": {"shareProcessNamespace": False, "model": {"processName": "^gunicorn$"}},
    "redis": {
        "agent": {
            "store": {
                "backend": "redis",
                "redis": {"existingSecret": "mlsidecar-redis", "keyPrefix": "fraud"},
            },
            "upstream": {
                "policies": {"shared": {"breaker": {"storage": "redis"}}},
                "targets": {"features": {"url": "http://feature-store:8080", "policy": "shared"}},
            },
        },
        "workload": {"replicas": 3},
    },
    "upstreams-alerts": UPSTREAMS_AND_ALERTS,
    "admin-exposed": ADMIN_EXPOSED,
    "demo-model": {"demoModel": {"enabled": True}, "model": {"image": {"repository": ""}}},
    "admin-tls": {
        "agent": {"api": {"expose": True, "tls": {"existingSecret": "mlsidecar-tls"}}},
        "podMonitor": {
            "enabled": True,
            "tlsConfig": {"ca": {"secret": {"name": "mlsidecar-ca", "key": "ca.crt"}}},
        },
    },
}
TLS_MOUNT = "/etc/mlsidecar-tls"


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(values: dict[str, Any], chart: Path = CHART, release: str = RELEASE) -> dict[str, str]:
    """Helm's render: template path -> manifest text (NOTES.txt included)."""
    loaded = helm_python.Chart.load(chart)
    try:
        return loaded.render(values, name=release, namespace=NAMESPACE, is_install=True)
    finally:
        loaded.close()


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


class Rendered:
    """One rendering of the chart: its objects, looked up by kind."""

    def __init__(self, values: dict[str, Any], texts: dict[str, str]) -> None:
        self.values = values
        self.texts = texts
        self.objects = objects(texts)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"]["labels"]

    @property
    def config_text(self) -> str:
        return self.one("ConfigMap")["data"]["mlsidecar.yaml"]

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_text)

    @property
    def sidecar(self) -> dict[str, Any]:
        found = [c for c in all_containers(self.pod) if c["name"] == "mlsidecar"]
        assert len(found) == 1, [c["name"] for c in all_containers(self.pod)]
        return found[0]

    @property
    def model(self) -> dict[str, Any]:
        model_name = self.values.get("mlsidecar", self.values).get("model", {}).get("containerName")
        name = model_name or "model"
        return next(c for c in self.pod["containers"] if c["name"] == name)


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers") or []) + list(pod["containers"])


def include_mode_chart(tmp: Path) -> Path:
    """The parent chart of tests/data with this chart copied in as its dependency."""
    parent = tmp / "helm-parent"
    shutil.copytree(PARENT, parent)
    shutil.copytree(CHART, parent / "charts" / "mlsidecar")
    return parent


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    """Every matrix entry rendered once (about 0.1 s each)."""
    out = {}
    for name, over in MATRIX.items():
        values = merged(MODEL, over)
        out[name] = Rendered(values, render(values))
    return out


@pytest.fixture(scope="module")
def included(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    parent = include_mode_chart(tmp_path_factory.mktemp("include"))
    values = yaml.safe_load((PARENT / "values.yaml").read_text())
    return Rendered(values, render({}, chart=parent))


@pytest.fixture(scope="module")
def every(rendered: dict[str, Rendered], included: Rendered) -> dict[str, Rendered]:
    return {**rendered, "include": included}


# -- the kubelet's part: a container's environment -------------------------------------------

POD_FACTS = {
    "metadata.name": "fraud-mlsidecar-7d9c5-x2kqz",
    "metadata.namespace": NAMESPACE,
    "spec.nodeName": "node-a",
    "metadata.uid": "0b6c1f9e-2a1e-4f7e-9a57-3c1d2e8f9a10",
}
NODE_ALLOCATABLE = {"cpu": 4.0, "memory": 16 * 2**30}
QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?$")
UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: Any) -> float:
    match = QUANTITY.match(str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def pod_env(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The env the kubelet would give ``container``: Downward API, limits, Secrets, $(VAR)."""
    env: dict[str, str] = {}
    by_name = {c["name"]: c for c in all_containers(pod)}
    for entry in container.get("env") or []:
        if "value" in entry:
            value = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"]
            )
        else:
            source = entry["valueFrom"]
            if "fieldRef" in source:
                value = POD_FACTS[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = SECRETS[(ref["name"], ref["key"])]
            else:
                ref = source["resourceFieldRef"]
                assert ref["containerName"] in by_name, f"no container {ref['containerName']!r}"
                limits = by_name[ref["containerName"]].get("resources", {}).get("limits", {})
                kind = ref["resource"].split(".")[1]
                amount = quantity(limits[kind]) if kind in limits else NODE_ALLOCATABLE[kind]
                value = str(int(-(-amount // quantity(ref.get("divisor", "1")))))  # rounds up
        env[entry["name"]] = value
    return env


def config_file(r: Rendered, tmp: Path) -> Path:
    path = tmp / "mlsidecar.yaml"
    path.write_text(r.config_text)
    return path


# -- Helm itself -------------------------------------------------------------------------------


def test_chart_lints_clean_in_strict_mode() -> None:
    injector = {"injector": {"enabled": True, "tls": {"existingSecret": "t", "caBundle": "Y2E="}}}
    for values in (
        MODEL,
        merged(MODEL, ADMIN_EXPOSED),
        {"demoModel": {"enabled": True}},
        merged(MODEL, injector),
    ):
        report = helm_python.lint(CHART, values, strict=True, kube_version="v1.29.0")
        assert report["errors"] == [] and report["messages"] == [], report


def test_chart_declares_kube_version_app_version_and_icon() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and meta["appVersion"] == version.group(1)
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert meta["icon"].startswith("https://")
    assert (CHART / "icon.svg").is_file()


# -- schema validation, both Kubernetes versions ----------------------------------------------

CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # Prometheus Operator: no schema bundled


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_object_is_valid_strictly(
    every: dict[str, Rendered], kube_version: str
) -> None:
    kinds = set()
    for name, r in every.items():
        for obj in r.objects:
            kinds.add(obj["kind"])
            if obj["kind"] in CRD_KINDS:
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(obj, kube_version, strict=True)
                continue
            try:
                used = kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {error}")
            assert used == kube_version.rsplit(".", 1)[0]
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Pod"} <= kinds
    expected = {"PersistentVolumeClaim", "NetworkPolicy", "PodDisruptionBudget"}
    assert expected | {"HorizontalPodAutoscaler"} | CRD_KINDS <= kinds


def test_kubernetes_validate_cli_accepts_the_rendered_files(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    """The same check as a user would run it: `kubernetes-validate --strict -k 1.29.0 FILE`."""
    cli = Path(mlsidecar_command()).parent / "kubernetes-validate"
    good = tmp_path / "native.yaml"
    docs = [o for o in rendered["native"].objects if o["kind"] not in CRD_KINDS]
    good.write_text(yaml.safe_dump_all(docs))
    bad = tmp_path / "typo.yaml"
    broken = copy.deepcopy(rendered["native"].deployment)
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    bad.write_text(yaml.safe_dump(broken))
    for kube_version in KUBE_VERSIONS:
        command = [str(cli), "--strict", "--quiet", "-k", kube_version]
        ok = subprocess.run([*command, str(good)], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        refused = subprocess.run([*command, str(bad)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "restartPolicyy" in refused.stdout + refused.stderr


def test_the_readmes_values_example_renders_and_validates() -> None:
    readme = (CHART / "README.md").read_text()
    block = readme.split("A values file with the usual extras:", 1)[1]
    values = yaml.safe_load(block.split("```yaml", 1)[1].split("```", 1)[0])
    r = Rendered(values, render(values))
    for obj in r.objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSIONS[0], strict=True)
    assert r.config["upstream"]["targets"]["slack"] == {"policy": "default"}
    assert r.one("ServiceMonitor") and r.one("HorizontalPodAutoscaler")


def test_strict_validation_catches_a_misspelt_container_key(rendered: dict[str, Rendered]) -> None:
    broken = copy.deepcopy(rendered["defaults"].deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)


def test_prometheus_operator_monitors_scrape_the_admin_port(rendered: dict[str, Rendered]) -> None:
    r = rendered["admin-exposed"]
    service_ports = {p["name"]: p for p in r.one("Service")["spec"]["ports"]}
    sidecar_ports = {p["name"]: p["containerPort"] for p in r.sidecar["ports"]}
    api_port = int(r.config["api"]["listen"].rsplit(":", 1)[1])
    assert service_ports["admin"]["port"] == sidecar_ports["admin"] == api_port
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitor = r.one(kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        labels = r.deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        (endpoint,) = monitor["spec"][key]
        assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
        assert endpoint["authorization"]["credentials"] == {"name": "mlsidecar-api", "key": "token"}
        assert endpoint["scheme"] == "http" and "tlsConfig" not in endpoint
    (endpoint,) = rendered["admin-tls"].one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https" and "authorization" not in endpoint
    assert endpoint["tlsConfig"] == MATRIX["admin-tls"]["podMonitor"]["tlsConfig"]


# -- invariants on the rendered objects --------------------------------------------------------

HARDENED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_every_container_is_hardened_and_has_requests(every: dict[str, Rendered]) -> None:
    for name, r in every.items():
        pods = [r.pod] + [p["spec"] for p in r.of_kind("Pod")]
        for pod in pods:
            for container in all_containers(pod):
                context = container["securityContext"]
                where = f"{name}/{container['name']}"
                assert HARDENED.items() <= context.items(), where
                assert context["runAsUser"] > 0, where
                assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where


def test_sidecar_mode_native_or_classic(rendered: dict[str, Rendered], included: Rendered) -> None:
    for r in (rendered["defaults"], rendered["native"], included):
        (init,) = r.pod["initContainers"]
        assert init["name"] == "mlsidecar" and init["restartPolicy"] == "Always"
        assert "mlsidecar" not in [c["name"] for c in r.pod["containers"]]
    classic = rendered["classic"]
    assert "initContainers" not in classic.pod
    assert "restartPolicy" not in classic.sidecar
    assert [c["name"] for c in classic.pod["containers"]] == ["model", "mlsidecar"]


def test_shared_pid_namespace_follows_model_discovery(
    rendered: dict[str, Rendered], included: Rendered
) -> None:
    assert rendered["defaults"].pod["shareProcessNamespace"] is False
    assert rendered["defaults"].config["resources"]["model"] == {}
    assert rendered["classic"].pod["shareProcessNamespace"] is True
    assert rendered["classic"].config["resources"]["model"] == {"process_name": "^gunicorn$"}
    native = rendered["native"].config["resources"]["model"]
    assert native == {"cmdline": "gunicorn .*fraud_scorer"}
    assert rendered["no-shared-pid"].pod["shareProcessNamespace"] is False
    demo = rendered["demo-model"]
    assert demo.pod["shareProcessNamespace"] is True
    assert demo.config["resources"]["model"] == {"cmdline": "mlsidecar demo-model"}
    assert demo.model["command"] == ["mlsidecar", "demo-model"]
    assert demo.model["image"] == demo.sidecar["image"] == "ghcr.io/mlsidecar/mlsidecar:0.1.0"
    assert included.pod["shareProcessNamespace"] is True


def test_demo_pod_runs_the_whole_story_on_loopback(rendered: dict[str, Rendered]) -> None:
    r = rendered["demo-model"]
    parser = build_parser()
    names = [c["name"] for c in r.pod["containers"]]
    assert names == ["model", "demo-feature-store", "demo-traffic"]
    parsed = {}
    for container in r.pod["containers"]:
        command = container["command"] + container.get("args", [])
        assert command[0] == "mlsidecar"
        parsed[container["name"]] = parser.parse_args(command[1:])  # the real CLI's options
    config = r.config
    model, store, traffic = parsed["model"], parsed["demo-feature-store"], parsed["demo-traffic"]
    assert model.sidecar == traffic.sidecar == config["ingest"]["listen"]
    proxy = f"http://{config['upstream']['listen']}/upstream/features"
    assert model.feature_store_url == proxy
    assert config["upstream"]["targets"]["features"]["url"] == f"http://{store.listen}"
    assert traffic.feature_store == f"http://{store.listen}"
    assert traffic.target == f"http://{model.listen}"
    for address in (model.listen, store.listen):
        assert address.startswith("127.0.0.1:")  # the demo refuses other addresses
    # Nothing off the pod can reach the demo: no Service, no helm test pod (port-forward).
    assert r.of_kind("Service") == [] and r.of_kind("Pod") == []


def test_sidecar_env_carries_downward_api_otel_and_model_limits(every: dict[str, Rendered]) -> None:
    for name, r in every.items():
        env = pod_env(r.pod, r.sidecar)
        attributes = dict(pair.split("=", 1) for pair in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
        assert attributes["k8s.pod.name"] == POD_FACTS["metadata.name"], name
        assert attributes["k8s.namespace.name"] == NAMESPACE
        assert attributes["k8s.node.name"] == POD_FACTS["spec.nodeName"]
        assert attributes["k8s.pod.uid"] == POD_FACTS["metadata.uid"]
        assert attributes["service.name"] == env["OTEL_SERVICE_NAME"]
        assert attributes["service.version"]
        assert env["MLSIDECAR_CONFIG"] == "/etc/mlsidecar/mlsidecar.yaml"
        mount = next(m for m in r.sidecar["volumeMounts"] if m["name"] == "mlsidecar-config")
        assert env["MLSIDECAR_CONFIG"].startswith(mount["mountPath"] + "/")
        model_limits = r.model["resources"]["limits"]
        memory = env["MLSIDECAR_RESOURCES__MODEL__MEMORY_LIMIT_BYTES"]
        assert int(memory) == quantity(model_limits["memory"])
        cpu = int(env["MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES"])
        assert cpu == quantity(model_limits.get("cpu", NODE_ALLOCATABLE["cpu"])) * 1000
    assert (
        pod_env(every["include"].pod, every["include"].sidecar)[
            "MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES"
        ]
        == "2000"
    )  # the parent's scorer container: limits.cpu "2"
    exposed = pod_env(every["admin-exposed"].pod, every["admin-exposed"].sidecar)
    assert exposed["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert exposed["OTEL_EXPORTER_OTLP_HEADERS"] == SECRETS[("otel-headers", "headers")]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in pod_env(
        every["defaults"].pod, every["defaults"].sidecar
    )


def test_model_is_told_where_its_sidecar_listens(every: dict[str, Rendered]) -> None:
    for name, r in every.items():
        env = pod_env(r.pod, r.model)
        config = r.config
        assert env["MLSIDECAR_TARGET"] == config["ingest"]["listen"], name
        api_port = config["api"]["listen"].rsplit(":", 1)[1]
        assert env["MLSIDECAR_API_URL"].endswith(f"127.0.0.1:{api_port}")
        assert env["MLSIDECAR_UPSTREAM_URL"] == f"http://{config['upstream']['listen']}/upstream"
    exposed = every["admin-exposed"]
    assert pod_env(exposed.pod, exposed.model)["MLSIDECAR_TOKEN"] == "ingest-s3cret-token"


def test_probes_point_at_the_agents_real_command_and_port(every: dict[str, Rendered]) -> None:
    parser = build_parser()
    for name, r in every.items():
        exposed = r.config["api"]["listen"].startswith("0.0.0.0")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = r.sidecar[probe]
            if not exposed:
                command = spec["exec"]["command"]
                assert command[:4] == ["mlsidecar", "health", "--probe", "--timeout"], name
                args = parser.parse_args(command[1:])
                assert args.probe and args.model is None and args.api is None
            else:
                port = spec["httpGet"]["port"]
                ports = {p["name"]: p["containerPort"] for p in r.sidecar["ports"]}
                assert ports[port] == int(r.config["api"]["listen"].rsplit(":", 1)[1])
                path = "/healthz" if probe == "livenessProbe" else "/readyz"
                assert spec["httpGet"]["path"] == path
                scheme = "HTTPS" if "tls" in r.config["api"] else "HTTP"
                assert spec["httpGet"]["scheme"] == scheme, name
        # The kubelet probe timeout leaves the CLI's own timeout room to answer.
        assert r.sidecar["readinessProbe"]["timeoutSeconds"] >= 3


def test_ingest_and_proxy_stay_on_loopback_and_an_exposed_api_is_protected(
    every: dict[str, Rendered],
) -> None:
    for name, r in every.items():
        config = r.config
        assert config["ingest"]["listen"].startswith("127.0.0.1:"), name
        assert config["upstream"]["listen"].startswith("127.0.0.1:"), name
        if not config["api"]["listen"].startswith("127.0.0.1:"):
            env = pod_env(r.pod, r.sidecar)
            assert "MLSIDECAR_API__TOKEN" in env or "tls" in config["api"], name
            assert not config["api"].get("insecure")


def test_secrets_never_reach_the_config_map(every: dict[str, Rendered]) -> None:
    for name, r in every.items():
        for obj in r.of_kind("ConfigMap"):
            text = json.dumps(obj)
            for secret in SECRET_VALUES:
                assert secret not in text, (name, secret)
            assert not re.search(r"\b(token|admin_token|redis_url|headers)\b", text), name
        for container in all_containers(r.pod):
            for entry in container.get("env") or []:
                if re.search(r"TOKEN|REDIS__URL|TARGETS__\w+__URL|HEADERS", entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (name, entry)
    redis = every["redis"]
    assert "url" not in redis.config["store"].get("redis", {})
    assert redis.config["store"]["redis"]["key_prefix"] == "fraud"
    targets = every["upstreams-alerts"].config["upstream"]["targets"]
    assert targets == {
        "features": {"url": "http://feature-store.ml.svc:8080", "policy": "fast"},
        "slack": {"policy": "default"},
    }


def test_free_form_agent_config_is_merged_and_its_top_level_keys_are_the_agents(
    rendered: dict[str, Rendered],
) -> None:
    from agent.config import Settings

    r = rendered["classic"]
    assert r.config["engine"] == {"min_window_rows": 50}
    assert r.config["shutdown_timeout_s"] == 20
    assert pod_env(r.pod, r.sidecar)["MLSIDECAR_ENGINE__WINDOW_S"] == "60"
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = schema["properties"]["agent"]["properties"]["config"]["propertyNames"]["enum"]
    assert sorted(allowed) == sorted(Settings.model_fields)


def test_upstreams_breaker_policies_and_alert_rules_reach_the_config(
    rendered: dict[str, Rendered],
) -> None:
    config = rendered["upstreams-alerts"].config
    wanted = UPSTREAMS_AND_ALERTS["agent"]
    assert config["upstream"]["policies"] == wanted["upstream"]["policies"]
    assert config["alerts"]["rules"] == wanted["alerts"]["rules"]
    assert config["alerts"]["channels"] == wanted["alerts"]["channels"]


def test_network_policy_lets_the_test_pod_and_scrapers_in(rendered: dict[str, Rendered]) -> None:
    r = rendered["admin-exposed"]
    policy = r.one("NetworkPolicy")["spec"]
    test_labels = r.one("Pod")["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= r.pod_labels.items()
    model_rule, admin_rule = policy["ingress"]
    assert model_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert "from" not in model_rule  # networkPolicy.ingressFrom empty: anyone may call the model
    assert admin_rule["ports"] == [{"port": "admin", "protocol": "TCP"}]
    scraper, test_pod = admin_rule["from"]
    assert scraper == ADMIN_EXPOSED["networkPolicy"]["metricsFrom"][0]
    assert test_pod["podSelector"]["matchLabels"].items() <= test_labels.items()


def test_data_dir_is_an_empty_dir_or_a_claim(rendered: dict[str, Rendered]) -> None:
    for name, claim in (("defaults", None), ("admin-exposed", "fraud-mlsidecar-data")):
        r = rendered[name]
        volume = next(v for v in r.pod["volumes"] if v["name"] == "mlsidecar-data")
        mount = next(m for m in r.sidecar["volumeMounts"] if m["name"] == "mlsidecar-data")
        assert mount["mountPath"] == r.config["store"]["data_dir"]
        if claim is None:
            assert volume["emptyDir"]["sizeLimit"] == "1Gi"
        else:
            assert volume["persistentVolumeClaim"]["claimName"] == claim
            assert r.one("PersistentVolumeClaim")["metadata"]["name"] == claim


def test_checksum_annotation_changes_with_the_config_only(rendered: dict[str, Rendered]) -> None:
    def checksum(r: Rendered) -> str:
        return r.deployment["spec"]["template"]["metadata"]["annotations"][
            "checksum/mlsidecar-config"
        ]

    base = rendered["defaults"]
    again = Rendered(base.values, render(base.values))
    assert checksum(again) == checksum(base)
    for change in (
        {
            "agent": {
                "alerts": {"rules": {"x": {"signal": "health.score", "op": "<", "threshold": 50}}}
            }
        },
        {"agent": {"logLevel": "DEBUG"}},
        {"agent": {"ingest": {"token": {"existingSecret": "mlsidecar-ingest"}}}},
    ):
        values = merged(base.values, change)
        assert checksum(Rendered(values, render(values))) != checksum(base), change
    values = merged(base.values, {"workload": {"replicas": 4}})  # not the config: same pod config
    assert checksum(Rendered(values, render(values))) == checksum(base)


def test_helm_test_hook_checks_the_sidecar(rendered: dict[str, Rendered]) -> None:
    parser = build_parser()
    for name in ("defaults", "admin-exposed"):
        r = rendered[name]
        pod = r.one("Pod")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        selector = r.one("Service")["spec"]["selector"]
        assert not selector.items() <= pod["metadata"]["labels"].items()  # not an endpoint
        (check,) = pod["spec"]["containers"]
        assert check["image"] == r.sidecar["image"]
        command = check["command"]
        service = r.one("Service")
        if name == "admin-exposed":
            args = parser.parse_args(command[1:])
            assert args.probe and args.api == f"{service['metadata']['name']}:8320"
        else:
            assert command[:2] == ["python3", "-c"]
            compile(command[2], "helm-test", "exec")
            assert repr(service["metadata"]["name"]) in command[2].replace('"', "'")


def test_notes_say_what_to_do_next(rendered: dict[str, Rendered], included: Rendered) -> None:
    notes = rendered["defaults"].texts["mlsidecar/templates/NOTES.txt"]
    assert "kubectl -n ml rollout status deployment/fraud-mlsidecar" in notes
    assert "helm test fraud" in notes
    include_notes = next(t for p, t in included.texts.items() if p.endswith("NOTES.txt"))
    assert "mlsidecar.initContainers" in include_notes


def test_include_mode_renders_only_the_config_map_from_this_chart(included: Rendered) -> None:
    kinds = sorted(o["kind"] for o in included.objects)
    assert kinds == ["ConfigMap", "Deployment"]
    deployment = included.deployment
    assert deployment["metadata"]["name"] == "fraud-scorer"
    config_volume = next(v for v in included.pod["volumes"] if v["name"] == "mlsidecar-config")
    assert config_volume["configMap"]["name"] == included.one("ConfigMap")["metadata"]["name"]
    assert "checksum/mlsidecar-config" in deployment["spec"]["template"]["metadata"]["annotations"]
    assert [c["name"] for c in included.pod["containers"]] == ["scorer"]


# -- bad values fail rendering, naming the value ------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"sidecar": {"mdoe": "classic"}}, "mdoe"),
        ({"sidecar": {"mode": "sidecar"}}, "mode"),
        ({"agent": {"config": {"engin": {}}}}, "engin"),
        ({"agent": {"api": {"port": 70000}}}, "port"),
        ({"agent": {"upstream": {"targets": {"x": {"url": "ftp://x"}}}}}, "url"),
        ({"agent": {"api": {"expose": True}}}, "agent.api.expose"),
        ({"agent": {"store": {"backend": "redis"}}}, "agent.store.redis.existingSecret"),
        ({"serviceMonitor": {"enabled": True}}, "agent.api.expose"),
        ({"agent": {"api": {"prometheus": False}}}, "agent.telemetry.otlpEndpoint"),
        ({"agent": {"upstream": {"targets": {"x": {"policy": "default"}}}}}, "targets.x"),
        ({"model": {"image": {"repository": ""}}}, "model.image.repository"),
    ],
)
def test_bad_values_fail_rendering(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm_python.HelmError) as error:
        render(merged(MODEL, values))
    assert named in str(error.value)


# -- the real agent agrees with the chart -------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mlsidecar_command(), *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the kubernetes.io/tls Secret would hold: a self-signed tls.crt and tls.key."""
    directory = tmp_path_factory.mktemp("tls")
    self_signed(directory, "127.0.0.1", "IP:127.0.0.1")
    return directory


def agent_env(r: Rendered, tls: Path | None = None, **extra: str) -> dict[str, str]:
    """The sidecar's env as the kubelet would set it, on top of a clean test environment;
    with ``tls``, the Secret's files are read from there instead of the mount path."""
    env = subprocess_env(**pod_env(r.pod, r.sidecar))
    env.pop("MLSIDECAR_CONFIG")  # the test passes the rendered file itself
    if "tls" in r.config["api"]:
        assert r.config["api"]["tls"]["cert"] == f"{TLS_MOUNT}/tls.crt"
        mount = next(m for m in r.sidecar["volumeMounts"] if m["name"] == "mlsidecar-tls")
        assert mount["mountPath"] == TLS_MOUNT
        assert tls is not None, "this config needs the TLS files"
        env["MLSIDECAR_API__TLS__CERT"] = str(tls / "tls.crt")
        env["MLSIDECAR_API__TLS__KEY"] = str(tls / "tls.key")
    env.update(extra)
    return env


@pytest.mark.slow  # ten CLI runs: 5-8 s on a busy 2-core machine
def test_rendered_config_passes_mlsidecar_config_validate(
    every: dict[str, Rendered], tmp_path: Path, tls_dir: Path
) -> None:
    for name, r in every.items():
        (tmp_path / name).mkdir()
        path = config_file(r, tmp_path / name)
        result = run_cli("config", "validate", str(path), env=agent_env(r, tls_dir))
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert result.stdout.strip() == f"{path}: valid"
    # Without the Secret's env, the exposed API's config is refused by the agent too.
    exposed = every["admin-exposed"]
    path = config_file(exposed, tmp_path)
    env = {k: v for k, v in agent_env(exposed).items() if k != "MLSIDECAR_API__TOKEN"}
    result = run_cli("config", "validate", str(path), env=env)
    assert result.returncode == 2 and "api.listen" in result.stderr


def test_config_show_masks_the_secrets_from_the_pod_env(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    r = rendered["redis"]
    result = run_cli("config", "show", "--config", str(config_file(r, tmp_path)), env=agent_env(r))
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["store"]["redis"]["url"] == "redis://:**********@redis.ml.svc:6379/0"
    assert "redis-s3cret" not in result.stdout


def http_get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


def wait_ready(api_url: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status, _ = http_get(f"{api_url}/readyz")
        if status == 200:
            break
        time.sleep(0.2)
    return status


@pytest.fixture
def started_agent(agent_process: Any, tmp_path: Path, tls_dir: Path) -> Iterator[Any]:
    """Start `mlsidecar run --config <rendered>` with the pod's env, on free loopback ports."""

    def start(r: Rendered, **extra: str) -> Any:
        path = config_file(r, tmp_path)
        env = agent_env(
            r,
            tls_dir,
            MLSIDECAR_STORE__DATA_DIR=str(tmp_path / "data"),
            MLSIDECAR_UPSTREAM__LISTEN=f"127.0.0.1:{free_port()}",
            **extra,
        )
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # no Collector here: no export retries
        process = agent_process("--config", str(path), env=env)
        process.wait_started()
        process.config_path = path
        process.env = env
        return process

    yield start


@pytest.mark.slow
def test_real_agent_runs_the_default_config_and_the_exec_probe_sees_it(
    rendered: dict[str, Rendered], started_agent: Any
) -> None:
    r = rendered["defaults"]
    process = started_agent(r)
    assert wait_ready(process.api_url) == 200
    # The probe exactly as the kubelet execs it, with the container's env (config via
    # MLSIDECAR_CONFIG; the listen address the test moved to a free port).
    probe = r.sidecar["readinessProbe"]["exec"]["command"]
    env = {
        **process.env,
        "MLSIDECAR_CONFIG": str(process.config_path),
        "MLSIDECAR_API__LISTEN": process.api_url.removeprefix("http://"),
    }
    assert run_cli(*probe[1:], env=env).returncode == 0
    process.terminate()
    assert run_cli(*probe[1:], env=env).returncode != 0  # and it fails once the agent is gone


@pytest.mark.slow
def test_real_agent_loads_upstreams_breakers_and_alert_rules_from_the_chart(
    rendered: dict[str, Rendered], started_agent: Any
) -> None:
    process = started_agent(rendered["upstreams-alerts"])
    assert wait_ready(process.api_url) == 200
    status, body = http_get(f"{process.api_url}/v1/breakers")
    assert status == 200
    # "slack" got its URL from the Secret's env, merged with the ConfigMap's target.
    assert sorted(b["upstream"] for b in body["breakers"]) == ["features", "slack"]
    status, _ = http_get(f"{process.api_url}/v1/alerts")
    assert status == 200


@pytest.mark.slow
def test_real_agent_behind_an_exposed_api_needs_its_token_but_not_for_probes(
    rendered: dict[str, Rendered], started_agent: Any
) -> None:
    process = started_agent(rendered["admin-exposed"])
    assert wait_ready(process.api_url) == 200  # the kubelet's httpGet carries no token
    assert http_get(f"{process.api_url}/healthz")[0] == 200
    assert http_get(f"{process.api_url}/metrics")[0] == 401
    token = SECRETS[("mlsidecar-api", "token")]
    assert http_get(f"{process.api_url}/v1/models", token)[0] == 200
    # The `helm test` pod's command and env, aimed at this agent instead of the Service.
    (check,) = rendered["admin-exposed"].one("Pod")["spec"]["containers"]
    command = [a if not a.endswith(":8320") else process.api_url[7:] for a in check["command"]]
    test_env = subprocess_env(**{e["name"]: e["value"] for e in check["env"]})
    assert run_cli(*command[1:], env=test_env).returncode == 0


@pytest.mark.slow
def test_real_agent_serves_https_probes_with_the_tls_secret(
    rendered: dict[str, Rendered], started_agent: Any, tls_dir: Path
) -> None:
    import ssl

    process = started_agent(rendered["admin-tls"])
    url = process.api_url.replace("http://", "https://") + "/readyz"
    context = ssl.create_default_context(cafile=str(tls_dir / "tls.crt"))
    deadline = time.monotonic() + 30
    while True:  # the kubelet's HTTPS probe (it skips verification; this test verifies)
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                assert response.status == 200
                break
        except urllib.error.URLError:
            assert time.monotonic() < deadline, "no HTTPS /readyz within 30 s"
            time.sleep(0.2)


@pytest.mark.slow
def test_demo_pod_containers_run_together_with_the_rendered_arguments(
    rendered: dict[str, Rendered], agent_process: Any, tmp_path: Path
) -> None:
    """The demo pod's four processes, as rendered, on free loopback ports (mapped below)."""
    r = rendered["demo-model"]
    config = r.config
    ports = {  # the pod's fixed loopback ports -> free ones here
        config["ingest"]["listen"]: f"127.0.0.1:{free_port()}",
        config["api"]["listen"]: f"127.0.0.1:{free_port()}",
        config["upstream"]["listen"]: f"127.0.0.1:{free_port()}",
        "127.0.0.1:8080": f"127.0.0.1:{free_port()}",
        "127.0.0.1:8090": f"127.0.0.1:{free_port()}",
    }

    def mapped(text: str) -> str:
        for pod_address, here in ports.items():
            text = text.replace(pod_address, here)
        return text

    path = tmp_path / "mlsidecar.yaml"
    path.write_text(mapped(r.config_text))
    env = agent_env(r, MLSIDECAR_STORE__DATA_DIR=str(tmp_path / "data"))
    agent = agent_process(
        "--config", str(path),
        "--ingest-listen", ports[config["ingest"]["listen"]],
        "--api-listen", ports[config["api"]["listen"]],
        env=env,
    )  # fmt: skip
    agent.wait_started()
    api = f"http://{ports[config['api']['listen']]}"
    assert wait_ready(api) == 200
    parts: list[subprocess.Popen[str]] = []
    try:
        for container in r.pod["containers"]:
            args = [mapped(a) for a in container["command"][1:] + container["args"]]
            if container["name"] == "demo-traffic":
                args += ["--speed", "20", "--duration", "6"]
            parts.append(
                subprocess.Popen(
                    [mlsidecar_command(), *args],
                    env=subprocess_env(**pod_env(r.pod, container)),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            time.sleep(1.5 if container["name"] == "model" else 0.5)
        traffic = parts[-1]
        _, traffic_err = traffic.communicate(timeout=60)
        assert traffic.returncode == 0, traffic_err
        status, body = http_get(f"{api}/v1/models")
        assert status == 200  # the model's predictions reached the sidecar:
        assert "fraud-scorer" in json.dumps(body["models"]), body
        status, body = http_get(f"{api}/v1/breakers")
        assert [b["upstream"] for b in body["breakers"]] == ["features"]
    finally:
        for part in parts:
            if part.poll() is None:
                part.terminate()
            part.wait(30)


@pytest.mark.slow
def test_real_agent_uses_redis_from_the_secret(
    rendered: dict[str, Rendered], started_agent: Any, redis_server: Any
) -> None:
    process = started_agent(
        rendered["redis"], MLSIDECAR_STORE__REDIS__URL=redis_server.url
    )  # the Secret's URL, pointed at the test's real redis-server
    assert wait_ready(process.api_url) == 200
    status, body = http_get(f"{process.api_url}/v1/breakers")
    assert status == 200 and [b["upstream"] for b in body["breakers"]] == ["features"]


# -- the kustomize snippet ---------------------------------------------------------------------

KUSTOMIZE = ROOT / "examples" / "kubernetes" / "kustomize"


def kustomize_patch_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kustomize_patch", SCRIPTS / "kustomize_patch.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The part of kubectl's strategic merge the patch uses: maps merge, lists of named
    items (containers, env, volumes) merge by name. (No kustomize binary here.)"""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        elif isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
            items = {item["name"]: item for item in out.get(key, [])}
            for item in value:
                items[item["name"]] = strategic_merge(items.get(item["name"], {}), item)
            out[key] = list(items.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def test_kustomize_patch_is_what_the_chart_renders() -> None:
    generator = kustomize_patch_module()
    for name, content in generator.build().items():  # scripts/kustomize_patch.py rewrites them
        assert (KUSTOMIZE / name).read_text() == content, f"{name} is stale"
    values = generator.VALUES
    chart = Rendered(values, render(values, release=generator.RELEASE))
    patch = yaml.safe_load((KUSTOMIZE / "mlsidecar-patch.yaml").read_text())
    pod_patch = patch["spec"]["template"]["spec"]
    assert pod_patch["initContainers"] == chart.pod["initContainers"]
    assert pod_patch["shareProcessNamespace"] is chart.pod["shareProcessNamespace"] is True
    assert pod_patch["containers"] == [{"name": "model", "env": chart.model["env"]}]
    chart_volumes = [v for v in chart.pod["volumes"] if v["name"].startswith("mlsidecar-")]
    assert pod_patch["volumes"] == chart_volumes
    config = yaml.safe_load((KUSTOMIZE / "mlsidecar.yaml").read_text())
    assert config == chart.config
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    (generated,) = kustomization["configMapGenerator"]
    config_volume = next(v for v in pod_patch["volumes"] if v["name"] == "mlsidecar-config")
    assert generated["name"] == config_volume["configMap"]["name"]
    assert generated["files"] == ["mlsidecar.yaml"]
    assert kustomization["resources"] == ["deployment.yaml"]
    assert kustomization["patches"][0]["path"] == "mlsidecar-patch.yaml"

    base = yaml.safe_load((KUSTOMIZE / "deployment.yaml").read_text())
    patched = strategic_merge(base, patch)
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(patched, kube_version, strict=True)
    pod = patched["spec"]["template"]["spec"]
    sidecar = pod["initContainers"][0]
    env = pod_env(pod, sidecar)  # resourceFieldRef names the base's "model" container
    assert env["MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES"] == "2000"
    model_env = pod_env(pod, pod["containers"][0])
    assert model_env["MLSIDECAR_TARGET"] == config["ingest"]["listen"]
    result = run_cli(
        "config", "validate", str(KUSTOMIZE / "mlsidecar.yaml"), env=subprocess_env(**env)
    )
    assert result.returncode == 0, result.stderr


# -- packaging ---------------------------------------------------------------------------------


def test_make_chart_packages_with_the_helm_sdk(tmp_path: Path) -> None:
    import tarfile

    result = subprocess.run(
        [
            str(Path(mlsidecar_command()).parent / "python"),
            str(ROOT / "scripts" / "package_chart.py"),
            "--lint",
            "--destination",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    archive = Path(result.stdout.strip())
    assert archive == tmp_path / "mlsidecar-0.1.0.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"mlsidecar/Chart.yaml", "mlsidecar/values.schema.json", "mlsidecar/README.md"} <= names
    loaded = helm_python.Chart.load_archive(archive.read_bytes())
    try:
        assert loaded.metadata["appVersion"] == "0.1.0"
        from_archive = loaded.render(MODEL, name=RELEASE, namespace=NAMESPACE)
    finally:
        loaded.close()
    assert from_archive == render(MODEL)
