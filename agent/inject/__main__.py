"""``python -m agent.inject``: serve the sidecar-injection webhook over HTTPS.

    python -m agent.inject --listen 0.0.0.0:8443 --template template.json \\
        --tls-cert tls.crt --tls-key tls.key
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from agent.inject.server import InjectorServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.inject", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT")
    parser.add_argument("--template", type=Path, required=True, help="the chart's template.json")
    parser.add_argument("--tls-cert", type=Path, required=True)
    parser.add_argument("--tls-key", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        server = InjectorServer(args.listen, args.template, args.tls_cert, args.tls_key)
    except ValueError as error:
        print(f"mlsidecar injector: {error}", file=sys.stderr)
        return 2

    async def serve() -> None:
        await server.start()
        print(f"mlsidecar injector on https://{args.listen.rsplit(':', 1)[0]}:{server.port}/mutate",
              flush=True)  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
