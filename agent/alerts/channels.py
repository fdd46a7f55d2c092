"""Where alert notifications go. Built in: ``log`` — a line in the agent's log and an
OpenTelemetry log record (``alert.firing`` / ``alert.resolved``), through the same path as
health events, so each reaches OTLP exactly once.

Webhook and Alertmanager channels send through the upstream layer (breaker-guarded
egress) and are not built yet: a rule naming another channel is refused at start.
"""

from __future__ import annotations

from typing import Protocol

from agent.alerts.manager import Notification
from agent.telemetry.events import HealthEvent, HealthEventLog

BUILT_IN_CHANNELS = frozenset({"log"})


class Channel(Protocol):
    def send(self, notification: Notification) -> None: ...


class LogChannel:
    """Alert notifications as log records (JSON line + OTel log record)."""

    def __init__(self, log: HealthEventLog) -> None:
        self._log = log

    def send(self, notification: Notification) -> None:
        alert = notification.alert
        firing = notification.status == "firing"
        where = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
        summary = alert.annotations.get("summary", "")
        body = (
            f"alert {alert.rule} {notification.status}: value {alert.value:.4g} "
            f"{'breaches' if firing else 'back within'} threshold {alert.threshold:g} ({where})"
            + (f": {summary}" if summary and firing else "")
        )
        self._log.emit(
            HealthEvent(
                f"alert.{notification.status}",
                ("ERROR" if alert.severity == "critical" else "WARN") if firing else "INFO",
                body,
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
