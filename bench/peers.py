"""Side by side with the peers, same data, same run: whylogs profiling and Evidently drift.

Prints figures (it is not a test). The peers live in their own venv, never in the
agent's dependencies: ``make bench-peers`` creates ``.venv-bench`` with the project and
its ``bench-peers`` extra (whylogs, evidently, pandas<3) and runs this script there.
Without the peers installed it says so and prints our figures alone.

    make bench-peers                                  # = .venv-bench/bin/python bench/peers.py
    .venv-bench/bin/python bench/peers.py --repeat 5  # every measurement 5 times; medians
    .venv-bench/bin/python bench/peers.py --quick     # 20k rows, 10k vs 10k, once
    .venv/bin/python bench/peers.py --quick --ours-only

Two comparisons on 20 numeric features (normal, lognormal, uniform and 4-valued ones):
  profiling  whylogs ``why.log(df)`` on --profile-rows rows (rows/s) against our engine
             counting the same rows as 1000-row columnar batches against a reference
             (``Engine.observe_predictions``: drift bins, quality, windows, as the agent does)
  drift      Evidently ``Report([DataDriftPreset()]).run(current, reference)`` for each of
             --sizes (10k vs 10k, 100k vs 100k) against ours for the same rows: build the
             reference profile from the reference rows, count the current rows in 1000-row
             batches, read the report's ``features.<name>.drift`` and ``dataset_drift``.
             Drift is injected into 5 features of the current rows; both tools' decisions
             are printed per feature with the exact scores (scipy on the raw values).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency, ks_2samp, wasserstein_distance

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.engine import Engine, ModelConfig, PredictionColumns, ReferenceProfile  # noqa: E402

# The peers must not phone home from a benchmark (there is no network here anyway).
os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")
os.environ.setdefault("DO_NOT_TRACK", "1")

MODEL = "peers"
FEATURES = [f"f{j:02d}" for j in range(20)]
# What differs in the current rows; every other feature has the reference's distribution.
INJECTED = {
    "f00": "mean +0.5 sd",
    "f01": "sd x1.5",
    "f10": "lognormal sigma x1.6",
    "f14": "uniform shifted +0.3",
    "f17": "category mix reversed",
}
# Shifted, but far below Evidently's 0.1 threshold: both should say "no drift".
NEAR_MISS = {"f05": "mean +0.03 sd (below threshold)"}
TARGET_PROFILING_RATIO = 5.0
TARGET_DRIFT_RATIO = 50.0
DRIFT_SHARE = 0.5


# --- data ---------------------------------------------------------------------------------------


def make_columns(rows: int, seed: int, *, drifted: bool) -> dict[str, np.ndarray]:
    """20 contiguous float64 columns; with ``drifted``, the INJECTED and NEAR_MISS changes."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for j in range(10):
        mean, sd = float(j), 1.0 + 0.1 * j
        if drifted and j == 0:
            mean += 0.5 * sd
        if drifted and j == 5:
            mean += 0.03 * sd
        scale = 1.5 if drifted and j == 1 else 1.0
        cols[f"f{j:02d}"] = rng.normal(mean, sd * scale, rows)
    for k in range(4):
        sigma = (0.5 + 0.1 * k) * (1.6 if drifted and k == 0 else 1.0)
        cols[f"f{10 + k:02d}"] = rng.lognormal(0.0, sigma, rows)
    for k in range(3):
        low = 0.3 if drifted and k == 0 else 0.0
        cols[f"f{14 + k:02d}"] = rng.uniform(low, low + 1.0 + k, rows)
    mix = np.array([0.4, 0.3, 0.2, 0.1])
    for k in range(3):
        p = mix[::-1] if drifted and k == 0 else mix
        cols[f"f{17 + k:02d}"] = rng.choice(np.arange(4.0), rows, p=p)
    return cols


# --- ours -----------------------------------------------------------------------------------------


def new_engine(reference: ReferenceProfile | None) -> Engine:
    """An engine with the agent's default settings, judging against ``reference``.

    ``ModelConfig()`` equals what ``agent.app.model_config_resolver`` builds from default
    ``Settings`` (importing the agent's app would add seconds of start-up, not figures).
    """
    return Engine(
        lambda model: ModelConfig(),
        max_models=10,
        clock=time.time_ns,
        reference_for=lambda model, version: reference,
    )


def build_reference(columns: Mapping[str, np.ndarray]) -> ReferenceProfile:
    return ReferenceProfile.from_columns(
        MODEL, "v1", numbers=columns, categories={}, source="file", created_unix_nano=time.time_ns()
    )


def count_rows(engine: Engine, columns: Mapping[str, np.ndarray], batch_rows: int) -> int:
    """Feed ``columns`` to the engine as the receiver does: one PredictionColumns per batch."""
    rows = len(next(iter(columns.values())))
    ids = [f"p-{i:06d}" for i in range(batch_rows)]
    for start in range(0, rows, batch_rows):
        stop = min(start + batch_rows, rows)
        engine.observe_predictions(
            PredictionColumns(
                MODEL,
                "v1",
                ids=ids if stop - start == batch_rows else ids[: stop - start],
                received_unix_nano=time.time_ns(),
                numbers={name: column[start:stop] for name, column in columns.items()},
            )
        )
    return rows


@dataclass
class Decision:
    method: str
    score: float | None
    drifted: bool


@dataclass
class DriftRun:
    seconds: float
    features: dict[str, Decision]
    share: float | None
    dataset_drifted: bool
    parts: dict[str, float]


def ours_drift(
    reference: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], batch_rows: int
) -> DriftRun:
    """Reference profile from the raw reference rows, current rows counted, report read."""
    t0 = time.perf_counter()
    profile = build_reference(reference)
    t1 = time.perf_counter()
    engine = new_engine(profile)
    count_rows(engine, current, batch_rows)
    t2 = time.perf_counter()
    report = engine.report(MODEL)
    t3 = time.perf_counter()
    assert report is not None and report["evaluated_window"] == "current", report
    features = {}
    for name in FEATURES:
        drift = report["features"][name]["drift"]
        features[name] = Decision(drift["method"], drift["score"], bool(drift["drifted"]))
    dataset = report["dataset_drift"]
    return DriftRun(
        t3 - t0,
        features,
        dataset["share"],
        bool(dataset["drifted"]),
        {"reference": t1 - t0, "count": t2 - t1, "report": t3 - t2},
    )


# --- exact (scipy on the raw values; default methods and thresholds, JS in base 2 as ours) ---


def exact_drift(reference: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> DriftRun:
    t0 = time.perf_counter()
    features = {}
    for name in FEATURES:
        ref, cur = reference[name], current[name]
        values = np.union1d(np.unique(ref), np.unique(cur))
        if ref.size <= 1000:
            if values.size > 5:
                p_value = float(ks_2samp(ref, cur).pvalue)
                features[name] = Decision("ks", p_value, p_value <= 0.05)
            else:
                table = [_value_counts(ref, values), _value_counts(cur, values)]
                p_value = float(chi2_contingency(table).pvalue)
                features[name] = Decision("chisquare", p_value, p_value < 0.05)
        elif values.size > 5:
            score = float(wasserstein_distance(ref, cur)) / max(float(np.std(ref)), 1e-3)
            features[name] = Decision("wasserstein", score, score >= 0.1)
        else:
            p, q = _value_counts(ref, values), _value_counts(cur, values)
            score = float(jensenshannon(p / p.sum(), q / q.sum(), base=2))
            features[name] = Decision("jensenshannon", score, score >= 0.1)
    share = sum(d.drifted for d in features.values()) / len(features)
    return DriftRun(time.perf_counter() - t0, features, share, share >= DRIFT_SHARE, {})


def _value_counts(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(values, x), minlength=values.size).astype(np.float64)


# --- the peers ----------------------------------------------------------------------------------


def import_peer(name: str) -> Any | None:
    """The peer's module, or None (and a line saying how to get it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "whylogs":
                import whylogs

                return whylogs
            import evidently

            return evidently
    except ImportError as error:
        print(f"{name} not installed: run make bench-peers ({error})")
        return None


EVIDENTLY_METHODS = {
    "Wasserstein distance (normed)": "wasserstein",
    "Jensen-Shannon distance": "jensenshannon",
    "K-S p_value": "ks",
    "chi-square p_value": "chisquare",
    "Z-test p_value": "z",
    "PSI": "psi",
}


def evidently_drift(reference: Any, current: Any) -> DriftRun:
    """``Report([DataDriftPreset()]).run(current, reference)`` and its decisions per column."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset(drift_share=DRIFT_SHARE)]).run(current, reference)
        result = snapshot.dict()
    seconds = time.perf_counter() - t0
    features: dict[str, Decision] = {}
    share = None
    for metric in result["metrics"]:
        config = metric["config"]
        kind = config.get("type", "")
        if kind.endswith("ValueDrift"):
            method, threshold, value = config["method"], config["threshold"], metric["value"]
            # Tests report a p-value (drift when small), distances a score (drift when large).
            drifted = value <= threshold if "p_value" in method else value >= threshold
            name = EVIDENTLY_METHODS.get(method, method)
            features[config["column"]] = Decision(name, float(value), bool(drifted))
        elif kind.endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
    return DriftRun(
        seconds, features, share, share is not None and share >= DRIFT_SHARE, {"report": seconds}
    )


# --- measurements ------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _rows(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def profiling(args: argparse.Namespace, whylogs: Any, pd: Any) -> dict[str, Any]:
    rows = args.profile_rows
    current = make_columns(rows, seed=1, drifted=False)
    reference = build_reference(make_columns(max(rows, 10_000), seed=2, drifted=False))
    frame: Any = None if whylogs is None else pd.DataFrame(current)
    print(f"\nprofiling: {_rows(rows)} rows x {len(FEATURES)} numeric features", flush=True)
    # Warm-up: first-call costs (imports, caches) are not what is compared.
    count_rows(new_engine(reference), {n: c[:2000] for n, c in current.items()}, args.batch_rows)
    if whylogs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whylogs.log(frame.head(2000))
    ours_s: list[float] = []
    peer_s: list[float] = []
    for _ in range(args.repeat):
        engine = new_engine(reference)
        t0 = time.perf_counter()
        count_rows(engine, current, args.batch_rows)
        ours_s.append(time.perf_counter() - t0)
        report = engine.report(MODEL)
        assert report is not None and report["totals"]["rows"] == rows
        assert report["dataset_drift"]["features"] == len(FEATURES), "drift was not evaluated"
        if whylogs is not None:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results = whylogs.log(frame)
            peer_s.append(time.perf_counter() - t0)
            columns = results.view().get_columns()
            assert len(columns) == len(FEATURES), sorted(columns)
    ours = rows / median(ours_s)
    print(
        f"  {'ours: Engine.observe_predictions, ' + str(args.batch_rows) + '-row batches':<50}"
        f"{_si(ours):>10} rows/s  ({median(ours_s):.3f} s; drift + quality bins, windows)"
    )
    summary: dict[str, Any] = {
        "rows": rows,
        "ours_rows_per_s": round(ours),
        "ours_runs_s": [round(s, 4) for s in ours_s],
    }
    if whylogs is not None:
        peer = rows / median(peer_s)
        ratio = ours / peer
        print(
            f"  {'whylogs ' + whylogs.__version__ + ': why.log(df)':<50}{_si(peer):>10} rows/s  ({median(peer_s):.3f} s)"
        )
        print(
            f"  ours / whylogs: {ratio:.1f}x (target >= {TARGET_PROFILING_RATIO:g}x: "
            f"{'met' if ratio >= TARGET_PROFILING_RATIO else 'NOT met'})"
        )
        summary.update(
            whylogs_rows_per_s=round(peer),
            whylogs_runs_s=[round(s, 4) for s in peer_s],
            ratio=round(ratio, 2),
            meets_target=ratio >= TARGET_PROFILING_RATIO,
        )
    if args.repeat > 1:
        runs = ", ".join(f"{s:.3f}" for s in ours_s)
        print(
            f"  runs (s): ours {runs}"
            + (f"; whylogs {', '.join(f'{s:.3f}' for s in peer_s)}" if peer_s else "")
        )
    return summary


def drift(args: argparse.Namespace, evidently: Any, pd: Any, rows: int) -> dict[str, Any]:
    reference = make_columns(rows, seed=10 + rows, drifted=False)
    current = make_columns(rows, seed=20 + rows, drifted=True)
    frames = None if evidently is None else (pd.DataFrame(reference), pd.DataFrame(current))
    label = f"{_rows(rows)} vs {_rows(rows)}"
    print(f"\ndrift: {label} rows x {len(FEATURES)} features", flush=True)
    # Warm-up on the first 2000 rows: first-call costs (imports, caches) are not compared.
    head = {name: column[:2000] for name, column in reference.items()}
    ours_drift(head, {name: column[:2000] for name, column in current.items()}, args.batch_rows)
    if frames is not None:
        evidently_drift(frames[0].head(2000), frames[1].head(2000))
    ours_runs: list[DriftRun] = []
    peer_runs: list[DriftRun] = []
    for i in range(args.repeat):
        # Alternate who goes first, so neither always runs on a warmer (or busier) machine.
        order = ("ours", "peer") if i % 2 == 0 else ("peer", "ours")
        for who in order:
            if who == "ours":
                ours_runs.append(ours_drift(reference, current, args.batch_rows))
            elif frames is not None:
                peer_runs.append(evidently_drift(frames[0], frames[1]))
    exact = exact_drift(reference, current)
    ours = min(ours_runs, key=lambda r: r.seconds)  # decisions are the same in every run
    ours_s = median([r.seconds for r in ours_runs])
    parts = {k: median([r.parts[k] for r in ours_runs]) for k in ours_runs[0].parts}
    print(
        f"  {'ours: reference + count + report':<44}{ours_s:>9.3f} s  (reference "
        f"{parts['reference']:.3f} s, count {parts['count']:.3f} s, report {parts['report']:.4f} s)"
    )
    print(
        f"  {'exact: scipy on the raw values':<44}{exact.seconds:>9.3f} s  (exact scores only, no report)"
    )
    summary: dict[str, Any] = {
        "rows": rows,
        "ours_s": round(ours_s, 4),
        "ours_parts_s": {k: round(v, 4) for k, v in parts.items()},
        "ours_runs_s": [round(r.seconds, 4) for r in ours_runs],
        "exact_s": round(exact.seconds, 4),
    }
    peer = peer_runs[0] if peer_runs else None
    if peer is not None:
        peer_s = median([r.seconds for r in peer_runs])
        ratio = peer_s / ours_s
        print(
            f"  {'evidently ' + evidently.__version__ + ': Report([DataDriftPreset()])':<44}"
            f"{peer_s:>9.3f} s"
        )
        print(
            f"  ours {ratio:.0f}x faster than evidently (target >= {TARGET_DRIFT_RATIO:g}x: "
            f"{'met' if ratio >= TARGET_DRIFT_RATIO else 'NOT met'})"
        )
        summary.update(
            evidently_s=round(peer_s, 4),
            evidently_runs_s=[round(r.seconds, 4) for r in peer_runs],
            ratio=round(ratio, 1),
            meets_target=ratio >= TARGET_DRIFT_RATIO,
        )
    summary.update(decisions_table(ours, peer, exact))
    return summary


def decisions_table(ours: DriftRun, peer: DriftRun | None, exact: DriftRun) -> dict[str, Any]:
    def cell(d: Decision | None) -> str:
        if d is None:
            return "-"
        score = "-" if d.score is None else f"{d.score:.3f}"
        return f"{d.method:<13} {score:>6} {'DRIFT' if d.drifted else 'no'}"

    header = f"  {'feature':<8}{'injected':<32}"
    if peer is not None:
        header += f"{'evidently':<28}"
    print(f"{header}{'ours':<28}{'exact':<28}{'agree' if peer is not None else ''}")
    agree_peer = agree_exact = agree_injected = 0
    for name in FEATURES:
        mine = ours.features[name]
        injected = INJECTED.get(name) or NEAR_MISS.get(name) or "-"
        row = f"  {name:<8}{injected:<32}"
        if peer is not None:
            theirs = peer.features.get(name)
            same = theirs is not None and theirs.drifted == mine.drifted
            agree_peer += same
            row += f"{cell(theirs):<28}"
        agree_exact += exact.features[name].drifted == mine.drifted
        agree_injected += (name in INJECTED) == mine.drifted
        row += f"{cell(mine):<28}{cell(exact.features[name]):<28}"
        if peer is not None:
            row += "yes" if same else "NO"
        print(row.rstrip())

    def dataset(run: DriftRun) -> str:
        share = "-" if run.share is None else f"{run.share:.2f}"
        return f"share {share} ({'DRIFT' if run.dataset_drifted else 'no'})"

    n = len(FEATURES)
    peer_part = "" if peer is None else f"evidently {dataset(peer)}, "
    print(
        f"  dataset drift (share >= {DRIFT_SHARE}): {peer_part}ours {dataset(ours)}, exact {dataset(exact)}"
    )
    pairs = [f"ours vs exact {agree_exact}/{n}", f"ours vs injected {agree_injected}/{n}"]
    if peer is not None:
        peer_injected = sum((name in INJECTED) == peer.features[name].drifted for name in FEATURES)
        pairs = [f"ours vs evidently {agree_peer}/{n}", *pairs]
        pairs.append(f"evidently vs injected {peer_injected}/{n}")
    print(f"  agreement on drifted or not: {', '.join(pairs)}")
    out: dict[str, Any] = {
        "agree_exact": agree_exact,
        "agree_injected": agree_injected,
        "features": n,
        "ours_dataset_share": ours.share,
    }
    if peer is not None:
        out.update(agree_evidently=agree_peer, evidently_dataset_share=peer.share)
    return out


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="run every measurement N times; medians")
    p.add_argument("--quick", action="store_true", help="20k profiling rows, 10k vs 10k, once")
    p.add_argument("--ours-only", action="store_true", help="our figures only, no peers")
    p.add_argument("--profile-rows", type=int, default=100_000, help="rows for profiling")
    p.add_argument("--sizes", default="10000,100000", help="rows per side for drift")
    p.add_argument("--batch-rows", type=int, default=1000, help="rows per batch for our engine")
    args = p.parse_args(argv)
    if args.quick:
        args.profile_rows, args.sizes, args.repeat = 20_000, "10000", 1
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if args.repeat < 1 or args.batch_rows < 1 or args.profile_rows < 1 or not args.sizes:
        p.error("--repeat, --batch-rows, --profile-rows and --sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()
    print(
        f"peers bench: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cpus, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"numpy {np.__version__}, repeat {args.repeat} (medians)",
        flush=True,
    )
    whylogs: Any = None
    evidently: Any = None
    pd: Any = None
    if args.ours_only:
        print("peers: skipped (--ours-only)")
    else:
        whylogs, evidently = import_peer("whylogs"), import_peer("evidently")
        if whylogs is not None or evidently is not None:
            pd = importlib.import_module("pandas")
    line: dict[str, Any] = {
        "bench": "peers",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "load": [round(x, 2) for x in load],
        "repeat": args.repeat,
        "versions": {
            "whylogs": None if whylogs is None else whylogs.__version__,
            "evidently": None if evidently is None else evidently.__version__,
            "pandas": None if pd is None else pd.__version__,
        },
        "profiling": profiling(args, whylogs, pd),
        "drift": [drift(args, evidently, pd, rows) for rows in args.sizes],
    }
    print(json.dumps(line))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
