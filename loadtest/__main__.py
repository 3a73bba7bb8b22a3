"""Command line: `python -m loadtest --url ws://HOST:PORT/xiaozhi/v1/ --clients N --duration 60`.

See docs/loadtest.md. Exit status: 0 when at least one step ran within budget (the capacity, or
with `--shape wake` the devices per box, is known), 1 when none did, 2 on bad options or
unreadable audio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

from .clips import DEFAULT_AUDIO_DIR, ClipError
from .report import Progress, format_progress, format_table, write_outputs
from .run import LoadOptions, OptionsError, default_out_dir, run_load
from .wake import add_wake_arguments, run_wake


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one client count")
    return vals


def _range_ms(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lo = float(parts[0])
        hi = float(parts[1]) if len(parts) > 1 else lo
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN[,MAX] in ms, got {text!r}") from None
    return lo, hi


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Simulated xiaozhi devices sending real Opus speech at real-time pace; reports "
        "end-of-speech -> stt latency per client count.",
    )
    ap.add_argument("--url", default="ws://127.0.0.1:8000/xiaozhi/v1/", help="server WebSocket URL")
    ap.add_argument("--clients", type=int, default=10, help="simultaneous devices (one step)")
    ap.add_argument(
        "--ramp",
        type=_int_list,
        default=None,
        metavar="N,N,...",
        help="run one step per client count, e.g. 5,10,20,40,80 (overrides --clients)",
    )
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of speech per step")
    ap.add_argument("--token", default=None, help="bearer token (sent as Authorization)")
    ap.add_argument("--protocol-version", type=int, choices=(1, 2, 3), default=1)
    ap.add_argument(
        "--mode",
        choices=("auto", "manual", "realtime"),
        default="auto",
        help="auto/realtime: trailing silence until the server endpoints; manual: listen stop",
    )
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO_DIR, help="folder of .wav/.flac clips")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--procs", type=int, default=1, help="generator processes sharing the clients")
    ap.add_argument("--frame-ms", type=int, choices=(10, 20, 40, 60), default=60)
    ap.add_argument(
        "--think-ms",
        type=_range_ms,
        default=(1000.0, 3000.0),
        metavar="MIN[,MAX]",
        help="pause between a reply and the next utterance",
    )
    ap.add_argument(
        "--relay",
        action="store_true",
        help="the server relays devices to an upstream chatbot server (upstream.url): also time end of speech "
        "to the first TTS audio frame at the device",
    )
    ap.add_argument(
        "--shape",
        choices=("continuous", "conversation", "wake"),
        default="continuous",
        help="continuous: the microphone streams through every pause; conversation: after each reply the "
        "device sends nothing while the answer plays (--reply-ms), then listens again, as the firmware does; "
        "wake: devices connect when woken, talk 1-N turns, close when idle, never retry a refused connect",
    )
    ap.add_argument(
        "--reply-ms",
        type=_range_ms,
        default=(4000.0, 10000.0),
        metavar="MIN[,MAX]",
        help="conversation and wake shapes: how long each answer plays (the device's microphone is off)",
    )
    add_wake_arguments(ap)
    ap.add_argument(
        "--stagger",
        type=float,
        default=None,
        help="seconds over which clients start "
        "(default 5, longer beyond 200 connections a second, at most a quarter of --duration)",
    )
    ap.add_argument(
        "--reply-timeout",
        type=float,
        default=10.0,
        help="seconds after end of speech before an utterance counts as missing",
    )
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--retry", type=float, default=1.0, help="seconds before reconnecting after a refusal or drop")
    ap.add_argument(
        "--honor-retry-after",
        action="store_true",
        help="after a 503 with Retry-After, wait what it says instead of --retry (off by default)",
    )
    ap.add_argument("--hello-timeout", type=float, default=10.0)
    ap.add_argument(
        "--server-silence-ms",
        type=float,
        default=400.0,
        help="the server's end-of-speech silence, subtracted to get its processing time",
    )
    ap.add_argument("--budget-ms", type=float, default=800.0, help="p95 latency budget of a step")
    ap.add_argument(
        "--lateness-budget-ms",
        type=float,
        default=20.0,
        help="frame send lateness p99 under which the generator is on time",
    )
    ap.add_argument(
        "--auth-in-query",
        action="store_true",
        help="pass device-id, client-id, authorization as query parameters, not headers",
    )
    ap.add_argument("--wake-word", default=None, help="send listen detect with this text before listening")
    ap.add_argument("--server-pid", type=int, default=None, help="read the server's CPU and RSS from /proc")
    ap.add_argument(
        "--metrics-url",
        default=None,
        help="the server's Prometheus endpoint (e.g. http://127.0.0.1:8080/metrics): CPU and RSS when no "
        "--server-pid, and per step the event-loop lag, speculation outcomes and wasted compute",
    )
    ap.add_argument("--step-pause", type=float, default=2.0, help="seconds between ramp steps")
    ap.add_argument("--no-stop", action="store_true", help="run every ramp step even after one fails")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default loadtest-results/<time>/)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument(
        "--sink",
        action="store_true",
        help="measure the generator alone: start a local sink server (python -m loadtest.sink) "
        "and send to it instead of --url",
    )
    ap.add_argument("--sink-procs", type=int, default=1, help="processes of that sink server")
    return ap


class _ProgressPrinter:
    """One line rewritten in place on a terminal, a line every 10 s otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        line = format_progress(p)
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
        elif time.monotonic() - self.last >= 10.0:
            sys.stderr.write(line + "\n")
            self.last = time.monotonic()
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _start_sink(procs: int, bound_s: float) -> tuple[subprocess.Popen[str], str]:
    port = "0"
    if procs > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtest.sink",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--duration",
            str(bound_s),
            "--procs",
            str(procs),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("sink listening on "):
        proc.kill()
        raise RuntimeError(f"the sink server did not start: {line!r}")
    return proc, line.removeprefix("sink listening on ")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sink = None
    url = args.url
    try:
        opts = LoadOptions(
            url=url,
            clients=args.ramp or (args.clients,),
            duration_s=args.duration,
            mode=args.mode,
            protocol_version=args.protocol_version,
            token=args.token,
            auth_in_query=args.auth_in_query,
            audio_dir=args.audio,
            seed=args.seed,
            procs=args.procs,
            frame_ms=args.frame_ms,
            think_ms=args.think_ms,
            shape=args.shape,
            relay=args.relay,
            reply_ms=args.reply_ms,
            wake_every_s=args.wake_every_s,
            idle_close_s=args.idle_close_s,
            group_wake=args.group_wake,
            turns=args.turns,
            stagger_s=args.stagger,
            reply_timeout_s=args.reply_timeout,
            connect_timeout_s=args.connect_timeout,
            hello_timeout_s=args.hello_timeout,
            retry_s=args.retry,
            honor_retry_after=args.honor_retry_after,
            server_silence_ms=args.server_silence_ms,
            budget_ms=args.budget_ms,
            lateness_budget_ms=args.lateness_budget_ms,
            expect_replies=not args.sink,
            wake_word=args.wake_word,
            server_pid=args.server_pid,
            metrics_url=args.metrics_url,
            step_pause_s=args.step_pause,
            stop_on_fail=not args.no_stop,
        )
    except OptionsError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    if args.sink:
        bound = len(opts.clients) * (opts.step_bound_s + opts.step_pause_s + 5.0) + 30.0
        sink, url = _start_sink(args.sink_procs, bound)
        opts = dataclasses.replace(opts, url=url, server_pid=opts.server_pid or sink.pid)
        print(f"sink mode: sending to the local sink at {url} (pid {sink.pid})", file=sys.stderr)
    printer = None if args.quiet else _ProgressPrinter()
    try:
        report = asyncio.run((run_wake if opts.shape == "wake" else run_load)(opts, on_progress=printer))
    except (ClipError, OptionsError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nloadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if printer is not None:
            printer.end()
        if sink is not None:
            sink.terminate()
            try:
                sink.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait(timeout=5)
            if sink.stdout is not None:
                sink.stdout.close()
    out = args.out or default_out_dir()
    files, skipped = write_outputs(report, out, plot=not args.no_plot)
    print(format_table(report))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    if skipped and not args.no_plot:
        print(f"note: {skipped}", file=sys.stderr)
    return 0 if report.capacity is not None else 1


if __name__ == "__main__":
    sys.exit(main())
