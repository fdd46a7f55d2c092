"""What ships runs the agent with MALLOC_ARENA_MAX=2 (two glibc malloc arenas: the 10 M-event
peak RSS went from 198.8 to 189.0 MB, bench/README.md), and the memory benchmark measures
it that way. The chart is rendered by real Helm; the Dockerfile is read stage by stage.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_helm_chart import MODEL, Rendered, render

ROOT = Path(__file__).resolve().parent.parent


def stage_env(dockerfile: str) -> dict[str, dict[str, str]]:
    """ENV KEY=value settings per build stage name (only this file's one-line forms)."""
    stages: dict[str, dict[str, str]] = {}
    current = ""
    for line in dockerfile.splitlines():
        if match := re.match(r"FROM \S+ AS (\S+)", line):
            current = match.group(1)
            stages[current] = {}
        elif line.startswith("ENV ") and current:
            for key, value in re.findall(r"(\w+)=(\S+)", line):
                stages[current][key] = value
    return stages


def test_the_agent_image_sets_two_malloc_arenas_and_the_demo_image_does_not() -> None:
    stages = stage_env((ROOT / "Dockerfile").read_text())
    assert stages["agent"]["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_ARENA_MAX" not in stages["demo"]


def test_the_charts_sidecar_container_sets_two_malloc_arenas() -> None:
    chart = Rendered(MODEL, render(MODEL))
    env = {e["name"]: e.get("value") for e in chart.sidecar["env"]}
    assert env["MALLOC_ARENA_MAX"] == "2"
    others = [c for c in chart.pod["containers"] if c["name"] != chart.sidecar["name"]]
    assert others and all("MALLOC_ARENA_MAX" not in str(c.get("env")) for c in others)


def test_the_memory_benchmark_runs_the_agent_as_it_ships() -> None:
    source = (ROOT / "bench" / "memory.py").read_text()
    assert 'env.setdefault("MALLOC_ARENA_MAX", "2")' in source
