"""Configuration: sources and their precedence, strictness, security defaults, redaction."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import ValidationError

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.app import model_config_resolver
from agent.cli import ConfigError, load_settings
from agent.config import Settings
from agent.engine import MonitorConfig
from agent.engine.health import HealthPolicy, Limit


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "MLSIDECAR_")):
            monkeypatch.delenv(name)


@pytest.fixture
def write_yaml(tmp_path: Path) -> Any:
    def write(data: Any, name: str = "mlsidecar.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return write


def errors_of(raised: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    """{'ingest.max_rows': 'extra_forbidden', ...} from a ValidationError."""
    return {".".join(map(str, e["loc"])): e["type"] for e in raised.value.errors()}


# -- defaults and precedence -----------------------------------------------------------------


def test_defaults_listen_on_loopback_ports_4320_and_8320():
    settings = Settings.load(None)
    assert settings.ingest.listen == "127.0.0.1:4320"
    assert settings.api.listen == "127.0.0.1:8320"
    assert (settings.ingest.host, settings.ingest.port) == ("127.0.0.1", 4320)
    assert settings.telemetry.protocol == "grpc"
    assert settings.telemetry.endpoint is None
    assert settings.api.prometheus is True
    assert settings.ingest.token is None and settings.api.admin_token is None


def test_precedence_is_overrides_then_env_then_yaml_then_defaults(write_yaml, monkeypatch):
    path = write_yaml(
        {
            "ingest": {"listen": "127.0.0.1:1111", "max_rows_per_batch": 7, "max_features": 9},
            "api": {"listen": "127.0.0.1:1112"},
        }
    )
    monkeypatch.setenv("MLSIDECAR_INGEST__MAX_ROWS_PER_BATCH", "55")
    monkeypatch.setenv("MLSIDECAR_INGEST__LISTEN", "127.0.0.1:3333")
    monkeypatch.setenv("MLSIDECAR_API__LISTEN", "127.0.0.1:3334")

    settings = Settings.load(path, ingest={"listen": "127.0.0.1:2222"})

    assert settings.ingest.listen == "127.0.0.1:2222"  # override beats env and YAML
    assert settings.api.listen == "127.0.0.1:3334"  # env beats YAML
    assert settings.ingest.max_rows_per_batch == 55  # env beats YAML
    assert settings.ingest.max_features == 9  # YAML beats the default
    assert settings.ingest.max_models == 100  # default


def test_a_nested_override_keeps_sibling_keys_from_other_sources(write_yaml, monkeypatch):
    path = write_yaml(
        {"telemetry": {"service_name": "from-yaml", "metric_export_interval_ms": 500}}
    )
    monkeypatch.setenv("MLSIDECAR_TELEMETRY__PROTOCOL", "http/protobuf")

    settings = Settings.load(path, telemetry={"otlp": False})

    assert settings.telemetry.otlp is False
    assert settings.telemetry.service_name == "from-yaml"
    assert settings.telemetry.metric_export_interval_ms == 500
    assert settings.telemetry.protocol == "http/protobuf"


def test_env_sets_nested_scalars_and_json_maps(monkeypatch):
    monkeypatch.setenv("MLSIDECAR_SHUTDOWN_TIMEOUT_S", "2.5")
    monkeypatch.setenv("MLSIDECAR_ENGINE__WINDOW_S", "60")
    monkeypatch.setenv("MLSIDECAR_TELEMETRY__RESOURCE_ATTRIBUTES", '{"team": "risk"}')
    monkeypatch.setenv("MLSIDECAR_ENGINE__SCORE_BUCKETS", "[0.25, 0.5, 0.75]")

    settings = Settings.load(None)

    assert settings.shutdown_timeout_s == 2.5
    assert settings.engine.window_s == 60
    assert settings.telemetry.resource_attributes == {"team": "risk"}
    assert settings.engine.score_buckets == [0.25, 0.5, 0.75]


def test_a_missing_config_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        Settings.load(missing)


# -- unknown keys and invalid values ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"ingestt": {"listen": "127.0.0.1:1"}}, "ingestt"),
        ({"ingest": {"max_rows": 5}}, "ingest.max_rows"),
        ({"telemetry": {"endpiont": "http://127.0.0.1:4317"}}, "telemetry.endpiont"),
        ({"models": {"fraud": {"window": 30}}}, "models.fraud.window"),
        ({"ingest": {"tls": {"cert": "c", "key": "k", "ca": "x"}}}, "ingest.tls.ca"),
    ],
)
def test_unknown_yaml_keys_are_errors_naming_the_key(write_yaml, data, key):
    path = write_yaml(data)
    with pytest.raises(ValidationError) as raised:
        Settings.load(path)
    assert errors_of(raised).get(key) == "extra_forbidden", errors_of(raised)

    with pytest.raises(ConfigError) as described:
        load_settings(path)
    assert f"  {key}: unknown key" in str(described.value)


def test_unknown_nested_env_key_is_an_error_naming_the_key(monkeypatch):
    monkeypatch.setenv("MLSIDECAR_INGEST__MAX_ROWS", "5")
    with pytest.raises(ValidationError) as raised:
        Settings.load(None)
    assert errors_of(raised) == {"ingest.max_rows": "extra_forbidden"}


def test_unknown_override_key_is_an_error():
    with pytest.raises(ValidationError) as raised:
        Settings.load(None, ingest={"listen_on": "127.0.0.1:1"})
    assert "ingest.listen_on" in errors_of(raised)


def test_every_invalid_key_is_reported_at_once(write_yaml):
    path = write_yaml(
        {"ingest": {"max_rows_per_batch": 0}, "engine": {"window_s": -1}, "bogus": True}
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    message = str(raised.value)
    assert "3 error(s)" in message
    for key in ("ingest.max_rows_per_batch", "engine.window_s", "bogus"):
        assert f"  {key}:" in message


def test_unparsable_yaml_is_a_config_error(write_yaml):
    path = write_yaml("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(path)


@pytest.mark.parametrize(
    ("section", "bounds"),
    [
        ("latency_buckets_ms", [1, 5, 5, 10]),
        ("score_buckets", [0.5, 0.2]),
        ("score_buckets", []),
        ("score_buckets", [0.1, "nan", 0.9]),
        ("latency_buckets_ms", [1, "inf"]),
    ],
)
def test_bucket_bounds_must_be_finite_strictly_increasing_and_non_empty(section, bounds):
    with pytest.raises(ValidationError) as raised:
        Settings.load(None, engine={section: bounds})
    assert f"engine.{section}" in errors_of(raised)


def test_listen_must_be_host_and_port():
    with pytest.raises(ValidationError) as raised:
        Settings.load(None, ingest={"listen": "127.0.0.1"})
    assert "ingest.listen" in errors_of(raised)
    assert "is not host:port" in str(raised.value)


# -- per-model settings ----------------------------------------------------------------------


def test_per_model_window_overrides_the_engine_window(write_yaml):
    path = write_yaml(
        {
            "engine": {"window_s": 120},
            "models": {"fraud-scorer.v2": {"window_s": 30, "score_buckets": [0.25, 0.5, 0.75]}},
        }
    )
    settings = Settings.load(path)

    assert settings.for_model("fraud-scorer.v2").window_s == 30
    assert settings.for_model("churn").window_s is None
    config_for = model_config_resolver(settings)
    assert config_for("fraud-scorer.v2").window_ns == 30 * 10**9
    assert tuple(config_for("fraud-scorer.v2").score_bounds) == (0.25, 0.5, 0.75)
    assert config_for("churn").window_ns == 120 * 10**9
    assert tuple(config_for("churn").score_bounds) == tuple(settings.engine.score_buckets)


def test_per_model_window_applies_to_that_models_reports(start_agent):
    harness = start_agent(engine={"window_s": 600}, models={"fast": {"window_s": 10}})
    stub = harness.stub()
    for model in ("fast", "slow"):
        stub.SubmitPredictions(pb.PredictionBatch(model=model, ids=["a"], scores=[0.5]))

    def window_length(model: str) -> float:
        window = httpx.get(f"{harness.api_url}/v1/models/{model}/health").json()["window"]
        return (window["end_unix_nano"] - window["start_unix_nano"]) / 1e9

    assert window_length("fast") == 10
    assert window_length("slow") == 600


@pytest.mark.parametrize("name", ["bad name", "", "slash/name", "x" * 129, "ünïcode"])
def test_invalid_model_names_in_the_models_map_are_errors(write_yaml, name):
    path = write_yaml({"models": {name: {"window_s": 5}}})
    with pytest.raises(ValidationError) as raised:
        Settings.load(path)
    assert "models" in errors_of(raised)
    assert "does not match [A-Za-z0-9._-]{1,128}" in str(raised.value)


def test_per_model_window_must_be_positive():
    with pytest.raises(ValidationError) as raised:
        Settings.load(None, models={"fraud": {"window_s": 0}})
    assert "models.fraud.window_s" in errors_of(raised)


# -- health and anomaly settings -------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def yaml_blocks(markdown: Path) -> list[Any]:
    text = markdown.read_text()
    return [yaml.safe_load(block.split("```")[0]) for block in text.split("```yaml\n")[1:]]


def monitor_config(settings: Settings, model: str) -> MonitorConfig:
    return model_config_resolver(settings)(model).monitor


def test_without_health_settings_every_model_gets_the_engines_built_in_policy():
    monitor = monitor_config(Settings.load(None), "churn")
    assert monitor.health == HealthPolicy()
    built_in = MonitorConfig()
    assert (monitor.anomaly_half_life, monitor.anomaly_z, monitor.anomaly_warmup) == (
        built_in.anomaly_half_life,
        built_in.anomaly_z,
        built_in.anomaly_warmup,
    )


def test_the_health_configuration_documented_in_health_score_md_loads_as_described(write_yaml):
    (documented,) = [b for b in yaml_blocks(DOCS / "health-score.md") if "engine" in b]
    settings = Settings.load(write_yaml(documented))

    fraud = monitor_config(settings, "fraud-scorer").health
    assert set(fraud.performance) == {"roc_auc", "mape"}  # accuracy: null stops judging it
    assert fraud.performance["roc_auc"] == Limit.at_least(0.75, 0.65)
    demand = monitor_config(settings, "demand-forecast").health
    assert demand.performance_weight == 60 and demand.drift_weight == 30
    assert demand.performance["mape"] == Limit.at_most(0.10, 0.30)
    assert demand.performance["accuracy"] == Limit.at_least(0.60, 0.50)
    assert monitor_config(settings, "demand-forecast").anomaly_z == 4
    churn = monitor_config(settings, "churn")
    assert churn.health == HealthPolicy()  # the documented engine.health is the built-in policy
    assert (churn.anomaly_half_life, churn.anomaly_z, churn.anomaly_warmup) == (12, 3, 6)


def test_a_models_health_overrides_only_the_keys_it_sets(write_yaml):
    path = write_yaml(
        {
            "engine": {
                "health": {
                    "weights": {"drift": 10},
                    "drift": {"critical_share": 0.9},
                    "performance": {"accuracy": {"min": 0.8, "critical_min": 0.7}},
                    "quality": {"missing_ratio": {"max": 0.2, "critical_max": 0.6}},
                    "anomalies": {"degraded": 4, "critical": 12},
                },
                "anomaly": {"half_life": 24, "z": 4},
            },
            "models": {
                "fraud": {
                    "health": {
                        "weights": {"performance": 50},
                        "drift": {"degraded_share": 0.6, "prediction_drift_degrades": False},
                        "performance": {"roc_auc": {"min": 0.75, "critical_min": 0.65}},
                        "quality": {"unseen_ratio": None},
                        "anomalies": {"critical": 20},
                        "max_reasons_per_signal": 5,
                    },
                    "anomaly": {"warmup": 10},
                }
            },
        }
    )
    settings = Settings.load(path)

    fraud = monitor_config(settings, "fraud")
    policy = fraud.health
    # Weights: the model's performance weight, the engine's drift weight, built-in others.
    assert (policy.drift_weight, policy.performance_weight) == (10, 50)
    assert (policy.quality_weight, policy.anomaly_weight) == (20, 10)
    assert (policy.dataset_drift_share, policy.critical_drift_share) == (0.6, 0.9)
    assert policy.prediction_drift_degrades is False
    # Limit maps merge per metric: the engine's accuracy, the built-in MAPE, the model's ROC AUC.
    assert policy.performance == {
        "accuracy": Limit.at_least(0.8, 0.7),
        "mape": Limit.at_most(0.05, 0.20),
        "roc_auc": Limit.at_least(0.75, 0.65),
    }
    assert policy.quality["missing_ratio"] == Limit.at_most(0.2, 0.6)
    assert "unseen_ratio" not in policy.quality and "out_of_range_ratio" in policy.quality
    assert (policy.anomalies_degraded, policy.anomalies_critical) == (4, 20)
    assert policy.max_reasons_per_signal == 5
    assert (fraud.anomaly_half_life, fraud.anomaly_z, fraud.anomaly_warmup) == (24, 4, 10)

    churn = monitor_config(settings, "churn")
    assert (churn.health.drift_weight, churn.health.performance_weight) == (10, 40)
    assert churn.health.critical_drift_share == 0.9 and churn.health.dataset_drift_share == 0.5
    assert set(churn.health.performance) == {"accuracy", "mape"}
    assert (churn.anomaly_half_life, churn.anomaly_z, churn.anomaly_warmup) == (24, 4, 6)


def test_health_and_anomaly_settings_from_the_environment(monkeypatch, write_yaml):
    path = write_yaml({"engine": {"health": {"weights": {"drift": 20}}}})
    monkeypatch.setenv("MLSIDECAR_ENGINE__HEALTH__WEIGHTS__PERFORMANCE", "60")
    monkeypatch.setenv(
        "MLSIDECAR_ENGINE__HEALTH__PERFORMANCE", '{"accuracy": {"min": 0.7, "critical_min": 0.6}}'
    )
    monkeypatch.setenv("MLSIDECAR_ENGINE__HEALTH__DRIFT__PREDICTION_DRIFT_DEGRADES", "false")
    monkeypatch.setenv("MLSIDECAR_ENGINE__ANOMALY__Z", "4.5")
    monkeypatch.setenv("MLSIDECAR_MODELS__fraud__HEALTH__ANOMALIES__DEGRADED", "5")

    settings = Settings.load(path)

    policy = monitor_config(settings, "churn").health
    assert (policy.drift_weight, policy.performance_weight) == (20, 60)  # YAML and env merge
    assert policy.performance == {
        "accuracy": Limit.at_least(0.7, 0.6),
        "mape": Limit.at_most(0.05, 0.20),  # the built-in MAPE limit stays
    }
    assert policy.prediction_drift_degrades is False
    assert monitor_config(settings, "churn").anomaly_z == 4.5
    assert monitor_config(settings, "fraud").health.anomalies_degraded == 5
    assert monitor_config(settings, "churn").health.anomalies_degraded == 3


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (
            {
                "engine": {
                    "health": {"performance": {"accuracy": {"min": 0.6, "critical_min": 0.7}}}
                }
            },
            "engine.health.performance.accuracy.critical_min",
            "0.7 must be below min=0.6",
        ),
        (
            {"engine": {"health": {"performance": {"mape": {"max": 0.05}}}}},
            "engine.health.performance.mape",
            "give min and critical_min (higher is better) or max and critical_max",
        ),
        (
            {"engine": {"health": {"performance": {"mape": {"max": 0.1, "min": 0.2}}}}},
            "engine.health.performance.mape",
            "got min, max",
        ),
        (
            {"engine": {"health": {"quality": {"missing_ratio": {"max": 0.1, "critical_max": 2}}}}},
            "engine.health.quality.missing_ratio.critical_max",
            "2.0 is not a ratio in [0, 1]",
        ),
        (
            {
                "engine": {
                    "health": {"quality": {"unseen_ratio": {"min": 0.9, "critical_min": 0.5}}}
                }
            },
            "engine.health.quality.unseen_ratio.min",
            "a ratio takes max and critical_max",
        ),
        (
            {"engine": {"health": {"quality": {"missing": {"max": 0.1, "critical_max": 0.5}}}}},
            "engine.health.quality.missing.[key]",
            "Input should be 'missing_ratio'",
        ),
        (
            {"engine": {"health": {"weights": {"drift": -1}}}},
            "engine.health.weights.drift",
            "greater than or equal to 0",
        ),
        (
            {"engine": {"health": {"weights": {"latency": 5}}}},
            "engine.health.weights.latency.[key]",
            "Input should be 'drift'",
        ),
        (
            {"engine": {"health": {"drift": {"degraded_share": 0.8}}}},
            "engine.health.drift.critical_share",
            "critical_share=0.75 must be above degraded_share=0.8",
        ),
        (
            {"engine": {"health": {"anomalies": {"degraded": 0}}}},
            "engine.health.anomalies.degraded",
            "greater than or equal to 1",
        ),
        (
            {"engine": {"health": {"max_reasons_per_signal": 0}}},
            "engine.health.max_reasons_per_signal",
            "greater than or equal to 1",
        ),
        (
            {"engine": {"health": {"weight": {"drift": 1}}}},
            "engine.health.weight",
            "unknown key",
        ),
        (
            {"engine": {"anomaly": {"warmup": 1}}},
            "engine.anomaly.warmup",
            "greater than or equal to 2",
        ),
        (
            {"engine": {"anomaly": {"z": "inf"}}},
            "engine.anomaly.z",
            "finite number",
        ),
        (
            {"models": {"fraud": {"health": {"performance": {"roc_auc": {"min": 0.7}}}}}},
            "models.fraud.health.performance.roc_auc",
            "give min and critical_min",
        ),
        (
            {"models": {"fraud": {"health": {"drift": {"degraded_share": 1.5}}}}},
            "models.fraud.health.drift.degraded_share",
            "less than or equal to 1",
        ),
        (
            {"models": {"fraud": {"anomaly": {"half_life": 0}}}},
            "models.fraud.anomaly.half_life",
            "greater than 0",
        ),
    ],
)
def test_invalid_health_and_anomaly_settings_are_errors_naming_the_key(
    write_yaml, data, key, message
):
    with pytest.raises(ConfigError) as raised:
        load_settings(write_yaml(data))
    line = next(
        (line for line in str(raised.value).splitlines() if line.startswith(f"  {key}: ")), None
    )
    assert line is not None, str(raised.value)
    assert message in line


def test_a_model_override_that_clashes_with_the_engines_settings_is_an_error_naming_the_model(
    write_yaml,
):
    path = write_yaml(
        {
            "engine": {"health": {"drift": {"degraded_share": 0.6, "critical_share": 0.8}}},
            "models": {
                "fraud": {"health": {"drift": {"critical_share": 0.55}}},
                "churn": {"health": {"anomalies": {"degraded": 10}}},
            },
        }
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    message = str(raised.value)
    assert "2 error(s)" in message
    assert (
        "  models.fraud.health.drift.critical_share: Value error, critical_share=0.55 must be "
        "above degraded_share=0.6" in message
    )
    assert (
        "  models.churn.health.anomalies.critical: Value error, critical=10 must be above "
        "degraded=10" in message
    )


def test_health_settings_show_and_load_back_with_the_same_policies():
    settings = Settings.load(
        None,
        engine={
            "health": {"performance": {"accuracy": None, "r2": {"min": 0.5, "critical_min": 0}}}
        },
        models={"fraud": {"health": {"weights": {"quality": 0}, "drift": {"critical_share": 0.9}}}},
    )
    shown = settings.redacted()
    # A limit shows the pair in use; a model's health shows what it sets (null: the engine's).
    assert shown["engine"]["health"]["performance"]["r2"] == {"min": 0.5, "critical_min": 0}
    assert shown["engine"]["health"]["performance"]["accuracy"] is None
    assert shown["models"]["fraud"]["health"]["weights"] == {"quality": 0}
    again = Settings.load(None, **shown)
    assert again == settings
    for model in ("fraud", "churn"):
        assert monitor_config(again, model).health == monitor_config(settings, model).health


def test_a_stricter_accuracy_limit_degrades_only_that_models_health(start_agent):
    # Accuracy 0.70: above the default 0.60, below the stricter model's 0.80.
    harness = start_agent(
        engine={"window_s": 1e9, "warmup_rows": 0},
        models={
            "strict": {"health": {"performance": {"accuracy": {"min": 0.8, "critical_min": 0.6}}}}
        },
    )
    stub = harness.stub()
    ids = [f"p{i}" for i in range(100)]
    predicted = ["yes"] * 100
    actual = ["yes"] * 70 + ["no"] * 30

    def health(model: str) -> dict[str, Any]:
        response = httpx.get(f"{harness.api_url}/v1/models/{model}/health")
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["performance"]["accuracy"] == pytest.approx(0.70)
        return dict(report["health"])

    for model in ("strict", "lenient"):
        stub.SubmitPredictions(
            pb.PredictionBatch(model=model, model_version="v1", ids=ids, labels=predicted)
        )
        ack = stub.SubmitOutcomes(pb.OutcomeBatch(model=model, ids=ids, actual_labels=actual))
        assert ack.accepted == 100

    strict, lenient = health("strict"), health("lenient")
    assert strict["status"] == "degraded"
    assert "accuracy 0.70 < 0.80" in strict["reasons"]
    assert strict["penalties"]["performance"] > 0
    assert lenient["status"] == "healthy"
    assert lenient["score"] == 100
    assert not any(reason.startswith("accuracy") for reason in lenient["reasons"])


# -- secure by default -----------------------------------------------------------------------


@pytest.mark.parametrize("section", ["ingest", "api"])
@pytest.mark.parametrize("listen", ["0.0.0.0:4320", "10.1.2.3:4320", "[::]:4320", "example.com:80"])
def test_non_loopback_listen_without_tls_or_token_is_refused_naming_listen(section, listen):
    with pytest.raises(ValidationError) as raised:
        Settings.load(None, **{section: {"listen": listen}})
    assert section in errors_of(raised)
    assert f"listen: {listen!r} is not a loopback address" in str(raised.value)
    assert "insecure: true" in str(raised.value)


@pytest.mark.parametrize(
    "protection",
    [{"insecure": True}, {"token": "s3cret"}],
    ids=["insecure", "token"],
)
def test_non_loopback_listen_is_allowed_when_protected_or_explicitly_insecure(protection):
    settings = Settings.load(None, ingest={"listen": "0.0.0.0:4320", **protection})
    assert settings.ingest.host == "0.0.0.0"


def test_non_loopback_listen_is_allowed_with_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    settings = Settings.load(
        None, api={"listen": "0.0.0.0:8320", "tls": {"cert": cert, "key": key}}
    )
    assert settings.api.tls is not None and settings.api.tls.cert == cert


def test_tls_files_must_exist(tmp_path):
    with pytest.raises(ValidationError) as raised:
        Settings.load(
            None, ingest={"tls": {"cert": tmp_path / "missing.pem", "key": tmp_path / "k"}}
        )
    assert "cert: file" in str(raised.value) and "missing.pem" in str(raised.value)


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:1", "127.8.9.10:1", "localhost:1", "[::1]:1", "::1:1"]
)
def test_loopback_addresses_need_no_protection(listen):
    assert Settings.load(None, ingest={"listen": listen}).ingest.port == 1


# -- redaction -------------------------------------------------------------------------------


def test_redacted_shows_every_secret_as_stars_and_keeps_the_rest(write_yaml):
    path = write_yaml(
        {
            "ingest": {"token": "ingest-secret"},
            "api": {"token": "api-secret", "admin_token": "admin-secret"},
            "telemetry": {"headers": {"x-api-key": "header-secret"}, "service_name": "svc"},
        }
    )
    settings = Settings.load(path)

    data = settings.redacted()
    assert data["ingest"]["token"] == "**********"
    assert data["api"]["token"] == "**********"
    assert data["api"]["admin_token"] == "**********"
    assert data["telemetry"]["headers"] == {"x-api-key": "**********"}
    assert data["telemetry"]["service_name"] == "svc"
    assert data["ingest"]["listen"] == "127.0.0.1:4320"
    text = json.dumps(data) + repr(settings) + str(settings)
    for secret in ("ingest-secret", "api-secret", "admin-secret", "header-secret"):
        assert secret not in text
    # The real values are still there for the code that needs them.
    assert settings.api.admin_token is not None
    assert settings.api.admin_token.get_secret_value() == "admin-secret"


def test_redacted_config_loads_back_except_for_secrets():
    settings = Settings.load(None, engine={"window_s": 42}, models={"fraud": {"window_s": 7}})
    again = Settings.load(None, **settings.redacted())
    assert again == settings


def test_a_misspelt_top_level_env_variable_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("MLSIDECAR_SHUTDOWN_TIMEOUT", "3")  # the key is shutdown_timeout_s
    with pytest.raises(ConfigError, match="MLSIDECAR_SHUTDOWN_TIMEOUT: unknown key"):
        load_settings(None)


def test_mlsidecar_config_is_not_taken_for_a_setting(monkeypatch, write_yaml):
    monkeypatch.setenv("MLSIDECAR_CONFIG", "elsewhere.yaml")
    monkeypatch.setenv("MLSIDECAR_SHUTDOWN_TIMEOUT_S", "3")
    assert load_settings(None).shutdown_timeout_s == 3


def test_mixed_case_model_names_in_env_are_refused_rather_than_silently_lowercased(monkeypatch):
    monkeypatch.setenv("MLSIDECAR_MODELS__Fraud__WINDOW_S", "30")
    with pytest.raises(ConfigError, match=r"set models\.Fraud in the YAML file"):
        load_settings(None)
    monkeypatch.delenv("MLSIDECAR_MODELS__Fraud__WINDOW_S")
    monkeypatch.setenv("MLSIDECAR_MODELS__fraud__WINDOW_S", "30")
    assert load_settings(None).for_model("fraud").window_s == 30


def test_the_example_config_is_valid_and_shows_the_defaults_it_claims():
    """examples/mlsidecar.yaml says its values are the defaults unless a comment says
    otherwise: it must load, and every section it sets must name real keys."""
    path = Path(__file__).resolve().parent.parent / "examples" / "mlsidecar.yaml"
    settings = load_settings(path)
    defaults = load_settings(None)
    for section in ("store", "telemetry"):
        shown = yaml.safe_load(path.read_text())[section]
        for key, value in shown.items():
            if not isinstance(value, dict):
                assert getattr(settings, section).model_dump(mode="json")[key] == value, key
    assert settings.store.pending_ttl_s == defaults.store.pending_ttl_s
    assert settings.store.backend == defaults.store.backend == "sqlite"
