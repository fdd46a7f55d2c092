"""Alerts: rules on health-report signals, the pending → firing → resolved life cycle,
acknowledgement, silences, durable state, the default rules, and the real agent."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import AgentHarness, agent_settings, free_port
from test_ml_health import ENGINE, MODEL, Traffic
from upstream_server import FlakyUpstream

from agent.alerts import DEFAULT_RULES, AlertRule, Alerts
from agent.alerts.rules import configured_rules
from agent.config import Settings

S = 10**9


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * S

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * S)


def report(model: str = "m", **sections: Any) -> dict[str, Any]:
    return {"model": model, "version": "v1", **sections}


def psi(**features: float | None) -> dict[str, Any]:
    return {
        "features": {
            name: {} if value is None else {"drift": {"psi": value}}
            for name, value in features.items()
        }
    }


PSI_RULE = AlertRule("feature-psi", "features.*.drift.psi", ">=", 0.25, for_s=60, cooldown_s=600)


# --- rules ----------------------------------------------------------------------------------


def test_a_wildcard_path_gives_one_instance_per_key_labelled_with_it():
    instances = PSI_RULE.instances(report(**psi(age=0.31, income=0.02, city=None)))
    assert instances == [
        ({"feature": "age"}, 0.31),
        ({"feature": "city"}, None),
        ({"feature": "income"}, 0.02),
    ]
    assert AlertRule("x", "health.score", "<", 50).instances(report()) == [({}, None)]
    drifted = AlertRule("x", "dataset_drift.drifted", "==", 1).instances(
        report(dataset_drift={"drifted": True})
    )
    assert drifted == [({}, 1.0)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"op": "=>"}, "op"),
        ({"threshold": float("nan")}, "threshold"),
        ({"signal": "features..psi"}, "signal"),
        ({"signal": "features.*.drift psi"}, "signal"),
        ({"for_s": -1}, "for_s"),
    ],
)
def test_a_bad_rule_is_refused_naming_the_field(kwargs, field):
    args = {"name": "r", "signal": "health.score", "op": "<", "threshold": 50.0, **kwargs}
    with pytest.raises(ValueError, match=field):
        AlertRule(**args)


# --- life cycle -----------------------------------------------------------------------------


def test_pending_then_firing_after_for_then_resolved_each_notified_once():
    clock = Clock()
    alerts = Alerts([PSI_RULE], clock=clock)
    assert alerts.evaluate([report(**psi(age=0.3))]) == []
    (pending,) = alerts.listing()["active"]
    assert (pending["state"], pending["labels"]["feature"]) == ("pending", "age")

    clock.advance(30)
    assert alerts.evaluate([report(**psi(age=0.4))]) == []  # not for 60 s yet
    clock.advance(31)
    (fired,) = alerts.evaluate([report(**psi(age=0.4))])
    assert (fired.status, fired.alert.value, fired.alert.labels["model"]) == ("firing", 0.4, "m")
    clock.advance(60)
    assert alerts.evaluate([report(**psi(age=0.5))]) == []  # deduplicated within cooldown
    clock.advance(600)
    (again,) = alerts.evaluate([report(**psi(age=0.5))])  # still firing after the cooldown
    assert again.status == "firing"

    (resolved,) = alerts.evaluate([report(**psi(age=0.1))])
    assert (resolved.status, resolved.alert.value) == ("resolved", 0.1)
    listing = alerts.listing()
    assert listing["active"] == []
    assert listing["recent"][0]["state"] == "resolved"


def test_a_condition_that_does_not_last_for_its_duration_never_notifies():
    clock = Clock()
    alerts = Alerts([PSI_RULE], clock=clock)
    alerts.evaluate([report(**psi(age=0.3))])
    clock.advance(30)
    assert alerts.evaluate([report(**psi(age=0.1))]) == []
    assert alerts.listing() == {"active": [], "recent": [], "silences": []}


def test_no_data_neither_fires_nor_resolves_but_a_model_that_went_away_resolves():
    clock = Clock()
    rule = AlertRule("low", "health.score", "<", 50, cooldown_s=0)
    alerts = Alerts([rule], clock=clock)
    (fired,) = alerts.evaluate([report(health={"score": 20})])
    assert fired.status == "firing"
    assert alerts.evaluate([report(health={"score": None})]) == []  # not evaluated
    assert [a["state"] for a in alerts.listing()["active"]] == ["firing"]
    (gone,) = alerts.evaluate([])  # the model version was forgotten
    assert gone.status == "resolved"


def test_acknowledged_alerts_do_not_repeat_and_silences_mute_without_losing_state():
    clock = Clock()
    rule = AlertRule("low", "health.score", "<", 50, cooldown_s=0)
    alerts = Alerts([rule], clock=clock)
    (fired,) = alerts.evaluate([report(health={"score": 20})])
    alerts.ack(fired.alert.id)
    assert alerts.evaluate([report(health={"score": 10})]) == []

    silence = alerts.silence({"model": "other"}, 3600)
    both = [report(health={"score": 20}), report("other", health={"score": 5})]
    assert alerts.evaluate(both) == []  # m is acknowledged, other is silenced
    active = {a["labels"]["model"]: a for a in alerts.listing()["active"]}
    assert active["other"]["state"] == "firing" and active["other"]["silenced"] is True
    assert active["m"]["acked"] is True
    assert alerts.unsilence(silence.id)
    clock.advance(1)
    (now_heard,) = alerts.evaluate(
        [report(health={"score": 20}), report("other", health={"score": 5})]
    )
    assert now_heard.alert.labels["model"] == "other"
    with pytest.raises(ValueError, match="matchers"):
        alerts.silence({}, 60)


def test_state_survives_a_restart_without_notifying_again(tmp_path: Path, caplog):
    clock = Clock()
    path = tmp_path / "alerts.json"
    rule = AlertRule("low", "health.score", "<", 50, cooldown_s=3600)
    first = Alerts([rule], clock=clock, state_path=path)
    (fired,) = first.evaluate([report(health={"score": 20})])
    first.silence({"model": "x"}, 60)

    clock.advance(10)
    restarted = Alerts([rule], clock=clock, state_path=path)
    assert restarted.evaluate([report(health={"score": 25})]) == []  # already announced
    (alert,) = restarted.listing()["active"]
    assert (alert["id"], alert["state"]) == (fired.alert.id, "firing")
    assert len(restarted.listing()["silences"]) == 1
    (resolved,) = restarted.evaluate([report(health={"score": 90})])
    assert resolved.status == "resolved"

    # A rule removed from the config drops its alerts; a broken file starts empty, saying so.
    assert Alerts([], clock=clock, state_path=path).listing()["active"] == []
    path.write_text("{broken")
    with caplog.at_level(logging.WARNING, logger="agent.alerts.manager"):
        assert Alerts([rule], clock=clock, state_path=path).listing()["active"] == []
    assert "unreadable" in caplog.text


# --- configuration --------------------------------------------------------------------------


def test_default_rules_can_be_replaced_removed_and_extended_by_name():
    names = [r.name for r in DEFAULT_RULES]
    assert names == [
        "dataset-drift",
        "feature-psi",
        "accuracy-low",
        "mape-high",
        "health-low",
        "model-process-down",
        "model-memory-high",
        "breaker-open",
    ]
    settings = Settings(
        alerts={
            "rules": {
                "feature-psi": {"signal": "features.*.drift.psi", "op": ">=", "threshold": 0.4},
                "mape-high": None,
                "latency": {
                    "signal": "window.latency_ms.p99",
                    "op": ">",
                    "threshold": 250,
                    "for_s": 120,
                },
            }
        }
    )
    rules = {r.name: r for r in configured_rules(settings.alerts)}
    assert set(rules) == set(names) - {"mape-high"} | {"latency"}
    assert rules["feature-psi"].threshold == 0.4
    assert rules["latency"].for_s == 120
    assert configured_rules(Settings(alerts={"default_rules": False}).alerts) == []


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        ({"signal": "features.*.drift psi", "op": ">", "threshold": 1}, "alerts.rules.bad.signal"),
        ({"signal": "health.score", "op": "=>", "threshold": 1}, "alerts.rules.bad.op"),
        (
            {"signal": "health.score", "op": "<", "threshold": 1, "channels": ["pager"]},
            "alerts.rules.bad.channels",
        ),
        ({"signal": "health.score", "op": "<"}, "alerts.rules.bad.threshold"),
    ],
)
def test_a_bad_configured_rule_is_a_config_error_naming_the_key(rule, where):
    from agent.cli import ConfigError, load_settings

    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_settings(None, alerts={"rules": {"bad": rule}})


# --- the real agent -------------------------------------------------------------------------


def test_the_agent_fires_an_alert_on_drift_lists_acks_and_keeps_it_across_a_restart(
    tmp_path: Path, caplog
):
    settings: dict[str, Any] = {
        "engine": ENGINE,
        "store": {"data_dir": str(tmp_path)},
        "api": {"admin_token": "admin-secret"},
        "alerts": {"interval_s": 3600, "default_rules": False, "rules": {
            "psi": {"signal": "features.*.drift.psi", "op": ">=", "threshold": 0.25, "severity": "critical"},
        }},
    }  # fmt: skip
    harness = AgentHarness(agent_settings(**settings)).start()
    try:
        traffic = Traffic()
        stub = harness.stub()
        stub.SubmitPredictions(traffic.batch(1000))  # the warm-up reference
        stub.SubmitPredictions(traffic.batch(1000, shift=1.5))  # income drifts
        with caplog.at_level(logging.INFO, logger="mlsidecar.events"):
            assert harness.run(harness.agent.evaluate_alerts()) >= 1
        assert "alert psi firing" in caplog.text and "feature=income" in caplog.text
        listing = httpx.get(f"{harness.api_url}/v1/alerts").json()
        firing = [a for a in listing["active"] if a["labels"]["feature"] == "income"]
        assert firing and firing[0]["state"] == "firing" and firing[0]["severity"] == "critical"
        alert_id = firing[0]["id"]
        assert httpx.post(f"{harness.api_url}/v1/alerts/{alert_id}/ack").status_code == 401
        acked = httpx.post(
            f"{harness.api_url}/v1/alerts/{alert_id}/ack",
            headers={"authorization": "Bearer admin-secret"},
        )
        assert acked.status_code == 200 and acked.json()["acked"] is True
        bad = httpx.post(
            f"{harness.api_url}/v1/silences",
            headers={"authorization": "Bearer admin-secret"},
            content=json.dumps({"matchers": {"model": MODEL}}),
        )
        assert bad.status_code == 400 and bad.json()["error"]["reason"] == "duration_s"
    finally:
        harness.stop()
    state = json.loads((tmp_path / "alerts.json").read_text())
    assert alert_id in {a["id"] for a in state["active"]}

    restarted = AgentHarness(agent_settings(**settings)).start()
    try:
        listing = httpx.get(f"{restarted.api_url}/v1/alerts").json()
        assert alert_id in {a["id"] for a in listing["active"]}
    finally:
        restarted.stop()


# --- HTTP channels, through the upstream layer ----------------------------------------------


class Alertmanager:
    """A real Alertmanager (Debian's prometheus-alertmanager) on a free loopback port."""

    def __init__(self, tmp_path: Path) -> None:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            pytest.fail(
                "Alertmanager is not installed: run `make system-deps` "
                "(apt-get install prometheus-alertmanager), which `make test` does"
            )
        config = tmp_path / "alertmanager.yml"
        config.write_text("route: {receiver: 'null'}\nreceivers: [{name: 'null'}]\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp_path / "alertmanager.log").open("w")
        self.args = [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no HA gossip
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Alertmanager:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail("Alertmanager did not become ready within 30 s")

    def alerts(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/api/v2/alerts", timeout=5).json())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def test_alerts_reach_a_real_alertmanager_through_the_upstream_layer_and_resolve(
    tmp_path: Path,
):
    manager = Alertmanager(tmp_path)  # not started yet: the first send fails and waits
    harness = AgentHarness(
        agent_settings(
            engine=ENGINE,
            upstream={"listen": "127.0.0.1:0", "targets": {"am": {"url": manager.url}}},
            alerts={
                "interval_s": 3600,
                "default_rules": False,
                "channels": {"pager": {"type": "alertmanager", "upstream": "am"}},
                "rules": {
                    "psi": {
                        "signal": "features.*.drift.psi",
                        "op": ">=",
                        "threshold": 0.25,
                        "channels": ["log", "pager"],
                        "annotations": {"summary": "feature drifted"},
                    }
                },
            },
        )
    ).start()
    try:
        traffic = Traffic()
        stub = harness.stub()
        stub.SubmitPredictions(traffic.batch(1000))
        stub.SubmitPredictions(traffic.batch(1000, shift=1.5))
        assert harness.run(harness.agent.evaluate_alerts()) >= 1
        pager = harness.agent.alert_channels["pager"]
        assert len(pager.outbox) >= 1  # Alertmanager down: kept, not lost

        manager.start()
        harness.run(harness.agent.evaluate_alerts())  # nothing new; the outbox goes first
        assert len(pager.outbox) == 0
        received = [a for a in manager.alerts() if a["labels"]["alertname"] == "psi"]
        income = [a for a in received if a["labels"].get("feature") == "income"]
        assert income, received
        assert income[0]["labels"]["model"] == MODEL
        assert income[0]["annotations"]["summary"] == "feature drifted"
        assert income[0]["status"]["state"] == "active"

        # Forgetting the model resolves its alerts: Alertmanager hears endsAt = now.
        httpx.delete(f"{harness.api_url}/v1/models/{MODEL}")
        harness.run(harness.agent.evaluate_alerts())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [
            a for a in manager.alerts() if a["labels"]["alertname"] == "psi"
        ]:
            time.sleep(0.2)
        assert [a for a in manager.alerts() if a["labels"]["alertname"] == "psi"] == []
    finally:
        harness.stop()
        manager.stop()


def test_a_slack_style_webhook_gets_the_text_and_a_refusal_is_not_retried_forever():
    with FlakyUpstream() as hook:
        harness = AgentHarness(
            agent_settings(
                upstream={
                    "listen": "127.0.0.1:0",
                    "policies": {"once": {"retries": None}},
                    "targets": {"chat": {"url": f"{hook.url}/hooks/T1/B2", "policy": "once"}},
                },
                alerts={
                    "interval_s": 3600,
                    "default_rules": False,
                    "channels": {
                        "chat": {"type": "webhook", "upstream": "chat", "format": "slack"}
                    },
                    "rules": {
                        "many": {
                            "signal": "totals.rows",
                            "op": ">",
                            "threshold": 10,
                            "channels": ["chat"],
                        }
                    },
                },
            )
        ).start()
        try:
            harness.stub().SubmitPredictions(Traffic().batch(50))
            assert harness.run(harness.agent.evaluate_alerts()) == 1
            (seen,) = hook.requests
            assert (seen.method, seen.path) == ("POST", "/hooks/T1/B2")
            text = json.loads(seen.body)["text"]
            assert text.startswith(":red_circle: alert many firing: value 50")

            hook.fail_next(1, status=500)  # a server error: kept for the next evaluation
            httpx.delete(f"{harness.api_url}/v1/models/{MODEL}")
            harness.run(harness.agent.evaluate_alerts())
            assert len(harness.agent.alert_channels["chat"].outbox) == 1
            harness.run(harness.agent.evaluate_alerts())
            assert harness.agent.alert_channels["chat"].outbox == deque()
            assert json.loads(hook.requests[-1].body)["text"].startswith(":large_green_circle:")
        finally:
            harness.stop()


def test_an_alert_channel_must_name_an_upstream_target():
    from agent.cli import ConfigError, load_settings

    with pytest.raises(
        ConfigError, match=r"alerts\.channels\.pager\.upstream: 'am' is not a target"
    ):
        load_settings(
            None, alerts={"channels": {"pager": {"type": "alertmanager", "upstream": "am"}}}
        )


def test_rules_on_the_agents_own_report_carry_no_model_label():
    clock = Clock()
    (breaker,) = [r for r in DEFAULT_RULES if r.name == "breaker-open"]
    alerts = Alerts([breaker], clock=clock)
    agent = {
        "model": "",
        "version": "",
        "breakers": {"feature-store": {"open": 1}, "db": {"open": 0}},
    }
    assert alerts.evaluate([agent]) == []  # open, but not for a minute yet
    clock.advance(61)
    (fired,) = alerts.evaluate([agent])
    assert fired.alert.labels == {
        "alertname": "breaker-open",
        "severity": "warning",
        "upstream": "feature-store",
    }
    # A model's report has no breakers: no data, nothing resolves.
    assert alerts.evaluate([report(health={"score": 90}), agent]) == []


def test_the_agent_alerts_when_the_model_process_is_not_running(tmp_path: Path):
    pid_file = tmp_path / "model.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(str(dead.pid))  # a process that has exited
    harness = AgentHarness(
        agent_settings(
            resources={"model": {"pid_file": str(pid_file)}},
            alerts={
                "interval_s": 3600,
                "rules": {
                    "model-process-down": {
                        "signal": "resources.model.up",
                        "op": "==",
                        "threshold": 0,
                        "severity": "critical",
                    }
                },
            },
        )
    ).start()
    try:
        harness.run(harness.agent.evaluate_alerts())
        active = httpx.get(f"{harness.api_url}/v1/alerts").json()["active"]
        down = [a for a in active if a["rule"] == "model-process-down"]
        assert down and down[0]["state"] == "firing"
        assert "model" not in down[0]["labels"]
    finally:
        harness.stop()


def test_a_notification_waiting_when_the_agent_stops_is_sent_after_the_restart(tmp_path: Path):
    with FlakyUpstream() as hook:
        settings = agent_settings(
            store={"data_dir": str(tmp_path)},
            upstream={
                "listen": "127.0.0.1:0",
                "policies": {"once": {"retries": None}},
                "targets": {"chat": {"url": f"{hook.url}/hooks", "policy": "once"}},
            },
            alerts={
                "interval_s": 3600,
                "default_rules": False,
                "channels": {"chat": {"type": "webhook", "upstream": "chat"}},
                "rules": {
                    "many": {
                        "signal": "totals.rows",
                        "op": ">",
                        "threshold": 10,
                        "channels": ["chat"],
                    }
                },
            },
        )
        outbox_file = tmp_path / "alert-outbox" / "chat.json"
        hook.fail_next(1, status=503)  # the webhook is down for the first send
        first = AgentHarness(settings).start()
        try:
            first.stub().SubmitPredictions(Traffic().batch(50))
            assert first.run(first.agent.evaluate_alerts()) == 1
            assert len(first.agent.alert_channels["chat"].outbox) == 1
            assert json.loads(outbox_file.read_text())["notifications"][0]["status"] == "firing"
        finally:
            first.stop()

        second = AgentHarness(settings).start()
        try:
            chat = second.agent.alert_channels["chat"]
            assert len(chat.outbox) == 1  # read back from the file
            second.run(chat.flush())
            sent = json.loads(hook.requests[-1].body)
            assert (sent["status"], sent["alert"]["rule"]) == ("firing", "many")
            assert sent["alert"]["value"] == 50
            assert chat.outbox == deque()
            assert not outbox_file.exists()  # nothing waits: no file
        finally:
            second.stop()


def test_an_unreadable_outbox_file_starts_empty_and_says_so(tmp_path: Path, caplog):
    from agent.alerts.channels import WebhookChannel

    path = tmp_path / "chat.json"
    path.write_text("{not json")

    async def post(upstream: str, where: str, payload: Any) -> int:
        return 200

    with caplog.at_level("WARNING"):
        channel = WebhookChannel("chat", post, "chat", "", "json", outbox_path=path)
    assert channel.outbox == deque()
    assert "outbox" in caplog.text and str(path) in caplog.text


def test_a_channel_name_must_be_usable_as_a_file_name():
    from agent.cli import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"channels\.\.\./x: use 1-64 letters"):
        load_settings(
            None,
            upstream={"targets": {"a": {"url": "http://127.0.0.1:9"}}},
            alerts={"channels": {"../x": {"type": "webhook", "upstream": "a"}}},
        )
