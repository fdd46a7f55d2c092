"""The ``mlsidecar`` command.

    mlsidecar run --config mlsidecar.yaml          # the sidecar, until SIGTERM/SIGINT
    mlsidecar demo --speed 10                      # agent + demo model service + a story
    mlsidecar replay events.jsonl --target 127.0.0.1:4320
    mlsidecar health fraud-scorer                  # ask a running agent for a model's report
    mlsidecar health --probe                       # exit 0 only when the agent is serving
    mlsidecar config show --config mlsidecar.yaml  # effective config, secrets redacted
    mlsidecar config validate mlsidecar.yaml
    mlsidecar reference build train.csv -o ref.json --model churn --score-column score

Exit codes: 0 ok, 1 not healthy / not reachable, 2 bad usage or invalid config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent import __version__
from agent.config import Settings
from agent.telemetry.logs import configure_logging

EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


class ConfigError(Exception):
    """Invalid configuration; the message names every offending key."""


_KEY_PREFIX = re.compile(r"([A-Za-z_][\w-]*(?:\[\d+\])?(?:\.[\w-]+(?:\[\d+\])?)*): (.+)", re.S)


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # A section's own check names the key below the section: "rules.x.channels: ...".
        below = _KEY_PREFIX.match(message.removeprefix("Value error, "))
        if item["type"] == "value_error" and below:
            key = f"{key}.{below[1]}" if key else below[1]
            message = below[2]
        lines.append(f"  {key or '(top level)'}: {message}")
    return f"invalid configuration ({error.error_count()} error(s)):\n" + "\n".join(lines)


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    try:
        return Settings.load(path, **overrides)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
    except (FileNotFoundError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config: {error}") from None
    except ValueError as error:  # e.g. an unknown MLSIDECAR_* variable
        raise ConfigError(f"invalid configuration: {error}") from None


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "ingest_listen", None):
        overrides["ingest"] = {"listen": args.ingest_listen}
    if getattr(args, "api_listen", None):
        overrides["api"] = {"listen": args.api_listen}
    if getattr(args, "log_level", None):
        overrides["logging"] = {"level": args.log_level}
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, **_cli_overrides(args))
    configure_logging(settings.logging)
    asyncio.run(build_agent(settings).run_until_signalled())
    return 0


def build_agent(settings: Settings) -> Any:
    """The Agent, with problems found while building it (e.g. a bad reference file) as ConfigError."""
    from agent.app import Agent

    try:
        return Agent(settings)
    except ValueError as error:
        raise ConfigError(f"invalid configuration: {error}") from None


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    data = settings.redacted()
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from agent.references import load_reference_file

    settings = load_settings(args.file)
    for name, model in settings.models.items():
        if model.reference is not None:  # the file exists (checked); is it a reference for name?
            try:
                load_reference_file(model.reference, name, f"models.{name}.reference")
            except ValueError as error:
                raise ConfigError(f"invalid configuration: {error}") from None
    print(f"{args.file}: valid")
    return 0


def _api_get(settings: Settings, path: str, timeout: float) -> tuple[int, Any]:
    host, port = settings.api.host, settings.api.port
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.api.tls else "http"
    request = urllib.request.Request(f"{scheme}://{host}:{port}{path}")
    if settings.api.token is not None:
        request.add_header("Authorization", f"Bearer {settings.api.token.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"detail": body.decode(errors="replace")}


def cmd_health(args: argparse.Namespace) -> int:
    overrides = {"api": {"listen": args.api}} if args.api else {}
    settings = load_settings(args.config, **overrides)
    path = "/readyz"
    if args.model:
        path = f"/v1/models/{args.model}/health"
        if args.version:
            path += f"?version={args.version}"
    try:
        status, body = _api_get(settings, path, args.timeout)
    except (OSError, urllib.error.URLError) as error:
        if not args.probe:
            print(f"no agent answering at {settings.api.listen}: {error}", file=sys.stderr)
        return EXIT_UNHEALTHY
    if args.probe:
        return 0 if status == 200 else EXIT_UNHEALTHY
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else EXIT_UNHEALTHY


def _demo_settings(args: argparse.Namespace) -> Settings:
    from agent.demo.story import demo_settings

    overrides = _cli_overrides(args)
    # Without a Collector to send to, the demo exports nothing over OTLP (no retry noise);
    # /metrics and the health endpoint show everything. OTEL_* endpoints turn OTLP on.
    otlp_env = any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )
    overrides.setdefault("telemetry", {})["otlp"] = otlp_env
    overrides["telemetry"].setdefault("service_name", "fraud-scorer")
    if args.window is not None:
        overrides.setdefault("engine", {})["window_s"] = args.window
    if getattr(args, "proxy_listen", None):
        overrides["upstream"] = {"listen": args.proxy_listen}
    return demo_settings(load_settings(args.config, **overrides), speed=args.speed)


def _positive(value: float | None, flag: str) -> None:
    if value is not None and not (value > 0 and value < float("inf")):
        raise ConfigError(f"{flag}: must be a positive number, got {value:g}")


def _addresses(args: argparse.Namespace, *flags: str) -> None:
    from agent.config import split_host_port

    for flag in flags:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if value is not None:
            try:
                split_host_port(value)
            except ValueError as error:
                raise ConfigError(f"{flag}: {error}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo.story import DemoOptions, run_story

    for value, flag in ((args.speed, "--speed"), (args.duration, "--duration"),
                        (args.rate, "--rate"), (args.every, "--every")):  # fmt: skip
        _positive(value, flag)
    _addresses(args, "--model-listen", "--feature-store-listen", "--proxy-listen")
    settings = _demo_settings(args)
    configure_logging(settings.logging)
    options = DemoOptions(
        speed=args.speed,
        seed=args.seed,
        duration=args.duration,
        rate=args.rate,
        every=args.every,
        model_listen=args.model_listen,
        feature_store_listen=args.feature_store_listen,
    )
    return asyncio.run(run_story(settings, options))


def cmd_demo_model(args: argparse.Namespace) -> int:
    from agent.demo.parts import serve_model

    _addresses(args, "--listen", "--sidecar")
    configure_logging(load_settings(None).logging)
    return asyncio.run(serve_model(args))


def cmd_demo_feature_store(args: argparse.Namespace) -> int:
    from agent.demo.parts import serve_feature_store

    _addresses(args, "--listen")
    configure_logging(load_settings(None).logging)
    return asyncio.run(serve_feature_store(args))


def cmd_demo_traffic(args: argparse.Namespace) -> int:
    from agent.demo.parts import send_traffic

    for value, flag in ((args.speed, "--speed"), (args.duration, "--duration"),
                        (args.rate, "--rate")):  # fmt: skip
        _positive(value, flag)
    configure_logging(load_settings(None).logging)
    return asyncio.run(send_traffic(args))


def cmd_replay(args: argparse.Namespace) -> int:
    from agent.replay import ReplayError, replay_file

    try:
        return replay_file(args)
    except ReplayError as error:
        raise ConfigError(str(error)) from None


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Rows of a .csv (header line), .jsonl (one object per line) or .parquet
    (with pyarrow: ``pip install 'mlsidecar[parquet]'``) training-data file."""
    import csv

    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    try:
        if suffix == ".csv":
            with path.open(newline="") as handle:
                return [
                    {k: (None if v == "" else v) for k, v in row.items()}
                    for row in csv.DictReader(handle)
                ]
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            with path.open() as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"line {number}: expected a JSON object")
                        rows.append(row)
            return rows
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {str(path)!r}: {error}") from None
    raise ConfigError(f"{str(path)!r}: expected a .csv, .jsonl or .parquet file")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ConfigError(
            f"{str(path)!r}: reading Parquet needs pyarrow: pip install 'mlsidecar[parquet]'"
        ) from None
    try:
        rows: list[dict[str, Any]] = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"cannot read {str(path)!r}: {error}") from None
    return rows


def _column(values: list[Any]) -> list[Any]:
    """CSV gives strings: a column whose present values all parse as numbers is numeric."""
    present = [v for v in values if v is not None]
    try:
        return [None if v is None else float(v) for v in values] if present else values
    except (TypeError, ValueError):
        return [None if v is None else str(v) for v in values]


def cmd_reference_build(args: argparse.Namespace) -> int:
    from agent.references import References

    rows = read_samples(args.data)
    if not rows:
        raise ConfigError(f"{str(args.data)!r} holds no rows")
    names = list(dict.fromkeys(k for row in rows for k in row))
    special = {args.score_column, args.label_column} - {None}
    missing = sorted(special - set(names))
    if missing:
        raise ConfigError(f"--score-column/--label-column: no column {missing[0]!r} in the data")
    document: dict[str, Any] = {
        "features": {
            name: _column([row.get(name) for row in rows])
            for name in names
            if name not in special and name not in args.exclude
        }
    }
    if args.score_column:
        document["scores"] = _column([row.get(args.score_column) for row in rows])
    if args.label_column:
        document["labels"] = [
            None if row.get(args.label_column) is None else str(row[args.label_column])
            for row in rows
        ]
    settings = load_settings(args.config)
    try:
        profile = References(settings).from_document(
            args.model, args.version, document, now_unix_nano=time.time_ns()
        )
    except ValueError as error:
        raise ConfigError(f"cannot build a reference: {error}") from None
    profile = dataclasses.replace(profile, source="file")
    args.output.write_text(json.dumps(profile.to_dict(), indent=1, allow_nan=False) + "\n")
    print(
        f"{args.output}: reference {profile.id} for {args.model!r}: {profile.rows} rows, "
        f"{len(profile.features)} features"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsidecar", description="Monitoring sidecar for ML model services."
    )
    parser.add_argument("--version", action="version", version=f"mlsidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config", "-c", type=Path, default=os.environ.get("MLSIDECAR_CONFIG") or None,
            help="YAML config file (default: $MLSIDECAR_CONFIG, else built-in defaults)",
        )  # fmt: skip

    def with_listeners(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--ingest-listen", metavar="HOST:PORT", help="gRPC ingest address")
        sub.add_argument("--api-listen", metavar="HOST:PORT", help="admin HTTP API address")
        sub.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    run = commands.add_parser("run", help="run the sidecar until SIGTERM/SIGINT")
    with_config(run)
    with_listeners(run)
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser(
        "demo", help="the agent, a demo model service, its feature store and a story of traffic"
    )
    with_config(demo)
    with_listeners(demo)
    demo.add_argument(
        "--duration", type=float, help="stop after this many seconds (default: the whole story)"
    )
    demo.add_argument(
        "--speed", type=float, default=1.0, help="story time per second (10: 300 s story in 30 s)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the traffic")
    demo.add_argument(
        "--rate", type=float, default=50.0, help="transactions per story second (default 50)"
    )
    demo.add_argument(
        "--every", type=float, help="seconds between summary lines (default: 5/speed, 1 to 5)"
    )
    demo.add_argument(
        "--window", type=float, help="engine window, seconds (default: config, else 20/speed)"
    )
    demo.add_argument("--model-listen", default="127.0.0.1:0", metavar="HOST:PORT",
                      help="demo model service address (default: a free port)")  # fmt: skip
    demo.add_argument("--feature-store-listen", default="127.0.0.1:0", metavar="HOST:PORT",
                      help="demo feature store address (default: a free port)")  # fmt: skip
    demo.add_argument("--proxy-listen", metavar="HOST:PORT",
                      help="egress proxy address (default: config, else a free port)")  # fmt: skip
    demo.set_defaults(handler=cmd_demo)

    from agent.demo.parts import add_part_commands

    add_part_commands(
        commands,
        model=cmd_demo_model,
        traffic=cmd_demo_traffic,
        feature_store=cmd_demo_feature_store,
    )

    replay = commands.add_parser(
        "replay", help="submit predictions/outcomes from a .jsonl or .csv file to an agent"
    )
    from agent.replay import add_replay_arguments

    add_replay_arguments(replay)
    replay.set_defaults(handler=cmd_replay)

    health = commands.add_parser("health", help="ask a running agent how it and a model are")
    with_config(health)
    health.add_argument("model", nargs="?", help="model name (default: the agent's readiness)")
    health.add_argument("--version", dest="version", help="model version (default: latest)")
    health.add_argument("--api", metavar="HOST:PORT", help="admin API address (default: config)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.add_argument(
        "--probe", action="store_true", help="print nothing; exit 0 only when ready (exec probes)"
    )
    health.set_defaults(handler=cmd_health)

    reference = commands.add_parser("reference", help="build reference profiles")
    reference_commands = reference.add_subparsers(
        dest="reference_command", required=True, metavar="ACTION"
    )
    build = reference_commands.add_parser(
        "build", help="profile a training-data file (.csv, .jsonl, .parquet) into a reference file"
    )
    with_config(build)
    build.add_argument(
        "data", type=Path, help="training data: .csv with a header, .jsonl, or .parquet"
    )
    build.add_argument("-o", "--output", type=Path, required=True, help="reference file to write")
    build.add_argument("--model", required=True, help="the model the reference is for")
    build.add_argument("--version", default="", help="model version (default: any)")
    build.add_argument("--score-column", help="column holding the model's score")
    build.add_argument("--label-column", help="column holding the predicted class")
    build.add_argument(
        "--exclude", action="append", default=[], help="column to leave out (repeatable)"
    )
    build.set_defaults(handler=cmd_reference_build)

    config = commands.add_parser("config", help="show or validate configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the effective config, secrets redacted")
    with_config(show)
    show.add_argument("--format", choices=["yaml", "json"], default="yaml")
    show.set_defaults(handler=cmd_config_show)
    validate = config_commands.add_parser("validate", help="check a config file")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=cmd_config_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"mlsidecar: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `mlsidecar health m | head`: the reader left, not an error
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stops the exit-time flush failing
        return 0
    except OSError as error:  # e.g. address already in use
        print(f"mlsidecar: {error}", file=sys.stderr)
        return EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
