"""`mlsidecar replay FILE`: recorded events into a real agent (in-process, real gRPC on
127.0.0.1), run as the user runs it (the console script, a child process)."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentHarness, agent_settings, free_port, mlsidecar_command, subprocess_env
from tls import Pki


def replay(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mlsidecar_command(), "replay", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(**env),
        stdin=subprocess.DEVNULL,
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def good_rows(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rows.append(
            {
                "kind": "prediction",
                "id": f"{prefix}{i}",
                "timestamp": f"2026-12-01T10:{i % 60:02d}:00Z",
                "features": {"amount": 10.0 + i, "merchant": ["fuel", "online"][i % 2]},
                "score": (i % 10) / 10,
                "label": "fraud" if i % 10 >= 5 else "legit",
                "latency_ms": 3.5,
            }
        )
    rows += [{"kind": "outcome", "id": f"{prefix}{i}", "label": "legit"} for i in range(0, n, 2)]
    return rows


def report(harness: AgentHarness, model: str) -> dict[str, Any]:
    result = harness.agent.engine.report(model, "v2")
    assert result is not None, f"the agent has no report for {model}"
    return result


def test_a_good_jsonl_file_is_accepted_whole_and_its_outcomes_join(
    agent: AgentHarness, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(120))

    result = replay(str(path), "--target", agent.ingest_target, "--model", "fraud-a",
                    "--version", "v2", "--batch-size", "50")  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "120 predictions and 60 outcomes accepted, 0 rejected" in result.stdout
    health = report(agent, "fraud-a")
    assert health["totals"]["rows"] == 120
    assert health["totals"]["outcomes"] == 60
    assert set(health["features"]) == {"amount", "merchant"}
    assert health["performance"]["count"] == 60  # every outcome joined its prediction
    assert not (tmp_path / "events.jsonl.rejected.jsonl").exists()
    assert "replay: 180/180 rows (100%)" in result.stderr  # plain progress lines (no TTY)


def test_a_mixed_file_keeps_its_good_rows_and_writes_the_bad_ones_with_reasons(
    start_agent: Callable[..., AgentHarness], tmp_path: Path
) -> None:
    # The agent takes at most 3 features: a row with 4 is refused by the agent itself, which
    # rejects its whole batch; replay bisects the batch so the other rows still go in.
    harness = start_agent(ingest={"max_features": 3})
    rows = good_rows(40)
    bad = [
        {"kind": "prediction", "id": "b1", "score": "high", "amount": 1.0},
        {"kind": "prediction", "amount": 2.0},
        {"kind": "guess", "id": "b3"},
        {"kind": "outcome", "id": "r1", "label": "fraud", "value": 1.0},
        {"kind": "prediction", "id": "r5", "amount": 3.0},  # duplicate id
        {"kind": "prediction", "id": "b6", "features": {"a": 1, "b": 2, "c": 3, "d": 4}},
        {"kind": "prediction", "id": "b7", "model": "bad model!"},
    ]
    for i, row in enumerate(bad):
        rows.insert(5 + 6 * i, row)
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with path.open("a") as handle:
        handle.write("{not json\n")

    result = replay(str(path), "--target", harness.ingest_target, "--model", "fraud-b",
                    "--version", "v2", "--batch-size", "16")  # fmt: skip

    assert result.returncode == 1, result.stdout + result.stderr
    assert "40 predictions and 20 outcomes accepted, 8 rejected" in result.stdout
    assert report(harness, "fraud-b")["totals"]["rows"] == 40
    side = [json.loads(line) for line in (tmp_path / "mixed.jsonl.rejected.jsonl").open()]
    by_field = {entry["field"]: entry for entry in side}
    fields = sorted(entry["field"] for entry in side)
    assert fields == ["events", "id", "id", "kind", "label", "line", "model", "score"], side
    assert by_field["score"]["reason"] == "score: expected a number, got 'high'"
    assert by_field["kind"]["reason"].startswith("kind: expected prediction or outcome")
    assert "exactly one of label and value" in by_field["label"]["reason"]
    assert by_field["model"]["row"]["model"] == "bad model!"
    assert by_field["line"]["reason"].startswith("line: not valid JSON")
    ids = [entry for entry in side if entry["field"] == "id"]
    assert {e["reason"].split(":")[0] for e in ids} == {"id"}
    assert any("duplicate prediction id 'r5'" in e["reason"] for e in ids)
    (from_agent,) = [entry for entry in side if entry["rejected_by"] == "agent"]
    assert from_agent["row"]["id"] == "b6"
    assert "ingest.max_features=3" in from_agent["reason"]
    assert "rejected rows (with reasons) written to" in result.stdout
    assert "score: e.g. line" in result.stdout


def test_a_csv_file_with_features_as_columns_is_accepted(
    agent: AgentHarness, tmp_path: Path
) -> None:
    path = tmp_path / "events.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "id", "model", "version", "score", "label", "amount",
                         "merchant", "attributes.region"])  # fmt: skip
        for i in range(30):
            writer.writerow(["prediction", f"c{i}", "fraud-c", "v2", i / 30, "legit",
                             5 + i, "fuel" if i % 2 else "", "eu"])  # fmt: skip
        for i in range(10):
            writer.writerow(["outcome", f"c{i}", "fraud-c", "v2", "", "fraud", "", "", ""])
        writer.writerow(["prediction", "c99", "fraud-c", "v2", "n/a", "", "", "", ""])

    result = replay(str(path), "--target", agent.ingest_target)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "30 predictions and 10 outcomes accepted, 1 rejected" in result.stdout
    health = report(agent, "fraud-c")
    assert health["totals"]["rows"] == 30 and health["totals"]["outcomes"] == 10
    assert health["features"]["amount"]["type"] == "numeric"
    assert health["features"]["merchant"]["type"] == "categorical"
    (rejected,) = [json.loads(x) for x in (tmp_path / "events.csv.rejected.jsonl").open()]
    assert rejected["line"] == 42 and rejected["reason"] == "score: expected a number, got 'n/a'"


def test_replay_says_clearly_when_no_agent_answers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(3))
    port = free_port()

    result = replay(str(path), "--target", f"127.0.0.1:{port}", "--model", "m", "--timeout", "1")

    assert result.returncode == 1
    assert f"no agent answering at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("events.txt", "x", "expected a .jsonl, .ndjson or .csv file"),
        ("missing.jsonl", None, "no such file"),
    ],
)
def test_replay_refuses_a_file_it_cannot_read_with_exit_2(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)

    result = replay(str(path), "--target", f"127.0.0.1:{free_port()}")

    assert result.returncode == 2
    assert message in result.stderr


def test_on_a_terminal_replay_draws_a_progress_bar(agent: AgentHarness, tmp_path: Path) -> None:
    import os
    import pty

    path = write_jsonl(tmp_path / "events.jsonl", good_rows(60, prefix="t"))
    leader, follower = pty.openpty()  # a real pseudo-terminal for stderr
    try:
        proc = subprocess.Popen(
            [mlsidecar_command(), "replay", str(path), "--target", agent.ingest_target,
             "--model", "fraud-t", "--batch-size", "20"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower,
            env=subprocess_env(), text=True,
        )  # fmt: skip
        os.close(follower)
        stdout, _ = proc.communicate(timeout=120)
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, stdout
    text = terminal.decode()
    assert "\r[" in text and "] 100.0% 90/90 rows, 90 accepted, 0 rejected" in text, text
    assert "replay: " not in text  # no plain progress lines on a terminal


@pytest.mark.slow
def test_replay_stops_with_a_clear_error_when_the_agent_goes_away_mid_file(
    start_agent: Callable[..., AgentHarness], tmp_path: Path
) -> None:
    harness = start_agent()
    path = write_jsonl(tmp_path / "big.jsonl", good_rows(20_000, prefix="g"))
    proc = subprocess.Popen(
        [mlsidecar_command(), "replay", str(path), "--target", harness.ingest_target,
         "--model", "fraud-g", "--batch-size", "10", "--timeout", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(), text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first progress line: it is sending
    assert first.startswith("replay: "), first
    harness.stop()
    stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1, stdout + stderr
    assert f"the agent at {harness.ingest_target} stopped answering" in stderr, stderr
    assert "replay stopped after" in stderr and "Traceback" not in stderr


# -- TLS and the token (a real agent serving TLS on 127.0.0.1; certificates from tests/tls.py)

TOKEN = "replay-s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # as `echo $TOKEN > token` writes it
    return path


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert "Traceback" not in output
    assert "Handshake failed" not in output  # gRPC core's own log lines: replay explains
    assert TOKEN not in output  # the token is never shown


def test_replay_sends_over_tls_with_a_token_file_to_an_agent_that_needs_both(
    start_agent: Callable[..., AgentHarness], pki: Pki, token_file: Path, tmp_path: Path
) -> None:
    harness = start_agent(ingest={"tls": pki.server_tls(), "token": TOKEN})
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(40, prefix="s"))

    result = replay(str(path), "--target", harness.ingest_target, "--model", "fraud-tls",
                    "--version", "v2", "--ca-file", str(pki.ca), "--token-file", str(token_file))  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "40 predictions and 20 outcomes accepted, 0 rejected" in result.stdout
    assert report(harness, "fraud-tls")["totals"]["outcomes"] == 20
    assert TOKEN not in result.stdout + result.stderr


def test_replay_uses_a_client_certificate_and_the_token_from_the_environment_for_mtls(
    start_agent: Callable[..., AgentHarness], pki: Pki, tmp_path: Path
) -> None:
    harness = start_agent(ingest={"tls": pki.server_tls(client_ca=str(pki.ca)), "token": TOKEN})
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(10, prefix="m"))
    tls = ["--ca-file", str(pki.ca), "--cert-file", str(pki.client),
           "--key-file", str(pki.client_key)]  # fmt: skip

    result = replay(str(path), "--target", harness.ingest_target, "--model", "fraud-mtls",
                    "--version", "v2", *tls, MLSIDECAR_TOKEN=TOKEN)  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert report(harness, "fraud-mtls")["totals"]["rows"] == 10


def test_replay_reads_target_token_and_tls_from_the_agents_config(
    start_agent: Callable[..., AgentHarness], pki: Pki, tmp_path: Path
) -> None:
    harness = start_agent(ingest={"tls": pki.server_tls(), "token": TOKEN})
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"ingest:\n  listen: {harness.ingest_target}\n  token: {TOKEN}\n"
        f"  tls:\n    cert: {pki.server}\n    key: {pki.server_key}\n"
    )
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(6, prefix="k"))

    # ingest.tls in the config turns TLS on; --ca-file says which CA signed its certificate.
    result = replay(str(path), "--config", str(config), "--ca-file", str(pki.ca),
                    "--model", "fraud-conf", "--version", "v2")  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert report(harness, "fraud-conf")["totals"]["rows"] == 6


@pytest.fixture(scope="module")
def tls_agent(pki: Pki) -> Iterator[AgentHarness]:
    """One TLS + token agent for the failure cases, which send nothing it would keep."""
    harness = AgentHarness(
        agent_settings(ingest={"tls": pki.server_tls(client_ca=None), "token": TOKEN})
    ).start()
    yield harness
    harness.stop()


def test_replay_with_the_wrong_ca_names_ca_file(
    tls_agent: AgentHarness, pki: Pki, token_file: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(3))
    result = replay(str(path), "--target", tls_agent.ingest_target, "--model", "m",
                    "--ca-file", str(pki.other_ca), "--token-file", str(token_file),
                    "--timeout", "1")  # fmt: skip
    assert_clean_failure(
        result, 1, f"no agent answering at {tls_agent.ingest_target} (gRPC ingest, TLS, with a token)",
        f"the agent's TLS certificate is not signed by a CA in --ca-file '{pki.other_ca}'",
    )  # fmt: skip


def test_replay_in_plaintext_to_a_tls_agent_suggests_ca_file(
    tls_agent: AgentHarness, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(3))
    result = replay(str(path), "--target", tls_agent.ingest_target, "--model", "m",
                    "--timeout", "1")  # fmt: skip
    assert_clean_failure(
        result, 1, "(gRPC ingest, plaintext)", "it may serve TLS (give --ca-file or --tls)"
    )


def test_replay_with_tls_to_a_plaintext_agent_says_so(
    agent: AgentHarness, pki: Pki, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(3))
    result = replay(str(path), "--target", agent.ingest_target, "--model", "m",
                    "--ca-file", str(pki.ca), "--timeout", "1")  # fmt: skip
    assert_clean_failure(result, 1, "the agent does not serve TLS there: drop --tls / --ca-file")


def test_replay_without_the_token_an_agent_needs_names_token_file(
    tls_agent: AgentHarness, pki: Pki, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(3))
    result = replay(str(path), "--target", tls_agent.ingest_target, "--model", "m",
                    "--ca-file", str(pki.ca))  # fmt: skip
    assert_clean_failure(
        result, 1, "missing or wrong bearer token",
        "give its ingest.token with --token-file PATH or MLSIDECAR_TOKEN",
        "replay stopped after",
    )  # fmt: skip

    wrong = replay(str(path), "--target", tls_agent.ingest_target, "--model", "m",
                   "--ca-file", str(pki.ca), MLSIDECAR_TOKEN="not-the-token")  # fmt: skip
    assert_clean_failure(wrong, 1, "the token given is not its ingest.token")
    assert "not-the-token" not in wrong.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--token", TOKEN], "--token: a token on the command line shows in `ps`"),
        (["--token-file", "{tmp}/absent"], "--token-file: cannot read '{tmp}/absent'"),
        (["--token-file", "{tmp}/empty"], "--token-file: '{tmp}/empty' is empty"),
        (["--ca-file", "{tmp}/absent.pem"], "--ca-file: cannot read '{tmp}/absent.pem'"),
        (["--ca-file", "{tmp}/empty"], "--ca-file: '{tmp}/empty' holds no PEM certificate"),
        (["--cert-file", "{ca}"], "--key-file: needed with --cert-file"),
    ],
    ids=["token-in-argv", "token-file-missing", "token-file-empty", "ca-missing", "ca-not-pem",
         "cert-without-key"],
)  # fmt: skip
def test_replay_refuses_unusable_connection_options_with_exit_2(
    pki: Pki, tmp_path: Path, options: list[str], message: str
) -> None:
    (tmp_path / "empty").write_text("")
    path = write_jsonl(tmp_path / "events.jsonl", good_rows(1))
    fill = {"tmp": str(tmp_path), "ca": str(pki.ca)}
    result = replay(str(path), "--target", f"127.0.0.1:{free_port()}", "--model", "m",
                    *(o.format(**fill) for o in options))  # fmt: skip
    assert_clean_failure(result, 2, message.format(**fill))
