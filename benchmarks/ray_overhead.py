"""What Ray Serve adds to each recognition, against the same engine in this process, in one run.

    python -m benchmarks.ray_overhead --models build/bench-models --threads 2 --concurrency 16

Two pipelines on the same models, clips and engine threads: `inference.mode: local` (the engine
in this process behind the scheduler) and `inference.mode: ray` (the same engine in one Serve
replica on a local Ray instance this run starts, called through a deployment handle). Both compute
one utterance at a time (local: `asr.parallel` 1, `max_batch` 1; the replica: `max_batch_size`
`--ray-batch`, 1 by default), so what differs is Ray: serialising the audio and the transcript,
the handle's routing, the actor call, the replica's batch queue. Light load: every clip alone,
the two modes interleaved clip by clip (`--repeat` rounds), so machine noise falls on both alike.
Higher load: `--concurrency` utterances in flight at once, the modes alternating round by round.
The table prints per mode and load the p50 and p95 per recognition (ms), what Ray adds (ms and
ratio) and utterances per second; the speaker embedder is off (the recogniser is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import numpy as np

from asr_server.config import Config, load_config
from asr_server.core.pipeline import Pipeline
from loadtest.clips import DEFAULT_AUDIO_DIR

from .recognizer import load_clips
from .stages import machine


def configs(models: Path, threads: int, concurrency: int, ray_batch: int) -> tuple[Config, Config]:
    base = {
        "asr": {
            "model_dir": str(models / "SenseVoiceSmall"),
            "parallel": 1,
            "max_batch": 1,
            "deadline_ms": 0,
            "budget_ms": 0,
            "max_queue": 100000,
        },
        "engine": {"threads": threads},
        "speaker": {"enabled": False},
    }
    ongoing = max(concurrency, ray_batch)
    ray = {
        "mode": "ray",
        "namespace": "asr-server-bench",
        "app_prefix": "asr-server-bench",
        "max_in_flight": concurrency,
        "asr": {
            "num_cpus": threads,
            "max_batch_size": ray_batch,
            "batch_wait_timeout_s": 0.0 if ray_batch == 1 else 0.01,
            "max_ongoing_requests": ongoing,
            "target_ongoing_requests": ongoing,
        },
    }
    return load_config(None, env={}, overrides=base), load_config(None, env={}, overrides={**base, "inference": ray})


async def timed(pipeline: Pipeline, audio: np.ndarray) -> float:
    t0 = time.perf_counter()
    await pipeline.recognize(audio, identify=False)
    return (time.perf_counter() - t0) * 1000


async def burst(pipeline: Pipeline, clips: list[np.ndarray], n: int) -> tuple[list[float], float]:
    """`n` utterances submitted at once: each one's latency, and the utterances per second."""
    t0 = time.perf_counter()
    ms = await asyncio.gather(*(timed(pipeline, clips[i % len(clips)]) for i in range(n)))
    return list(ms), n / (time.perf_counter() - t0)


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


async def run(args: argparse.Namespace) -> None:
    clips, _ = load_clips(args.audio)
    if not clips:
        raise SystemExit(f"no 3.5-6.2 s clips in {args.audio}")
    local_cfg, ray_cfg = configs(args.models, args.threads, args.concurrency, args.ray_batch)
    local = await asyncio.to_thread(Pipeline.load, local_cfg)
    remote = await asyncio.to_thread(Pipeline.load, ray_cfg)
    pipes = {"local": local, "ray": remote}
    described = [f"{name}: {p.models[1].describe()}" for name, p in pipes.items()]  # [0] is the VAD
    try:
        for p in pipes.values():  # warm-up: first runs allocate
            for c in clips[:2]:
                await timed(p, c)
        alone: dict[str, list[float]] = {k: [] for k in pipes}
        for _ in range(args.repeat):
            for c in clips:
                for name, p in pipes.items():
                    alone[name].append(await timed(p, c))
        loaded: dict[str, list[float]] = {k: [] for k in pipes}
        rate: dict[str, list[float]] = {k: [] for k in pipes}
        for _ in range(args.rounds):
            for name, p in pipes.items():
                ms, ups = await burst(p, clips, args.concurrency)
                loaded[name] += ms
                rate[name].append(ups)
    finally:
        for p in pipes.values():
            await p.close()
    seconds = statistics.mean(len(c) / 16000 for c in clips)
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"models: {args.models}; {len(clips)} clips of {seconds:.1f} s on average; engine threads {args.threads}; "
        f"replica max_batch_size {args.ray_batch}"
    )
    for line in described:
        print(line)
    print()
    print("| load | mode | p50 ms | p95 ms | Ray adds p50 | Ray adds p95 | p50 ratio | utterances/s | n |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load, data in (("one at a time", alone), (f"{args.concurrency} in flight", loaded)):
        base50, base95 = statistics.median(data["local"]), p95(data["local"])
        for name in pipes:
            xs = data[name]
            m50, m95 = statistics.median(xs), p95(xs)
            add = " | |" if name == "local" else f"{m50 - base50:+.1f} | {m95 - base95:+.1f} | {m50 / base50:.3f}"
            # Alone, a mode's rate is one over its mean latency; under load, what the bursts achieved.
            ups = 1000 / statistics.mean(xs) if load == "one at a time" else statistics.mean(rate[name])
            print(f"| {load} | {name} | {m50:.1f} | {m95:.1f} | {add} | {ups:.2f} | {len(xs)} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ray_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with SenseVoiceSmall/")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO_DIR)
    ap.add_argument("--threads", type=int, default=2, help="the engine's intra-op threads, in both modes")
    ap.add_argument("--concurrency", type=int, default=16, help="utterances in flight at the higher load")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per mode at the higher load")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every clip alone")
    ap.add_argument("--ray-batch", type=int, default=1, help="the replica's @serve.batch max_batch_size")
    args = ap.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
