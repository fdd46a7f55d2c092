"""Alert rules: a signal named by its path in the health report, a comparison, a threshold.

    rule = AlertRule("feature-psi", "features.*.drift.psi", ">=", 0.25, for_s=300)
    rule.instances(report)   # [({"feature": "age"}, 0.31), ({"feature": "income"}, 0.02)]
    rule.breached(0.31)      # True

A ``*`` in the path matches every key at that level; each match is its own alert
instance, labelled with the key (``feature`` under ``features``, else ``key<level>``).
A value that is absent or not a number is "no data": it neither fires nor resolves.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agent.config import AlertSettings

Severity = Literal["info", "warning", "critical"]
Comparison = Literal[">", ">=", "<", "<=", "==", "!="]
COMPARISONS: Mapping[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
SEGMENT = re.compile(r"[A-Za-z0-9_-]+|\*")
# The label a wildcard's key gets, by the key of the level above it.
WILDCARD_LABELS: Mapping[str, str] = {
    "features": "feature",
    "per_class": "class",
    "segments": "segment",
    "streams": "stream",
    "long_windows": "window",
    "breakers": "upstream",
}


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One rule; validated on construction (ValueError names the field)."""

    name: str
    signal: str
    op: Comparison
    threshold: float
    for_s: float = 0.0
    severity: Severity = "warning"
    # Fires again for the same instance only after this long (repeat notifications).
    cooldown_s: float = 300.0
    # Which models the rule watches (None: all).
    models: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    channels: tuple[str, ...] = ("log",)
    path: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.op not in COMPARISONS:
            raise ValueError(f"op: {self.op!r} is not one of {', '.join(COMPARISONS)}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold: must be a finite number, got {self.threshold}")
        if self.for_s < 0 or self.cooldown_s < 0:
            raise ValueError("for_s and cooldown_s: must be ≥ 0")
        parts = tuple(self.signal.split("."))
        if not parts or not all(SEGMENT.fullmatch(p) for p in parts):
            raise ValueError(
                f"signal: {self.signal!r} is not a dotted path of keys and '*' "
                "(e.g. features.*.drift.psi)"
            )
        object.__setattr__(self, "path", parts)

    def breached(self, value: float) -> bool:
        return COMPARISONS[self.op](value, self.threshold)

    def instances(self, report: Mapping[str, Any]) -> list[tuple[dict[str, str], float | None]]:
        """Every value the signal names in ``report``, with the wildcard keys as labels;
        None where a named value is absent or not a number."""
        out: list[tuple[dict[str, str], float | None]] = []
        _walk(report, self.path, 0, {}, out, parent="")
        return out


def _walk(
    node: Any,
    path: Sequence[str],
    depth: int,
    labels: dict[str, str],
    out: list[tuple[dict[str, str], float | None]],
    parent: str,
) -> None:
    if depth == len(path):
        number = float(node) if isinstance(node, int | float) else None  # bool: 0 or 1
        out.append((labels, number if number is not None and math.isfinite(number) else None))
        return
    key = path[depth]
    if key == "*":
        if isinstance(node, Mapping):
            label = WILDCARD_LABELS.get(parent, f"key{depth}")
            for name in sorted(node):
                _walk(node[name], path, depth + 1, {**labels, label: str(name)}, out, key)
        elif isinstance(node, list):
            label = WILDCARD_LABELS.get(parent, f"key{depth}")
            for i, item in enumerate(node):
                _walk(item, path, depth + 1, {**labels, label: str(i)}, out, key)
        return
    if isinstance(node, Mapping) and key in node:
        _walk(node[key], path, depth + 1, labels, out, key)
    else:  # absent (e.g. no drift evaluated yet): no data for this instance
        out.append((labels, None))


# The rules shipped by default (`alerts.default_rules`), as common practice goes.
DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        "dataset-drift",
        "dataset_drift.share",
        ">=",
        0.5,
        severity="warning",
        annotations={"summary": "half or more of the features drifted"},
    ),
    AlertRule(
        "feature-psi",
        "features.*.drift.psi",
        ">=",
        0.25,
        severity="warning",
        annotations={"summary": "a feature's PSI is 0.25 or more (a major shift)"},
    ),
    AlertRule(
        "accuracy-low",
        "performance.accuracy",
        "<",
        0.6,
        severity="critical",
        annotations={"summary": "accuracy on joined outcomes below 60 %"},
    ),
    AlertRule(
        "mape-high",
        "performance.mape",
        ">",
        0.05,
        severity="warning",
        annotations={"summary": "mean absolute percentage error above 5 %"},
    ),
    AlertRule(
        "health-low",
        "health.score",
        "<",
        50.0,
        severity="critical",
        annotations={"summary": "model health score below 50"},
    ),
    # On the agent's own report (resources, breakers): no data unless those are configured.
    AlertRule(
        "model-process-down",
        "resources.model.up",
        "==",
        0.0,
        for_s=30.0,
        severity="critical",
        annotations={"summary": "the model service's process is not running"},
    ),
    AlertRule(
        "model-memory-high",
        "resources.model.memory.limit_utilization",
        ">",
        0.9,
        for_s=60.0,
        severity="warning",
        annotations={"summary": "the model process uses over 90 % of its memory limit"},
    ),
    AlertRule(
        "breaker-open",
        "breakers.*.open",
        "==",
        1.0,
        for_s=60.0,
        severity="warning",
        annotations={"summary": "an upstream's circuit breaker has been open for a minute"},
    ),
)


def configured_rules(settings: AlertSettings) -> list[AlertRule]:
    """The default rules (unless turned off), replaced or removed by name, plus the rules
    of ``alerts.rules``."""
    rules = {rule.name: rule for rule in DEFAULT_RULES} if settings.default_rules else {}
    for name, rule in settings.rules.items():
        if rule is None:
            rules.pop(name, None)
            continue
        rules[name] = AlertRule(
            name,
            rule.signal,
            rule.op,
            rule.threshold,
            for_s=rule.for_s,
            severity=rule.severity,
            cooldown_s=rule.cooldown_s,
            models=None if rule.models is None else tuple(rule.models),
            labels=dict(rule.labels),
            annotations=dict(rule.annotations),
            channels=tuple(rule.channels),
        )
    return list(rules.values())
