"""The demo: a fraud model service, its feature store and traffic that tells a story.

    mlsidecar demo --speed 10 --duration 30      # everything in one process (story.py)
    mlsidecar demo-model --sidecar 127.0.0.1:4320 --listen 127.0.0.1:8080   # model.py
    mlsidecar demo-traffic --target http://127.0.0.1:8080 --speed 10        # traffic.py

See docs/demo.md for the phases, their timings and where to look. Importing this package
is cheap (the CLI builds its parser from ``parts``): the parts load numpy, FastAPI, gRPC.
"""

from __future__ import annotations

from typing import Any

MODEL = "fraud-scorer"
VERSION = "v1"
__all__ = ["MODEL", "VERSION", "SyntheticTraffic"]


def __getattr__(name: str) -> Any:
    if name == "SyntheticTraffic":  # raw gRPC load for tests and benchmarks
        from agent.demo.synthetic import SyntheticTraffic

        return SyntheticTraffic
    raise AttributeError(f"module 'agent.demo' has no attribute {name!r}")
