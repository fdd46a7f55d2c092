"""Finding the model service's process, and noticing when it is replaced.

    model = ModelProcess(settings.resources.model, own_pid=os.getpid())
    model.discover()          # at start, then every discovery_interval_s (in a thread)
    model.current()           # the psutil.Process, or None while it is down
    model.restarts            # new processes found after a first one

In Kubernetes the pod needs ``shareProcessNamespace: true`` for the sidecar to see the
model container's processes at all.
"""

from __future__ import annotations

import logging
import re
import threading

import psutil

from agent.config import ModelProcessSettings

log = logging.getLogger(__name__)


def _describe(settings: ModelProcessSettings) -> str:
    if settings.pid is not None:
        return f"pid {settings.pid}"
    if settings.pid_file is not None:
        return f"pid_file {str(settings.pid_file)!r}"
    parts = []
    if settings.process_name:
        parts.append(f"process_name ~ {settings.process_name!r}")
    if settings.cmdline:
        parts.append(f"cmdline ~ {settings.cmdline!r}")
    return " and ".join(parts)


def _alive(process: psutil.Process) -> bool:
    # is_running() also compares the start time, so a reused pid is not taken for ours.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ModelProcess:
    """The model service's process as found by pid, pid file or name/cmdline pattern.

    Several processes matching a pattern: the oldest is taken (a server's master rather
    than its workers). A different process found after a first one counts as a restart.
    Being down is logged once per loss, not once per look.
    """

    def __init__(self, settings: ModelProcessSettings, *, own_pid: int) -> None:
        self.settings = settings
        self.selector = _describe(settings)
        self._own_pid = own_pid
        self._name = re.compile(settings.process_name) if settings.process_name else None
        self._cmdline = re.compile(settings.cmdline) if settings.cmdline else None
        self._lock = threading.Lock()
        self._process: psutil.Process | None = None
        self._last_identity: tuple[int, float] | None = None
        self._down_logged = False
        self.restarts = 0
        self.last_problem: str | None = None

    def current(self) -> psutil.Process | None:
        with self._lock:
            return self._process

    @property
    def up(self) -> bool:
        return self.current() is not None

    def lost(self, process: psutil.Process) -> None:
        """A reading found ``process`` gone: mark the model down until discovery finds one."""
        pid: int = process.pid
        with self._lock:
            if self._process is not process:
                return
            self._process = None
            self.last_problem = f"process {pid} exited"
            self._log_down()

    def discover(self) -> psutil.Process | None:
        """Keep the current process if it still runs, else look for one (blocking: /proc walk)."""
        current = self.current()
        if current is not None and _alive(current):
            return current
        found, problem = self.find()
        with self._lock:
            if found is None:
                self._process = None
                self.last_problem = problem
                self._log_down()
                return None
            identity = (found.pid, found.create_time())
            if self._last_identity is not None and identity != self._last_identity:
                self.restarts += 1
                log.warning(
                    "model process restarted",
                    extra={"pid": found.pid, "restarts": self.restarts, "selector": self.selector},
                )
            elif self._last_identity is None:
                log.info("model process found", extra={"pid": found.pid, "selector": self.selector})
            self._last_identity = identity
            self._process = found
            self._down_logged = False
            self.last_problem = None
            return found

    def _log_down(self) -> None:
        if not self._down_logged:
            self._down_logged = True
            log.warning(
                "model process not found",
                extra={"selector": self.selector, "problem": self.last_problem},
            )

    def find(self) -> tuple[psutil.Process | None, str]:
        """Look now (walking /proc for a pattern), without changing what is tracked:
        the process found, or None and why."""
        settings = self.settings
        if settings.pid is not None:
            return self._by_pid(settings.pid, f"no process with pid {settings.pid}")
        if settings.pid_file is not None:
            try:
                text = settings.pid_file.read_text().strip()
            except OSError as error:
                return None, f"cannot read pid_file {str(settings.pid_file)!r}: {error.strerror}"
            if not text.isdigit():
                return None, f"pid_file {str(settings.pid_file)!r} holds {text[:40]!r}, not a pid"
            return self._by_pid(int(text), f"no process with pid {text} (from the pid_file)")
        return self._by_pattern()

    def _by_pid(self, pid: int, problem: str) -> tuple[psutil.Process | None, str]:
        try:
            process = psutil.Process(pid)
        except psutil.Error:
            return None, problem
        return (process, "") if _alive(process) else (None, problem)

    def _by_pattern(self) -> tuple[psutil.Process | None, str]:
        matches: list[tuple[float, int, psutil.Process]] = []
        for process in psutil.process_iter(["name", "cmdline", "create_time", "status"]):
            info = process.info
            if process.pid == self._own_pid or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if self._name is not None and not self._name.search(info["name"] or ""):
                continue
            if self._cmdline is not None and not self._cmdline.search(
                " ".join(info["cmdline"] or ())
            ):
                continue
            matches.append((info["create_time"] or 0.0, process.pid, process))
        if not matches:
            return None, f"no process matches {self.selector}"
        return min(matches, key=lambda match: (match[0], match[1]))[2], ""
