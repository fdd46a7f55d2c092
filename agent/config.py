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
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
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


class StoreSettings(Section):
    """Durable state: references (and pending predictions) under ``data_dir``."""

    data_dir: Path = Path("data")
    # Keep predictions pending (data_dir/pending.db) so outcomes can join them by id.
    pending: bool = True
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


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: JSON when stderr is not a terminal, text otherwise.
    format: Literal["auto", "json", "text"] = "auto"


ENV_PREFIX = "MLSIDECAR_"
# Read by the CLI, not part of the settings tree.
ENV_NOT_SETTINGS = frozenset({"MLSIDECAR_CONFIG"})


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
    # Deadline for a graceful stop: in-flight batches finish, exporters flush.
    shutdown_timeout_s: float = Field(10.0, gt=0)

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

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets shown as '**********'."""
        return self.model_dump(mode="json")
