"""Package helm/mlsidecar into dist/ with Helm's own Go SDK (helm-python-sdk), no helm binary.

.venv/bin/python scripts/package_chart.py            # dist/mlsidecar-0.1.0.tgz
.venv/bin/python scripts/package_chart.py --lint     # lint in strict mode first
make chart
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "mlsidecar"
# `helm lint` renders with these: the defaults need a model image (or the demo model).
LINT_VALUES = {"model": {"image": {"repository": "registry.example.com/model", "tag": "1.0.0"}}}


def lint(chart: Path) -> list[str]:
    """Helm's lint in strict mode (warnings count): the problems found, as text."""
    import helm_python

    report = helm_python.lint(chart, LINT_VALUES, strict=True)
    problems = [str(error) for error in report.get("errors") or []]
    problems += [f"{m['path']}: {m['error']}" for m in report.get("messages") or []]
    return problems


def package(chart: Path, destination: Path) -> Path:
    """``helm package chart -d destination``: the archive Helm itself writes."""
    import helm_python

    destination.mkdir(parents=True, exist_ok=True)
    return Path(helm_python.package(chart, destination=destination))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--destination", "-d", type=Path, default=ROOT / "dist")
    parser.add_argument("--lint", action="store_true", help="lint (strict) before packaging")
    args = parser.parse_args(argv)
    if args.lint:
        problems = lint(args.chart)
        if problems:
            print("helm lint (strict) found:", *problems, sep="\n  ", file=sys.stderr)
            return 1
    print(package(args.chart, args.destination))
    return 0


if __name__ == "__main__":
    sys.exit(main())
