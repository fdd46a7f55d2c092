"""The sidecar's own container, read from its cgroup v2 files.

    cgroup = OwnCgroup(Path("/sys/fs/cgroup"))
    reading = cgroup.read()    # None on cgroup v1 or without a cgroup filesystem
    reading.memory_current / reading.memory_max

A container can read only its own cgroup, so these are the sidecar container's numbers;
the model container's limits come from configuration instead. cgroup v1 or missing
files are said once in the log, not once per scrape.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from agent.resources.process import Unreadable

log = logging.getLogger(__name__)
ROLE = "container"


@dataclass(frozen=True)
class CgroupReading:
    """One look at the cgroup; a file that is absent (or says ``max``) gives None."""

    path: str
    memory_current: int | None
    memory_max: int | None  # None: no limit ("max") or unreadable
    cpu_limit_cores: float | None  # cpu.max quota / period; None: no limit
    cpu_usage_s: float | None
    periods: int | None
    throttled_periods: int | None
    throttled_s: float | None
    taken_at: float

    @property
    def memory_utilization(self) -> float | None:
        if self.memory_current is None or not self.memory_max:
            return None
        return self.memory_current / self.memory_max


def _own_path(proc_self_cgroup: Path) -> str:
    """This process's cgroup v2 path (the ``0::/path`` line), or "" if there is none."""
    try:
        for line in proc_self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip().lstrip("/")
    except OSError:
        pass
    return ""


class OwnCgroup:
    """Reads the sidecar's cgroup v2 directory under ``root``; degrades to None."""

    def __init__(
        self,
        root: Path,
        *,
        unreadable: Unreadable | None = None,
        proc_self_cgroup: Path = Path("/proc/self/cgroup"),
    ) -> None:
        self.root = root
        self._unreadable = unreadable or Unreadable()
        self.problem: str | None = None
        self.directory = self._locate(proc_self_cgroup)
        self._previous_usage: tuple[float, float] | None = None

    def _locate(self, proc_self_cgroup: Path) -> Path | None:
        root = self.root
        if not (root / "cgroup.controllers").is_file():
            if root.is_dir() and any((root / c).is_dir() for c in ("memory", "cpu", "cpuacct")):
                self.problem = (
                    f"cgroup v1 at {root}: the sidecar's container limits are not read "
                    "(only cgroup v2 is supported)"
                )
            else:
                self.problem = f"no cgroup v2 filesystem at {root}: container limits are not read"
            log.info("container cgroup not read: %s", self.problem, extra={"problem": self.problem})
            return None
        # Inside a cgroup namespace (the usual container) our cgroup is the root itself;
        # on a host, it is the 0:: path below the root.
        nested = root / _own_path(proc_self_cgroup)
        if nested != root and (nested / "cgroup.controllers").is_file():
            return nested
        return root

    def _read(self, name: str) -> str | None:
        assert self.directory is not None
        try:
            return (self.directory / name).read_text().strip()
        except OSError as error:
            self._unreadable.note(
                ROLE, name, f"cannot read {self.directory / name}: {error.strerror or error}"
            )
            return None

    def read(self) -> CgroupReading | None:
        if self.directory is None:
            return None
        memory_current = self._read("memory.current")
        memory_max = self._read("memory.max")
        cpu_max = self._read("cpu.max")
        stat: dict[str, int] = {}
        cpu_stat = self._read("cpu.stat")
        for line in (cpu_stat or "").splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stat[key] = int(value)
        limit = None
        if cpu_max:
            quota, _, period = cpu_max.partition(" ")
            if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                limit = int(quota) / int(period)
        usage_s = stat["usage_usec"] / 1e6 if "usage_usec" in stat else None
        throttled = stat.get("throttled_usec")
        return CgroupReading(
            path=str(self.directory),
            memory_current=int(memory_current)
            if memory_current and memory_current.isdigit()
            else None,
            memory_max=int(memory_max) if memory_max and memory_max.isdigit() else None,
            cpu_limit_cores=limit,
            cpu_usage_s=usage_s,
            periods=stat.get("nr_periods"),
            throttled_periods=stat.get("nr_throttled"),
            throttled_s=None if throttled is None else throttled / 1e6,
            taken_at=time.monotonic(),
        )

    def cpu_cores(self, reading: CgroupReading) -> float | None:
        """Cores the container used since the previous reading (None on the first)."""
        if reading.cpu_usage_s is None:
            return None
        previous = self._previous_usage
        self._previous_usage = (reading.cpu_usage_s, reading.taken_at)
        if previous is None or reading.taken_at <= previous[1]:
            return None
        return max(reading.cpu_usage_s - previous[0], 0.0) / (reading.taken_at - previous[1])
