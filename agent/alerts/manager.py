"""Alert life cycle: pending → firing → resolved, per rule and instance, durable.

    alerts = Alerts(rules, state_path=data_dir / "alerts.json", clock=time.time_ns)
    notifications = alerts.evaluate([report, ...])    # one health report per model version
    for n in notifications: channel.send(n)           # firing / resolved, deduplicated

An instance is one rule on one model version with its wildcard keys (``feature=age``).
It turns pending when its condition first holds, firing once it has held for the
rule's ``for_s``, and resolved when it stops holding; "no data" changes nothing. A
firing instance notifies once, then again only after ``cooldown_s`` if still firing
and not acknowledged; silences (label matchers with an end time) mute notifications
but not the state. State, silences and the recent history are written atomically to
``state_path`` after each change, so a restart neither forgets a firing alert nor
notifies it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.alerts.rules import AlertRule

log = logging.getLogger(__name__)
STATE_VERSION = 1
State = Literal["pending", "firing"]


@dataclass(slots=True)
class AlertInstance:
    id: str
    rule: str
    labels: dict[str, str]
    severity: str
    state: State
    value: float
    threshold: float
    since_unix_nano: int  # when the condition started to hold
    fired_unix_nano: int | None = None
    notified_unix_nano: int | None = None
    acked: bool = False
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: dict[str, str]  # every label must equal its value
    ends_unix_nano: int
    comment: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.matchers.items())


@dataclass(frozen=True, slots=True)
class Notification:
    """What channels send: an instance that fired (again) or resolved."""

    status: Literal["firing", "resolved"]
    alert: AlertInstance
    channels: tuple[str, ...]
    at_unix_nano: int


# (rule, model, version, severity); model and version are "" for the agent's own alerts.
FiringKey = tuple[str, str, str, str]


def _firing_key(alert: AlertInstance) -> FiringKey:
    labels = alert.labels
    return (alert.rule, labels.get("model", ""), labels.get("version", ""), alert.severity)


def instance_id(rule: str, labels: Mapping[str, str]) -> str:
    key = json.dumps([rule, sorted(labels.items())], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Alerts:
    """Evaluates rules against health reports; keeps and persists the alerts' state."""

    def __init__(
        self,
        rules: Iterable[AlertRule],
        *,
        clock: Callable[[], int],
        state_path: Path | None = None,
        history: int = 200,
    ) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self._clock = clock
        self._path = state_path
        self.active: dict[str, AlertInstance] = {}
        self.silences: dict[str, Silence] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=history)
        # Series of the firing gauge that have fired: kept at 0 once resolved, while their
        # rule is configured and their model version still reported (bounded by both).
        self._fired: set[FiringKey] = set()
        if state_path is not None:
            self._load(state_path)

    # --- evaluation -------------------------------------------------------------------------

    def evaluate(self, reports: Iterable[Mapping[str, Any]]) -> list[Notification]:
        """Judge every rule on every report: one per model version, and the agent's own
        (``model`` empty: ``resources``, ``breakers``); returns what to send."""
        now = self._clock()
        out: list[Notification] = []
        seen: set[str] = set()
        reported: set[tuple[str, str]] = set()
        fired = self._firing_keys()  # resolved below, they still show as 0 in the gauge
        changed = False
        for report in reports:
            model, version = str(report.get("model", "")), str(report.get("version", ""))
            reported.add((model, version))
            for rule in self.rules.values():
                if rule.models is not None and model not in rule.models:
                    continue
                for keys, value in rule.instances(report):
                    # The agent's own report (resources, breakers) names no model.
                    where = {"model": model, "version": version} if model else {}
                    labels = {
                        "alertname": rule.name,
                        **where,
                        "severity": rule.severity,
                        **keys,
                        **rule.labels,
                    }
                    key = instance_id(rule.name, labels)
                    seen.add(key)
                    if value is None:
                        continue  # no data: neither fires nor resolves
                    changed |= self._judge(rule, key, labels, value, now, out)
        # Instances whose model version or key went away (forgotten, renamed): resolved.
        for key in [k for k in self.active if k not in seen]:
            changed |= self._resolve(key, None, now, out)
        fired |= self._fired | self._firing_keys()
        self._fired = {k for k in fired if k[0] in self.rules and (k[1], k[2]) in reported}
        if changed:
            self.save()
        return out

    def _judge(
        self,
        rule: AlertRule,
        key: str,
        labels: dict[str, str],
        value: float,
        now: int,
        out: list[Notification],
    ) -> bool:
        alert = self.active.get(key)
        if not rule.breached(value):
            return self._resolve(key, value, now, out) if alert is not None else False
        if alert is None:
            alert = self.active[key] = AlertInstance(
                key,
                rule.name,
                labels,
                rule.severity,
                "pending",
                value,
                rule.threshold,
                since_unix_nano=now,
                annotations=dict(rule.annotations),
            )
        alert.value = value
        if alert.state == "pending" and now - alert.since_unix_nano >= rule.for_s * 1e9:
            alert.state, alert.fired_unix_nano = "firing", now
        if alert.state == "firing" and self._due(rule, alert, now):
            alert.notified_unix_nano = now
            out.append(Notification("firing", alert, rule.channels, now))
        return True

    def _due(self, rule: AlertRule, alert: AlertInstance, now: int) -> bool:
        if alert.acked or any(s.matches(alert.labels) for s in self._live_silences(now)):
            return False
        last = alert.notified_unix_nano
        return last is None or now - last >= rule.cooldown_s * 1e9

    def _resolve(self, key: str, value: float | None, now: int, out: list[Notification]) -> bool:
        alert = self.active.pop(key)
        if alert.state != "firing":
            return True  # pending that did not last: never announced
        if value is not None:
            alert.value = value
        rule = self.rules.get(alert.rule)
        # Resolution is announced where the firing was, silenced or not.
        if alert.notified_unix_nano is not None:
            out.append(Notification("resolved", alert, rule.channels if rule else ("log",), now))
        self.recent.appendleft({**asdict(alert), "state": "resolved", "resolved_unix_nano": now})
        return True

    # --- the firing gauge -------------------------------------------------------------------

    def _firing_keys(self) -> set[FiringKey]:
        return {_firing_key(a) for a in list(self.active.values()) if a.state == "firing"}

    def firing(self) -> dict[FiringKey, int]:
        """Firing instances per (rule, model, version, severity): the ``mlsidecar.alerts.firing``
        gauge. A series that fired reads 0 once resolved, until its model version is no
        longer reported or its rule is removed. Safe to call from a metric reader's thread."""
        counts = dict.fromkeys(set(self._fired), 0)
        for alert in list(self.active.values()):
            if alert.state == "firing" and alert.rule in self.rules:
                key = _firing_key(alert)
                counts[key] = counts.get(key, 0) + 1
        return counts

    # --- operator actions -------------------------------------------------------------------

    def ack(self, alert_id: str) -> AlertInstance | None:
        """Stop repeat notifications of a firing or pending alert until it resolves."""
        alert = self.active.get(alert_id)
        if alert is not None:
            alert.acked = True
            self.save()
        return alert

    def silence(self, matchers: Mapping[str, str], duration_s: float, comment: str = "") -> Silence:
        if not matchers:
            raise ValueError("matchers: at least one label, e.g. {'model': 'churn'}")
        if not duration_s > 0:
            raise ValueError(f"duration_s: must be > 0, got {duration_s}")
        now = self._clock()
        key = hashlib.sha256(f"{sorted(matchers.items())}{now}".encode()).hexdigest()[:16]
        silence = Silence(key, dict(matchers), now + int(duration_s * 1e9), comment)
        self.silences[key] = silence
        self.save()
        return silence

    def unsilence(self, silence_id: str) -> bool:
        removed = self.silences.pop(silence_id, None) is not None
        if removed:
            self.save()
        return removed

    def _live_silences(self, now: int) -> list[Silence]:
        return [s for s in self.silences.values() if s.ends_unix_nano > now]

    def listing(self) -> dict[str, Any]:
        """``GET /v1/alerts``: active alerts (firing first), recent resolved, live silences."""
        now = self._clock()
        live = self._live_silences(now)
        active = sorted(self.active.values(), key=lambda a: (a.state != "firing", a.rule, a.id))
        return {
            "active": [
                {**asdict(a), "silenced": any(s.matches(a.labels) for s in live)} for a in active
            ],
            "recent": list(self.recent),
            "silences": [asdict(s) for s in live],
        }

    # --- persistence ------------------------------------------------------------------------

    def save(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        data = {
            "version": STATE_VERSION,
            "active": [asdict(a) for a in self.active.values()],
            "silences": [asdict(s) for s in self.silences.values() if s.ends_unix_nano > now],
            "recent": list(self.recent),
        }
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".alerts-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warning("alert state %s unreadable, starting empty: %s", path, error)
            return
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.warning("alert state %s has another format, starting empty", path)
            return
        try:
            for item in data.get("active", []):
                if item.get("rule") in self.rules:  # a removed rule's alerts are dropped
                    alert = AlertInstance(**item)
                    self.active[alert.id] = alert
            for item in data.get("silences", []):
                silence = Silence(**item)
                self.silences[silence.id] = silence
            self.recent.extend(data.get("recent", []))
        except TypeError as error:
            log.warning("alert state %s malformed, starting empty: %s", path, error)
            self.active.clear()
            self.silences.clear()
