"""`asr-server serve`: every listener around one pipeline, until SIGINT/SIGTERM; with `--workers`,
that many processes on the same ports, supervised (`workers`)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..config import Config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the server (device WebSocket, HTTP API, FunASR-compatible socket)")
    p.add_argument("--host", default=None, help="override xiaozhi.host (the device socket)")
    p.add_argument("--port", type=int, default=None, help="override xiaozhi.port (the device socket)")
    p.add_argument(
        "--workers",
        default=None,
        help="front-end processes sharing the ports: a count or auto (one per core); default: the config's workers",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from ..app import serve_forever
    from ..workers import Supervisor, worker_count

    if args.host:
        cfg.xiaozhi.host = args.host
    if args.port is not None:
        cfg.xiaozhi.port = args.port
    count = worker_count(args.workers if args.workers is not None else cfg.workers)
    if count > 1:
        return Supervisor(cfg, count).run()
    asyncio.run(serve_forever(cfg))
    return 0
