"""The pod's resources as OpenTelemetry instruments, read when a reader collects.

    monitor = ResourceMonitor(settings.resources, telemetry.meter_provider)
    await monitor.start()      # finds the model process, then looks again periodically
    monitor.report()           # GET /v1/resources
    await monitor.stop()

Every instrument is observable: nothing is read between collections, and one
collection reads each process and the cgroup once (a sample younger than
``max_age_s`` is shared by all callbacks and by ``report``). Host-wide ``system.*``
metrics come from opentelemetry-instrumentation-system-metrics; process metrics are
read here, for the sidecar and for the model service, so both carry ``process.pid``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

from agent import __version__
from agent.config import ResourcesSettings
from agent.resources.cgroup import CgroupReading, OwnCgroup
from agent.resources.discovery import ModelProcess
from agent.resources.gpu import GpuReading, Gpus
from agent.resources.process import ProcessReader, ProcessReading, Unreadable, available_cpus

log = logging.getLogger(__name__)
SCOPE = "mlsidecar.resources"
SIDECAR, MODEL = "sidecar", "model"

# Host metrics taken from the instrumentor; its process.* metrics are not used (ours carry
# process.pid and cover the model process too), nor its deprecated process.runtime.*.
HOST_METRICS: dict[str, list[str] | None] = {
    "system.cpu.time": ["idle", "user", "system", "irq", "softirq", "nice", "iowait", "steal"],
    "system.cpu.utilization": [
        "idle",
        "user",
        "system",
        "irq",
        "softirq",
        "nice",
        "iowait",
        "steal",
    ],
    "system.memory.usage": ["used", "free", "cached", "buffers"],
    "system.memory.utilization": ["used", "free", "cached", "buffers"],
    "system.swap.usage": ["used", "free"],
    "system.swap.utilization": ["used", "free"],
    "system.disk.io": ["read", "write"],
    "system.disk.operations": ["read", "write"],
    "system.disk.time": ["read", "write"],
    "system.network.dropped.packets": ["transmit", "receive"],
    "system.network.packets": ["transmit", "receive"],
    "system.network.errors": ["transmit", "receive"],
    "system.network.io": ["transmit", "receive"],
    "cpython.gc.collections": None,
    "cpython.gc.collected_objects": None,
    "cpython.gc.uncollectable_objects": None,
}


def instrument_host(meter_provider: MeterProvider, *, network_connections: bool) -> None:
    """Register the instrumentor's ``system.*`` instruments on ``meter_provider``."""
    from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor

    config = dict(HOST_METRICS)
    if network_connections:
        config["system.network.connections"] = ["family", "type"]
    instrumentor = SystemMetricsInstrumentor(config=config)
    # The instrumentor is a process-wide singleton that instruments once; its uninstrument
    # unregisters nothing, so resetting it lets every Agent (tests run many) register its
    # own instruments on its own MeterProvider.
    instrumentor.instrument(meter_provider=meter_provider)
    instrumentor.uninstrument()


@dataclass(frozen=True)
class ResourceSample:
    """Everything one collection reads."""

    sidecar: ProcessReading | None
    sidecar_cores: float | None
    model: ProcessReading | None
    model_cores: float | None
    cgroup: CgroupReading | None
    cgroup_cores: float | None
    gpus: list[GpuReading] = field(default_factory=list)
    cpus: int = 1


def _ratio(value: float | None, limit: float | None) -> float | None:
    return None if value is None or not limit else value / limit


class ResourceMonitor:
    """Reads the sidecar, the model process, the sidecar's cgroup and GPUs at collection time."""

    def __init__(
        self,
        settings: ResourcesSettings,
        meter_provider: MeterProvider,
        *,
        nvml: Any | None = None,
        own_pid: int | None = None,
        max_age_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.unreadable = Unreadable()
        own_pid = os.getpid() if own_pid is None else own_pid
        self._sidecar = ProcessReader(
            psutil.Process(own_pid), role=SIDECAR, unreadable=self.unreadable
        )
        self.model = (
            ModelProcess(settings.model, own_pid=own_pid) if settings.model.enabled else None
        )
        self._model_reader: ProcessReader | None = None
        self.cgroup = OwnCgroup(settings.cgroup_root, unreadable=self.unreadable)
        self.gpus = Gpus(nvml) if settings.gpu else None
        self._cpus = available_cpus()
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._sample: ResourceSample | None = None
        self._sampled_at = -float("inf")
        self._sampled_model: Any = None  # the model process the sample read (psutil.Process)
        self._task: asyncio.Task[None] | None = None
        self._register(meter_provider.get_meter(SCOPE, __version__))
        if settings.host:
            instrument_host(meter_provider, network_connections=settings.network_connections)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the model process (off the loop: a pattern walks /proc), then keep looking."""
        if self.model is None:
            return
        await asyncio.to_thread(self.model.discover)
        self._task = asyncio.create_task(self._discover_periodically(), name="discover-model")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.gpus is not None:
            self.gpus.close()

    async def _discover_periodically(self) -> None:
        assert self.model is not None
        while True:
            await asyncio.sleep(self.settings.model.discovery_interval_s)
            try:
                await asyncio.to_thread(self.model.discover)
            except Exception:
                log.exception("looking for the model process failed")

    # -- reading -----------------------------------------------------------------------------

    def sample(self, *, fresh: bool = False) -> ResourceSample:
        """One reading of everything; shared by the callbacks of one collection."""
        with self._lock:
            now = time.monotonic()
            # A model process found (or lost) since the last sample makes it stale.
            tracked = None if self.model is None else self.model.current()
            if (
                not fresh
                and self._sample is not None
                and now - self._sampled_at < self._max_age_s
                and tracked is self._sampled_model
            ):
                return self._sample
            sidecar = self._sidecar.read()
            model, model_cores = self._read_model()
            cgroup = self.cgroup.read()
            self._sample = ResourceSample(
                sidecar=sidecar,
                sidecar_cores=None if sidecar is None else self._sidecar.cpu_cores(sidecar),
                model=model,
                model_cores=model_cores,
                cgroup=cgroup,
                cgroup_cores=None if cgroup is None else self.cgroup.cpu_cores(cgroup),
                gpus=self.gpus.read() if self.gpus is not None else [],
                cpus=self._cpus,
            )
            self._sampled_at = now
            self._sampled_model = None if self.model is None else self.model.current()
            return self._sample

    def _read_model(self) -> tuple[ProcessReading | None, float | None]:
        if self.model is None:
            return None, None
        process = self.model.current()
        if process is None:
            return None, None
        reader = self._model_reader
        if reader is None or reader.process is not process:
            reader = self._model_reader = ProcessReader(
                process, role=MODEL, unreadable=self.unreadable
            )
        reading = reader.read()
        if reading is None:
            self.model.lost(process)
            return None, None
        return reading, reader.cpu_cores(reading)

    def _processes(self) -> Iterator[tuple[ProcessReading, float | None, dict[str, Any]]]:
        sample = self.sample()
        for role, reading, cores in (
            (SIDECAR, sample.sidecar, sample.sidecar_cores),
            (MODEL, sample.model, sample.model_cores),
        ):
            if reading is not None:
                attributes = {
                    "process.pid": reading.pid,
                    "process.executable.name": reading.name,
                    "mlsidecar.process.role": role,
                }
                yield reading, cores, attributes

    # -- instruments -------------------------------------------------------------------------

    def _register(self, meter: Meter) -> None:
        def per_process(
            value: Callable[[ProcessReading], Any],
        ) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                for reading, _, attributes in self._processes():
                    v = value(reading)
                    if v is not None:
                        yield Observation(v, attributes)

            return observe

        meter.create_observable_counter(
            "process.cpu.time",
            callbacks=[self._observe_cpu_time],
            unit="s",
            description="CPU seconds used by the process, by cpu.mode (user, system).",
        )
        # Ratios carry no unit rather than the conventions' "1": a Collector would add
        # `_ratio` to a unit-"1" gauge and /metrics would not (docs/metrics.md#names-end-to-end).
        meter.create_observable_gauge(
            "process.cpu.utilization",
            callbacks=[self._observe_cpu_utilization],
            unit="",
            description="CPU time used since the previous collection per elapsed second, divided by the CPUs available.",
        )
        for name, unit, description, value in (
            (
                "process.memory.usage",
                "By",
                "Resident memory (RSS) of the process.",
                lambda r: r.memory_rss,
            ),
            (
                "process.memory.virtual",
                "By",
                "Virtual memory of the process.",
                lambda r: r.memory_vms,
            ),
            ("process.thread.count", "{thread}", "Threads of the process.", lambda r: r.threads),
            (
                "process.unix.file_descriptor.count",
                "{file_descriptor}",
                "File descriptors open in the process (absent when /proc/<pid>/fd is unreadable).",
                lambda r: r.fds,
            ),
        ):
            meter.create_observable_up_down_counter(
                name,
                callbacks=[per_process(value)],
                unit=unit,
                description=description,
            )
        meter.create_observable_gauge(
            "process.uptime",
            callbacks=[per_process(lambda r: r.uptime_s)],
            unit="s",
            description="Seconds since the process started.",
        )
        meter.create_observable_counter(
            "process.context_switches",
            callbacks=[self._observe_context_switches],
            unit="{context_switch}",
            description="Context switches of the process, by process.context_switch.type.",
        )
        meter.create_observable_counter(
            "process.disk.io",
            callbacks=[self._observe_disk_io],
            unit="By",
            description="Bytes the process read and wrote through storage (absent when /proc/<pid>/io is unreadable).",
        )
        if self.model is not None:
            self._register_model(meter)
        if self.cgroup.directory is not None:
            self._register_cgroup(meter)
        if self.settings.filesystems:
            meter.create_observable_up_down_counter(
                "system.filesystem.usage",
                callbacks=[self._observe_filesystem_usage],
                unit="By",
                description="Filesystem space by system.filesystem.state (used, free, reserved).",
            )
            meter.create_observable_gauge(
                "system.filesystem.utilization",
                callbacks=[self._observe_filesystem_utilization],
                unit="",
                description="Share of the filesystem's space in use.",
            )
        if self.settings.host and hasattr(os, "getloadavg"):
            for minutes in (1, 5, 15):
                meter.create_observable_gauge(
                    f"system.cpu.load_average.{minutes}m",
                    callbacks=[self._load_average(minutes)],
                    unit="{thread}",
                    description=f"Load average over {minutes} minute(s) (as the Collector's hostmetrics).",
                )
        if self.gpus is not None and self.gpus.available:
            self._register_gpus(meter)

    def _observe_cpu_time(self, options: CallbackOptions) -> Iterable[Observation]:
        for reading, _, attributes in self._processes():
            yield Observation(reading.cpu_user_s, {**attributes, "cpu.mode": "user"})
            yield Observation(reading.cpu_system_s, {**attributes, "cpu.mode": "system"})

    def _observe_cpu_utilization(self, options: CallbackOptions) -> Iterable[Observation]:
        cpus = self._cpus
        for _, cores, attributes in self._processes():
            if cores is not None:
                yield Observation(cores / cpus, attributes)

    def _observe_context_switches(self, options: CallbackOptions) -> Iterable[Observation]:
        for reading, _, attributes in self._processes():
            for kind, value in (
                ("voluntary", reading.voluntary_switches),
                ("involuntary", reading.involuntary_switches),
            ):
                if value is not None:
                    yield Observation(value, {**attributes, "process.context_switch.type": kind})

    def _observe_disk_io(self, options: CallbackOptions) -> Iterable[Observation]:
        for reading, _, attributes in self._processes():
            for direction, value in (
                ("read", reading.io_read_bytes),
                ("write", reading.io_write_bytes),
            ):
                if value is not None:
                    yield Observation(value, {**attributes, "disk.io.direction": direction})

    def _register_model(self, meter: Meter) -> None:
        model = self.model
        assert model is not None
        limits = self.settings.model
        meter.create_observable_gauge(
            "mlsidecar.model.process.up",
            callbacks=[lambda options: [Observation(1 if self.sample().model else 0)]],
            unit="",
            description="1 while the model service's process is found and readable, else 0.",
        )
        meter.create_observable_counter(
            "mlsidecar.model.process.restarts",
            callbacks=[lambda options: [Observation(model.restarts)]],
            unit="{restart}",
            description="Times a new model process was found after a previous one went away.",
        )
        if limits.cpu_limit is not None:
            cpu_limit = limits.cpu_limit
            meter.create_observable_gauge(
                "mlsidecar.model.cpu.limit",
                callbacks=[lambda options: [Observation(cpu_limit)]],
                unit="{cpu}",
                description="The model container's CPU limit (from configuration).",
            )
            meter.create_observable_gauge(
                "mlsidecar.model.cpu.limit_utilization",
                callbacks=[self._observe_model_cpu_ratio],
                unit="",
                description="CPU cores the model process uses divided by its container's CPU limit.",
            )
        if limits.memory_limit_bytes is not None:
            memory_limit = limits.memory_limit_bytes
            meter.create_observable_gauge(
                "mlsidecar.model.memory.limit",
                callbacks=[lambda options: [Observation(memory_limit)]],
                unit="By",
                description="The model container's memory limit (from configuration).",
            )
            meter.create_observable_gauge(
                "mlsidecar.model.memory.limit_utilization",
                callbacks=[self._observe_model_memory_ratio],
                unit="",
                description="Resident memory of the model process divided by its container's memory limit.",
            )

    def _model_attributes(self, reading: ProcessReading) -> dict[str, Any]:
        return {"process.pid": reading.pid, "process.executable.name": reading.name}

    def _observe_model_cpu_ratio(self, options: CallbackOptions) -> Iterable[Observation]:
        sample = self.sample()
        ratio = _ratio(sample.model_cores, self.settings.model.cpu_limit)
        if sample.model is not None and ratio is not None:
            yield Observation(ratio, self._model_attributes(sample.model))

    def _observe_model_memory_ratio(self, options: CallbackOptions) -> Iterable[Observation]:
        sample = self.sample()
        if sample.model is not None:
            ratio = _ratio(sample.model.memory_rss, self.settings.model.memory_limit_bytes)
            if ratio is not None:
                yield Observation(ratio, self._model_attributes(sample.model))

    def _register_cgroup(self, meter: Meter) -> None:
        def observe(
            value: Callable[[CgroupReading, ResourceSample], Any],
        ) -> Callable[..., Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                sample = self.sample()
                if sample.cgroup is not None:
                    v = value(sample.cgroup, sample)
                    if v is not None:
                        yield Observation(v)

            return callback

        for kind, name, unit, description, value in (
            (
                "updown",
                "container.memory.usage",
                "By",
                "The sidecar container's memory (cgroup memory.current).",
                lambda c, s: c.memory_current,
            ),
            (
                "gauge",
                "mlsidecar.container.memory.limit",
                "By",
                "The sidecar container's memory limit (cgroup memory.max; absent when unlimited).",
                lambda c, s: c.memory_max,
            ),
            (
                "gauge",
                "mlsidecar.container.memory.limit_utilization",
                "",
                "memory.current / memory.max of the sidecar's container.",
                lambda c, s: c.memory_utilization,
            ),
            (
                "counter",
                "container.cpu.time",
                "s",
                "CPU seconds used by the sidecar's container (cgroup cpu.stat usage_usec).",
                lambda c, s: c.cpu_usage_s,
            ),
            (
                "gauge",
                "container.cpu.usage",
                "{cpu}",
                "CPU cores the sidecar's container used since the previous collection.",
                lambda c, s: s.cgroup_cores,
            ),
            (
                "gauge",
                "mlsidecar.container.cpu.limit",
                "{cpu}",
                "The sidecar container's CPU limit (cgroup cpu.max quota/period; absent when unlimited).",
                lambda c, s: c.cpu_limit_cores,
            ),
            (
                "gauge",
                "mlsidecar.container.cpu.limit_utilization",
                "",
                "container.cpu.usage / the CPU limit of the sidecar's container.",
                lambda c, s: _ratio(s.cgroup_cores, c.cpu_limit_cores),
            ),
            (
                "counter",
                "mlsidecar.container.cpu.periods",
                "{period}",
                "CPU enforcement periods elapsed (cgroup cpu.stat nr_periods).",
                lambda c, s: c.periods,
            ),
            (
                "counter",
                "mlsidecar.container.cpu.throttled.periods",
                "{period}",
                "Periods in which the container was throttled (cpu.stat nr_throttled).",
                lambda c, s: c.throttled_periods,
            ),
            (
                "counter",
                "mlsidecar.container.cpu.throttled.time",
                "s",
                "Time the container was throttled (cpu.stat throttled_usec).",
                lambda c, s: c.throttled_s,
            ),
        ):
            create = {
                "updown": meter.create_observable_up_down_counter,
                "gauge": meter.create_observable_gauge,
                "counter": meter.create_observable_counter,
            }[kind]
            create(name, callbacks=[observe(value)], unit=unit, description=description)

    def _filesystems(self) -> Iterator[tuple[dict[str, Any], Any]]:
        for path in self.settings.filesystems:
            try:
                usage = os.statvfs(path)
            except OSError as error:
                self.unreadable.note(
                    "host", f"filesystem {path}", f"statvfs failed: {error.strerror}"
                )
                continue
            yield {"system.filesystem.mountpoint": path}, usage

    def _observe_filesystem_usage(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, st in self._filesystems():
            free = st.f_bavail * st.f_frsize
            reserved = (st.f_bfree - st.f_bavail) * st.f_frsize
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            for state, value in (("used", used), ("free", free), ("reserved", reserved)):
                yield Observation(value, {**attributes, "system.filesystem.state": state})

    def _observe_filesystem_utilization(self, options: CallbackOptions) -> Iterable[Observation]:
        for attributes, st in self._filesystems():
            used = st.f_blocks - st.f_bfree
            # As df: used / (used + available to unprivileged users).
            denominator = used + st.f_bavail
            if denominator > 0:
                yield Observation(used / denominator, attributes)

    def _load_average(self, minutes: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        index = {1: 0, 5: 1, 15: 2}[minutes]

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(os.getloadavg()[index])

        return observe

    def _register_gpus(self, meter: Meter) -> None:
        def observe(value: Callable[[GpuReading], Any]) -> Callable[..., Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                for gpu in self.sample().gpus:
                    v = value(gpu)
                    if v is not None:
                        yield Observation(
                            v, {"hw.id": gpu.uuid, "hw.name": gpu.name, "hw.type": "gpu"}
                        )

            return callback

        meter.create_observable_gauge(
            "hw.gpu.utilization",
            callbacks=[observe(lambda g: g.utilization)],
            unit="",
            description="Share of time a GPU kernel was running (NVML).",
        )
        meter.create_observable_up_down_counter(
            "hw.gpu.memory.usage",
            callbacks=[observe(lambda g: g.memory_used)],
            unit="By",
            description="GPU memory in use (NVML).",
        )
        meter.create_observable_up_down_counter(
            "hw.gpu.memory.limit",
            callbacks=[observe(lambda g: g.memory_total)],
            unit="By",
            description="GPU memory in total (NVML).",
        )
        meter.create_observable_gauge(
            "hw.gpu.memory.utilization",
            callbacks=[observe(lambda g: _ratio(g.memory_used, g.memory_total))],
            unit="",
            description="Share of GPU memory in use (NVML).",
        )
        meter.create_observable_gauge(
            "hw.temperature",
            callbacks=[observe(lambda g: g.temperature_c)],
            unit="Cel",
            description="GPU temperature (NVML).",
        )

    # -- report ------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The current readings as JSON-ready data (``GET /v1/resources``)."""
        sample = self.sample()
        report: dict[str, Any] = {
            "cpus_available": sample.cpus,
            "sidecar": self._process_report(
                sample.sidecar, sample.sidecar_cores, sample.cpus, SIDECAR
            ),
            "model": self._model_report(sample),
            "container": self._container_report(sample),
        }
        if self.gpus is not None:
            report["gpus"] = [gpu.__dict__ for gpu in sample.gpus]
            report["gpu_problem"] = self.gpus.problem
        return report

    def _process_report(
        self, reading: ProcessReading | None, cores: float | None, cpus: int, role: str
    ) -> dict[str, Any]:
        report: dict[str, Any] = {"up": reading is not None}
        if reading is not None:
            report.update(
                pid=reading.pid,
                executable_name=reading.name,
                uptime_s=round(reading.uptime_s, 3),
                cpu={
                    "cores": cores,
                    "utilization": None if cores is None else cores / cpus,
                    "user_s": reading.cpu_user_s,
                    "system_s": reading.cpu_system_s,
                },
                memory={"rss_bytes": reading.memory_rss, "virtual_bytes": reading.memory_vms},
                threads=reading.threads,
                open_file_descriptors=reading.fds,
                context_switches={
                    "voluntary": reading.voluntary_switches,
                    "involuntary": reading.involuntary_switches,
                },
                disk_io={
                    "read_bytes": reading.io_read_bytes,
                    "write_bytes": reading.io_write_bytes,
                },
            )
        report["unreadable"] = self.unreadable.reasons(role)
        return report

    def _model_report(self, sample: ResourceSample) -> dict[str, Any]:
        if self.model is None:
            return {"configured": False}
        limits = self.settings.model
        report = {
            "configured": True,
            "selector": self.model.selector,
            "restarts": self.model.restarts,
            "problem": None if sample.model is not None else self.model.last_problem,
            **self._process_report(sample.model, sample.model_cores, sample.cpus, MODEL),
        }
        report.setdefault("cpu", {})
        report.setdefault("memory", {})
        report["cpu"]["limit_cores"] = limits.cpu_limit
        report["cpu"]["limit_utilization"] = _ratio(sample.model_cores, limits.cpu_limit)
        report["memory"]["limit_bytes"] = limits.memory_limit_bytes
        report["memory"]["limit_utilization"] = _ratio(
            None if sample.model is None else sample.model.memory_rss, limits.memory_limit_bytes
        )
        return report

    def _container_report(self, sample: ResourceSample) -> dict[str, Any]:
        cgroup = sample.cgroup
        report: dict[str, Any] = {
            "cgroup": None if cgroup is None else cgroup.path,
            "problem": self.cgroup.problem,
        }
        if cgroup is not None:
            report["memory"] = {
                "current_bytes": cgroup.memory_current,
                "limit_bytes": cgroup.memory_max,
                "limit_utilization": cgroup.memory_utilization,
            }
            report["cpu"] = {
                "usage_cores": sample.cgroup_cores,
                "limit_cores": cgroup.cpu_limit_cores,
                "limit_utilization": _ratio(sample.cgroup_cores, cgroup.cpu_limit_cores),
                "periods": cgroup.periods,
                "throttled_periods": cgroup.throttled_periods,
                "throttled_s": cgroup.throttled_s,
            }
        report["unreadable"] = self.unreadable.reasons("container")
        return report
