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
