"""Slowloris against a real server: thousands of sockets that trickle headers, while probes check
that every port still answers.

    python -m benchmarks.slowloris --models build/test-models/<hash> --sockets 5000 --duration 40

Starts `asr-server serve` (tiny models are enough: the target is the sockets, not the models) on
free loopback ports, with the shipped limits (`http.max_connections`, `http.max_connections_per_ip`,
`http.header_timeout_s`, `xiaozhi.max_sessions` counted from the upgrade, websockets'
opening-handshake timeout). Then it opens `--sockets` connections from `--source` (127.0.0.2)
spread over `--ports`, each sending a request line and then one header line every `--trickle-s`
seconds, never finishing; one probe per port and second checks that a real client from 127.0.0.1
still gets through (HTTP `GET /healthz`, a device `hello` answered, a FunASR connection opened),
each within 5 s.

It prints, per attacked port: sockets opened, refused at connect, closed by the server and how long
they lived; per probed port: the share of probes answered; and the server's file descriptors,
threads and RSS before, at their peak and after. A server that holds is: every probe answered,
every attacking socket closed by the server within its timeout, fds back to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from websockets.asyncio.client import connect

from .capacity import free_port, server_env, stop_server, wait_ready
from .stages import machine

ROOT = Path(__file__).resolve().parent.parent
PORTS = ("http", "xiaozhi", "funasr")


@dataclass
class Attack:
    """What the attacking sockets of one port met."""

    opened: int = 0
    refused: int = 0
    closed_by_server: int = 0
    lifetimes: list[float] = field(default_factory=list)


@dataclass
class Probe:
    tried: int = 0
    answered: int = 0


@dataclass
class Usage:
    fds: int
    threads: int
    rss_mb: float


def usage(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    threads = re.search(r"Threads:\s+(\d+)", status)
    return Usage(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(threads.group(1)) if threads else 0,
        rss_mb=int(rss.group(1)) / 1024 if rss else float("nan"),
    )


async def slow_socket(port: int, path: str, source: str, trickle_s: float, until: float, result: Attack) -> None:
    """One slowloris client: a request line, then a header line now and then, never the blank line."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        result.refused += 1
        return
    result.opened += 1
    start = time.monotonic()
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        await writer.drain()
        i = 0
        while time.monotonic() < until:
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=trickle_s)
            except TimeoutError:
                writer.write(f"X-Slow-{i}: {'a' * 8}\r\n".encode())
                await writer.drain()
                i += 1
                continue
            if not data:  # the server closed it
                result.closed_by_server += 1
                result.lifetimes.append(time.monotonic() - start)
                return
    except (ConnectionError, OSError):
        result.closed_by_server += 1
        result.lifetimes.append(time.monotonic() - start)
        return
    finally:
        writer.close()


async def probe_http(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(url + "/healthz") as r:
                return r.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def probe_device(url: str) -> bool:
    hello = {"type": "hello", "version": 1, "transport": "websocket", "audio_params": {"format": "opus"}}
    try:
        async with asyncio.timeout(5):
            async with connect(url, additional_headers={"Device-Id": "probe", "Client-Id": "probe"}) as ws:
                await ws.send(json.dumps(hello))
                return json.loads(await ws.recv()).get("type") == "hello"
    except (OSError, TimeoutError, ValueError, Exception):  # any failure is a missed probe
        return False


async def probe_funasr(url: str) -> bool:
    try:
        async with asyncio.timeout(5):
            async with connect(url):
                return True
    except (OSError, TimeoutError, Exception):
        return False


async def attack(args: argparse.Namespace, ports: dict[str, int], pid: int) -> tuple[dict, dict, Usage]:
    targets = [p for p in args.ports.split(",") if p]
    paths = {"http": "/healthz", "xiaozhi": "/xiaozhi/v1/", "funasr": "/"}
    results = {t: Attack() for t in targets}
    probes = {t: Probe() for t in PORTS}
    urls = {
        "http": f"http://127.0.0.1:{ports['http']}",
        "xiaozhi": f"ws://127.0.0.1:{ports['xiaozhi']}/xiaozhi/v1/",
        "funasr": f"ws://127.0.0.1:{ports['funasr']}/",
    }
    probe_fns = {"http": probe_http, "xiaozhi": probe_device, "funasr": probe_funasr}
    until = time.monotonic() + args.duration
    peak = usage(pid)
    tasks = []
    for i in range(args.sockets):  # opened in steps so the accept queue is not the test
        t = targets[i % len(targets)]
        tasks.append(
            asyncio.create_task(slow_socket(ports[t], paths[t], args.source, args.trickle_s, until, results[t]))
        )
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    while time.monotonic() < until:
        tick = time.monotonic()
        answers = await asyncio.gather(*(probe_fns[t](urls[t]) for t in PORTS))
        for t, ok in zip(PORTS, answers):
            probes[t].tried += 1
            probes[t].answered += int(ok)
        u = usage(pid)
        peak = Usage(max(peak.fds, u.fds), max(peak.threads, u.threads), max(peak.rss_mb, u.rss_mb))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    await asyncio.gather(*tasks)
    return results, probes, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.slowloris", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with SenseVoiceSmall/ and campplus/")
    ap.add_argument("--sockets", type=int, default=5000)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds the attack lasts")
    ap.add_argument("--trickle-s", type=float, default=5.0, help="seconds between header lines")
    ap.add_argument("--ports", default="http,xiaozhi,funasr", help="ports attacked, comma-separated")
    ap.add_argument(
        "--source",
        default="127.0.0.2",
        help="the attacker's loopback address (the probes come from 127.0.0.1, as other clients would)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server config override")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    work = Path(args.out or ROOT / "build" / "slowloris" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    ports = {p: free_port() for p in PORTS}
    env = server_env(args.models.resolve(), ports, args.set, work / "voiceprints.sqlite")
    env.update(
        {
            "ASR_SERVER__FUNASR__ENABLED": "true",
            "ASR_SERVER__FUNASR__HOST": "127.0.0.1",
            "ASR_SERVER__FUNASR__PORT": str(ports["funasr"]),
            "ASR_SERVER__FUNASR__TLS": "off",
            "ASR_SERVER__LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
    )
    log_path = work / "server.log"
    load = os.getloadavg()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "asr_server", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(f"http://127.0.0.1:{ports['http']}", proc)
            before = usage(proc.pid)
            results, probes, peak = asyncio.run(attack(args, ports, proc.pid))
            time.sleep(3)  # the server's own closes settle
            alive = proc.poll() is None
            after = usage(proc.pid) if alive else Usage(-1, -1, float("nan"))
        finally:
            stop_server(proc)
    text = log_path.read_text(errors="replace")
    print(f"machine: {machine()}; load average before: {load[0]:.2f}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"{args.sockets} sockets from {args.source} over {args.ports}, a header line every {args.trickle_s:g} s,"
        f" {args.duration:g} s; overrides {args.set or 'none'}\n"
    )
    print("| attacked port | opened | refused at connect | closed by the server | lifetime p50 / max s | left open |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for t, r in results.items():
        life = f"{statistics.median(r.lifetimes):.1f} / {max(r.lifetimes):.1f}" if r.lifetimes else "-"
        print(f"| {t} | {r.opened} | {r.refused} | {r.closed_by_server} | {life} | {r.opened - r.closed_by_server} |")
    print("\n| probed port | probes answered |")
    print("| --- | ---: |")
    for t, p in probes.items():
        print(f"| {t} | {p.answered} / {p.tried} |")
    print("\n| server | before | peak | after |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| file descriptors | {before.fds} | {peak.fds} | {after.fds} |")
    print(f"| threads | {before.threads} | {peak.threads} | {after.threads} |")
    print(f"| RSS MB | {before.rss_mb:.0f} | {peak.rss_mb:.0f} | {after.rss_mb:.0f} |")
    print(f"\nserver alive: {'yes' if alive else 'NO'}; tracebacks in its log: {text.count('Traceback')}")
    print(f"server log: {log_path}")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
