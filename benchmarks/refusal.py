"""How fast a busy server answers a connect it refuses: the time from opening the TCP connection
to the HTTP 503 (or to the upgrade, when admitted), probed at a steady pace beside a load test.

A device the governor refuses should hear so at the upgrade, at once, not after its hello or its
first utterance. Run it against a server under load (`python -m loadtest`, or the server a
`benchmarks.capacity` run started: its log names the device port):

    python -m benchmarks.refusal --url ws://127.0.0.1:8000/xiaozhi/v1/ --every-s 0.25 --duration 60

An admitted probe closes at once (it says no hello), so it takes a session slot for milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from loadtest.report import _markdown_table
from loadtest.stats import percentile


async def probe(url: str) -> tuple[str, float]:
    """One connect: its outcome (`admitted`, `refused` for a 503, else the HTTP status or error
    name) and the milliseconds until the server's answer."""
    t0 = time.perf_counter()
    try:
        ws = await connect(url, open_timeout=10, additional_headers={"Device-Id": "refusal-probe"})
    except InvalidStatus as e:
        status = e.response.status_code
        return ("refused" if status == 503 else f"http {status}"), (time.perf_counter() - t0) * 1000
    except (OSError, TimeoutError) as e:
        return type(e).__name__, (time.perf_counter() - t0) * 1000
    ms = (time.perf_counter() - t0) * 1000
    await ws.close()
    return "admitted", ms


async def run(url: str, every_s: float, duration_s: float) -> dict[str, list[float]]:
    """Probe every `every_s` for `duration_s`, each probe on its own (a slow answer does not delay
    the next); the answer times by outcome."""
    tasks = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        tasks.append(asyncio.ensure_future(probe(url)))
        await asyncio.sleep(every_s)
    times: dict[str, list[float]] = {}
    for outcome, ms in await asyncio.gather(*tasks):
        times.setdefault(outcome, []).append(ms)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.refusal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the device endpoint, ws://host:port/xiaozhi/v1/")
    ap.add_argument("--every-s", type=float, default=0.25, help="seconds between probes")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of probing")
    args = ap.parse_args(argv)
    times = asyncio.run(run(args.url, args.every_s, args.duration))
    rows = [
        [outcome, str(len(ms)), *(f"{percentile(sorted(ms), q):.0f}" for q in (50, 95, 99)), f"{max(ms):.0f}"]
        for outcome, ms in sorted(times.items())
    ]
    print("\n".join(_markdown_table(["outcome", "probes", "ms p50", "ms p95", "ms p99", "ms max"], rows)))


if __name__ == "__main__":
    main()
