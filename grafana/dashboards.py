"""mlsidecar's Grafana dashboards, as code, with Grafana Labs' ``grafana-foundation-sdk``.

    python grafana/dashboards.py            # (make dashboards) writes grafana/dashboards/*.json
    python grafana/dashboards.py --check    # exit 1, naming the files, when the JSON is stale
    build_all()                             # {"mlsidecar-model-health.json": {...}, ...}

Every query is PromQL on the Prometheus names of docs/metrics.md. Selectors filter with
``=~"$namespace"`` and friends: a variable's "All" is ``.*``, which also matches a label
that is absent, as ``k8s_namespace_name`` and ``k8s_pod_name`` are for an agent run
without those resource attributes (outside Kubernetes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    barchart,
    dashboard,
    heatmap,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"
# The provisioned Prometheus datasource (provisioning/datasources/datasources.yaml).
PROMETHEUS_UID = "prometheus"
TAG = "mlsidecar"

# Panels use the dashboard's datasource variable, so one dashboard serves any Prometheus.
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters shared by the panels. `ml_model_version` is filtered as a regex too, so
# "All" (.*) shows every version.
MODEL = 'k8s_namespace_name=~"$namespace", ml_model_name=~"$model", ml_model_version=~"$version"'
FEATURE = f'{MODEL}, ml_feature_name=~"$feature"'
POD = 'k8s_namespace_name=~"$namespace", k8s_pod_name=~"$pod"'
UPSTREAM = 'k8s_namespace_name=~"$namespace", upstream=~"$upstream"'
BY_MODEL = "ml_model_name, ml_model_version"

Target = tuple[str, str]  # (expr, legend)


# ---------------------------------------------------------------- building blocks


def _query(expr: str, legend: str, ref: str, *, instant: bool, fmt: str | None) -> Any:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)
    query = query.instant() if instant else query.range()
    if fmt == "table":
        query = query.format(PromQueryFormat.TABLE)
    return query


def panel(
    builder: Any,
    title: str,
    description: str,
    targets: list[Target],
    *,
    unit: str | None = None,
    width: int = 12,
    height: int = 8,
    instant: bool = False,
    fmt: str | None = None,
    exemplars: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    bands: Any = None,
) -> Any:
    """A panel of any kind with Prometheus targets A, B, C..."""
    built = builder.title(title).description(description).datasource(DS).span(width).height(height)
    for index, (expr, legend) in enumerate(targets):
        query = _query(expr, legend, chr(ord("A") + index), instant=instant, fmt=fmt)
        if exemplars:
            query = query.exemplar(True)
        built = built.with_target(query)
    if unit is not None:
        built = built.unit(unit)
    if minimum is not None:
        built = built.min(minimum)
    if maximum is not None:
        built = built.max(maximum)
    if bands is not None:
        built = built.thresholds(bands)
    return built


def ts(title: str, description: str, targets: list[Target], **kw: Any) -> Any:
    return panel(timeseries.Panel(), title, description, targets, **kw)


def stat_panel(title: str, description: str, targets: list[Target], **kw: Any) -> Any:
    return panel(stat.Panel(), title, description, targets, instant=True, **kw)


def table_panel(title: str, description: str, targets: list[Target], **kw: Any) -> Any:
    built = panel(table.Panel(), title, description, targets, instant=True, fmt="table", **kw)
    # One row per series, the queries' values side by side.
    return built.with_transformation(DataTransformerConfig(id_val="merge", options={}))


def quantiles(bucket: str, *qs: float) -> list[Target]:
    """Quantiles of a model histogram per model version, all replicas: one target each."""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {BY_MODEL}) "
            f"(rate({bucket}{{{MODEL}}}[$__rate_interval])))",
            f"p{q * 100:g} {{{{ml_model_name}}}} {{{{ml_model_version}}}}",
        )
        for q in qs
    ]


def mapping(values: dict[int, tuple[str, str]]) -> list[Any]:
    return [
        ValueMap(
            options={
                str(v): ValueMappingResult(text=text, color=color)
                for v, (text, color) in values.items()
            }
        )
    ]


def thresholds(*steps: tuple[float | None, str]) -> Any:
    """Colour steps: (None, base colour), then (from value, colour)..."""
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


# Health score colours: red below 50 (where MLHealthScoreLow pages), orange below 80.
HEALTH_BANDS = thresholds((None, "red"), (50, "orange"), (80, "green"))
# PSI: < 0.1 stable, 0.1-0.25 moderate, >= 0.25 a major shift.
PSI_BANDS = thresholds((None, "green"), (0.1, "orange"), (0.25, "red"))


def var_datasource() -> Any:
    return (
        dashboard.DatasourceVariable("datasource")
        .label("Prometheus")
        .type("prometheus")
        .current(VariableOption(text="Prometheus", value=PROMETHEUS_UID, selected=True))
    )


def var_query(name: str, label: str, query: str, *, include_all: bool = True) -> Any:
    variable = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    if include_all:
        # "All" is the regex .*, which also matches a series without the label.
        variable = (
            variable.include_all(True)
            .all_value(".*")
            .current(VariableOption(text="All", value="$__all", selected=True))
        )
    return variable


def model_variables() -> list[Any]:
    return [
        var_datasource(),
        var_query(
            "namespace",
            "Namespace",
            "label_values(ml_predictions_total, k8s_namespace_name)",
        ),
        var_query(
            "model",
            "Model",
            'label_values(ml_predictions_total{k8s_namespace_name=~"$namespace"}, ml_model_name)',
        ),
        var_query(
            "version",
            "Version",
            'label_values(ml_predictions_total{k8s_namespace_name=~"$namespace", ml_model_name=~"$model"}, ml_model_version)',
        ),
    ]


def new_dashboard(uid: str, title: str, description: str, variables: list[Any]) -> Any:
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .link(
            dashboard.DashboardLink("mlsidecar dashboards")
            .type(DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in variables:
        board = board.with_variable(variable)
    return board


def model_dashboard(
    uid: str, title: str, question: str, rows: list[tuple[str, list[Any]]], *extra: Any
) -> Any:
    """A dashboard of one model's panels: the model variables (and ``extra`` ones), rows."""
    return with_panels(new_dashboard(uid, title, question, [*model_variables(), *extra]), rows)


def with_panels(board: Any, rows: list[tuple[str, list[Any]]]) -> Any:
    """Rows of panels, numbered 1, 2, 3... in reading order (stable ids across builds)."""
    next_id = 1
    for title, panels in rows:
        board = board.with_row(dashboard.Row(title).id(next_id))
        next_id += 1
        for built in panels:
            board = board.with_panel(built.id(next_id))
            next_id += 1
    return board


# ---------------------------------------------------------------- 1. model health


def model_health() -> Any:
    rate = "$__rate_interval"
    rows = [
        (
            "Health",
            [
                stat_panel(
                    "Health score",
                    "The agent's 0-100 health score of each model version (the worst replica). "
                    "Below 50 is critical. The reasons are in GET /v1/models/<model>/health.",
                    [
                        (
                            f"min by ({BY_MODEL}) (ml_model_health_score{{{MODEL}}})",
                            "{{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                    width=6,
                    minimum=0,
                    maximum=100,
                    bands=HEALTH_BANDS,
                ),
                ts(
                    "Health score over time",
                    "When the score fell, and whether it recovered.",
                    [
                        (
                            f"min by ({BY_MODEL}) (ml_model_health_score{{{MODEL}}})",
                            "{{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                    width=10,
                    minimum=0,
                    maximum=100,
                    bands=HEALTH_BANDS,
                ),
                table_panel(
                    "Firing alerts",
                    "Alerts firing now, for this model and for pod-level alerts without a model "
                    "label: from the Prometheus rules (prometheus/rules/, ALERTS) and from the "
                    "agent's own rules (mlsidecar_alerts_firing: firing instances per rule). "
                    "Each team uses one of the two paths (docs/alerts.md).",
                    [
                        (
                            'ALERTS{alertstate="firing", ml_model_name=~"$model|", k8s_namespace_name=~"$namespace"}',
                            "{{alertname}}",
                        ),
                        (
                            'mlsidecar_alerts_firing{ml_model_name=~"$model|", k8s_namespace_name=~"$namespace"} > 0',
                            "agent: {{alertname}}",
                        ),
                    ],
                    width=8,
                ),
                table_panel(
                    "Health reasons: the signals the score penalises",
                    "Per model version: share of drifted features, worst feature PSI, accuracy, "
                    "worst missing ratio and anomalous windows in the last hour. The score's "
                    "sentences are in the health report; these are the figures behind them.",
                    [
                        (f"max by ({BY_MODEL}) (ml_dataset_drift_share{{{MODEL}}})", "drift share"),
                        (f"max by ({BY_MODEL}) (ml_feature_drift_psi{{{MODEL}}})", "worst PSI"),
                        (
                            f'min by ({BY_MODEL}) (ml_model_performance{{{MODEL}, ml_metric=~"accuracy|r2"}})',
                            "accuracy / r2",
                        ),
                        (
                            f"max by ({BY_MODEL}) (ml_feature_missing_ratio{{{MODEL}}})",
                            "worst missing ratio",
                        ),
                        (
                            f"sum by ({BY_MODEL}) (increase(ml_anomalies_total{{{MODEL}}}[1h]))",
                            "anomalous windows (1h)",
                        ),
                    ],
                    width=24,
                    height=6,
                ),
            ],
        ),
        (
            "Traffic and latency",
            [
                ts(
                    "Traffic",
                    "Predictions per second (weighted by 1/sample_rate) and outcomes received per second.",
                    [
                        (
                            f"sum by ({BY_MODEL}) (rate(ml_predictions_total{{{MODEL}}}[{rate}]))",
                            "predictions {{ml_model_name}} {{ml_model_version}}",
                        ),
                        (
                            f"sum by ({BY_MODEL}) (rate(ml_outcomes_total{{{MODEL}}}[{rate}]))",
                            "outcomes {{ml_model_name}} {{ml_model_version}}",
                        ),
                    ],
                    unit="reqps",
                ),
                ts(
                    "Model latency p50 / p99 (exemplars lead to the trace)",
                    "Latency reported by the model service. Exemplars (dots) carry the trace id "
                    "of a model request: click one to open the trace in Tempo.",
                    quantiles("ml_prediction_duration_seconds_bucket", 0.5, 0.99),
                    unit="s",
                    exemplars=True,
                ),
            ],
        ),
        (
            "Drift and performance",
            [
                ts(
                    "Drift share",
                    "Share of the model's features that drifted in the evaluated window (worst "
                    "replica), and the fleet's share over the last hour (recording rules).",
                    [
                        (
                            f"max by ({BY_MODEL}) (ml_dataset_drift_share{{{MODEL}}})",
                            "window {{ml_model_name}} {{ml_model_version}}",
                        ),
                        (
                            f"max by ({BY_MODEL}) (ml:dataset_drift_share:fleet1h{{{MODEL}}})",
                            "fleet 1h {{ml_model_name}} {{ml_model_version}}",
                        ),
                    ],
                    unit="percentunit",
                    minimum=0,
                    maximum=1,
                ),
                ts(
                    "Performance",
                    "Performance on the outcomes joined in the evaluated window (worst replica).",
                    [
                        (
                            f'min by ({BY_MODEL}, ml_metric) (ml_model_performance{{{MODEL}, ml_metric=~"accuracy|f1_macro|roc_auc|r2"}})',
                            "{{ml_metric}} {{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                    unit="percentunit",
                ),
            ],
        ),
    ]
    return model_dashboard(
        "mlsidecar-model-health",
        "mlsidecar / Model health overview",
        "Is the model healthy? Score, traffic, latency, drift, performance and alerts.",
        rows,
    )


# ---------------------------------------------------------------- 2. drift & quality


def drift_quality() -> Any:
    share = (
        f"sum by (ml_reference_id, ml_bin) (increase(ml_feature_psi_bin_values_total{{{FEATURE}}}[$__range]))"
        " / ignoring (ml_bin) group_left "
        f"sum by (ml_reference_id) (increase(ml_feature_psi_bin_values_total{{{FEATURE}}}[$__range]))"
    )
    rows = [
        (
            "Feature drift",
            [
                table_panel(
                    "Feature drift now",
                    "Each feature's drift score by its decision method (KS, Wasserstein, JS, "
                    "chi-square or PSI), its PSI, and whether it is flagged drifted (1).",
                    [
                        (
                            f"max by (ml_feature_name, ml_drift_method) (ml_feature_drift_score{{{MODEL}}})",
                            "score",
                        ),
                        (f"max by (ml_feature_name) (ml_feature_drift_psi{{{MODEL}}})", "PSI"),
                        (f"max by (ml_feature_name) (ml_feature_drifted{{{MODEL}}})", "drifted"),
                    ],
                    width=10,
                ),
                panel(
                    heatmap.Panel().calculate(False),
                    "PSI per feature over time (heatmap)",
                    "One row per feature, colour = PSI in the evaluated window: a feature "
                    "that turns red has moved away from the reference.",
                    [
                        (
                            f"max by (ml_feature_name) (ml_feature_drift_psi{{{MODEL}}})",
                            "{{ml_feature_name}}",
                        )
                    ],
                    # Plain time series, one heatmap row each: the "heatmap" query format
                    # would de-accumulate them as if they were histogram buckets.
                    width=14,
                ),
                ts(
                    "PSI per feature",
                    "PSI against the reference: < 0.1 stable, 0.1-0.25 moderate, >= 0.25 major.",
                    [
                        (
                            f"max by (ml_feature_name) (ml_feature_drift_psi{{{MODEL}}})",
                            "{{ml_feature_name}}",
                        )
                    ],
                    bands=PSI_BANDS,
                ),
                ts(
                    "Fleet drift over the last hour (all replicas)",
                    "PSI and Jensen-Shannon distance of everything the replicas sharing a "
                    "reference saw in the last hour, from the per-bin counters (recording rules).",
                    [
                        (f"ml:feature_drift_psi:fleet1h{{{MODEL}}}", "PSI {{ml_feature_name}}"),
                        (f"ml:feature_drift_js:fleet1h{{{MODEL}}}", "JS {{ml_feature_name}}"),
                    ],
                ),
                panel(
                    barchart.Panel().x_field("ml_bin"),
                    "Reference vs current distribution ($feature)",
                    "Share of values per bin: the reference's, and the live traffic's over the "
                    "dashboard's time range, all replicas added. Choose a single feature.",
                    [
                        (
                            f"max by (ml_reference_id, ml_bin) (ml_feature_psi_bin_reference{{{FEATURE}}})",
                            "reference",
                        ),
                        (share, "current"),
                    ],
                    instant=True,
                    fmt="table",
                    unit="percentunit",
                    width=12,
                ).with_transformation(
                    DataTransformerConfig(
                        id_val="joinByField", options={"byField": "ml_bin", "mode": "outer"}
                    )
                ),
                ts(
                    "Prediction drift (PSI of the scores)",
                    "Whether the model's output distribution moved, which shows drift before any outcome arrives.",
                    [
                        (
                            f"max by ({BY_MODEL}) (ml_prediction_drift_psi{{{MODEL}}})",
                            "{{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                ),
            ],
        ),
        (
            "Data quality",
            [
                ts(
                    "Missing ratio",
                    "Share of each feature's values missing in the evaluated window.",
                    [
                        (
                            f"max by (ml_feature_name) (ml_feature_missing_ratio{{{MODEL}}})",
                            "{{ml_feature_name}}",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                ),
                ts(
                    "Out-of-range ratio",
                    "Share of a numeric feature's values outside the reference's range.",
                    [
                        (
                            f"max by (ml_feature_name) (ml_feature_out_of_range_ratio{{{MODEL}}})",
                            "{{ml_feature_name}}",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                ),
                ts(
                    "Other quality ratios",
                    "Non-finite numbers, unseen categories and values of the wrong type.",
                    [
                        (
                            f"max by (ml_feature_name) (ml_feature_nonfinite_ratio{{{MODEL}}})",
                            "non-finite {{ml_feature_name}}",
                        ),
                        (
                            f"max by (ml_feature_name) (ml_feature_unseen_ratio{{{MODEL}}})",
                            "unseen {{ml_feature_name}}",
                        ),
                        (
                            f"max by (ml_feature_name) (ml_feature_type_mismatch_ratio{{{MODEL}}})",
                            "type mismatch {{ml_feature_name}}",
                        ),
                    ],
                    unit="percentunit",
                    width=8,
                ),
                ts(
                    "Anomalous windows",
                    "Closed windows whose aggregate (mean score, mean latency, traffic, a feature's "
                    "mean) the rolling z-score flagged.",
                    [
                        (
                            f"sum by (ml_anomaly_stream) (increase(ml_anomalies_total{{{MODEL}}}[$__rate_interval]))",
                            "{{ml_anomaly_stream}}",
                        )
                    ],
                    width=24,
                ),
            ],
        ),
    ]
    return model_dashboard(
        "mlsidecar-drift",
        "mlsidecar / Drift & data quality",
        "Which features moved, how far, since when, and is the input data broken?",
        rows,
        var_query(
            "feature",
            "Feature",
            f"label_values(ml_feature_drift_psi{{{MODEL}}}, ml_feature_name)",
            include_all=False,
        ),
    )


# ---------------------------------------------------------------- 3. outcomes & performance


def outcomes_performance() -> Any:
    rate = "$__rate_interval"
    rows = [
        (
            "Outcomes",
            [
                ts(
                    "Outcomes joined, orphaned, unmatched",
                    "Outcomes joined to their prediction, outcomes whose prediction was never "
                    "found, and predictions dropped without an outcome (per second).",
                    [
                        (
                            f"sum by ({BY_MODEL}) (rate(ml_outcomes_joined_total{{{MODEL}}}[{rate}]))",
                            "joined",
                        ),
                        (
                            f"sum by ({BY_MODEL}) (rate(ml_outcomes_orphaned_total{{{MODEL}}}[{rate}]))",
                            "orphaned",
                        ),
                        (
                            f"sum by ({BY_MODEL}) (rate(ml_predictions_unmatched_total{{{MODEL}}}[{rate}]))",
                            "unmatched predictions",
                        ),
                    ],
                    unit="reqps",
                ),
                ts(
                    "Label delay p50 / p90",
                    "How long outcomes take to arrive: seconds from a prediction to the outcome "
                    "joined to it, for the outcomes joined in each interval (all replicas).",
                    quantiles("ml_outcome_label_delay_seconds_bucket", 0.5, 0.9),
                    unit="s",
                ),
                stat_panel(
                    "Join rate",
                    "Share of the outcomes received that found their prediction.",
                    [
                        (
                            f"sum(increase(ml_outcomes_joined_total{{{MODEL}}}[$__range])) / sum(increase(ml_outcomes_total{{{MODEL}}}[$__range]))",
                            "joined",
                        )
                    ],
                    unit="percentunit",
                    width=6,
                ),
                ts(
                    "Pending predictions",
                    "Predictions kept waiting for their outcome: a steady climb means outcomes "
                    "stopped arriving or joining.",
                    [
                        (
                            f"sum by ({BY_MODEL}) (ml_predictions_pending{{{MODEL}}})",
                            "pending {{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                    width=6,
                ),
                ts(
                    "Traffic per segment",
                    "Predictions per second per segment (the batch attributes, e.g. region=eu).",
                    [
                        (
                            f"sum by (ml_segment) (rate(ml_predictions_total{{{MODEL}}}[{rate}]))",
                            "{{ml_segment}}",
                        )
                    ],
                    unit="reqps",
                ),
            ],
        ),
        (
            "Performance",
            [
                ts(
                    "Classification: accuracy, F1, ROC AUC",
                    "On the outcomes joined in the evaluated window, worst replica.",
                    [
                        (
                            f'min by ({BY_MODEL}, ml_metric) (ml_model_performance{{{MODEL}, ml_metric=~"accuracy|f1_macro|roc_auc"}})',
                            "{{ml_metric}} {{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                    unit="percentunit",
                ),
                ts(
                    "Performance per segment",
                    "Accuracy, F1 and ROC AUC (R² for regression) of each segment on the "
                    "outcomes joined in the evaluated window, worst replica: is one region or "
                    "tier worse than the rest?",
                    [
                        (
                            f'min by (ml_segment, ml_metric) (ml_model_segment_performance{{{MODEL}, ml_metric=~"accuracy|f1_macro|roc_auc|r2"}})',
                            "{{ml_metric}} {{ml_segment}}",
                        )
                    ],
                    unit="percentunit",
                ),
                ts(
                    "Regression: MAE, RMSE, MAPE",
                    "Errors of a regression model on the joined outcomes (MAPE as a fraction: 0.05 = 5 %).",
                    [
                        (
                            f'max by ({BY_MODEL}, ml_metric) (ml_model_performance{{{MODEL}, ml_metric=~"mae|rmse|mape"}})',
                            "{{ml_metric}} {{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                ),
                ts(
                    "Fleet performance (weighted by joins)",
                    "Every replica's figure weighted by the outcomes it joined in the last 5 minutes (recording rule).",
                    [
                        (
                            f"ml:model_performance:fleet_weighted5m{{{MODEL}}}",
                            "{{ml_metric}} {{ml_model_name}} {{ml_model_version}}",
                        )
                    ],
                ),
                ts(
                    "Predicted classes",
                    "Predictions per second per predicted class: a shifting mix shows up here first.",
                    [
                        (
                            f"sum by (ml_prediction_label) (rate(ml_prediction_classes_total{{{MODEL}}}[{rate}]))",
                            "{{ml_prediction_label}}",
                        )
                    ],
                    unit="reqps",
                ),
            ],
        ),
    ]
    return model_dashboard(
        "mlsidecar-outcomes",
        "mlsidecar / Outcomes & performance",
        "Do outcomes arrive and join, and how good are the predictions?",
        rows,
    )


# ---------------------------------------------------------------- 4. pod resources


def pod_resources() -> Any:
    rate = "$__rate_interval"
    model_proc = f'{POD}, mlsidecar_process_role="model"'
    sidecar_proc = f'{POD}, mlsidecar_process_role="sidecar"'
    rows = [
        (
            "Model process",
            [
                ts(
                    "Model CPU against its limit",
                    "Cores the model process uses, and its container's CPU limit.",
                    [
                        (
                            f"sum by (k8s_pod_name, instance) (rate(process_cpu_time_seconds_total{{{model_proc}}}[{rate}]))",
                            "used {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"max by (k8s_pod_name, instance) (mlsidecar_model_cpu_limit{{{POD}}})",
                            "limit {{k8s_pod_name}}{{instance}}",
                        ),
                    ],
                ),
                ts(
                    "Model memory against its limit",
                    "Resident memory of the model process and its container's memory limit: "
                    "at the limit the kernel kills it (OOM).",
                    [
                        (
                            f"sum by (k8s_pod_name, instance) (process_memory_usage_bytes{{{model_proc}}})",
                            "RSS {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"max by (k8s_pod_name, instance) (mlsidecar_model_memory_limit_bytes{{{POD}}})",
                            "limit {{k8s_pod_name}}{{instance}}",
                        ),
                    ],
                    unit="bytes",
                ),
                ts(
                    "Model limit utilization",
                    "CPU and memory used as a share of the limits (alert at 90 % memory).",
                    [
                        (
                            f"max by (k8s_pod_name, instance) (mlsidecar_model_cpu_limit_utilization{{{POD}}})",
                            "CPU {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"max by (k8s_pod_name, instance) (mlsidecar_model_memory_limit_utilization{{{POD}}})",
                            "memory {{k8s_pod_name}}{{instance}}",
                        ),
                    ],
                    unit="percentunit",
                ),
                panel(
                    statetimeline.Panel().mappings(
                        mapping({0: ("down", "red"), 1: ("up", "green")})
                    ),
                    "Model process up",
                    "Whether the sidecar finds the model process (1 up, 0 down).",
                    [
                        (
                            f"max by (k8s_pod_name, instance) (mlsidecar_model_process_up{{{POD}}})",
                            "{{k8s_pod_name}}{{instance}}",
                        )
                    ],
                    width=6,
                ),
                stat_panel(
                    "Model restarts",
                    "New model processes found in the time range (a crash loop shows here).",
                    [
                        (
                            f"sum(increase(mlsidecar_model_process_restarts_total{{{POD}}}[$__range]))",
                            "restarts",
                        )
                    ],
                    width=6,
                ),
            ],
        ),
        (
            "The sidecar's own overhead",
            [
                ts(
                    "Sidecar CPU",
                    "Cores the sidecar uses, and its share of the pod's CPU (sidecar / (sidecar + model)).",
                    [
                        (
                            f"sum by (k8s_pod_name, instance) (rate(process_cpu_time_seconds_total{{{sidecar_proc}}}[{rate}]))",
                            "cores {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"sum by (k8s_pod_name, instance) (rate(process_cpu_time_seconds_total{{{sidecar_proc}}}[{rate}])) "
                            f"/ sum by (k8s_pod_name, instance) (rate(process_cpu_time_seconds_total{{{POD}}}[{rate}]))",
                            "share of the pod {{k8s_pod_name}}{{instance}}",
                        ),
                    ],
                    width=8,
                ),
                ts(
                    "Sidecar memory",
                    "The sidecar's resident memory, and its container's memory against the limit (cgroup v2).",
                    [
                        (
                            f"sum by (k8s_pod_name, instance) (process_memory_usage_bytes{{{sidecar_proc}}})",
                            "RSS {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"max by (k8s_pod_name, instance) (container_memory_usage_bytes{{{POD}}})",
                            "container {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"max by (k8s_pod_name, instance) (mlsidecar_container_memory_limit_bytes{{{POD}}})",
                            "limit {{k8s_pod_name}}{{instance}}",
                        ),
                    ],
                    unit="bytes",
                    width=8,
                ),
                ts(
                    "Sidecar CPU throttling",
                    "Share of CFS periods in which the sidecar's container was throttled (cgroup v2): "
                    "above a few percent, raise its CPU limit.",
                    [
                        (
                            f"sum by (k8s_pod_name, instance) (rate(mlsidecar_container_cpu_throttled_periods_total{{{POD}}}[{rate}])) "
                            f"/ sum by (k8s_pod_name, instance) (rate(mlsidecar_container_cpu_periods_total{{{POD}}}[{rate}]))",
                            "{{k8s_pod_name}}{{instance}}",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                ),
                ts(
                    "Ingest work",
                    "Seconds per second the sidecar spends validating and processing batches, and rows accepted per second.",
                    [
                        (
                            f"sum by (k8s_pod_name, instance) (rate(mlsidecar_ingest_duration_seconds_sum{{{POD}}}[{rate}]))",
                            "busy {{k8s_pod_name}}{{instance}}",
                        ),
                        (
                            f"sum by (mlsidecar_kind) (rate(mlsidecar_ingest_rows_total{{{POD}}}[{rate}]))",
                            "{{mlsidecar_kind}} rows/s",
                        ),
                    ],
                ),
                ts(
                    "Ingest results",
                    "Batches accepted, duplicate and rejected (with the reason) per second.",
                    [
                        (
                            f"sum by (mlsidecar_result, error_type) (rate(mlsidecar_ingest_batches_total{{{POD}}}[{rate}]))",
                            "{{mlsidecar_result}} {{error_type}}",
                        )
                    ],
                ),
            ],
        ),
    ]
    return model_dashboard(
        "mlsidecar-resources",
        "mlsidecar / Pod resources",
        "Is the model process starved or about to be killed, and what does the sidecar cost?",
        rows,
        var_query("pod", "Pod", f"label_values(ml_predictions_total{{{MODEL}}}, k8s_pod_name)"),
    )


# ---------------------------------------------------------------- 5. upstreams & breakers


def upstreams() -> Any:
    rate = "$__rate_interval"
    rows = [
        (
            "Breakers",
            [
                panel(
                    statetimeline.Panel().mappings(
                        mapping(
                            {0: ("closed", "green"), 1: ("half-open", "orange"), 2: ("open", "red")}
                        )
                    ),
                    "Breaker state",
                    "Each upstream's circuit breaker as the replicas last saw it (worst replica).",
                    [
                        (
                            f"max by (upstream) (mlsidecar_upstream_breaker_state{{{UPSTREAM}}})",
                            "{{upstream}}",
                        )
                    ],
                    width=24,
                    height=6,
                ),
                ts(
                    "Breaker transitions",
                    "State changes per upstream, from -> to.",
                    [
                        (
                            f"sum by (upstream, from, to) (increase(mlsidecar_upstream_breaker_state_changes_total{{{UPSTREAM}}}[{rate}]))",
                            "{{upstream}} {{from}} -> {{to}}",
                        )
                    ],
                ),
                ts(
                    "Rejections",
                    "Calls refused without being sent: breaker open or bulkhead full.",
                    [
                        (
                            f"sum by (upstream, reason) (rate(mlsidecar_upstream_rejections_total{{{UPSTREAM}}}[{rate}]))",
                            "{{upstream}} {{reason}}",
                        )
                    ],
                    unit="reqps",
                ),
            ],
        ),
        (
            "Calls",
            [
                ts(
                    "Requests by outcome",
                    "Calls per second: success, error_status (5xx after retries), timeout, unreachable, refused.",
                    [
                        (
                            f"sum by (upstream, outcome) (rate(mlsidecar_upstream_requests_total{{{UPSTREAM}}}[{rate}]))",
                            "{{upstream}} {{outcome}}",
                        )
                    ],
                    unit="reqps",
                ),
                ts(
                    "Latency p50 / p99",
                    "From the first attempt to the last response, retry delays included.",
                    [
                        (
                            f"histogram_quantile(0.5, sum by (le, upstream) (rate(mlsidecar_upstream_duration_seconds_bucket{{{UPSTREAM}}}[{rate}])))",
                            "p50 {{upstream}}",
                        ),
                        (
                            f"histogram_quantile(0.99, sum by (le, upstream) (rate(mlsidecar_upstream_duration_seconds_bucket{{{UPSTREAM}}}[{rate}])))",
                            "p99 {{upstream}}",
                        ),
                    ],
                    unit="s",
                ),
                ts(
                    "Retries",
                    "Retries per second: a rise warns before the breaker opens.",
                    [
                        (
                            f"sum by (upstream) (rate(mlsidecar_upstream_retries_total{{{UPSTREAM}}}[{rate}]))",
                            "{{upstream}}",
                        )
                    ],
                ),
                ts(
                    "Error ratio",
                    "Share of calls that did not succeed (refused ones included).",
                    [
                        (
                            f'sum by (upstream) (rate(mlsidecar_upstream_requests_total{{{UPSTREAM}, outcome!="success"}}[{rate}])) '
                            f"/ sum by (upstream) (rate(mlsidecar_upstream_requests_total{{{UPSTREAM}}}[{rate}]))",
                            "{{upstream}}",
                        )
                    ],
                    unit="percentunit",
                ),
            ],
        ),
    ]
    variables = [
        var_datasource(),
        var_query(
            "namespace",
            "Namespace",
            "label_values(mlsidecar_upstream_requests_total, k8s_namespace_name)",
        ),
        var_query(
            "upstream",
            "Upstream",
            'label_values(mlsidecar_upstream_requests_total{k8s_namespace_name=~"$namespace"}, upstream)',
        ),
    ]
    board = new_dashboard(
        "mlsidecar-upstreams",
        "mlsidecar / Upstreams & breakers",
        "Are the model's dependencies answering, and is a breaker protecting it?",
        variables,
    )
    return with_panels(board, rows)


# ---------------------------------------------------------------- output

DASHBOARDS: dict[str, Callable[[], Any]] = {
    "mlsidecar-model-health.json": model_health,
    "mlsidecar-drift.json": drift_quality,
    "mlsidecar-outcomes.json": outcomes_performance,
    "mlsidecar-resources.json": pod_resources,
    "mlsidecar-upstreams.json": upstreams,
}


def build_all() -> dict[str, dict[str, Any]]:
    """Every dashboard as the JSON Grafana loads (plain dicts)."""
    return {
        name: json.loads(json.dumps(make().build(), cls=JSONEncoder))
        for name, make in DASHBOARDS.items()
    }


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    stale = []
    for name, board in build_all().items():
        path = args.out / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale dashboards (run `make dashboards`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
