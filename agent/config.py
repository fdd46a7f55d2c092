"""One typed settings tree for the whole agent.

Sources, highest precedence first: CLI overrides > ``MLSIDECAR_*`` environment
(nested with ``__``, e.g. ``MLSIDECAR_INGEST__LISTEN``) > YAML file > defaults.
The standard ``OTEL_*`` variables win over the ``telemetry`` section (see
``agent.telemetry``). Unknown keys are errors that name the key.

    settings = Settings.load(Path("mlsidecar.yaml"), ingest={"listen": "127.0.0.1:5320"})
    settings.ingest.listen  # '127.0.0.1:5320'
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DriftMethodName = Literal["psi", "ks", "wasserstein", "jensenshannon", "chisquare"]
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

_yaml_file: ContextVar[Path | None] = ContextVar("mlsidecar_yaml_file", default=None)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:4320' -> ('127.0.0.1', 4320); '[::1]:4320' -> ('::1', 4320)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{address!r} has no host")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TLSSettings(Section):
    """Server TLS; with ``client_ca`` set, clients must present a certificate (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> TLSSettings:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file {str(path)!r} does not exist")
        return self


class Listener(Section):
    """A listening address and how it is protected."""

    listen: str
    tls: TLSSettings | None = None
    # Bearer token clients must send (``authorization: Bearer <token>``).
    token: SecretStr | None = None
    # Allow a non-loopback address with neither TLS nor token.
    insecure: bool = False

    @field_validator("listen")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _secure_by_default(self) -> Listener:
        host, _ = split_host_port(self.listen)
        if not is_loopback(host) and self.tls is None and self.token is None and not self.insecure:
            raise ValueError(
                f"listen: {self.listen!r} is not a loopback address; set tls or token "
                "(or insecure: true to accept unauthenticated plaintext traffic)"
            )
        return self

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]


class IngestSettings(Listener):
    """gRPC ingest of prediction and outcome batches."""

    listen: str = "127.0.0.1:4320"
    max_rows_per_batch: int = Field(10_000, ge=1)
    max_features: int = Field(1_000, ge=1)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Model versions tracked at once; a batch for one more is rejected (INVALID_ARGUMENT).
    max_models: int = Field(100, ge=1)
    # Batches being processed at once before RESOURCE_EXHAUSTED (transient backpressure).
    max_in_flight: int = Field(256, ge=1)
    # A batch re-sent with the same batch_id within this window is counted once.
    dedup_window_s: float = Field(600.0, ge=0)
    dedup_max_batches: int = Field(100_000, ge=0)
    reflection: bool = True


class ApiSettings(Listener):
    """Admin HTTP API (health, model reports, HTTP JSON ingest, /metrics)."""

    listen: str = "127.0.0.1:8320"
    # Serve a Prometheus /metrics endpoint for setups without a Collector.
    prometheus: bool = True
    # Required by state-changing admin endpoints when set.
    admin_token: SecretStr | None = None
    # HTTP ingest bodies (POST /v1/predictions, /v1/outcomes) read or processed at once;
    # beyond, 429 RESOURCE_EXHAUSTED + Retry-After before the body is read (each body may
    # be up to ingest.max_message_bytes: this bounds their memory).
    max_ingest_in_flight: int = Field(8, ge=1)


class TelemetrySettings(Section):
    """OpenTelemetry export. Standard OTEL_* variables win over these values."""

    # service.name of the monitored model service (OTEL_SERVICE_NAME wins).
    service_name: str = "ml-model"
    otlp: bool = True
    # Collector OTLP endpoint; default http://127.0.0.1:4317 (grpc) or :4318 (http/protobuf).
    endpoint: str | None = None
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    metric_export_interval_ms: int = Field(10_000, ge=100)
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    traces: bool = True
    logs: bool = True
    # How often health events (drift detected/resolved, ...) are evaluated; 0 turns them off.
    events_interval_s: float = Field(10.0, ge=0)


def key_error(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """An error at ``loc``, below the section raising it, so the message names the exact key
    (``engine.health.performance.accuracy.critical_min: ...``)."""
    error = InitErrorDetails(type="value_error", loc=loc, input=value, ctx={"error": message})
    return ValidationError.from_exception_data("Settings", [error])


def _strictly_beyond(section: BaseModel, degraded: str, critical: str, below: bool = False) -> None:
    """A critical threshold lies strictly beyond its degraded one: above it, or ``below``."""
    at, worst = getattr(section, degraded), getattr(section, critical)
    if not (worst < at if below else worst > at):
        side = "below" if below else "above"
        raise key_error((critical,), f"{critical}={worst} must be {side} {degraded}={at}", worst)


HealthSignal = Literal["drift", "performance", "quality", "anomalies"]
QualityRatio = Literal[
    "missing_ratio", "nonfinite_ratio", "out_of_range_ratio", "unseen_ratio", "type_mismatch_ratio"
]
# The overall metrics of the performance report that a limit can judge (a misspelt one
# would silently never be judged); tests/test_health.py checks them against the report.
PerformanceMetric = Literal[
    "accuracy", "precision_macro", "recall_macro", "f1_macro", "log_loss", "brier", "roc_auc",
    "ece", "mae", "rmse", "mape", "r2", "bias",
]  # fmt: skip
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class HealthLimit(Section):
    """Where a metric or ratio stops being fine: ``min`` and ``critical_min`` (higher is
    better) or ``max`` and ``critical_max`` (lower is better).

        HealthLimit(min=0.60, critical_min=0.50)   # accuracy: degraded below 0.60, critical at 0.50
        HealthLimit(max=0.05, critical_max=0.20)   # MAPE: degraded above 5 %, critical at 20 %
    """

    min: float | None = Field(None, allow_inf_nan=False)
    critical_min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)
    critical_max: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_direction(self) -> HealthLimit:
        given = [key for key, value in self if value is not None]
        if given not in (["min", "critical_min"], ["max", "critical_max"]):
            raise ValueError(
                "give min and critical_min (higher is better) or max and critical_max "
                f"(lower is better); got {', '.join(given) or 'neither'}"
            )
        if self.higher_is_better:
            _strictly_beyond(self, "min", "critical_min", below=True)
        else:
            _strictly_beyond(self, "max", "critical_max")
        return self

    @model_serializer(mode="wrap")
    def _pair_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `config show` prints the pair in use: {min: 0.6, critical_min: 0.5}.
        return {key: value for key, value in handler(self).items() if value is not None}

    @property
    def higher_is_better(self) -> bool:
        return self.min is not None

    @property
    def degraded(self) -> float:
        value = self.min if self.higher_is_better else self.max
        assert value is not None  # one pair is set (checked above)
        return value

    @property
    def critical(self) -> float:
        value = self.critical_min if self.higher_is_better else self.critical_max
        assert value is not None
        return value


def _ratio_limits(
    value: dict[QualityRatio, HealthLimit | None],
) -> dict[QualityRatio, HealthLimit | None]:
    """Quality limits are ratios: lower is better, 0 ≤ max < critical_max ≤ 1."""
    for ratio, limit in value.items():
        if limit is None:
            continue
        if limit.higher_is_better:
            raise key_error((ratio, "min"), "a ratio takes max and critical_max", limit.min)
        if limit.degraded < 0:
            raise key_error((ratio, "max"), f"{limit.degraded} is not a ratio in [0, 1]", limit.max)
        if limit.critical > 1:
            raise key_error(
                (ratio, "critical_max"),
                f"{limit.critical} is not a ratio in [0, 1]",
                limit.critical,
            )
    return value


# The built-in health policy (agent.engine.health.HealthPolicy's defaults; a test checks they agree).
def _default_weights() -> dict[HealthSignal, float]:
    return {"drift": 30.0, "performance": 40.0, "quality": 20.0, "anomalies": 10.0}


def _default_performance() -> dict[PerformanceMetric, HealthLimit | None]:
    return {
        "accuracy": HealthLimit(min=0.60, critical_min=0.50),
        "mape": HealthLimit(max=0.05, critical_max=0.20),
    }


def _default_quality() -> dict[QualityRatio, HealthLimit | None]:
    return {
        "missing_ratio": HealthLimit(max=0.10, critical_max=0.50),
        "nonfinite_ratio": HealthLimit(max=0.10, critical_max=0.50),
        "out_of_range_ratio": HealthLimit(max=0.10, critical_max=0.50),
        "unseen_ratio": HealthLimit(max=0.10, critical_max=0.50),
        "type_mismatch_ratio": HealthLimit(max=0.0, critical_max=0.50),
    }


class DriftHealth(Section):
    """``engine.health.drift``: the share of drifted features that degrades the model, and
    that makes it critical."""

    degraded_share: float = Field(0.5, gt=0, le=1)
    critical_share: float = Field(0.75, gt=0, le=1)
    prediction_drift_degrades: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> DriftHealth:
        _strictly_beyond(self, "degraded_share", "critical_share")
        return self


class AnomalyHealth(Section):
    """``engine.health.anomalies``: anomalies in a window that degrade the model, and that make
    it critical."""

    degraded: int = Field(3, ge=1)
    critical: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> AnomalyHealth:
        _strictly_beyond(self, "degraded", "critical")
        return self


class HealthSettings(Section):
    """``engine.health``: the health score's weights and limits for every model
    (docs/health-score.md). The maps are laid over the built-in ones entry by entry; a
    metric set to null is not judged.

        Settings.load(None, engine={"health": {"performance": {"accuracy": {"min": 0.7, "critical_min": 0.6}}}})
    """

    # Points each signal can cost.
    weights: dict[HealthSignal, Weight] = Field(default_factory=_default_weights)
    drift: DriftHealth = Field(default_factory=DriftHealth)
    # Metric (as the performance report names it) → limit; metrics not listed are not judged.
    performance: dict[PerformanceMetric, HealthLimit | None] = Field(
        default_factory=_default_performance
    )
    # Quality ratio → limit, applied to every feature.
    quality: dict[QualityRatio, HealthLimit | None] = Field(default_factory=_default_quality)
    anomalies: AnomalyHealth = Field(default_factory=AnomalyHealth)
    # Findings listed per signal before "N more not listed".
    max_reasons_per_signal: int = Field(3, ge=1)

    @field_validator("weights")
    @classmethod
    def _every_weight(cls, value: dict[HealthSignal, float]) -> dict[HealthSignal, float]:
        return {**_default_weights(), **value}

    @field_validator("performance")
    @classmethod
    def _every_metric(
        cls, value: dict[PerformanceMetric, HealthLimit | None]
    ) -> dict[PerformanceMetric, HealthLimit | None]:
        return {**_default_performance(), **value}

    @field_validator("quality")
    @classmethod
    def _every_ratio(
        cls, value: dict[QualityRatio, HealthLimit | None]
    ) -> dict[QualityRatio, HealthLimit | None]:
        return {**_default_quality(), **_ratio_limits(value)}


class DriftHealthOverride(Section):
    """``models.<name>.health.drift``: the keys set replace those of ``engine.health.drift``."""

    degraded_share: float | None = Field(None, gt=0, le=1)
    critical_share: float | None = Field(None, gt=0, le=1)
    prediction_drift_degrades: bool | None = None


class AnomalyHealthOverride(Section):
    """``models.<name>.health.anomalies``: the keys set replace those of ``engine.health.anomalies``."""

    degraded: int | None = Field(None, ge=1)
    critical: int | None = Field(None, ge=1)


class ModelHealthSettings(Section):
    """``models.<name>.health``: overrides of ``engine.health`` for one model. Only the keys
    set apply; the maps are merged entry by entry, and a metric set to null is not judged.

        models: {fraud: {health: {performance: {roc_auc: {min: 0.75, critical_min: 0.65}, accuracy: null}}}}
    """

    weights: dict[HealthSignal, Weight] = Field(default_factory=dict)
    drift: DriftHealthOverride | None = None
    performance: dict[str, HealthLimit | None] = Field(default_factory=dict)
    quality: dict[QualityRatio, HealthLimit | None] = Field(default_factory=dict)
    anomalies: AnomalyHealthOverride | None = None
    max_reasons_per_signal: int | None = Field(None, ge=1)

    @field_validator("quality")
    @classmethod
    def _ratios(
        cls, value: dict[QualityRatio, HealthLimit | None]
    ) -> dict[QualityRatio, HealthLimit | None]:
        return _ratio_limits(value)


class AnomalySettings(Section):
    """``engine.anomaly``: the rolling z-score detectors of each model's window aggregates
    (mean score, mean latency, rows), one observation per closed window."""

    # Windows after which an old window keeps half its weight in the rolling mean.
    half_life: float = Field(12.0, gt=0, allow_inf_nan=False)
    # A window is flagged when |z| is above this.
    z: float = Field(3.0, gt=0, allow_inf_nan=False)
    # Windows only learnt, not scored, at the start of each model version.
    warmup: int = Field(6, ge=2)


class AnomalyOverride(Section):
    """``models.<name>.anomaly``: the keys set replace those of ``engine.anomaly``."""

    half_life: float | None = Field(None, gt=0, allow_inf_nan=False)
    z: float | None = Field(None, gt=0, allow_inf_nan=False)
    warmup: int | None = Field(None, ge=2)


SectionT = TypeVar("SectionT", bound=Section)


def overlay(base: SectionT, override: Section | None) -> SectionT:
    """``base`` with the keys ``override`` sets laid over it, validated again: maps entry by
    entry, sub-sections key by key, other keys when not None.

        overlay(settings.engine.anomaly, AnomalyOverride(z=4.0)).z   # 4.0
    """
    if override is None:
        return base
    data = base.model_dump()
    for key, value in override:
        if isinstance(value, dict):
            data[key].update(value)
        elif isinstance(value, BaseModel):
            data[key].update(value.model_dump(exclude_none=True))
        elif value is not None:
            data[key] = value
    return type(base).model_validate(data)


class EngineSettings(Section):
    """Per-model health computation."""

    # Tumbling window length (by receipt time).
    window_s: float = Field(300.0, gt=0)
    # Longer tumbling windows over which drift is also judged (multiples of window_s).
    long_windows_s: list[float] = Field(default_factory=list, max_length=4)
    # A live window is reported as complete once it holds this many rows.
    min_window_rows: int = Field(100, ge=1)
    # Upper bounds of the latency histogram buckets, milliseconds.
    latency_buckets_ms: list[float] = Field(
        default_factory=lambda: [1.0, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
    )
    # Upper bounds of the score histogram buckets.
    score_buckets: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)]
    )
    # Distinct segments (combinations of batch attributes) per model version before "other".
    max_segments: int = Field(20, ge=1)
    # Without a reference file or upload, the first N predictions become the reference; 0: off.
    warmup_rows: int = Field(1000, ge=0)
    # Reference bins: quantile bins for PSI, finer ones for KS / Wasserstein, top-K categories.
    psi_bins: int = Field(10, ge=2, le=1000)
    cdf_bins: int = Field(100, ge=2, le=10_000)
    top_k: int = Field(50, ge=1, le=10_000)
    # Dataset drift: this share of features drifted (each by its own method).
    drift_share: float = Field(0.5, gt=0, le=1)
    # Per-method decision thresholds (docs/drift.md has the defaults).
    drift_thresholds: dict[DriftMethodName, float] = Field(default_factory=dict)
    # References kept per model version, the current one included.
    reference_history: int = Field(5, ge=1)
    # The health score's weights and limits (docs/health-score.md).
    health: HealthSettings = Field(default_factory=HealthSettings)
    # Rolling z-score detectors of the window aggregates.
    anomaly: AnomalySettings = Field(default_factory=AnomalySettings)

    @field_validator("drift_thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for method, threshold in value.items():
            if not math.isfinite(threshold) or threshold < 0:
                raise ValueError(f"{method}: must be a finite number >= 0, got {threshold}")
        return value

    @field_validator("latency_buckets_ms", "score_buckets")
    @classmethod
    def _sorted(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one bucket bound")
        if not all(math.isfinite(b) for b in value):
            raise ValueError(f"bucket bounds must be finite numbers: {value}")
        if any(b >= a for a, b in zip(value[1:], value, strict=False)):
            raise ValueError(f"bucket bounds not in strictly increasing order: {value}")
        return value


class ModelSettings(Section):
    """Settings for one model, under ``models.<name>``."""

    window_s: float | None = Field(None, gt=0)
    score_buckets: list[float] | None = None
    # A reference file written by `mlsidecar reference build` (turns warm-up off).
    reference: Path | None = None
    # The class whose score `scores` carries (binary metrics: precision, ROC AUC, ...).
    positive_class: str | None = None
    # Drift method per feature, overriding the default choice.
    drift_methods: dict[str, DriftMethodName] = Field(default_factory=dict)
    # Overrides of engine.health and engine.anomaly: only the keys set apply.
    health: ModelHealthSettings | None = None
    anomaly: AnomalyOverride | None = None

    @field_validator("reference")
    @classmethod
    def _reference_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("score_buckets")
    @classmethod
    def _sorted(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else EngineSettings._sorted(value)


SECRET_MASK = "**********"


def redact_url(url: str) -> str:
    """``url`` with its password masked: 'redis://app:**********@redis:6379/0' (also a
    ``password=`` query parameter, as in 'unix:///run/redis.sock?password=...')."""
    parts = urllib.parse.urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{SECRET_MASK}@{netloc.rpartition('@')[2]}"
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        masked = [(key, SECRET_MASK if key == "password" else value) for key, value in pairs]
        query = urllib.parse.urlencode(masked, safe="*")
    # Built by hand: urlunsplit would drop the "//" of 'unix:///path' (no host).
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


class RedisStoreSettings(Section):
    """The shared Redis pending store, used when ``store.backend`` is ``redis``."""

    # redis://[user:password@]host:port/db, rediss://... (TLS) or unix:///path?db=0. A
    # secret: `config show` and logs show it with the password masked.
    url: SecretStr | None = None
    # Every key starts with "<key_prefix>:": one prefix per deployment sharing a Redis.
    key_prefix: str = Field("mlsidecar", min_length=1, max_length=100)
    # Connect and command timeout; a store call past it fails (ingest answers UNAVAILABLE).
    timeout_s: float = Field(2.0, gt=0)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urllib.parse.urlsplit(value.get_secret_value())
        shown = redact_url(value.get_secret_value())
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{shown!r} is not a Redis URL (redis://, rediss:// or unix://)")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError(f"{shown!r} has an invalid port") from None
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"{shown!r} names no host")
        return value

    @field_serializer("url", when_used="json")
    def _shown_url(self, value: SecretStr | None) -> str | None:
        # Host, port and db help whoever reads `config show`; the password never shows.
        return None if value is None else redact_url(value.get_secret_value())


class StoreSettings(Section):
    """Durable state: references (and pending predictions) under ``data_dir``."""

    data_dir: Path = Path("data")
    # Keep predictions pending (data_dir/pending.db) so outcomes can join them by id.
    pending: bool = True
    # Where pending predictions live: sqlite (data_dir/pending.db, this replica only) or
    # redis (shared by replicas: an outcome joins whichever replica got its prediction).
    backend: Literal["sqlite", "redis"] = "sqlite"
    redis: RedisStoreSettings = Field(default_factory=RedisStoreSettings)
    # A prediction with no outcome after this long is dropped and counted as unmatched.
    pending_ttl_s: float = Field(7 * 86400.0, gt=0)
    # At most this many pending predictions; the oldest are evicted (unmatched) beyond it.
    max_pending: int = Field(1_000_000, ge=1)
    # SQLite synchronous mode: NORMAL survives kill -9 (not power loss); FULL survives both.
    synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"
    # Refuse new predictions (RESOURCE_EXHAUSTED) once the file reaches this size.
    max_db_bytes: int | None = Field(None, ge=65536)
    # How often expired predictions and orphaned outcomes are counted.
    expire_interval_s: float = Field(10.0, gt=0)
    # An outcome whose prediction is not pending is held this long in case it is in flight.
    orphan_grace_s: float = Field(60.0, ge=0)
    max_orphans: int = Field(50_000, ge=0)

    @model_validator(mode="after")
    def _backend_configured(self) -> StoreSettings:
        if self.backend == "redis" and self.redis.url is None:
            raise ValueError(
                "store.redis.url is required when store.backend is redis "
                "(e.g. redis://127.0.0.1:6379/0)"
            )
        return self


class RetryPolicy(Section):
    """``upstream.policies.<name>.retries``: attempts after the first, and when to make them."""

    max: int = Field(2, ge=0, le=10)
    backoff: Literal["constant", "exponential"] = "exponential"
    base_s: float = Field(0.05, ge=0)
    max_s: float = Field(2.0, ge=0)
    # Share of each delay drawn at random (0: none, 1: full jitter).
    jitter: float = Field(0.2, ge=0, le=1)
    # Response statuses worth another attempt.
    on_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=lambda: [502, 503, 504]
    )
    # Retry connection errors and timeouts too.
    on_error: bool = True


class BreakerPolicy(Section):
    """``upstream.policies.<name>.breaker``: when to trip, how long to stay open, how to close."""

    consecutive_failures: int = Field(5, ge=1)
    # Also trip at this failure share over window_s once min_requests calls ended; null: off.
    failure_rate: float | None = Field(None, gt=0, le=1)
    min_requests: int = Field(20, ge=1)
    window_s: float = Field(30.0, gt=0)
    open_s: float = Field(30.0, gt=0)
    # Probe calls in flight at once while half-open.
    half_open_requests: int = Field(1, ge=1)
    # Successful probes that close the breaker.
    close_after_successes: int = Field(1, ge=1)
    # memory: this replica only; redis: shared by replicas (upstream.redis_url).
    storage: Literal["memory", "redis"] = "memory"


class BulkheadPolicy(Section):
    """``upstream.policies.<name>.bulkhead``: calls in flight, and calls waiting, per target."""

    max_in_flight: int = Field(64, ge=1)
    max_pending: int = Field(64, ge=0)


class UpstreamPolicy(Section):
    """One named policy under ``upstream.policies``; a section left out is off."""

    # Per attempt, connect to last byte of the response headers.
    timeout_s: float = Field(5.0, gt=0)
    retries: RetryPolicy | None = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy | None = Field(default_factory=BreakerPolicy)
    bulkhead: BulkheadPolicy | None = None


UPSTREAM_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class UpstreamTarget(Section):
    """``upstream.targets.<name>``: the base URL the proxy forwards ``/upstream/<name>/`` to.
    A secret, as a webhook URL may carry a token: `config show` masks its password."""

    url: SecretStr
    policy: str = "default"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        parts = urllib.parse.urlsplit(value.get_secret_value())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = redact_url(value.get_secret_value())
            raise ValueError(f"{shown!r} is not an http:// or https:// URL with a host")
        return value

    @field_serializer("url", when_used="json")
    def _shown_url(self, value: SecretStr) -> str:
        return redact_url(value.get_secret_value())


class UpstreamSettings(Listener):
    """The egress proxy: ``http://<listen>/upstream/<target>/<path>`` guarded by its policy."""

    # Served only when targets are configured.
    listen: str = "127.0.0.1:8321"
    policies: dict[str, UpstreamPolicy] = Field(
        default_factory=lambda: {"default": UpstreamPolicy()}
    )
    targets: dict[str, UpstreamTarget] = Field(default_factory=dict)
    # Where breakers with storage: redis keep their state (default: store.redis.url).
    redis_url: SecretStr | None = None
    key_prefix: str = Field("mlsidecar", min_length=1, max_length=100)
    # Request bodies are read whole (to be re-sent on a retry); larger ones get 413.
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)

    @field_validator("policies")
    @classmethod
    def _default_policy(cls, value: dict[str, UpstreamPolicy]) -> dict[str, UpstreamPolicy]:
        return {"default": UpstreamPolicy(), **value}

    @field_validator("targets")
    @classmethod
    def _target_names(cls, value: dict[str, UpstreamTarget]) -> dict[str, UpstreamTarget]:
        for name in value:
            if not UPSTREAM_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"target name {name!r} does not match [A-Za-z0-9_-]{{1,64}}")
        return value

    @model_validator(mode="after")
    def _policies_exist(self) -> UpstreamSettings:
        for name, target in self.targets.items():
            if target.policy not in self.policies:
                raise key_error(
                    ("targets", name, "policy"),
                    f"no policy {target.policy!r} in upstream.policies "
                    f"(have: {', '.join(sorted(self.policies))})",
                    target.policy,
                )
        return self

    @field_serializer("redis_url", when_used="json")
    def _shown_redis_url(self, value: SecretStr | None) -> str | None:
        return None if value is None else redact_url(value.get_secret_value())


class ModelProcessSettings(Section):
    """How to find the model service's process, and its container's limits (docs/resources.md).

    Set one of ``pid`` / ``pid_file`` / ``process_name`` / ``cmdline`` (the two patterns
    may be combined: both must match). The limits usually come from the chart, through
    the Downward API, as ``MLSIDECAR_RESOURCES__MODEL__MEMORY_LIMIT_BYTES`` and
    ``MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES``.
    """

    pid: int | None = Field(None, ge=1)
    pid_file: Path | None = None
    # Regular expressions searched in the process name / the space-joined command line.
    process_name: str | None = None
    cmdline: str | None = None
    cpu_limit_cores: float | None = Field(None, gt=0)
    # The Downward API's `limits.cpu` with `divisor: 1m` (whole cores would round 500m up to 1).
    cpu_limit_millicores: int | None = Field(None, gt=0)
    memory_limit_bytes: int | None = Field(None, gt=0)
    # How often a missing or exited model process is looked for again.
    discovery_interval_s: float = Field(5.0, gt=0)

    @field_validator("process_name", "cmdline")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{value!r} is not a regular expression: {error}") from None
        return value

    @model_validator(mode="after")
    def _one_selector(self) -> ModelProcessSettings:
        chosen = [
            key
            for key, value in (
                ("pid", self.pid),
                ("pid_file", self.pid_file),
                ("process_name/cmdline", self.process_name or self.cmdline),
            )
            if value
        ]
        if len(chosen) > 1:
            raise ValueError(f"set only one of {', '.join(chosen)} to find the model process")
        if self.cpu_limit_cores is not None and self.cpu_limit_millicores is not None:
            raise ValueError("set cpu_limit_cores or cpu_limit_millicores, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.pid or self.pid_file or self.process_name or self.cmdline)

    @property
    def cpu_limit(self) -> float | None:
        """The model container's CPU limit in cores, whichever key set it."""
        if self.cpu_limit_millicores is not None:
            return self.cpu_limit_millicores / 1000
        return self.cpu_limit_cores


class ResourcesSettings(Section):
    """The pod's resources: the sidecar's process and host, its cgroup, the model process, GPUs."""

    enabled: bool = True
    # system.* metrics of the host (or node) through opentelemetry-instrumentation-system-metrics.
    host: bool = True
    # system.network.connections walks every socket (psutil.net_connections): off unless asked.
    network_connections: bool = False
    # Paths whose filesystems are reported (system.filesystem.*).
    filesystems: list[str] = Field(default_factory=lambda: ["/"])
    # Where cgroup v2 is mounted; only the sidecar's own container's cgroup is readable.
    cgroup_root: Path = Path("/sys/fs/cgroup")
    # NVML GPU metrics when nvidia-ml-py is installed and a driver answers.
    gpu: bool = True
    model: ModelProcessSettings = Field(default_factory=ModelProcessSettings)


class AlertRuleSettings(Section):
    """One alert rule (docs/alerts.md): a health-report signal path, a comparison, a threshold."""

    # Path in the health report, '*' matching every key: "features.*.drift.psi".
    signal: str
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    threshold: float
    # The condition must hold this long before the alert fires.
    for_s: float = Field(0.0, ge=0)
    severity: Literal["info", "warning", "critical"] = "warning"
    # A firing alert notifies again after this long (unless acknowledged).
    cooldown_s: float = Field(300.0, ge=0)
    # Models the rule watches; null: all.
    models: list[str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # "log" (built in: the agent's log and an OTel log record) or names of alerts.channels.
    channels: list[str] = Field(default_factory=lambda: ["log"], min_length=1)

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        if not re.fullmatch(r"(?:[A-Za-z0-9_-]+|\*)(?:\.(?:[A-Za-z0-9_-]+|\*))*", value):
            raise ValueError(
                f"{value!r} is not a dotted path of report keys and '*' (e.g. features.*.drift.psi)"
            )
        return value


class AlertChannelSettings(Section):
    """An HTTP alert channel, sending through an ``upstream.targets`` entry (its timeout,
    retries and breaker): Alertmanager's v2 API, or a JSON webhook."""

    type: Literal["alertmanager", "webhook"]
    # The upstream target to send through; its URL is a secret (it may hold a token).
    upstream: str = Field(min_length=1)
    # Webhooks: a path below the target's URL ("" posts to the URL itself).
    path: str = ""
    # Webhooks: the notification as JSON, or {"text": ...} for Slack-style hooks.
    format: Literal["json", "slack"] = "json"


class AlertSettings(Section):
    """Alerts on health-report signals: built-in rules, your rules, evaluation interval."""

    enabled: bool = True
    # How often every model version's report is judged.
    interval_s: float = Field(15.0, gt=0)
    # Ship the default rules (dataset drift, feature PSI, accuracy, MAPE, health score).
    default_rules: bool = True
    # Your rules by name; a default rule's name replaces it, and null turns it off.
    rules: dict[str, AlertRuleSettings | None] = Field(default_factory=dict)
    # Resolved alerts kept for GET /v1/alerts (and across restarts).
    history: int = Field(200, ge=0, le=10_000)
    # HTTP channels by name, for rules' ``channels``.
    channels: dict[str, AlertChannelSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_channels(self) -> AlertSettings:
        if "log" in self.channels:
            raise ValueError("channels.log: 'log' is the built-in channel; pick another name")
        for name in self.channels:  # a channel's outbox is a file named after it
            if not UPSTREAM_NAME_PATTERN.fullmatch(name):
                raise ValueError(
                    f"channels.{name}: use 1-64 letters, digits, '_' or '-' in a channel name"
                )
        for name, rule in self.rules.items():
            for channel in rule.channels if rule else ():
                if channel != "log" and channel not in self.channels:
                    raise ValueError(
                        f"rules.{name}.channels: {channel!r} is neither 'log' nor a channel "
                        "of alerts.channels"
                    )
        return self


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: JSON when stderr is not a terminal, text otherwise.
    format: Literal["auto", "json", "text"] = "auto"


ENV_PREFIX = "MLSIDECAR_"
# Read by the CLI, not part of the settings tree. The Helm chart gives the model container
# the other four (where its sidecar listens); a model running an mlsidecar command keeps them.
ENV_NOT_SETTINGS = frozenset(
    {
        "MLSIDECAR_CONFIG",
        "MLSIDECAR_TARGET",
        "MLSIDECAR_API_URL",
        "MLSIDECAR_UPSTREAM_URL",
        "MLSIDECAR_TOKEN",
    }
)


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``MLSIDECAR_*`` variables that name no setting (pydantic-settings ignores them).

    Nested unknown keys (``MLSIDECAR_INGEST__BOGUS``) fail validation already; a
    misspelt top-level key would otherwise be silently ignored.
    """
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in ENV_NOT_SETTINGS:
            continue
        parts = name[len(ENV_PREFIX) :].split("__")
        if parts[0].lower() not in Settings.model_fields:
            raise ValueError(f"environment variable {name}: unknown key {parts[0].lower()!r}")
        if parts[0].lower() == "models" and len(parts) > 1 and parts[1] != parts[1].lower():
            raise ValueError(
                f"environment variable {name}: environment names are matched without case, "
                f"so model {parts[1]!r} would become {parts[1].lower()!r}; "
                f"set models.{parts[1]} in the YAML file instead"
            )


class Settings(BaseSettings):
    """The agent's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="MLSIDECAR_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    ingest: IngestSettings = Field(default_factory=IngestSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    # The pod's resources and the model process (docs/resources.md).
    resources: ResourcesSettings = Field(default_factory=ResourcesSettings)
    # The egress proxy and its breaker-guarded upstream targets (docs/upstream.md).
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    # Deadline for a graceful stop: in-flight batches finish, exporters flush.
    shutdown_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _upstream_redis(self) -> Settings:
        shared = [
            name
            for name, policy in self.upstream.policies.items()
            if policy.breaker is not None and policy.breaker.storage == "redis"
        ]
        if shared and self.upstream_redis_url() is None:
            raise ValueError(
                f"upstream.policies.{shared[0]}.breaker.storage: redis needs upstream.redis_url "
                "(or store.redis.url)"
            )
        return self

    def upstream_redis_url(self) -> str | None:
        """Where shared breaker state lives: ``upstream.redis_url``, else ``store.redis.url``."""
        url = self.upstream.redis_url or self.store.redis.url
        return None if url is None else url.get_secret_value()

    @model_validator(mode="after")
    def _alert_channel_upstreams(self) -> Settings:
        """Alert channels send through the upstream layer: their target must exist."""
        for name, channel in self.alerts.channels.items():
            if channel.upstream not in self.upstream.targets:
                raise ValueError(
                    f"alerts.channels.{name}.upstream: {channel.upstream!r} is not a target "
                    "of upstream.targets"
                )
        return self

    @model_validator(mode="after")
    def _long_windows(self) -> Settings:
        """Long windows are made of whole base windows, for every model's base window."""
        bases = {"engine.window_s": self.engine.window_s}
        for name, model in self.models.items():
            if model.window_s is not None:
                bases[f"models.{name}.window_s"] = model.window_s
        for i, length in enumerate(self.engine.long_windows_s):
            for key, base in bases.items():
                ratio = length / base
                if ratio <= 1 or abs(ratio - round(ratio)) > 1e-9:
                    raise ValueError(
                        f"engine.long_windows_s[{i}]: {length:g} s must be a multiple of "
                        f"{key} ({base:g} s) greater than it"
                    )
        return self

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in value:
            if not MODEL_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"model name {name!r} does not match [A-Za-z0-9._-]{{1,128}}")
        return value

    @model_validator(mode="after")
    def _model_health_fits_engine_health(self) -> Settings:
        # A model's override can clash with the engine's keys it leaves alone (a critical_share
        # below engine.health.drift.degraded_share): refused now, naming the model's key.
        errors: list[InitErrorDetails] = []
        for name in self.models:
            try:
                self.health_for(name)
            except ValidationError as error:
                errors.extend(
                    InitErrorDetails(
                        type=e["type"],
                        loc=("models", name, "health", *e["loc"]),
                        input=e["input"],
                        ctx=e.get("ctx", {}),
                    )
                    for e in error.errors()
                )
        if errors:
            raise ValidationError.from_exception_data("Settings", errors)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from an optional YAML file, the environment and overrides."""
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        check_environment(os.environ)
        token = _yaml_file.set(path)
        try:
            return cls(**overrides)
        finally:
            _yaml_file.reset(token)

    def for_model(self, name: str) -> ModelSettings:
        return self.models.get(name) or ModelSettings()

    def health_for(self, name: str) -> HealthSettings:
        """``engine.health`` with ``models.<name>.health`` laid over it."""
        return overlay(self.engine.health, self.for_model(name).health)

    def anomaly_for(self, name: str) -> AnomalySettings:
        """``engine.anomaly`` with ``models.<name>.anomaly`` laid over it."""
        return overlay(self.engine.anomaly, self.for_model(name).anomaly)

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets shown as '**********'."""
        return self.model_dump(mode="json")
