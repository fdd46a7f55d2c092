"""Alerts on the health report's signals: rules, life cycle, channels (docs/alerts.md)."""

from agent.alerts.manager import AlertInstance, Alerts, Notification, Silence
from agent.alerts.rules import DEFAULT_RULES, AlertRule

__all__ = ["DEFAULT_RULES", "AlertInstance", "AlertRule", "Alerts", "Notification", "Silence"]
