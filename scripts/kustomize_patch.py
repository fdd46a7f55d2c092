"""Write examples/kubernetes/kustomize/ (the sidecar as a kustomize patch) from the Helm chart.

    .venv/bin/python scripts/kustomize_patch.py          # rewrite the patch and the config
    .venv/bin/python scripts/kustomize_patch.py --check  # exit 1 if they differ from the chart

tests/test_helm_chart.py runs the check, so the snippet never drifts from the chart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "mlsidecar"
OUT = ROOT / "examples" / "kubernetes" / "kustomize"
# Release "mlsidecar" names the ConfigMap "mlsidecar-config", the configMapGenerator's name.
RELEASE = "mlsidecar"
VALUES: dict[str, Any] = {
    "model": {
        "image": {"repository": "registry.example.com/fraud-scorer", "tag": "1.4.0"},
        "cmdline": "gunicorn .*fraud_scorer",
    },
    "agent": {"telemetry": {"serviceName": "fraud-scorer", "serviceVersion": "1.4.0"}},
}
PATCH_HEADER = """\
# Adds the mlsidecar sidecar to the Deployment `fraud-scorer` (model container `model`).
# Generated from helm/mlsidecar by scripts/kustomize_patch.py: do not edit by hand.
"""
CONFIG_HEADER = """\
# The agent's config (docs/configuration.md); secrets come from Secrets as env.
# Generated from helm/mlsidecar by scripts/kustomize_patch.py.
"""


def build() -> dict[str, str]:
    """File name -> content, rendered by the real Helm SDK."""
    import helm_python

    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(VALUES, name=RELEASE, namespace="default")
    finally:
        chart.close()
    docs = {
        doc["kind"]: doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict)
    }
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    model = next(c for c in pod["containers"] if c["name"] == "model")
    pod_patch = {
        "shareProcessNamespace": pod["shareProcessNamespace"],
        "initContainers": pod["initContainers"],
        "containers": [{"name": "model", "env": model["env"]}],
        "volumes": [v for v in pod["volumes"] if v["name"].startswith("mlsidecar-")],
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "fraud-scorer"},
        "spec": {"template": {"spec": pod_patch}},
    }
    return {
        "mlsidecar-patch.yaml": PATCH_HEADER + yaml.safe_dump(patch, sort_keys=False),
        "mlsidecar.yaml": CONFIG_HEADER + docs["ConfigMap"]["data"]["mlsidecar.yaml"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, content in build().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != content:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(content)
    if stale:
        print("stale, run scripts/kustomize_patch.py:", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
