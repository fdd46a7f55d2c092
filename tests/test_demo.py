"""The demo: its story end to end (`mlsidecar demo` as a child process, watched through the
agent's real admin API), its parts run on their own, and the story's building blocks.

Everything is real: the agent, its egress proxy and breaker, the FastAPI model service with
the SDK, the feature store and the traffic generator, all on free 127.0.0.1 ports.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import AgentHarness, free_port, mlsidecar_command, subprocess_env
from metric_data import data_points

from agent.api.serve import HttpListener
from agent.config import Listener
from agent.demo.featurestore import FeatureStore
from agent.demo.story import summary_line
from agent.demo.traffic import PHASES, STORY_S, Traffic, phase_at, rows_per_request
from agent.demo.world import World, account_age_days, fraud_probability


class Child:
    """An ``mlsidecar`` subcommand as a child process; stdout and stderr lines collected."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [mlsidecar_command(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(s, lines), daemon=True)
            for s, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stdout):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(
            f"no line matching {pattern!r} (exit {self.proc.poll()}):\n"
            + "\n".join(self.stdout[-20:] + self.stderr[-20:])
        )

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def children() -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Child:
        child = Child(*args, env=env or subprocess_env())
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


def _demo_env(tmp_path: Path) -> dict[str, str]:
    # Its own state directory: no reference or alert from another run.
    return subprocess_env(MLSIDECAR_STORE__DATA_DIR=str(tmp_path / "state"))


# -- the story, end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_demo_story_shows_drift_accuracy_drop_breaker_and_alerts_then_recovers(
    tmp_path: Path, children: Callable[..., Child]
) -> None:
    speed = 15.0  # the 300 s story in 20 s
    api_port = free_port()
    demo = children(
        "demo", "--speed", str(speed), "--seed", "3", "--duration", "24",
        "--api-listen", f"127.0.0.1:{api_port}", "--ingest-listen", "127.0.0.1:0",
        env=_demo_env(tmp_path),
    )  # fmt: skip
    demo.wait_for(r"^mlsidecar demo: agent ingest on 127\.0\.0\.1:\d+", timeout=60)
    api = f"http://127.0.0.1:{api_port}"
    seen: dict[str, Any] = {"psi": [], "accuracy": [], "breaker": [], "firing": set()}
    metrics = ""
    with httpx.Client(timeout=5) as http:
        while demo.proc.poll() is None:
            try:
                report = http.get(f"{api}/v1/models/fraud-scorer/health").json()
                breakers = http.get(f"{api}/v1/breakers").json()["breakers"]
                alerts = http.get(f"{api}/v1/alerts").json()
                metrics = http.get(f"{api}/metrics").text  # the last one read is checked
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)  # starting or stopping
                continue
            psi = ((report.get("features") or {}).get("amount") or {}).get("drift") or {}
            seen["psi"].append(psi.get("psi"))
            seen["accuracy"].append((report.get("performance") or {}).get("accuracy"))
            seen["breaker"] += [b["state"] for b in breakers if b["upstream"] == "features"]
            seen["firing"] |= {a["rule"] for a in alerts["active"] if a["state"] == "firing"}
            time.sleep(0.25)
    assert demo.wait(30) == 0, "\n".join(demo.stderr[-30:])
    assert not any("Traceback" in line for line in demo.stderr), "\n".join(demo.stderr[-40:])

    # Every phase was told, in order, and the summary lines say what happened.
    phases = [m.group(1) for line in demo.stdout if (m := re.search(r"phase \d/5 (\S+)", line))]
    assert list(dict.fromkeys(phases)) == [p.name for p in PHASES], phases
    psis = [p for p in seen["psi"] if p is not None]
    accuracies = [a for a in seen["accuracy"] if a is not None]
    assert psis and max(psis) > 0.5, psis  # the amount drifted
    assert psis[-1] < 0.2, psis  # and came back
    assert accuracies and max(accuracies) > 0.85 and min(accuracies) < 0.6, accuracies
    assert accuracies[-1] > 0.8, accuracies  # recovered once fresh outcomes joined
    states = seen["breaker"]
    assert "open" in states, states
    assert states[-1] == "closed" and states.index("open") < len(states) - 1, states
    assert {"feature-psi", "accuracy-low", "breaker-open", "health-low"} <= seen["firing"]
    finished = demo.wait_for(r"^demo finished: sent (\d+) predictions and (\d+) outcomes")
    assert int(finished.group(1)) > 5000 and int(finished.group(2)) > 1000
    # Prometheus sees it too: predictions, outcomes joined, and the breaker's state changes.
    assert re.search(r'^ml_predictions_total\{[^}]*ml_model_name="fraud-scorer"', metrics, re.M)
    assert re.search(r"^ml_outcomes_joined_total\{", metrics, re.M)
    changes = re.findall(
        r"^mlsidecar_upstream_breaker_state_changes_total\{([^}]*)\}", metrics, re.M
    )
    assert any('upstream="features"' in labels for labels in changes), changes


@pytest.mark.slow
def test_demo_exits_0_on_sigterm_and_stops_everything(
    tmp_path: Path, children: Callable[..., Child]
) -> None:
    demo = children(
        "demo", "--speed", "10", "--every", "0.5", "--api-listen", "127.0.0.1:0",
        "--ingest-listen", "127.0.0.1:0", env=_demo_env(tmp_path),
    )  # fmt: skip
    model = demo.wait_for(r"model service: (http://127\.0\.0\.1:\d+)/predict").group(1)
    demo.wait_for(r"fraud-scorer@v1: [1-9]\d* predictions")
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.wait(30) == 0, "\n".join(demo.stderr[-30:])
    assert not any("Traceback" in line for line in demo.stderr)
    demo.wait_for(r"^demo finished: sent [1-9]\d* predictions")
    with pytest.raises(httpx.ConnectError):  # the model service is gone with it
        httpx.get(f"{model}/healthz", timeout=2)


def test_demo_refuses_a_speed_that_is_not_positive(tmp_path: Path) -> None:
    result = subprocess.run(
        [mlsidecar_command(), "demo", "--speed", "0"],
        capture_output=True, text=True, timeout=60, env=_demo_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "--speed: must be a positive number" in result.stderr


# -- the parts on their own --------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_and_traffic_run_on_their_own_against_a_real_agent(
    start_agent: Callable[..., AgentHarness], children: Callable[..., Child]
) -> None:
    store = children("demo-feature-store", "--listen", "127.0.0.1:0")
    store_url = store.wait_for(r"demo feature store on (http://127\.0\.0\.1:\d+)").group(1)
    harness = start_agent(
        upstream={"listen": "127.0.0.1:0", "targets": {"features": {"url": store_url}}}
    )
    proxy = f"http://127.0.0.1:{harness.agent.proxy.port}/upstream/features"  # type: ignore[union-attr]
    model = children(
        "demo-model", "--listen", "127.0.0.1:0", "--sidecar", harness.ingest_target,
        "--feature-store-url", proxy,
    )  # fmt: skip
    model_url = model.wait_for(r"demo model service on (http://127\.0\.0\.1:\d+)").group(1)
    traffic = children(
        "demo-traffic", "--target", model_url, "--sidecar", harness.ingest_target,
        "--speed", "20", "--duration", "4", "--every", "1", "--feature-store", store_url,
    )  # fmt: skip
    assert traffic.wait(60) == 0, "\n".join(traffic.stderr[-20:])
    done = traffic.wait_for(r"demo traffic finished: sent (\d+) predictions and (\d+) outcomes")
    sent, outcomes = int(done.group(1)), int(done.group(2))
    assert sent > 1000 and outcomes > 0

    stats = httpx.get(f"{model_url}/stats", timeout=5).json()
    assert stats["predictions"] == sent and stats["fallbacks"] == 0
    lookups = httpx.get(f"{store_url}/admin/status", timeout=5).json()["lookups"]
    assert lookups == stats["requests"]  # every request went through the proxy to the store
    deadline = time.monotonic() + 10
    report: dict[str, Any] | None = None
    while time.monotonic() < deadline:  # the SDK sends in the background
        report = harness.agent.engine.report("fraud-scorer", "v1")
        if report and report["totals"]["rows"] == sent:
            break
        time.sleep(0.2)
    assert report is not None and report["totals"]["rows"] == sent
    assert report["totals"]["outcomes"] > 0
    assert set(report["features"]) == {"amount", "hour", "merchant", "account_age_days"}
    # The model's request span (FastAPI instrumentation) was current when the SDK logged:
    # the predictions' exemplars carry its trace id, and so does the proxy's span (its child).
    spans = [s for s in harness.spans.get_finished_spans() if s.name.startswith("upstream")]
    assert spans and all(s.parent is not None for s in spans)
    proxy_traces = {s.context.trace_id for s in spans}
    exemplar_traces = {
        exemplar.trace_id
        for point in data_points(harness.metric_reader, "ml.prediction.duration")
        for exemplar in point.exemplars
    }
    assert exemplar_traces and exemplar_traces <= proxy_traces | {0}, exemplar_traces
    assert exemplar_traces - {0}


def test_demo_traffic_says_clearly_when_no_model_service_answers() -> None:
    result = subprocess.run(
        [mlsidecar_command(), "demo-traffic", "--target", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, env=subprocess_env(),
    )  # fmt: skip
    assert result.returncode == 1
    assert "no demo model service answering at http://127.0.0.1:" in result.stderr


# -- building blocks ---------------------------------------------------------------------


def test_phases_follow_each_other_and_the_last_one_lasts() -> None:
    assert STORY_S == sum(p.seconds for p in PHASES) == 300
    assert phase_at(0)[1].name == "healthy"
    assert phase_at(60)[1].name == "drift"
    assert phase_at(299.9)[1].name == "recovery"
    assert phase_at(10_000) == (4, PHASES[-1])
    failing = [p.name for p in PHASES if p.store_failing]
    assert failing == ["upstream-failing"]
    assert rows_per_request(50) == 20 and rows_per_request(5000) == 50


def test_traffic_refuses_a_bad_speed_naming_it() -> None:
    with pytest.raises(ValueError, match="speed"):
        Traffic("http://127.0.0.1:1", speed=0)
    with pytest.raises(ValueError, match="outcome_share"):
        Traffic("http://127.0.0.1:1", outcome_share=2)


def test_the_world_drifts_the_amount_and_a_fraud_ring_breaks_the_models_accuracy() -> None:
    world = World(seed=1)
    healthy = world.transactions(20_000, drifted=False)
    drifted = world.transactions(20_000, drifted=True)
    assert np.median(drifted["amount"]) > 2 * np.median(healthy["amount"])
    score = fraud_probability(
        healthy["amount"],
        account_age_days(healthy["user_id"]),
        healthy["hour"],
        healthy["merchant"],
    )
    predicted = score >= 0.5
    assert np.mean(predicted == world.truth(healthy, fraud_ring=False)) > 0.85
    assert np.mean(predicted == world.truth(healthy, fraud_ring=True)) < 0.6


def test_the_new_market_drifts_the_merchant_mix_too_so_half_the_features_drift() -> None:
    """Amount and merchant both move past the demo's PSI threshold (0.2): with four
    features the drift share is 0.5 through the drift phases (MLDatasetDrift's >= 0.5)."""
    from agent.demo.story import DRIFT_PSI
    from agent.demo.world import MERCHANTS
    from agent.engine.drift import psi

    world = World(seed=4)
    healthy = world.transactions(5_000, drifted=False)
    drifted = world.transactions(5_000, drifted=True)

    def mix(batch: dict[str, Any]) -> np.ndarray:
        return np.array([np.count_nonzero(batch["merchant"] == m) for m in MERCHANTS])

    assert psi(mix(healthy), mix(drifted)) > 4 * DRIFT_PSI
    assert psi(mix(healthy), mix(world.transactions(5_000, drifted=False))) < DRIFT_PSI / 10
    assert np.mean(drifted["merchant"] == "online") > 0.5


def test_feature_store_serves_account_ages_and_fails_on_demand() -> None:
    store = FeatureStore()

    async def exercise() -> None:
        listener = HttpListener(store.app(), Listener(listen="127.0.0.1:0"), key="t", what="t")
        await listener.start()
        url = f"http://127.0.0.1:{listener.port}"
        try:
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                ok = await client.post("/features", json={"user_ids": [1, 2]})
                assert ok.status_code == 200
                assert ok.json()["features"]["1"]["account_age_days"] == pytest.approx(
                    float(account_age_days(np.array([1]))[0])
                )
                assert (await client.post("/features", json={"user_ids": "x"})).status_code == 400
                failing = await client.put("/admin/failing", json={"failing": True})
                assert failing.json()["failing"] is True
                assert (await client.post("/features", json={"user_ids": [1]})).status_code == 503
                bad = await client.put("/admin/failing", json={"failing": "yes"})
                assert bad.status_code == 400 and "failing" in bad.json()["error"]
        finally:
            await listener.stop()

    asyncio.run(exercise())
    assert store.status() == {"failing": True, "lookups": 1, "refused": 1}


def test_summary_line_names_phase_drift_accuracy_health_breaker_and_alerts() -> None:
    report = json.loads(
        json.dumps(
            {
                "model": "fraud-scorer",
                "version": "v1",
                "totals": {"rows": 1200, "outcomes": 300},
                "features": {"amount": {"drift": {"psi": 1.234}}},
                "dataset_drift": {"share": 0.25},
                "performance": {"accuracy": 0.41},
                "health": {"score": 42.4, "status": "critical"},
            }
        )
    )
    status = {"phase": "late-outcomes", "phase_index": 2, "progress": 0.5}
    line = summary_line(12.0, status, report, [{"upstream": "features", "state": "open"}],
                        ["accuracy-low", "feature-psi"])  # fmt: skip
    assert "phase 3/5 late-outcomes" in line and " 50%" in line
    assert "fraud-scorer@v1: 1200 predictions, 300 outcomes" in line
    assert "amount PSI 1.23" in line and "accuracy 0.41" in line
    assert "health 42 (critical)" in line and "breaker features open" in line
    assert line.endswith("alerts: accuracy-low, feature-psi")
    assert "waiting" in summary_line(1.0, status, None, [], [])


# -- the benchmark still runs -------------------------------------------------------------


@pytest.mark.slow
def test_demo_latency_bench_runs_every_mode_and_every_logged_prediction_arrives() -> None:
    """A smoke run of bench/demo_latency.py: figures are printed, not asserted."""
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "bench/demo_latency.py", "--rounds", "2", "--requests", "40", "--warmup", "20"],
        cwd=root, capture_output=True, text=True, timeout=180, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    summary = json.loads(lines[-1])
    for mode in ("sdk", "sdk-inline", "no-sdk"):
        assert summary[mode]["p50_ms"] > 0 and summary[mode]["cpu_us_per_request"] > 0, mode
    assert isinstance(summary["within_spread"], bool)
    # both SDK modes logged (after the response and inline), and the agent counted it all
    assert summary["sdk_sent_predictions"] == summary["agent_rows"] == 2 * (2 * 40 + 20) * 20
    assert any(line.startswith("sdk - no-sdk: p50 ") for line in lines)
    assert any(line.startswith("sdk-inline - no-sdk: p50 ") for line in lines)


def test_demo_settings_scale_with_speed_but_leave_what_the_config_sets(tmp_path: Path) -> None:
    from agent.config import Settings
    from agent.demo.story import demo_settings

    scaled = demo_settings(Settings.load(None), speed=10)
    assert scaled.engine.window_s == 2.0 and scaled.alerts.interval_s == 0.5
    assert scaled.alerts.rules["breaker-open"].for_s == 1.0  # type: ignore[union-attr]
    assert scaled.upstream.listen == "127.0.0.1:0"
    breaker = scaled.upstream.policies["demo-features"].breaker
    assert breaker is not None and breaker.open_s == 1.0
    assert scaled.models["fraud-scorer"].drift_methods["amount"] == "psi"

    mine = Settings.load(
        None,
        engine={"window_s": 7},
        alerts={"interval_s": 3, "rules": {"breaker-open": None}},
        upstream={"listen": "127.0.0.1:9999"},
        models={"fraud-scorer": {"positive_class": "legit"}},
    )
    kept = demo_settings(mine, speed=10)
    assert kept.engine.window_s == 7 and kept.alerts.interval_s == 3
    assert kept.alerts.rules["breaker-open"] is None  # turned off stays off
    assert kept.upstream.listen == "127.0.0.1:9999"
    assert kept.models["fraud-scorer"].positive_class == "legit"
    assert demo_settings(Settings.load(None), speed=100).engine.window_s == 1.0  # the floor


# -- listen addresses and the agent's token (issue 5) ---------------------------------------

DEMO_TOKEN = "demo-ingest-s3cret"


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mlsidecar_command(), *args], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(**env), stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo-model", "--listen", "0.0.0.0:8080"],
         "--listen: '0.0.0.0:8080' is not a loopback address and the demo model service has no "
         "authentication; add --insecure"),
        (["demo-feature-store", "--listen", "[::]:8090"],
         "--listen: '[::]:8090' is not a loopback address and the demo feature store"),
        (["demo-model", "--listen", "nonsense"], "--listen: 'nonsense' is not host:port"),
        (["demo-model", "--listen", "127.0.0.1:99999"],
         "--listen: '127.0.0.1:99999' is not host:port"),
        (["demo-feature-store", "--listen", ":8090"], "--listen: ':8090' has no host"),
        (["demo", "--model-listen", "0.0.0.0:0"],
         "--model-listen: '0.0.0.0:0' is not a loopback address"),
        (["demo-traffic", "--target", "http://127.0.0.1:1", "--sidecar", "nonsense"],
         "--sidecar: 'nonsense' is not host:port"),
    ],
    ids=["model-wildcard", "store-wildcard-v6", "model-nonsense", "model-port-range",
         "store-no-host", "demo-model-listen", "traffic-sidecar"],
)  # fmt: skip
def test_demo_parts_refuse_a_bad_or_exposed_address_in_one_line_naming_the_option(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_cli(*args, MLSIDECAR_STORE__DATA_DIR=str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"mlsidecar: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no traceback
    assert result.stdout == ""


def test_demo_model_serves_on_every_interface_only_with_insecure(
    children: Callable[..., Child],
) -> None:
    model = children("demo-model", "--listen", "0.0.0.0:0", "--insecure", "--no-sdk")
    line = model.wait_for(
        r"demo model service on (http://127\.0\.0\.1:(\d+)) \(listening on (\S+)\)"
    )
    assert line.group(3) == f"0.0.0.0:{line.group(2)}"
    assert httpx.get(f"{line.group(1)}/healthz", timeout=5).json()["status"] == "ok"


@pytest.mark.parametrize(
    ("command", "options", "message"),
    [
        ("demo-model", ["--token", DEMO_TOKEN],
         "--token: a token on the command line shows in `ps`"),
        ("demo-traffic", ["--token", DEMO_TOKEN],
         "--token: a token on the command line shows in `ps`"),
        ("demo-model", ["--token-file", "{tmp}/absent"],
         "--token-file: cannot read '{tmp}/absent'"),
        ("demo-traffic", ["--token-file", "{tmp}/empty"], "--token-file: '{tmp}/empty' is empty"),
        ("demo-model", ["--proxy-token-file", "{tmp}/empty"],
         "--proxy-token-file: '{tmp}/empty' is empty"),
    ],
    ids=["model-token-in-argv", "traffic-token-in-argv", "model-token-file-missing",
         "traffic-token-file-empty", "model-proxy-token-file-empty"],
)  # fmt: skip
def test_demo_parts_refuse_an_unusable_token_option_naming_it(
    command: str, options: list[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "empty").write_text("\n")
    extra = ["--target", f"http://127.0.0.1:{free_port()}"] if command == "demo-traffic" else []
    result = run_cli(command, *extra, *(o.format(tmp=tmp_path) for o in options))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"mlsidecar: {message.format(tmp=tmp_path)}"), result.stderr
    assert "Traceback" not in result.stderr and DEMO_TOKEN not in result.stderr


def _rows_at(harness: AgentHarness, wanted: int, timeout: float = 15.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    report = harness.agent.engine.report("fraud-scorer", "v1")
    while time.monotonic() < deadline and (report is None or report["totals"]["rows"] < wanted):
        time.sleep(0.2)
        report = harness.agent.engine.report("fraud-scorer", "v1")
    return report


@pytest.mark.slow
def test_demo_model_and_traffic_send_the_token_an_agent_requires(
    start_agent: Callable[..., AgentHarness], children: Callable[..., Child], tmp_path: Path
) -> None:
    harness = start_agent(ingest={"token": DEMO_TOKEN})
    token_file = tmp_path / "token"
    token_file.write_text(DEMO_TOKEN + "\n")
    model = children("demo-model", "--listen", "127.0.0.1:0", "--sidecar",
                     harness.ingest_target, "--token-file", str(token_file))  # fmt: skip
    model_url = model.wait_for(r"demo model service on (http://127\.0\.0\.1:\d+)").group(1)
    assert f"predictions logged to {harness.ingest_target} with a token" in model.stdout[0]
    traffic = children(
        "demo-traffic", "--target", model_url, "--sidecar", harness.ingest_target,
        "--speed", "20", "--duration", "2", "--every", "1",
        env=subprocess_env(MLSIDECAR_TOKEN=DEMO_TOKEN),
    )  # fmt: skip
    assert traffic.wait(60) == 0, "\n".join(traffic.stderr[-20:])
    done = traffic.wait_for(r"demo traffic finished: sent (\d+) predictions and (\d+) outcomes")
    sent, outcomes = int(done.group(1)), int(done.group(2))
    assert sent > 0 and outcomes > 0

    report = _rows_at(harness, sent)
    assert report is not None and report["totals"]["rows"] == sent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and report["totals"]["outcomes"] < outcomes:
        time.sleep(0.2)
        report = harness.agent.engine.report("fraud-scorer", "v1") or report
    assert report["totals"]["outcomes"] == outcomes  # the traffic's own SDK client had it too
    sdk = httpx.get(f"{model_url}/stats", timeout=5).json()["sdk"]
    assert sdk["dropped"] == {} and sdk["sent_predictions"] == sent
    printed = "\n".join(model.stdout + model.stderr + traffic.stdout + traffic.stderr)
    assert DEMO_TOKEN not in printed


def test_demo_model_without_the_token_has_its_predictions_refused(
    start_agent: Callable[..., AgentHarness], children: Callable[..., Child]
) -> None:
    """The control for the test above: the same agent refuses a model service with no token."""
    harness = start_agent(ingest={"token": DEMO_TOKEN})
    model = children("demo-model", "--listen", "127.0.0.1:0", "--sidecar", harness.ingest_target)
    model_url = model.wait_for(r"demo model service on (http://127\.0\.0\.1:\d+)").group(1)
    instances = [{"id": f"t{i}", "amount": 20.0, "hour": 12, "merchant": "fuel", "user_id": i}
                 for i in range(5)]  # fmt: skip
    assert httpx.post(f"{model_url}/predict", json={"instances": instances}, timeout=5).is_success
    deadline = time.monotonic() + 15
    sdk: dict[str, Any] = {}
    while time.monotonic() < deadline and not sdk.get("dropped"):
        time.sleep(0.2)
        sdk = httpx.get(f"{model_url}/stats", timeout=5).json()["sdk"]
    assert sdk["dropped"].get("unauthenticated") == 5, sdk
    assert harness.agent.engine.report("fraud-scorer", "v1") is None


def test_demo_model_sends_the_proxy_token_so_the_egress_proxy_lets_lookups_through(
    start_agent: Callable[..., AgentHarness], children: Callable[..., Child], tmp_path: Path
) -> None:
    store = children("demo-feature-store", "--listen", "127.0.0.1:0")
    store_url = store.wait_for(r"demo feature store on (http://127\.0\.0\.1:\d+)").group(1)
    harness = start_agent(
        upstream={"listen": "127.0.0.1:0", "token": "proxy-s3cret",
                  "targets": {"features": {"url": store_url}}}
    )  # fmt: skip
    proxy = f"http://127.0.0.1:{harness.agent.proxy.port}/upstream/features"  # type: ignore[union-attr]
    (tmp_path / "proxy-token").write_text("proxy-s3cret\n")
    instances = [{"id": "p1", "amount": 20.0, "hour": 12, "merchant": "fuel", "user_id": 1}]
    sources = {}
    for name, extra in (("with", ["--proxy-token-file", str(tmp_path / "proxy-token")]),
                        ("without", [])):  # fmt: skip
        model = children("demo-model", "--listen", "127.0.0.1:0", "--no-sdk",
                         "--feature-store-url", proxy, *extra)  # fmt: skip
        url = model.wait_for(r"demo model service on (http://127\.0\.0\.1:\d+)").group(1)
        answer = httpx.post(f"{url}/predict", json={"instances": instances}, timeout=5).json()
        sources[name] = answer["features_source"]
    # Without the token the proxy answers 407 and the model falls back to a missing feature.
    assert sources == {"with": "store", "without": "fallback"}
    assert httpx.get(f"{store_url}/admin/status", timeout=5).json()["lookups"] == 1


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:8080", "listen: '0.0.0.0:8080' is not a loopback address"),
        ("nonsense", "listen: 'nonsense' is not host:port"),
        ("127.0.0.1:99999", "listen: '127.0.0.1:99999' is not host:port"),
    ],
)
def test_model_service_refuses_a_bad_listen_with_a_plain_value_error(
    listen: str, message: str
) -> None:
    from pydantic import ValidationError

    from agent.demo.model import ModelService

    with pytest.raises(ValueError, match="^" + re.escape(message)) as error:
        ModelService(listen=listen)
    assert not isinstance(error.value, ValidationError)  # one line, not pydantic's report
    # Exposed on purpose (a container): allowed, as the agent's listeners with insecure: true.
    if "loopback" in message:
        assert ModelService(listen=listen, insecure=True).port is None  # built, not started
