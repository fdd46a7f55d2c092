"""The pod's resources: the sidecar's process, its cgroup, the model service's process, GPUs.

The "model service" is a real child process (``python -c``) that allocates memory and,
where CPU matters, spins. It is found by pid, pid file, process name and command line,
killed and replaced, and read back through the agent's real metric readers
(``InMemoryMetricReader``, or ``/metrics`` over HTTP from a real agent). What cannot be
real on this VM is said where it is simulated: cgroup files (the VM's own cgroup cannot
be set to known values, and is v1 here) and NVML (there is no GPU). A permission-denied
``/proc/<pid>/fd`` is real where the tests run as root (a reader runs as nobody against
a root-owned model) and simulated in the in-process test (root may read every process).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest
from conftest import AgentHarness, agent_settings
from metric_data import by_name
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
from pydantic import ValidationError

from agent.config import ResourcesSettings, Settings
from agent.resources import Gpus, OwnCgroup, ResourceMonitor

MIB = 1 << 20
# The child touches every page of its buffer (b"x" * n), so its RSS really grows.
CHILD = """
import sys, time
buffer = b"x" * (int(sys.argv[1]) << 20)
print("ready", flush=True)
if sys.argv[2] == "spin":
    while True:
        pass
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "MLSIDECAR_")):
            monkeypatch.delenv(name)


@pytest.fixture
def start_model() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start "model service" children; each is killed at teardown."""
    children: list[subprocess.Popen[str]] = []

    def start(
        marker: str = "",
        *,
        mib: int = 32,
        spin: bool = False,
        executable: str = sys.executable,
        user: int | None = None,
    ) -> subprocess.Popen[str]:
        args = [executable, "-c", CHILD, str(mib), "spin" if spin else "sleep"]
        if marker:
            args.append(marker)
        child = subprocess.Popen(
            args, stdout=subprocess.PIPE, text=True, user=user, cwd="/" if user else None
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait(10)


# One collection's callbacks share one sample younger than this; tests wait it out
# (collect sleeps past it) so that every collection reads /proc and the cgroup afresh.
MAX_AGE_S = 0.1


def monitor_for(reader: InMemoryMetricReader, **resources: Any) -> ResourceMonitor:
    """A monitor on its own MeterProvider."""
    resources.setdefault("host", False)  # the instrumentor's host metrics: one test enough
    provider = MeterProvider(metric_readers=[reader])
    return ResourceMonitor(ResourcesSettings(**resources), provider, max_age_s=MAX_AGE_S)


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Every metric of one fresh collection, by name."""
    time.sleep(MAX_AGE_S * 1.1)
    return by_name(reader)


def points(metric: Metric, **attributes: Any) -> list[Any]:
    return [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]


def value(metrics: dict[str, Metric], name: str, **attributes: Any) -> float:
    matching = points(metrics[name], **attributes)
    assert len(matching) == 1, f"{name}: {len(matching)} points match {attributes}"
    return float(matching[0].value)


def model_value(metrics: dict[str, Metric], name: str, **attributes: Any) -> float:
    return value(metrics, name, **{"mlsidecar.process.role": "model", **attributes})


def wait_for(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.05)


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


# -- discovery ---------------------------------------------------------------------------------


def test_model_found_by_pid_reports_its_memory_and_cpu_through_the_metric_reader(
    start_model: Callable[..., subprocess.Popen[str]],
) -> None:
    child = start_model(mib=64, spin=True)
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, model={"pid": child.pid})
    assert monitor.model is not None
    monitor.model.discover()
    collect(reader)  # the first CPU figure averages since start; the next is a rate
    time.sleep(0.5)
    metrics = collect(reader)

    at_pid = {"process.pid": child.pid, "process.executable.name": psutil.Process(child.pid).name()}
    assert model_value(metrics, "process.memory.usage", **at_pid) >= 64 * MIB
    # A spinning child on a shared 2-core VM: well above idle, at most one core.
    cpus = len(os.sched_getaffinity(0))
    assert 0.2 / cpus < model_value(metrics, "process.cpu.utilization", **at_pid) <= 1.1 / cpus
    assert model_value(metrics, "process.thread.count", **at_pid) == 1
    assert model_value(metrics, "process.unix.file_descriptor.count", **at_pid) >= 3
    assert model_value(metrics, "process.cpu.time", **at_pid, **{"cpu.mode": "user"}) > 0
    switches = points(metrics["process.context_switches"], **at_pid)
    assert {p.attributes["process.context_switch.type"] for p in switches} == {
        "voluntary",
        "involuntary",
    }
    assert value(metrics, "mlsidecar.model.process.up") == 1
    assert value(metrics, "mlsidecar.model.process.restarts") == 0
    # The sidecar's own process is there too, under its own pid.
    assert value(metrics, "process.memory.usage", **{"process.pid": os.getpid()}) > 0


def test_model_found_by_pid_file_then_replaced_counts_a_restart(
    start_model: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    pid_file = tmp_path / "model.pid"
    first = start_model()
    pid_file.write_text(f"{first.pid}\n")
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, model={"pid_file": str(pid_file)})
    assert monitor.model is not None
    monitor.model.discover()
    assert monitor.report()["model"]["pid"] == first.pid

    first.kill()
    first.wait(10)
    time.sleep(MAX_AGE_S * 1.1)
    assert monitor.report()["model"]["up"] is False  # noticed by the reading itself
    second = start_model()
    pid_file.write_text(f"{second.pid}\n")
    monitor.model.discover()

    report = monitor.report()["model"]
    assert (report["up"], report["pid"], report["restarts"]) == (True, second.pid, 1)
    metrics = collect(reader)
    assert value(metrics, "mlsidecar.model.process.restarts") == 1
    assert points(metrics["process.memory.usage"], **{"process.pid": second.pid})
    # The old process's series end: observable instruments report only what they observe.
    for name in ("process.memory.usage", "process.cpu.time", "process.cpu.utilization"):
        assert not points(metrics[name], **{"process.pid": first.pid}), name


def test_model_found_by_process_name_pattern(
    start_model: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    # The kernel names a process after the file it executed (at most 15 characters):
    # a symlink to this Python gives the child a name no other process has.
    name = f"model-{uuid.uuid4().hex[:8]}"
    link = tmp_path / name
    link.symlink_to(sys.executable)
    child = start_model(executable=str(link))
    assert psutil.Process(child.pid).name() == name

    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, model={"process_name": f"^{name}$"})
    assert monitor.model is not None
    assert monitor.model.discover() is not None
    metrics = collect(reader)
    assert model_value(metrics, "process.memory.usage", **{"process.executable.name": name}) > 0
    assert monitor.report()["model"]["pid"] == child.pid


def test_model_found_by_cmdline_pattern(start_model: Callable[..., subprocess.Popen[str]]) -> None:
    marker = f"--serve-{uuid.uuid4().hex}"
    child = start_model(marker)
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, model={"cmdline": f"{marker}$"})
    assert monitor.model is not None
    assert monitor.model.discover() is not None
    assert model_value(collect(reader), "process.memory.usage", **{"process.pid": child.pid}) > 0


def test_pattern_matching_nothing_reports_down_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.resources")
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, model={"cmdline": f"no-such-model-{uuid.uuid4().hex}"})
    assert monitor.model is not None
    for _ in range(5):
        assert monitor.model.discover() is None
        metrics = collect(reader)

    assert value(metrics, "mlsidecar.model.process.up") == 0
    assert not points(metrics["process.memory.usage"], **{"mlsidecar.process.role": "model"})
    report = monitor.report()["model"]
    assert report["up"] is False
    assert "no process matches cmdline" in report["problem"]
    assert len(messages(caplog, "model process not found")) == 1


# -- a real agent: restarts, /v1/resources, /metrics -------------------------------------------


def test_agent_rediscovers_a_restarted_model_and_serves_it_on_metrics_and_v1_resources(
    start_model: Callable[..., subprocess.Popen[str]],
    start_agent: Callable[..., AgentHarness],
) -> None:
    marker = f"--model-{uuid.uuid4().hex}"
    first = start_model(marker, mib=48)
    harness = start_agent(
        resources={
            "model": {
                "cmdline": marker,
                "discovery_interval_s": 0.1,
                "memory_limit_bytes": 512 * MIB,
                "cpu_limit_millicores": 500,
            }
        }
    )
    resources = httpx.get(harness.api_url + "/v1/resources").json()
    assert (resources["model"]["pid"], resources["model"]["restarts"]) == (first.pid, 0)

    first.kill()
    first.wait(10)
    second = start_model(marker, mib=48)

    def replaced() -> dict[str, Any] | None:
        model = httpx.get(harness.api_url + "/v1/resources").json()["model"]
        return model if model.get("pid") == second.pid else None

    model = wait_for(replaced)
    assert model["up"] is True and model["restarts"] == 1
    assert model["memory"]["rss_bytes"] >= 48 * MIB
    assert model["memory"]["limit_bytes"] == 512 * MIB
    assert model["memory"]["limit_utilization"] == pytest.approx(
        model["memory"]["rss_bytes"] / (512 * MIB)
    )
    assert model["cpu"]["limit_cores"] == 0.5
    assert model["unreadable"] == {}

    # The same readings through the agent's own readers: in-memory and Prometheus /metrics.
    metrics = collect(harness.metric_reader)
    assert value(metrics, "mlsidecar.model.process.restarts") == 1
    assert model_value(metrics, "process.memory.usage", **{"process.pid": second.pid}) > 48 * MIB
    assert value(metrics, "mlsidecar.model.cpu.limit") == 0.5
    text = httpx.get(harness.api_url + "/metrics").text
    model_rss = [
        line
        for line in text.splitlines()
        if line.startswith("process_memory_usage_bytes{")
        and 'mlsidecar_process_role="model"' in line
    ]
    assert len(model_rss) == 1 and f'process_pid="{second.pid}"' in model_rss[0]
    assert float(model_rss[0].rsplit(" ", 1)[1]) > 48 * MIB
    for name in (
        "mlsidecar_model_process_restarts_total",
        "mlsidecar_model_memory_limit_utilization",
        "process_cpu_utilization",
        "system_memory_usage_bytes",  # the instrumentor's host metrics, on by default
    ):
        assert f"\n{name}{{" in text, name


def test_v1_resources_is_404_when_resources_are_off(
    start_agent: Callable[..., AgentHarness],
) -> None:
    harness = start_agent(resources={"enabled": False})
    response = httpx.get(harness.api_url + "/v1/resources")
    assert response.status_code == 404
    assert "process_memory_usage_bytes" not in httpx.get(harness.api_url + "/metrics").text


# -- what a different uid hides ----------------------------------------------------------------


def test_unreadable_fd_and_io_are_left_out_and_said_once_with_the_reason(
    start_model: Callable[..., subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The child runs as another user when we can arrange it (root: as nobody). Root may
    # still read every /proc/<pid>/fd, so the permission error itself is SIMULATED: psutil
    # is made to raise AccessDenied for this child's fd and io, as it does in a pod where
    # the model container runs under another uid.
    # (nobody may not traverse into this venv, so it runs the system's Python.)
    system_python = Path("/usr/bin/python3")
    other_user = 65534 if os.getuid() == 0 and system_python.exists() else None
    child = start_model(
        user=other_user, executable=str(system_python) if other_user else sys.executable
    )
    real_num_fds, real_io = psutil.Process.num_fds, psutil.Process.io_counters

    def denied(real: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: psutil.Process) -> Any:
            if self.pid == child.pid:
                raise psutil.AccessDenied(self.pid)
            return real(self)

        return read

    monkeypatch.setattr(psutil.Process, "num_fds", denied(real_num_fds))
    monkeypatch.setattr(psutil.Process, "io_counters", denied(real_io))
    caplog.set_level(logging.WARNING, logger="agent.resources")

    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, model={"pid": child.pid})
    assert monitor.model is not None
    monitor.model.discover()
    for _ in range(5):
        metrics = collect(reader)

    at_child = {"process.pid": child.pid}
    assert model_value(metrics, "process.memory.usage", **at_child) > 0  # stat/statm: readable
    assert points(metrics["process.context_switches"], **at_child)  # status: readable
    assert not points(metrics["process.unix.file_descriptor.count"], **at_child)
    assert not points(metrics["process.disk.io"], **at_child)
    assert points(metrics["process.unix.file_descriptor.count"], **{"process.pid": os.getpid()})

    unreadable = monitor.report()["model"]["unreadable"]
    assert set(unreadable) == {"open_file_descriptors", "disk_io"}
    assert f"/proc/{child.pid}/fd" in unreadable["open_file_descriptors"]
    if other_user is not None:
        assert f"runs as uid {other_user}" in unreadable["open_file_descriptors"]
    assert len(messages(caplog, "resource reading unavailable")) == 2  # once each, not per scrape


# A sidecar process running as another uid, for real: the system's Python (same minor
# version, so it can import this venv's packages) as nobody, reading a root-owned "model".
AS_OTHER_USER = """
import json, sys
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from agent.config import ResourcesSettings
from agent.resources import ResourceMonitor

reader = InMemoryMetricReader()
settings = ResourcesSettings(host=False, model={"pid": int(sys.argv[1])})
monitor = ResourceMonitor(settings, MeterProvider(metric_readers=[reader]), max_age_s=0)
monitor.model.discover()
for _ in range(3):
    data = reader.get_metrics_data()
names = sorted(
    m.name
    for rm in data.resource_metrics
    for sm in rm.scope_metrics
    for m in sm.metrics
    if any(p.attributes.get("process.pid") == int(sys.argv[1]) for p in m.data.data_points)
)
print(json.dumps({"uid": __import__("os").getuid(), "names": names, "model": monitor.report()["model"]}))
"""


def system_python_like_ours() -> str | None:
    python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    return str(python) if python.exists() else None


@pytest.mark.skipif(
    os.getuid() != 0 or system_python_like_ours() is None,
    reason="needs root (to run a reader as nobody) and a system Python of this minor version",
)
def test_a_sidecar_under_another_uid_really_cannot_read_fd_and_io_and_says_why(
    start_model: Callable[..., subprocess.Popen[str]],
) -> None:
    import json
    import site

    model = start_model()  # runs as root; the "sidecar" below runs as nobody: no simulation
    python = system_python_like_ours()
    assert python is not None
    root = Path(__file__).resolve().parent.parent
    packages = [root, *map(Path, site.getsitepackages())]
    path = os.pathsep.join(map(str, packages))
    # nobody must reach the checkout and the venv: a CI clone may sit in a mode-700 tmp
    # dir. Grant traverse (o+x, not read) on the directories in the way, for this test only.
    granted = []
    for directory in {d for p in packages for d in (p, *p.parents)}:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o001)
            granted.append((directory, mode))
    try:
        done = subprocess.run(
            [python, "-c", AS_OTHER_USER, str(model.pid)],
            user=65534,
            group=65534,
            cwd="/",
            env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for directory, mode in granted:
            directory.chmod(mode)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["uid"] == 65534
    # stat, statm and status are world-readable: CPU, memory, threads, switches are there.
    for name in (
        "process.cpu.time",
        "process.memory.usage",
        "process.thread.count",
        "process.context_switches",
    ):
        assert name in result["names"], name
    assert "process.unix.file_descriptor.count" not in result["names"]
    assert "process.disk.io" not in result["names"]
    reported = result["model"]
    assert reported["up"] is True and reported["memory"]["rss_bytes"] > 32 * MIB
    assert reported["open_file_descriptors"] is None
    assert set(reported["unreadable"]) == {"open_file_descriptors", "disk_io"}
    assert reported["unreadable"]["open_file_descriptors"] == (
        f"permission denied reading /proc/{model.pid}/fd: the process runs as uid 0 and the "
        "sidecar as uid 65534 (another user's fd and io need the same uid or CAP_SYS_PTRACE)"
    )
    # Said once each on stderr (the child's log), not once per reading (max_age_s=0:
    # every callback of three collections read the process again).
    assert done.stderr.count("resource reading unavailable") == 2


# -- cgroups -----------------------------------------------------------------------------------


def fabricate_cgroup_v2(root: Path, **files: str) -> Path:
    """FABRICATED cgroup v2 files: the VM's own cgroup cannot be set to known values."""
    root.mkdir(parents=True, exist_ok=True)
    defaults = {
        "cgroup.controllers": "cpuset cpu io memory pids",
        "memory.current": str(256 * MIB),
        "memory.max": str(512 * MIB),
        "cpu.max": "50000 100000",
        "cpu.stat": "usage_usec 2000000\nuser_usec 1500000\nsystem_usec 500000\n"
        "nr_periods 40\nnr_throttled 10\nthrottled_usec 250000\n",
    }
    for name, text in {**defaults, **files}.items():
        (root / name.replace("_", ".", 1) if "." not in name else root / name).write_text(text)
    return root


def test_fabricated_cgroup_v2_tree_gives_the_container_ratios(tmp_path: Path) -> None:
    root = fabricate_cgroup_v2(tmp_path / "cgroup")
    reader = InMemoryMetricReader()
    monitor_for(reader, cgroup_root=str(root))
    metrics = collect(reader)

    assert value(metrics, "container.memory.usage") == 256 * MIB
    assert value(metrics, "mlsidecar.container.memory.limit") == 512 * MIB
    assert value(metrics, "mlsidecar.container.memory.limit_utilization") == 0.5
    assert value(metrics, "mlsidecar.container.cpu.limit") == 0.5
    assert value(metrics, "container.cpu.time") == 2.0
    assert value(metrics, "mlsidecar.container.cpu.periods") == 40
    assert value(metrics, "mlsidecar.container.cpu.throttled.periods") == 10
    assert value(metrics, "mlsidecar.container.cpu.throttled.time") == 0.25
    assert "container.cpu.usage" not in metrics  # a rate needs a second reading


def test_container_cpu_usage_is_the_usage_rate_against_the_quota(tmp_path: Path) -> None:
    root = fabricate_cgroup_v2(tmp_path / "cgroup")
    cgroup = OwnCgroup(root)
    first = cgroup.read()
    assert first is not None and cgroup.cpu_cores(first) is None
    (root / "cpu.stat").write_text("usage_usec 2300000\nnr_periods 41\n")
    second = cgroup.read()
    assert second is not None
    cores = cgroup.cpu_cores(second)
    assert cores == pytest.approx(0.3 / (second.taken_at - first.taken_at))
    assert second.cpu_limit_cores == 0.5


def test_unlimited_cgroup_has_no_limit_series(tmp_path: Path) -> None:
    root = fabricate_cgroup_v2(
        tmp_path / "cgroup", **{"memory.max": "max", "cpu.max": "max 100000"}
    )
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, cgroup_root=str(root))
    metrics = collect(reader)
    assert value(metrics, "container.memory.usage") == 256 * MIB
    for name in (
        "mlsidecar.container.memory.limit",
        "mlsidecar.container.memory.limit_utilization",
        "mlsidecar.container.cpu.limit",
    ):
        assert name not in metrics
    container = monitor.report()["container"]
    assert container["memory"]["limit_bytes"] is None and container["cpu"]["limit_cores"] is None


@pytest.mark.parametrize("layout", ["v1", "absent"])
def test_cgroup_v1_or_absent_is_one_log_line_across_many_collections(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cgroup"
    if layout == "v1":  # FABRICATED v1 layout: one directory per controller, no cgroup.controllers
        for controller in ("memory", "cpu", "cpuacct"):
            (root / controller).mkdir(parents=True)
    caplog.set_level(logging.DEBUG, logger="agent.resources")
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, cgroup_root=str(root))
    for _ in range(20):
        metrics = collect(reader)

    assert not [name for name in metrics if name.startswith(("container.", "mlsidecar.container."))]
    lines = [r for r in caplog.records if r.name == "agent.resources.cgroup"]
    assert len(lines) == 1
    expected = "cgroup v1" if layout == "v1" else "no cgroup v2 filesystem"
    assert expected in lines[0].getMessage()
    assert expected in monitor.report()["container"]["problem"]
    assert not messages(caplog, "resource reading unavailable")


def test_missing_cgroup_file_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = fabricate_cgroup_v2(tmp_path / "cgroup")
    (root / "memory.max").unlink()  # the root cgroup of a host has no memory.max
    caplog.set_level(logging.WARNING, logger="agent.resources")
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, cgroup_root=str(root))
    for _ in range(10):
        metrics = collect(reader)
    assert value(metrics, "container.memory.usage") == 256 * MIB
    assert "mlsidecar.container.memory.limit" not in metrics
    assert len(messages(caplog, "memory.max")) == 1
    assert "memory.max" in monitor.report()["container"]["unreadable"]


# -- limits from the environment (the chart's Downward API) -------------------------------------


def test_model_limits_from_environment_give_the_memory_and_cpu_ratios(
    start_model: Callable[..., subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    child = start_model(mib=64, spin=True)
    # What the chart sets through `resourceFieldRef` (limits.memory; limits.cpu, divisor 1m).
    monkeypatch.setenv("MLSIDECAR_RESOURCES__MODEL__PID", str(child.pid))
    monkeypatch.setenv("MLSIDECAR_RESOURCES__MODEL__MEMORY_LIMIT_BYTES", str(256 * MIB))
    monkeypatch.setenv("MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES", "2000")
    settings = Settings.load(None)
    assert settings.resources.model.cpu_limit == 2.0

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monitor = ResourceMonitor(
        settings.resources.model_copy(update={"host": False}), provider, max_age_s=MAX_AGE_S
    )
    assert monitor.model is not None
    monitor.model.discover()
    collect(reader)
    time.sleep(0.3)
    # One collection shares one sample: the ratio is exactly this collection's RSS / limit.
    metrics = collect(reader)
    rss = model_value(metrics, "process.memory.usage")
    assert rss >= 64 * MIB
    ratio = value(metrics, "mlsidecar.model.memory.limit_utilization", **{"process.pid": child.pid})
    assert ratio == pytest.approx(rss / (256 * MIB))
    assert value(metrics, "mlsidecar.model.memory.limit") == 256 * MIB
    cpus = len(os.sched_getaffinity(0))
    cpu_ratio = value(metrics, "mlsidecar.model.cpu.limit_utilization")
    assert cpu_ratio == pytest.approx(model_value(metrics, "process.cpu.utilization") * cpus / 2)
    assert 0.2 / 2 < cpu_ratio <= 1.1 / 2  # a spinning child: up to one core of the two allowed


# -- GPUs ----------------------------------------------------------------------------------------


class FakeNvml:
    """A FAKE NVML module (the ``pynvml`` API of nvidia-ml-py): this machine has no GPU,
    so the GPU code path is driven through this stand-in with two invented devices."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-fake-{handle}".encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Fake A100"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=[40, 90][handle], memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * 1024 * MIB, total=40960 * MIB, free=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if handle == 1:
            raise RuntimeError("Not Supported")  # one query unsupported on one device
        return 61


def test_gpu_metrics_per_device_from_a_fake_nvml() -> None:
    nvml = FakeNvml()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monitor = ResourceMonitor(ResourcesSettings(host=False), provider, nvml=nvml)
    metrics = collect(reader)

    gpu0, gpu1 = {"hw.id": "GPU-fake-0"}, {"hw.id": "GPU-fake-1"}
    assert value(metrics, "hw.gpu.utilization", **gpu0) == 0.4
    assert value(metrics, "hw.gpu.utilization", **gpu1) == 0.9
    assert value(metrics, "hw.gpu.memory.usage", **gpu1) == 2048 * MIB
    assert value(metrics, "hw.gpu.memory.limit", **gpu0) == 40960 * MIB
    assert value(metrics, "hw.gpu.memory.utilization", **gpu1) == pytest.approx(2048 / 40960)
    assert value(metrics, "hw.temperature", **gpu0) == 61
    assert not points(metrics["hw.temperature"], **gpu1)
    assert [g["uuid"] for g in monitor.report()["gpus"]] == ["GPU-fake-0", "GPU-fake-1"]
    gpus = monitor.gpus
    assert gpus is not None
    gpus.close()
    assert nvml.shut_down


def test_no_gpu_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.resources")
    failing = Gpus(nvml=FakeNvml(fail_init=True))  # FAKE NVML whose library is missing
    assert not failing.available and failing.read() == []
    assert "NVML unavailable" in str(failing.problem)
    # The real import path: nvidia-ml-py is not installed here, or has no driver to talk to.
    assert Gpus().read() == []
    reader = InMemoryMetricReader()
    monitor_for(reader)
    assert not [name for name in collect(reader) if name.startswith("hw.")]


# -- host and cost -------------------------------------------------------------------------------


def test_host_metrics_from_the_instrumentor_without_socket_walks_by_default() -> None:
    reader = InMemoryMetricReader()
    monitor = monitor_for(reader, host=True)
    metrics = collect(reader)
    for name in (
        "system.cpu.utilization",
        "system.memory.usage",
        "system.swap.usage",
        "system.network.io",
        "system.filesystem.usage",
        "system.filesystem.utilization",
        "system.cpu.load_average.1m",
    ):
        assert name in metrics, name
    assert "system.network.connections" not in metrics
    used = value(metrics, "system.filesystem.usage", **{"system.filesystem.state": "used"})
    assert used > 0
    assert 0 < value(metrics, "system.filesystem.utilization") < 1
    # The instrumentor's own process.* metrics are not used: ours carry process.pid.
    assert all(
        "process.pid" in p.attributes for p in metrics["process.memory.usage"].data.data_points
    )
    assert monitor.report()["sidecar"]["pid"] == os.getpid()


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "key", "message"),
    [
        (
            {"pid": 1, "cmdline": "x"},
            "resources.model",
            "set only one of pid, process_name/cmdline",
        ),
        ({"process_name": "("}, "resources.model.process_name", "is not a regular expression"),
        ({"bogus": 1}, "resources.model.bogus", "Extra inputs are not permitted"),
        (
            {"cpu_limit_cores": 1, "cpu_limit_millicores": 500},
            "resources.model",
            "not both",
        ),
    ],
)
def test_bad_resources_config_names_the_key(model: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        agent_settings(resources={"model": model})
    errors = [
        (".".join(str(part) for part in error["loc"]), error["msg"])
        for error in raised.value.errors()
    ]
    assert any(loc == key and message in msg for loc, msg in errors), errors


def test_the_configuration_documented_in_resources_md_loads(tmp_path: Path) -> None:
    import yaml

    text = (Path(__file__).resolve().parent.parent / "docs" / "resources.md").read_text()
    blocks = [yaml.safe_load(b.split("```")[0]) for b in text.split("```yaml\n")[1:]]
    (documented,) = [b for b in blocks if "resources" in b]
    path = tmp_path / "mlsidecar.yaml"
    path.write_text(yaml.safe_dump(documented))
    model = Settings.load(path).resources.model
    assert (model.cmdline, model.cpu_limit, model.memory_limit_bytes) == (
        "gunicorn .*fraud_scorer",
        2.0,
        4 * 1024 * MIB,
    )
