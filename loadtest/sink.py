"""A xiaozhi server that answers `hello` and otherwise only receives: the generator's yardstick.

Against it the load test measures its own ceiling, how many clients one process keeps on time
(frame send lateness p99 under 20 ms), with no recogniser in the way.

    python -m loadtest.sink --port 8765 [--host 127.0.0.1] [--duration 120] [--procs 2]

prints `sink listening on ws://HOST:PORT/xiaozhi/v1/` once ready, its counters every few seconds
on stderr, and stops on SIGINT/SIGTERM or after `--duration` seconds. With `--procs N` that many
processes share the port (SO_REUSEPORT), so the sink is never what runs out of CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import sys
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from asr_server.adapters.xiaozhi.wire import server_hello

SINK_PATH = "/xiaozhi/v1/"


@dataclass(slots=True)
class SinkStats:
    connections: int = 0
    open: int = 0
    frames: int = 0
    bytes: int = 0
    texts: int = 0


class Sink:
    """`async with Sink() as sink:` serves on `sink.url` until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> None:
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.stats = SinkStats()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{SINK_PATH}"

    async def _handle(self, ws: ServerConnection) -> None:
        st = self.stats
        st.connections += 1
        st.open += 1
        session_id = uuid.uuid4().hex
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    st.frames += 1
                    st.bytes += len(msg)
                    continue
                st.texts += 1
                try:
                    data: Any = json.loads(msg)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("type") == "hello":
                    params = data.get("audio_params") if isinstance(data.get("audio_params"), dict) else {}
                    await ws.send(json.dumps(server_hello(session_id, params)))
        except ConnectionClosed:
            pass
        finally:
            st.open -= 1

    async def start(self) -> str:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            compression=None,
            ping_interval=None,
            max_size=1 << 16,
            reuse_port=self.reuse_port or None,
            backlog=2048,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _serve(
    host: str, port: int, duration: float | None, reuse_port: bool, announce: bool, report_every_s: float = 5.0
) -> SinkStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Sink(host, port, reuse_port) as sink:
        if announce:
            print(f"sink listening on {sink.url}", flush=True)

        async def report() -> None:
            while True:
                await asyncio.sleep(report_every_s)
                print(f"sink: {sink.stats.open} open, {sink.stats.frames} frames", file=sys.stderr, flush=True)

        reporter = loop.create_task(report())
        try:
            await asyncio.wait_for(stop.wait(), duration)
        except TimeoutError:
            pass
        finally:
            reporter.cancel()
        return sink.stats


def _worker(host: str, port: int, duration: float | None) -> None:
    asyncio.run(_serve(host, port, duration, reuse_port=True, announce=False, report_every_s=3600.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.sink", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765, help="0 picks a free port (single process only)")
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--procs", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = ap.parse_args(argv)
    if args.procs < 1:
        ap.error("--procs must be at least 1")
    if args.procs > 1 and args.port == 0:
        ap.error("--procs > 1 needs a fixed --port")
    workers = []
    if args.procs > 1:
        ctx = multiprocessing.get_context("spawn")
        for _ in range(args.procs - 1):
            p = ctx.Process(target=_worker, args=(args.host, args.port, args.duration), daemon=True)
            p.start()
            workers.append(p)
    try:
        stats = asyncio.run(_serve(args.host, args.port, args.duration, args.procs > 1, announce=True))
    finally:
        for p in workers:
            p.terminate()
            p.join(timeout=5.0)
    print(json.dumps(asdict(stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
