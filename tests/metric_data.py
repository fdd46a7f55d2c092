"""What an in-memory OTel metric reader holds, for tests.

for point in data_points(agent.metric_reader, "mlsidecar.ingest.batches"):
    point.attributes, point.value
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric


def collected(reader: InMemoryMetricReader) -> list[Metric]:
    """Every metric of one fresh collection, across resources and scopes."""
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


def by_name(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Every metric of one fresh collection by name; a name exported twice fails the test."""
    metrics: dict[str, Metric] = {}
    for metric in collected(reader):
        assert metric.name not in metrics, f"{metric.name} exported twice"
        metrics[metric.name] = metric
    return metrics


def data_points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    """The data points of the metric ``name`` in one fresh collection (every scope)."""
    return [p for m in collected(reader) if m.name == name for p in m.data.data_points]
