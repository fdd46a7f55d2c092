"""One process read through psutil (``/proc/<pid>/...``), saying what it could not read.

    reader = ProcessReader(psutil.Process(pid), role="model", unreadable=Unreadable())
    reading = reader.read()        # None once the process has exited
    reading.memory_rss, reader.cpu_cores(reading)

Across containers with different uids (Kubernetes ``shareProcessNamespace: true``),
``/proc/<pid>/stat``, ``statm`` and ``status`` are world-readable, but ``fd`` and ``io``
need the same uid or CAP_SYS_PTRACE: those fields come back as None and the reason is
recorded once in ``Unreadable``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psutil

log = logging.getLogger(__name__)
T = TypeVar("T")


class Unreadable:
    """What could not be read, and why; each (role, field) is logged once, not per scrape."""

    def __init__(self) -> None:
        self._reasons: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def note(self, role: str, field: str, reason: str) -> None:
        with self._lock:
            fields = self._reasons.setdefault(role, {})
            if field in fields:
                return
            fields[field] = reason
        log.warning(
            "resource reading unavailable: %s %s: %s",
            role,
            field,
            reason,
            extra={"role": role, "field": field, "reason": reason},
        )

    def reasons(self, role: str) -> dict[str, str]:
        with self._lock:
            return dict(self._reasons.get(role, {}))


@dataclass(frozen=True)
class ProcessReading:
    """One look at a process; a field it may not read is None."""

    pid: int
    name: str
    create_time: float
    cpu_user_s: float
    cpu_system_s: float
    memory_rss: int
    memory_vms: int
    threads: int
    voluntary_switches: int | None
    involuntary_switches: int | None
    fds: int | None
    io_read_bytes: int | None
    io_write_bytes: int | None
    taken_at: float  # time.monotonic()
    wall_time: float  # time.time()

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_system_s

    @property
    def uptime_s(self) -> float:
        return max(self.wall_time - self.create_time, 0.0)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity), the denominator of cpu.utilization."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return psutil.cpu_count() or 1


def _why_denied(process: psutil.Process, path: str) -> str:
    try:
        theirs = process.uids().real
    except psutil.Error:
        theirs = None
    mine = os.getuid()
    if theirs is not None and theirs != mine:
        return (
            f"permission denied reading {path}: the process runs as uid {theirs} and the "
            f"sidecar as uid {mine} (another user's fd and io need the same uid or "
            "CAP_SYS_PTRACE)"
        )
    return f"permission denied reading {path}"


class ProcessReader:
    """Reads one process; keeps the previous reading to turn CPU time into a rate."""

    def __init__(self, process: psutil.Process, *, role: str, unreadable: Unreadable) -> None:
        self.process = process
        self.pid = process.pid
        self.role = role
        self._unreadable = unreadable
        self._skip: set[str] = set()  # denied fields are not retried for this pid
        self._previous: tuple[float, float] | None = None  # (cpu seconds, monotonic)

    def read(self) -> ProcessReading | None:
        """A reading, or None when the process has exited (or is a zombie)."""
        p = self.process
        try:
            with p.oneshot():
                if p.status() == psutil.STATUS_ZOMBIE:
                    return None
                name = p.name()
                create_time = p.create_time()
                cpu = p.cpu_times()
                memory = p.memory_info()
                threads = p.num_threads()
                switches = self._optional("context_switches", p.num_ctx_switches, "status")
            fds = self._optional("open_file_descriptors", p.num_fds, "fd")
            io = self._optional("disk_io", p.io_counters, "io")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            # stat/status unreadable is unusual (hidepid mounts); the process is still there.
            self._unreadable.note(self.role, "process", _why_denied(p, f"/proc/{self.pid}/stat"))
            return None
        return ProcessReading(
            pid=self.pid,
            name=name,
            create_time=create_time,
            cpu_user_s=cpu.user,
            cpu_system_s=cpu.system,
            memory_rss=memory.rss,
            memory_vms=memory.vms,
            threads=threads,
            voluntary_switches=None if switches is None else switches.voluntary,
            involuntary_switches=None if switches is None else switches.involuntary,
            fds=fds,
            io_read_bytes=None if io is None else io.read_bytes,
            io_write_bytes=None if io is None else io.write_bytes,
            taken_at=time.monotonic(),
            wall_time=time.time(),
        )

    def _optional(self, field: str, read: Callable[[], T], proc_file: str) -> T | None:
        if field in self._skip:
            return None
        try:
            return read()
        except psutil.AccessDenied:
            self._skip.add(field)
            path = f"/proc/{self.pid}/{proc_file}"
            self._unreadable.note(self.role, field, _why_denied(self.process, path))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            raise
        except (OSError, NotImplementedError, AttributeError) as error:
            # e.g. a kernel built without task I/O accounting has no /proc/<pid>/io.
            self._skip.add(field)
            self._unreadable.note(
                self.role, field, f"cannot read /proc/{self.pid}/{proc_file}: {error}"
            )
        return None

    def cpu_cores(self, reading: ProcessReading) -> float:
        """Cores in use since the previous reading (the first: the average since start)."""
        previous = self._previous
        self._previous = (reading.cpu_s, reading.taken_at)
        if previous is None:
            return reading.cpu_s / reading.uptime_s if reading.uptime_s > 0 else 0.0
        elapsed = reading.taken_at - previous[1]
        if elapsed <= 0:
            return 0.0
        return max(reading.cpu_s - previous[0], 0.0) / elapsed
