"""Per-stage cost on this machine: `python -m benchmarks.stages`.

Builds full-size random-weight SenseVoice and CAM++ once (funasr's classes at the real
dimensions: the timing is representative, the text is not), then times every stage on the
shared clips: Opus decode per frame, the SenseVoice and CAM++ features per utterance, VAD per
window (one stream and batched), SenseVoice fp32 and int8 per utterance and per batch size, CAM++
per utterance. Prints a Markdown table. `--stages opus,features` times only the front end's stages
(no models needed): run it in two checkouts, alternately, to compare them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asr_server.audio.io import decode_audio
from asr_server.audio.opus import OpusStreamDecoder
from asr_server.engines.features import campplus_features, sensevoice_lfr
from asr_server.engines.sensevoice import SenseVoice
from asr_server.engines.speaker.campplus import CampplusEmbedder
from asr_server.engines.vad import SileroVad, VadStream
from benchmarks.gpu import cpu_name
from loadtest.clips import DEFAULT_AUDIO_DIR

REPO = Path(__file__).resolve().parents[1]
STAGES = ("opus", "features", "vad", "sensevoice", "campplus")


def machine() -> str:
    import onnxruntime

    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def row(stage: str, unit: str, samples_ms: list[float], note: str = "") -> str:
    med = statistics.median(samples_ms)
    p95 = float(np.percentile(samples_ms, 95))
    return f"| {stage} | {unit} | {med:.3f} | {p95:.3f} | {len(samples_ms)} | {note} |"


def load_clips(audio_dir: Path) -> list[tuple[str, np.ndarray]]:
    clips = []
    for p in sorted(audio_dir.iterdir()):
        if p.suffix.lower() in (".wav", ".flac"):
            clips.append((p.name, decode_audio(p.read_bytes()).samples))
    if not clips:
        raise SystemExit(f"no wav/flac clips in {audio_dir}")
    return clips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    ap.add_argument(
        "--models",
        type=Path,
        default=REPO / "build" / "bench-models",
        help="where the full-size random-weight models are built (once) and read",
    )
    ap.add_argument(
        "--audio",
        type=Path,
        default=DEFAULT_AUDIO_DIR,
        help=f"folder of wav/flac clips (default {DEFAULT_AUDIO_DIR}, or $ASR_AUDIO_DIR)",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = runtime default)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"which of {', '.join(STAGES)} to time")
    args = ap.parse_args(argv)
    stages = set(args.stages.split(","))
    if stages - set(STAGES):
        ap.error(f"unknown stages {', '.join(sorted(stages - set(STAGES)))}")

    clips = load_clips(args.audio)
    rows: list[str] = []
    if "opus" in stages:
        rows.append(opus_row(clips, args.repeat))
    if "features" in stages:
        mid = [a for _, a in clips if 3.5 <= len(a) / 16000 <= 6.0]
        for name, fn in (("SenseVoice features", sensevoice_lfr), ("CAM++ features", campplus_features)):
            per_utt = [t for a in mid for t in timeit(lambda a=a, fn=fn: fn(a), args.repeat)]
            rows.append(row(name, "per utterance (fbank, LFR or mean)", per_utt, f"{len(mid)} clips of 3.5-6 s"))
    if stages & {"vad", "sensevoice", "campplus"}:
        from benchmarks.standins import build_models

        build_models(args.models, size="full")
        rows += model_rows(args, clips, stages)
    print(f"Machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| stage | unit | median ms | p95 ms | n | note |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    print("\n".join(rows))
    return 0


def opus_row(clips: list[tuple[str, np.ndarray]], repeat: int) -> str:
    """Opus decode: every clip as 60 ms packets, per frame."""
    import opuslib

    enc = opuslib.Encoder(16000, 1, opuslib.APPLICATION_VOIP)
    packets = []
    for _, a in clips:
        pcm = (np.clip(a, -1, 1) * 32767).astype(np.int16)
        for i in range(0, len(pcm) - 960 + 1, 960):
            packets.append(enc.encode(pcm[i : i + 960].tobytes(), 960))
    dec = OpusStreamDecoder()
    t = timeit(lambda: [dec.decode(p) for p in packets], repeat)
    return row("Opus decode", "per 60 ms frame", [x / len(packets) for x in t], f"{len(packets)} frames")


def model_rows(args: argparse.Namespace, clips: list[tuple[str, np.ndarray]], stages: set[str]) -> list[str]:
    """VAD, SenseVoice and CAM++ on the full-size stand-ins."""
    rows: list[str] = []
    if "vad" in stages:
        # VAD: one stream, then 64 streams batched.
        vad = SileroVad.load()
        speech = np.concatenate([a for _, a in clips])[: 16000 * 20]
        stream = VadStream()
        windows = stream.inputs(stream.push_block(speech))
        state1 = np.zeros((2, 1, 128), np.float32)

        def vad_single():
            for w in windows:
                vad.run(w[None], state1)

        t = timeit(vad_single, args.repeat)
        rows.append(row("Silero VAD, batch 1", "per window (32 ms)", [x / len(windows) for x in t]))
        batch, state64 = windows[:64], np.zeros((2, 64, 128), np.float32)
        t = timeit(lambda: vad.run(batch, state64), args.repeat * 10)
        rows.append(row("Silero VAD, batch 64", "per stream-window", [x / len(batch) for x in t]))

    model_dir = args.models / "SenseVoiceSmall"
    mid = [a for _, a in clips if 3.5 <= len(a) / 16000 <= 6.0]
    mid_s = statistics.mean(len(a) / 16000 for a in mid)
    if "sensevoice" in stages:
        # SenseVoice per utterance (each clip) and per batch, fp32 and int8.
        for quant, label in (("no", "fp32"), ("yes", "int8")):
            sv = SenseVoice.load(model_dir, quantized=quant, device="cpu", threads=args.threads)
            rows.append(f"| SenseVoice {label} load | once | {sv.info.load_s * 1000:.0f} | | 1 | |")
            per_utt = []
            for a in mid:
                per_utt += timeit(lambda a=a, sv=sv: sv.transcribe_batch([a], ["auto"], [True]), args.repeat)
            rows.append(
                row(
                    f"SenseVoice {label}, batch 1",
                    f"per utterance ({mid_s:.1f} s avg)",
                    per_utt,
                    f"{len(mid)} clips of 3.5-6 s",
                )
            )
            for b in [int(x) for x in args.batches.split(",") if int(x) > 1]:
                group = [mid[i % len(mid)] for i in range(b)]
                t = timeit(
                    lambda g=group, sv=sv: sv.transcribe_batch(g, ["auto"] * len(g), [True] * len(g)), args.repeat
                )
                rows.append(
                    row(
                        f"SenseVoice {label}, batch {b}",
                        "per utterance",
                        [x / b for x in t],
                        f"batch call {statistics.median(t):.0f} ms",
                    )
                )

    if "campplus" in stages:
        spk = CampplusEmbedder.load(args.models / "campplus" / "campplus.onnx", device="cpu", threads=args.threads)
        per_utt = []
        for a in mid:
            per_utt += timeit(lambda a=a: spk.embed_batch([a]), args.repeat)
        rows.append(row("CAM++ embedding", f"per utterance ({mid_s:.1f} s avg)", per_utt))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
