"""Helpers shared by the Grafana tests: load the dashboards and substitute their variables.

boards = committed_dashboards()                  # {"mlsidecar-drift.json": {...}}
for board, panel, target in targets(boards): ...
substitute('rate(x{m=~"$model"}[$__rate_interval])', {"model": "m"})
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
PROVISIONING = GRAFANA / "provisioning"

# Grafana's built-in variables, and what the proof on real data puts in their place.
BUILTINS = {"__rate_interval": "15s", "__interval": "5s", "__range": "10m"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def generator() -> ModuleType:
    """grafana/dashboards.py, imported from its path (grafana/ is not a package)."""
    spec = importlib.util.spec_from_file_location("mlsidecar_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_dashboards() -> dict[str, dict[str, Any]]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return {path.name: json.loads(path.read_text()) for path in files}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(
    boards: dict[str, dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(dashboard file, panel, target) for every query of every non-row panel."""
    for name, board in boards.items():
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            for target in panel.get("targets", []):
                yield name, panel, target


def variable_names(board: dict[str, Any]) -> set[str]:
    return {v["name"] for v in board.get("templating", {}).get("list", [])}


def referenced(text: str) -> set[str]:
    return {a or b for a, b in VARIABLE.findall(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $var and ${var} by values (then the built-ins), as Grafana would."""
    merged = {**BUILTINS, **values}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in merged:
            raise KeyError(f"no value for variable ${name} in {text!r}")
        return merged[name]

    return VARIABLE.sub(one, text)
