"""What decoding an upload in a decoder process costs, against decoding it in this process, in one run.

    python -m benchmarks.decode_pool --repeat 30

The same files, decoded one at a time the two ways the server could: `decode_audio` in a thread of
this process (17ee092) and `DecodePool.decode` (a worker process: the file sent over a pipe, the
16 kHz samples sent back), the two interleaved file by file so machine noise falls on both alike.
The table prints per file the median and p90 of each (ms) and what the pool adds (ms, ratio); then
what starting the pool costs (the fork server and two workers) and what replacing a worker costs
(a fork, after a crash or a decode bomb).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import statistics
import time
from datetime import UTC, datetime

import numpy as np
import soundfile as sf

from asr_server.audio.decode_pool import DecodePool
from asr_server.audio.io import decode_audio

from .gpu import cpu_name


def _speechlike(rate: int, channels: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.2 * np.sin(2 * np.pi * 180 * t * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) + 0.01 * rng.standard_normal(t.size)
    return np.tile(x[:, None], (1, channels)).astype(np.float32)


def files() -> dict[str, bytes]:
    """Uploads as clients send them: a short WAV, a minute of FLAC, compressed stereo, 7.1 Vorbis."""

    def write(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, x, rate, format=fmt, subtype=subtype)
        return buf.getvalue()

    return {
        "wav 16 kHz mono 5 s": write(_speechlike(16000, 1, 5), 16000, "WAV", "PCM_16"),
        "flac 44.1 kHz stereo 60 s": write(_speechlike(44100, 2, 60), 44100, "FLAC", "PCM_16"),
        "mp3 44.1 kHz stereo 10 s": write(_speechlike(44100, 2, 10), 44100, "MP3", "MPEG_LAYER_III"),
        "ogg vorbis 48 kHz 8 ch 5 s": write(_speechlike(48000, 8, 5), 48000, "OGG", "VORBIS"),
    }


async def run(repeat: int) -> None:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    pool = DecodePool(2)
    await asyncio.to_thread(pool.warm)
    start_ms = (time.perf_counter() - t0) * 1000
    rows = []
    corpus = files()
    try:
        for name, data in corpus.items():
            local: list[float] = []
            pooled: list[float] = []
            for i in range(repeat + 1):  # the first round warms both and is not counted
                for way in ("local", "pool") if i % 2 else ("pool", "local"):
                    t = time.perf_counter()
                    if way == "local":
                        await asyncio.to_thread(decode_audio, data, 3600)
                    else:
                        await pool.decode(data, 3600)
                    if i:
                        (local if way == "local" else pooled).append((time.perf_counter() - t) * 1000)
            rows.append((name, len(data), local, pooled))
    finally:
        pool.close()
    one = DecodePool(1)
    wav = corpus["wav 16 kHz mono 5 s"]
    replace_ms = []
    try:
        await one.decode(wav, 3600)
        for _ in range(5):
            pid = one.pids[0]
            os.kill(pid, signal.SIGKILL)
            while pid in one.pids:  # until the pool can see it is gone
                await asyncio.sleep(0.01)
            t = time.perf_counter()
            await one.decode(wav, 3600)  # finds its worker dead, forks another
            replace_ms.append((time.perf_counter() - t) * 1000)
    finally:
        one.close()

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(0.9 * (len(xs) - 1))]

    print(
        f"{cpu_name()}, {os.cpu_count()} cores; load average before {load:.2f}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(f"{repeat} decodes each way per file, interleaved\n")
    print("| file | KB | in process p50 / p90 ms | decoder process p50 / p90 ms | added p50 ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, size, local, pooled in rows:
        a, b = statistics.median(local), statistics.median(pooled)
        print(
            f"| {name} | {size / 1024:.0f} | {a:.1f} / {p90(local):.1f} | {b:.1f} / {p90(pooled):.1f} "
            f"| {b - a:+.1f} | {b / a:.2f} |"
        )
    print(f"\nstarting the pool (fork server + 2 workers): {start_ms:.0f} ms")
    print(f"replacing a dead worker, with the next decode (5 s WAV): median {statistics.median(replace_ms):.1f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=30, help="decodes each way per file")
    args = ap.parse_args(argv)
    asyncio.run(run(args.repeat))


if __name__ == "__main__":
    main()
