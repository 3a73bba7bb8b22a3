"""`asr-server` command line: serve, transcribe files offline, manage voiceprints and models.

Every error a user can cause (a bad key in config.yaml, a missing model file, an unreachable hub)
is an `AsrServerError`: it is printed as one line naming the cause and the command exits 2; the
traceback goes to the log at DEBUG.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import Config, load_config
from ..errors import AsrServerError
from ..logs import setup_logging

DEFAULT_CONFIG = Path("config.yaml")

log = logging.getLogger("asr_server")


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    cfg = load_config(path)
    if args.log_level:
        cfg.log_level = args.log_level
    return cfg


def build_parser() -> argparse.ArgumentParser:
    from . import models, serve, speakers, transcribe

    parser = argparse.ArgumentParser(prog="asr-server", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="config file (default: ./config.yaml when present; env ASR_SERVER__* overrides)",
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    transcribe.add_parser(sub)
    speakers.add_parser(sub)
    models.add_parser(sub)
    for command in sub.choices.values():  # `asr-server serve --config FILE` works as well as before it
        command.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="as before the command")
        command.add_argument(
            "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=argparse.SUPPRESS, help="as before"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _load(args)
    except AsrServerError as e:
        print(f"asr-server: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    for line in cfg.deprecations:
        log.warning("config: %s", line)
    try:
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        return 130
    except AsrServerError as e:  # a named, one-line error for the operator; the traceback at DEBUG
        log.debug("%s failed", args.command, exc_info=True)
        print(f"asr-server: {e}", file=sys.stderr)
        return 2
