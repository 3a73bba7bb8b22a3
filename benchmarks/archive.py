"""What keeping what was said costs: the archive off against on, interleaved in one run.

    python -m benchmarks.archive --models build/test-models/<hash> --audio ../shared/audio --clients 40 --rounds 2 --duration 30

Two servers run side by side as processes (the same tree, the same models): one with
`archive.enabled: false`, one with it on (a temporary directory). Each round runs the same
load-test step (`--clients` devices talking continuously for `--duration` seconds) against one,
then the other, the order alternating per round, so drifts in the shared machine's load fall on
both arms. Per step: the server process's CPU, the end-of-speech → `stt` latency p95 and the
utterances answered; at the end, what the archive holds: audio bytes and database bytes per
minute of speech kept, and what its writer thread spent per utterance (`asr_archive_cpu_seconds`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from loadtest.clips import DEFAULT_AUDIO_DIR, load_clips
from loadtest.probe import fetch_series
from loadtest.run import LoadOptions, run_step

from .capacity import ROOT, free_port, server_env, stop_server, wait_ready
from .stages import machine


def start(models: Path, overrides: list[str], work: Path, name: str) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = {"xiaozhi": free_port(), "http": free_port()}
    env = server_env(models, ports, [*overrides, "funasr.enabled=false"], work / f"{name}-voiceprints.sqlite")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log = open(work / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "asr_server", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log)
    wait_ready(f"http://127.0.0.1:{ports['http']}", proc)
    return proc, ports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.archive", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with SenseVoiceSmall/ and campplus/")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO_DIR)
    ap.add_argument("--clients", type=int, default=40, help="devices talking at once (near the box's capacity)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per step")
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs, the order alternating")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="archive-bench-"))
    archive_dir = work / "archive"
    load1 = os.getloadavg()
    clips = load_clips(args.audio)
    models = args.models.resolve()
    servers = {
        "off": start(models, [*args.set, "archive.enabled=false"], work, "off"),
        "on": start(models, [*args.set, "archive.enabled=true", f"archive.dir={archive_dir}"], work, "on"),
    }
    rows: dict[str, list[tuple[float, float, int, int]]] = {"off": [], "on": []}
    try:
        for r in range(args.rounds):
            for arm in ("off", "on") if r % 2 == 0 else ("on", "off"):
                proc, ports = servers[arm]
                opts = LoadOptions(
                    url=f"ws://127.0.0.1:{ports['xiaozhi']}/xiaozhi/v1/",
                    clients=args.clients,
                    duration_s=args.duration,
                    audio_dir=args.audio,
                    server_pid=proc.pid,
                    seed=r,
                )
                stats = asyncio.run(run_step(opts, clips, args.clients)).stats
                row = (stats.server_cpu_percent or 0.0, stats.latency.p95 or 0.0, stats.answered, stats.utterances)
                rows[arm].append(row)
                print(f"round {r + 1} {arm:>3}: cpu {row[0]:.0f} %, p95 {row[1]:.0f} ms, {row[2]}/{row[3]} answered")
        metrics = fetch_series(f"http://127.0.0.1:{servers['on'][1]['http']}/metrics", 10)
        writer_s = metrics.get("asr_archive_cpu_seconds_total", 0.0)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    db = archive_dir / "archive.sqlite"
    with sqlite3.connect(db) as c:
        kept, audio_ms, audio_bytes = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(audio_ms), 0), COALESCE(SUM(audio_bytes), 0) FROM utterances"
        ).fetchone()
    db_bytes = sum(p.stat().st_size for p in archive_dir.glob("archive.sqlite*"))
    minutes = audio_ms / 60000 or float("nan")
    load2 = os.getloadavg()
    print(
        f"\nmachine: {machine()}; {datetime.now(UTC).isoformat(timespec='minutes')}; load average before "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}, after {load2[0]:.2f} {load2[1]:.2f} {load2[2]:.2f}"
    )
    print(f"{args.clients} devices, {args.duration:g} s steps, {args.rounds} rounds; models {args.models}\n")
    print("| archive | server CPU % (mean of steps) | latency p95 ms (mean of steps) | answered / utterances |")
    print("|---|---|---|---|")
    for arm in ("off", "on"):
        cpu = sum(x[0] for x in rows[arm]) / len(rows[arm])
        p95 = sum(x[1] for x in rows[arm]) / len(rows[arm])
        print(f"| {arm} | {cpu:.0f} | {p95:.0f} | {sum(x[2] for x in rows[arm])} / {sum(x[3] for x in rows[arm])} |")
    print(
        f"\nkept {kept} utterances, {audio_ms / 1000:.0f} s of speech: audio {audio_bytes / minutes / 1024:.0f} KiB "
        f"and database {db_bytes / minutes / 1024:.1f} KiB per minute of speech; writer thread "
        f"{writer_s * 1000 / max(kept, 1):.2f} ms CPU per utterance ({writer_s:.2f} s in all)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
