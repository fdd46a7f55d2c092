"""Where alert notifications go (docs/alerts.md#channels).

- ``log`` (built in): a line in the agent's log and an OpenTelemetry log record
  (``alert.firing`` / ``alert.resolved``), through the same path as health events.
- ``alertmanager``: ``POST /api/v2/alerts`` of a Prometheus Alertmanager, which routes to
  email, Slack, PagerDuty or Telegram.
- ``webhook``: a JSON POST, the notification itself or a Slack-compatible ``{"text"}``.

The HTTP channels send through the upstream layer (an ``upstream.targets`` entry, with its
timeout, retries and circuit breaker), never straight out. A send that fails stays in
the channel's outbox and is retried at the next evaluation; the outbox is bounded, and
what falls out of it is logged. With a ``path`` the outbox is kept in a file whenever it
changes, so notifications still waiting when the agent stops are sent after the restart.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent.alerts.manager import AlertInstance, Notification
from agent.telemetry.events import HealthEvent, HealthEventLog

log = logging.getLogger(__name__)
# (upstream target, path below its URL, JSON payload) -> HTTP status; raises if unreachable.
Post = Callable[[str, str, Any], Awaitable[int]]
OUTBOX = 1000


class Channel(Protocol):
    name: str

    async def send(self, notification: Notification) -> None: ...


def describe(notification: Notification) -> str:
    """'alert feature-psi firing: value 0.31 breaches threshold 0.25 (feature=age, ...)'."""
    alert = notification.alert
    firing = notification.status == "firing"
    where = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
    summary = alert.annotations.get("summary", "")
    return (
        f"alert {alert.rule} {notification.status}: value {alert.value:.4g} "
        f"{'breaches' if firing else 'back within'} threshold {alert.threshold:g} ({where})"
        + (f": {summary}" if summary and firing else "")
    )


class LogChannel:
    """Alert notifications as log records (JSON line + OTel log record)."""

    name = "log"

    def __init__(self, log: HealthEventLog) -> None:
        self._log = log

    async def send(self, notification: Notification) -> None:
        alert = notification.alert
        firing = notification.status == "firing"
        self._log.emit(
            HealthEvent(
                f"alert.{notification.status}",
                ("ERROR" if alert.severity == "critical" else "WARN") if firing else "INFO",
                describe(notification),
                {
                    "alert.id": alert.id,
                    "alert.rule": alert.rule,
                    "alert.severity": alert.severity,
                    "alert.value": alert.value,
                    "alert.threshold": alert.threshold,
                    **{f"alert.label.{k}": v for k, v in alert.labels.items()},
                },
            )
        )


def _iso(unix_nano: int) -> str:
    return datetime.fromtimestamp(unix_nano / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")


class HttpChannel(ABC):
    """A channel that POSTs JSON through an upstream target; failed sends are retried.

    With ``outbox_path`` what waits is written there (atomically) whenever it changes and
    read back at construction: a restart loses no notification.
    """

    def __init__(
        self, name: str, post: Post, upstream: str, path: str, outbox_path: Path | None = None
    ) -> None:
        self.name = name
        self._post = post
        self._upstream = upstream
        self._path = path
        self.outbox: deque[Notification] = deque()
        self.dropped = 0
        self._outbox_path = outbox_path
        if outbox_path is not None:
            self.outbox.extend(_read_outbox(outbox_path, name))
            if self.outbox:
                log.info(
                    "alert channel %s: %d notifications waiting from before the restart",
                    name,
                    len(self.outbox),
                )

    @abstractmethod
    def payload(self, notification: Notification) -> Any:
        """The JSON body a notification is sent as."""

    async def send(self, notification: Notification) -> None:
        if len(self.outbox) >= OUTBOX:
            self.outbox.popleft()
            self.dropped += 1
            log.error("alert channel %s: outbox full, the oldest notification dropped", self.name)
        self.outbox.append(notification)
        self._keep()  # before sending: a crash mid-send must not lose it
        await self.flush()

    async def flush(self) -> None:
        """Send what waits, oldest first; stop at the first failure (retried next time)."""
        waiting = len(self.outbox)
        try:
            await self._send_waiting()
        finally:
            if len(self.outbox) != waiting:
                self._keep()

    def _keep(self) -> None:
        if self._outbox_path is None:
            return
        try:
            _write_outbox(self._outbox_path, self.outbox)
        except OSError as error:  # disk full, read-only: still sent, only not durable
            log.error(
                "alert channel %s: cannot keep the outbox in %s: %s",
                self.name,
                self._outbox_path,
                error,
            )

    async def _send_waiting(self) -> None:
        while self.outbox:
            notification = self.outbox[0]
            try:
                status = await self._post(self._upstream, self._path, self.payload(notification))
            except Exception as error:  # unreachable, breaker open, timeout: retried later
                log.warning(
                    "alert channel %s: sending failed, %d waiting: %s",
                    self.name,
                    len(self.outbox),
                    error,
                )
                return
            if status >= 400:
                log.warning(
                    "alert channel %s: upstream %s answered %d, %d waiting",
                    self.name,
                    self._upstream,
                    status,
                    len(self.outbox),
                )
                if status < 500 and status != 429:
                    self.outbox.popleft()  # refused for good: retrying would not help
                    self.dropped += 1
                    continue
                return
            self.outbox.popleft()


def _read_outbox(path: Path, name: str) -> list[Notification]:
    try:
        data = json.loads(path.read_text())
        return [
            Notification(
                item["status"],
                AlertInstance(**item["alert"]),
                tuple(item["channels"]),
                int(item["at_unix_nano"]),
            )
            for item in data["notifications"]
        ]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("alert channel %s: outbox %s unreadable, starting empty: %s", name, path, error)
        return []


def _write_outbox(path: Path, outbox: deque[Notification]) -> None:
    if not outbox:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".outbox-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": 1, "notifications": [asdict(n) for n in outbox]}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AlertmanagerChannel(HttpChannel):
    """Prometheus Alertmanager's v2 API: a firing alert carries an ``endsAt`` a few
    evaluation intervals ahead, so it resolves by itself if the agent stops sending."""

    def __init__(
        self,
        name: str,
        post: Post,
        upstream: str,
        *,
        interval_s: float,
        generator_url: str = "",
        outbox_path: Path | None = None,
    ) -> None:
        super().__init__(name, post, upstream, "api/v2/alerts", outbox_path)
        self._hold_ns = int(max(interval_s * 4, 60) * 1e9)
        self._generator_url = generator_url

    def payload(self, notification: Notification) -> Any:
        alert = notification.alert
        ends = notification.at_unix_nano + (self._hold_ns if notification.status == "firing" else 0)
        return [
            {
                "labels": dict(alert.labels),
                "annotations": {
                    **alert.annotations,
                    "description": describe(notification),
                    "value": f"{alert.value:g}",
                    "threshold": f"{alert.threshold:g}",
                },
                "startsAt": _iso(alert.fired_unix_nano or alert.since_unix_nano),
                "endsAt": _iso(ends),
                **({"generatorURL": self._generator_url} if self._generator_url else {}),
            }
        ]


class WebhookChannel(HttpChannel):
    """A generic JSON webhook: the notification (``format: json``) or ``{"text": ...}``
    (``format: slack``, which Slack's incoming webhooks and many chat tools accept)."""

    def __init__(
        self,
        name: str,
        post: Post,
        upstream: str,
        path: str,
        fmt: str,
        outbox_path: Path | None = None,
    ) -> None:
        super().__init__(name, post, upstream, path, outbox_path)
        self._format = fmt

    def payload(self, notification: Notification) -> Any:
        alert = notification.alert
        if self._format == "slack":
            icon = ":red_circle:" if notification.status == "firing" else ":large_green_circle:"
            return {"text": f"{icon} {describe(notification)}"}
        return {
            "status": notification.status,
            "at": _iso(notification.at_unix_nano),
            "alert": {
                "id": alert.id,
                "rule": alert.rule,
                "severity": alert.severity,
                "labels": alert.labels,
                "annotations": alert.annotations,
                "value": alert.value,
                "threshold": alert.threshold,
                "since": _iso(alert.since_unix_nano),
            },
            "text": describe(notification),
        }
