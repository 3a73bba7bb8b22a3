"""How many devices one server holds: start it, enrol voiceprints, run a load-test ramp, print the tables.

    python -m benchmarks.capacity --models build/bench-models --ramp 10,20,30 --duration 60
    python -m benchmarks.capacity --models build/test-models/<hash> --ramp 100,200,300 --shape continuous

The server runs as its own process (`python -m asr_server serve` from `--checkout`, this tree by
default, so another commit's checkout can be measured with the same generator), on free loopback
ports, with `--set key=value` config overrides. Before the ramp, `--enroll` voiceprints are
registered through the HTTP API (so every utterance is embedded and matched, as on a box where
people are enrolled). The load generator runs here, on the same machine; the report states the
machine, the load average before and after the run, the traffic shape, and per step the latency table and
where the time went (the server's `stt` timings and its metrics: event-loop lag, speculations,
compute wasted).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

from loadtest.clips import DEFAULT_AUDIO_DIR
from loadtest.report import format_table, write_outputs
from loadtest.run import LoadOptions, run_load
from loadtest.wake import add_wake_arguments, run_wake

from .stages import machine

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(
    models: Path, ports: dict[str, int], overrides: list[str], db: Path, checkout: Path = ROOT
) -> dict[str, str]:
    """The server's configuration as `ASR_SERVER__*` variables: models, ports, overrides. The health
    listener takes a free port where `checkout` has one (older checkouts, measured with `--checkout`,
    do not know the key and would refuse to start)."""
    env = dict(os.environ)
    env.update(
        {
            "ASR_SERVER__ASR__MODEL_DIR": str(models / "SenseVoiceSmall"),
            "ASR_SERVER__SPEAKER__MODEL": str(models / "campplus" / "campplus.onnx"),
            "ASR_SERVER__SPEAKER__DB": str(db),
            "ASR_SERVER__XIAOZHI__HOST": "127.0.0.1",
            "ASR_SERVER__XIAOZHI__PORT": str(ports["xiaozhi"]),
            "ASR_SERVER__HTTP__HOST": "127.0.0.1",
            "ASR_SERVER__HTTP__PORT": str(ports["http"]),
            "ASR_SERVER__FUNASR__ENABLED": "false",
            "ASR_SERVER__LOG_LEVEL": "WARNING",
        }
    )
    if "health_port" in (checkout / "asr_server" / "config" / "sections.py").read_text(encoding="utf-8"):
        env["ASR_SERVER__HTTP__HEALTH_PORT"] = "0"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants key=value (e.g. asr.max_batch=1), got {item!r}")
        env["ASR_SERVER__" + "__".join(p.upper() for p in key.split("."))] = value
    return env


def cpu_list(text: str) -> set[int]:
    """`0-3,8` -> {0, 1, 2, 3, 8}: the `taskset -c` notation."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            cpus.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SystemExit(f"--server-cpus {text!r}: not a CPU list like 0-3 or 0,2") from None
    available = os.sched_getaffinity(0)
    if not cpus or not cpus < available:
        raise SystemExit(
            f"--server-cpus {text!r} must name some but not all of this machine's CPUs {sorted(available)}"
        )
    return cpus


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout_s:g} s")


def enroll(http_url: str, audio_dir: Path, count: int) -> int:
    """Register `count` voiceprints (speaker-0..), each from one of the shared clips."""
    clips = sorted(p for p in audio_dir.iterdir() if p.suffix in (".wav", ".flac"))
    done = 0
    for i in range(count):
        x, sr = sf.read(clips[i % len(clips)], dtype="float32", always_2d=True)
        buf = io.BytesIO()
        sf.write(buf, x.mean(axis=1), sr, format="WAV", subtype="PCM_16")
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="speaker_id"\r\n\r\nspeaker-{i}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                "Content-Type: audio/wav\r\n\r\n"
            ).encode()
            + buf.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        req = urllib.request.Request(
            http_url + "/voiceprint/register",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            done += int(json.loads(r.read()).get("success", False))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with SenseVoiceSmall/ and campplus/")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the source tree whose server runs")
    ap.add_argument("--ramp", default="5,10,20", help="client counts, comma-separated")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per step")
    ap.add_argument("--shape", choices=("continuous", "conversation", "wake"), default="continuous")
    ap.add_argument("--reply-ms", default="4000,10000", help="conversation, wake: how long each answer plays")
    add_wake_arguments(ap)
    ap.add_argument("--think-ms", default="1000,3000", help="pause between reply and next utterance")
    ap.add_argument("--enroll", type=int, default=3, help="voiceprints to register before the ramp (0: none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server config override")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO_DIR)
    ap.add_argument("--no-stop", action="store_true", help="run every step even after one fails")
    ap.add_argument(
        "--honor-retry-after", action="store_true", help="refused devices wait the 503's Retry-After, not 1 s"
    )
    ap.add_argument("--procs", type=int, default=1, help="load generator processes")
    ap.add_argument(
        "--server-cpus",
        default=None,
        metavar="LIST",
        help="pin the server to these CPUs (taskset notation, e.g. 0-3) and the load generator to the others, "
        "so the generator's work does not count against the server's cores",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy record the server into this SVG")
    ap.add_argument(
        "--relay",
        action="store_true",
        help="relay every device to a stub chatbot server (python -m loadtest.upstream) and time the first TTS audio",
    )
    args = ap.parse_args(argv)

    ports = {"xiaozhi": free_port(), "http": free_port()}
    work = Path(args.out or ROOT / "build" / "capacity" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "voiceprints.sqlite"
    db.unlink(missing_ok=True)
    server_cpus = cpu_list(args.server_cpus) if args.server_cpus else None
    generator_cpus = os.sched_getaffinity(0) - server_cpus if server_cpus else None
    stub = None
    if args.relay:
        ports["upstream"] = free_port()
        stub = subprocess.Popen(
            [sys.executable, "-m", "loadtest.upstream", "--port", str(ports["upstream"])],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, generator_cpus)) if generator_cpus else None,
        )
        args.set = [*args.set, f"upstream.url=ws://127.0.0.1:{ports['upstream']}/xiaozhi/v1/"]
    env = server_env(args.models.resolve(), ports, args.set, db, args.checkout)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.checkout.resolve()), env.get("PYTHONPATH")) if p)
    load1 = os.getloadavg()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asr_server", "serve"],
        cwd=args.checkout,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None,
    )
    if generator_cpus:
        os.sched_setaffinity(0, generator_cpus)
    spy = None
    try:
        http = f"http://127.0.0.1:{ports['http']}"
        wait_ready(http, proc)
        enrolled = enroll(http, args.audio, args.enroll) if args.enroll else 0
        if args.profile is not None:
            spy = subprocess.Popen(
                [
                    shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-p",
                    str(proc.pid),
                    "-o",
                    str(args.profile),
                    "-r",
                    "50",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        lo, _, hi = args.reply_ms.partition(",")
        tlo, _, thi = args.think_ms.partition(",")
        opts = LoadOptions(
            url=f"ws://127.0.0.1:{ports['xiaozhi']}/xiaozhi/v1/",
            clients=tuple(int(x) for x in args.ramp.split(",")),
            duration_s=args.duration,
            shape=args.shape,
            reply_ms=(float(lo), float(hi or lo)),
            think_ms=(float(tlo), float(thi or tlo)),
            audio_dir=args.audio,
            server_pid=proc.pid,
            metrics_url=http + "/metrics",
            stop_on_fail=not args.no_stop,
            procs=args.procs,
            relay=args.relay,
            honor_retry_after=args.honor_retry_after,
            wake_every_s=args.wake_every_s,
            idle_close_s=args.idle_close_s,
            group_wake=args.group_wake,
            turns=args.turns,
        )
        report = asyncio.run((run_wake if opts.shape == "wake" else run_load)(opts))
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=60)
        stop_server(proc)
        if stub is not None:
            stub.terminate()
            stub.wait(timeout=10)
        log.close()
    load2 = os.getloadavg()
    write_outputs(report, work, plot=False)
    print(
        f"machine: {machine()}; "
        f"load average before: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}, "
        f"after: {load2[0]:.2f} {load2[1]:.2f} {load2[2]:.2f}; "
        f"{datetime.now(UTC).isoformat(timespec='minutes')}"
    )
    print(
        f"server: {args.checkout} with {args.models}, overrides {args.set or 'none'}, {enrolled} voiceprints enrolled"
    )
    if server_cpus:
        print(f"server pinned to CPUs {args.server_cpus}; load generator on CPUs {sorted(os.sched_getaffinity(0))}")
    print(format_table(report))
    print(f"\noutputs in {work}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
