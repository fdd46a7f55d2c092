"""The ``mlsidecar`` console script, run for real as a child process."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import yaml
from conftest import free_port, mlsidecar_command, subprocess_env

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.cli import read_samples

SECRETS = ("ingest-token-c0ffee", "admin-token-baddad", "otlp-header-f00d")


def mlsidecar(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mlsidecar_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(**env),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Any:
    def write(data: Any, name: str = "mlsidecar.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


SECRET_CONFIG = {
    "ingest": {"token": SECRETS[0]},
    "api": {"admin_token": SECRETS[1]},
    "telemetry": {"headers": {"x-api-key": SECRETS[2]}, "service_name": "fraud-scorer"},
    "models": {"fraud": {"window_s": 30}},
}


# -- config ----------------------------------------------------------------------------------


def test_config_show_prints_the_effective_config_as_yaml_with_secrets_redacted(config_file):
    result = mlsidecar("config", "show", "--config", str(config_file(SECRET_CONFIG)))

    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (
        shown["ingest"]["listen"] == "127.0.0.1:4320"
    )  # defaults are part of the effective config
    assert shown["telemetry"]["service_name"] == "fraud-scorer"
    assert shown["models"]["fraud"]["window_s"] == 30.0
    assert shown["models"]["fraud"]["score_buckets"] is None
    assert shown["ingest"]["token"] == "**********"
    assert shown["api"]["admin_token"] == "**********"
    assert shown["telemetry"]["headers"] == {"x-api-key": "**********"}
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def test_config_show_json_matches_the_yaml_form_and_honours_env(config_file):
    path = config_file(SECRET_CONFIG)
    env = {"MLSIDECAR_CONFIG": str(path), "MLSIDECAR_INGEST__MAX_ROWS_PER_BATCH": "77"}

    as_json = mlsidecar("config", "show", "--format", "json", **env)
    as_yaml = mlsidecar("config", "show", **env)

    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown == yaml.safe_load(as_yaml.stdout)
    assert shown["ingest"]["max_rows_per_batch"] == 77
    assert shown["telemetry"]["service_name"] == "fraud-scorer"  # from $MLSIDECAR_CONFIG
    for secret in SECRETS:
        assert secret not in as_json.stdout


def test_config_validate_accepts_a_good_file(config_file):
    path = config_file(SECRET_CONFIG, "good.yaml")
    result = mlsidecar("config", "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: valid"


def test_config_validate_rejects_a_bad_file_with_exit_2_naming_the_key(config_file):
    path = config_file({"ingest": {"max_rows": 10}, "engine": {"window_s": 0}}, "bad.yaml")
    result = mlsidecar("config", "validate", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    assert "ingest.max_rows: unknown key" in result.stderr
    assert "engine.window_s:" in result.stderr


def test_config_validate_of_a_missing_file_exits_2(tmp_path):
    result = mlsidecar("config", "validate", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr


def test_bad_usage_exits_2():
    assert mlsidecar("config").returncode == 2
    assert mlsidecar("no-such-command").returncode == 2


# -- health ----------------------------------------------------------------------------------


def test_health_probe_without_an_agent_exits_1_silently():
    result = mlsidecar("health", "--probe", "--api", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")


def test_health_without_an_agent_says_so_on_stderr():
    port = free_port()
    result = mlsidecar("health", "--api", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert f"no agent answering at 127.0.0.1:{port}" in result.stderr


def test_health_probe_of_a_running_agent_exits_0_silently(agent):
    result = mlsidecar("health", "--probe", "--api", f"127.0.0.1:{agent.agent.api.port}")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_health_probe_exits_1_once_the_agent_is_draining(agent):
    agent.run(agent.agent.ingest.drain())
    result = mlsidecar("health", "--probe", "--api", f"127.0.0.1:{agent.agent.api.port}")
    assert (result.returncode, result.stdout) == (1, "")


def test_health_of_a_model_prints_its_report_as_json(agent):
    agent.stub().SubmitPredictions(
        pb.PredictionBatch(
            model="fraud", model_version="v2", ids=["a", "b", "c"], scores=[0.1, 0.5, 0.9]
        )
    )
    result = mlsidecar("health", "fraud", "--api", f"127.0.0.1:{agent.agent.api.port}")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model"], report["version"]) == ("fraud", "v2")
    assert report["totals"]["rows"] == 3
    assert report.keys() == httpx.get(f"{agent.api_url}/v1/models/fraud/health").json().keys()


def test_health_of_an_unknown_model_exits_1_with_the_error(agent):
    result = mlsidecar("health", "nobody", "--api", f"127.0.0.1:{agent.agent.api.port}")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "NOT_FOUND"


def test_health_sends_the_api_token_from_the_config(start_agent, config_file):
    harness = start_agent(api={"token": "api-token-1234"})
    harness.stub().SubmitPredictions(pb.PredictionBatch(model="fraud", ids=["a"]))
    api = f"127.0.0.1:{harness.agent.api.port}"
    with_token = config_file({"api": {"token": "api-token-1234"}})

    assert mlsidecar("health", "fraud", "--api", api).returncode == 1  # 401 without the token
    result = mlsidecar("health", "fraud", "--api", api, "--config", str(with_token))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["model"] == "fraud"


# -- demo and run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_for_its_duration_and_reports_nonzero_predictions():
    result = mlsidecar(
        "demo",
        "--duration",
        "3",
        "--every",
        "1",
        "--ingest-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mlsidecar demo: agent ingest on 127.0.0.1:")
    summaries = [
        int(m.group(1)) for m in re.finditer(r"fraud-scorer@v1: (\d+) predictions", result.stdout)
    ]
    assert summaries and summaries[-1] > 0, result.stdout
    assert summaries == sorted(summaries)
    (finished,) = [line for line in lines if line.startswith("demo finished:")]
    sent = int(re.search(r"sent (\d+) predictions", finished).group(1))  # type: ignore[union-attr]
    assert sent >= summaries[-1] > 0
    assert "(0 failed batches)" in finished


@pytest.mark.slow
def test_run_logs_json_to_stderr_serves_and_exits_0_on_sigterm(agent_process, config_file):
    telemetry = {**SECRET_CONFIG["telemetry"], "otlp": False}
    config = config_file({**SECRET_CONFIG, "shutdown_timeout_s": 5, "telemetry": telemetry})
    process = agent_process("--config", str(config))

    started = process.wait_started()
    assert started["level"] == "INFO" and started["logger"] == "agent.app"
    assert started["ingest"].startswith("127.0.0.1:") and started["api"].startswith("127.0.0.1:")
    assert started["exporting"] == "prometheus"
    assert httpx.get(f"{process.api_url}/readyz").status_code == 200
    with grpc.insecure_channel(process.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        metadata = (("authorization", f"Bearer {SECRETS[0]}"),)
        ack = stub.SubmitPredictions(
            pb.PredictionBatch(model="fraud", ids=["a", "b"]), metadata=metadata
        )
    assert ack.accepted == 2

    returncode, seconds = process.terminate()

    assert returncode == 0, "\n".join(process.stderr_lines)
    assert seconds < 5 + 5, f"exit took {seconds:.1f}s with shutdown_timeout_s=5"
    messages = [entry["message"] for entry in process.logs()]
    assert "mlsidecar stopping" in messages and messages[-1] == "mlsidecar stopped"
    assert all(line.startswith("{") for line in process.stderr_lines), "stderr is JSON lines only"
    for secret in SECRETS:
        assert not any(secret in line for line in process.stderr_lines + process.stdout_lines)


@pytest.mark.slow
def test_run_with_an_invalid_config_exits_2_before_starting(agent_process, config_file):
    process = agent_process("--config", str(config_file({"ingest": {"max_rows": 10}})))
    assert process.proc.wait(60) == 2
    process.kill()  # joins the output readers
    assert "ingest.max_rows: unknown key" in "\n".join(process.stderr_lines)
    assert not any(entry["message"] == "mlsidecar started" for entry in process.logs())


@pytest.mark.slow
@pytest.mark.parametrize("listener", ["ingest", "api"])
def test_run_exits_1_naming_the_listener_whose_port_is_taken(
    agent, agent_process, config_file, listener
):
    taken = agent.ingest_target if listener == "ingest" else f"127.0.0.1:{agent.agent.api.port}"
    no_otlp = config_file({"telemetry": {"otlp": False}})
    # The later --*-listen flag wins over the one AgentProcess passes.
    process = agent_process("--config", str(no_otlp), f"--{listener}-listen", taken)
    assert process.proc.wait(60) == 1
    process.kill()
    stderr = "\n".join(process.stderr_lines)
    assert f"{listener}.listen: cannot bind {taken}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_failed_start_exits_promptly_even_when_the_collector_is_down(
    agent, agent_process, config_file
):
    collector_down = config_file(
        {"telemetry": {"otlp": True, "endpoint": f"http://127.0.0.1:{free_port()}"}}
    )
    started = time.monotonic()
    process = agent_process("--config", str(collector_down), "--ingest-listen", agent.ingest_target)
    assert process.proc.wait(60) == 1
    process.kill()
    # Nothing was accepted, so there is nothing to flush: no waiting on exporter retries.
    assert time.monotonic() - started < 8


def write_training_csv(path: Path, rows: int = 1500) -> Path:
    rng = np.random.default_rng(4)
    lines = ["income,age,region,score,row_id"]
    for i in range(rows):
        age = "" if i % 50 == 0 else str(int(rng.integers(18, 80)))
        lines.append(
            f"{rng.normal(50, 10):.2f},{age},{rng.choice(['n', 's', 'e'])},{rng.random():.3f},{i}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reference_build_profiles_a_csv_into_a_file_the_agent_accepts(tmp_path, config_file):
    data = write_training_csv(tmp_path / "train.csv")
    out = tmp_path / "ref.json"
    result = mlsidecar(
        "reference", "build", str(data), "-o", str(out), "--model", "credit",
        "--score-column", "score", "--exclude", "row_id",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    profile = json.loads(out.read_text())
    assert (profile["model"], profile["rows"], profile["source"]) == ("credit", 1500, "file")
    assert sorted(profile["features"]) == ["age", "income", "region"]
    assert profile["features"]["age"]["missing"] == 30
    assert profile["features"]["region"]["type"] == "categorical"
    assert profile["scores"]["count"] == 1500
    assert profile["id"] in result.stdout
    assert "row_id" not in out.read_text()

    good = config_file({"models": {"credit": {"reference": str(out)}}})
    assert mlsidecar("config", "validate", str(good)).returncode == 0
    wrong_model = config_file({"models": {"fraud": {"reference": str(out)}}})
    refused = mlsidecar("config", "validate", str(wrong_model))
    assert refused.returncode == 2
    assert "models.fraud.reference" in refused.stderr


def test_reference_build_names_a_missing_column_and_an_unknown_format(tmp_path):
    data = write_training_csv(tmp_path / "train.csv", rows=10)
    missing = mlsidecar(
        "reference", "build", str(data), "-o", str(tmp_path / "r.json"), "--model", "m",
        "--label-column", "predicted",
    )  # fmt: skip
    assert missing.returncode == 2
    assert "'predicted'" in missing.stderr
    other = tmp_path / "train.xlsx"
    other.write_bytes(b"PK")
    unknown = mlsidecar(
        "reference", "build", str(other), "-o", str(tmp_path / "r.json"), "--model", "m"
    )
    assert unknown.returncode == 2
    assert "expected a .csv, .jsonl or .parquet file" in unknown.stderr
    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"PAR1")  # a truncated Parquet file
    refused = mlsidecar(
        "reference", "build", str(broken), "-o", str(tmp_path / "r.json"), "--model", "m"
    )
    assert refused.returncode == 2
    assert "cannot read" in refused.stderr and "train.parquet" in refused.stderr
    assert not (tmp_path / "r.json").exists()


def test_reference_build_reads_parquet_to_the_same_reference_as_csv(tmp_path):
    """The same training data as CSV and as Parquet (typed columns, nulls) gives one id."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    csv_path = write_training_csv(tmp_path / "train.csv")
    rows = read_samples(csv_path)
    table = pa.table(
        {
            "income": [float(r["income"]) for r in rows],
            "age": [None if r["age"] is None else int(r["age"]) for r in rows],
            "region": [r["region"] for r in rows],
            "score": [float(r["score"]) for r in rows],
            "row_id": [int(r["row_id"]) for r in rows],
        }
    )
    parquet.write_table(table, tmp_path / "train.parquet")
    ids = []
    for name in ("train.csv", "train.parquet"):
        out = tmp_path / f"{name}.json"
        result = mlsidecar(
            "reference", "build", str(tmp_path / name), "-o", str(out), "--model", "credit",
            "--score-column", "score", "--exclude", "row_id",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        ids.append(json.loads(out.read_text())["id"])
    assert ids[0] == ids[1]
