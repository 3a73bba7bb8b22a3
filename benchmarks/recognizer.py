"""Our recogniser against what users run instead, on the same weights, clips and cores, in one run.

    python -m pip install --no-deps --target build/peers sherpa-onnx==2.0.1 sherpa-onnx-core==2.0.1 funasr-onnx==0.4.3
    python -m benchmarks.recognizer --models build/bench-models --peers build/peers --threads 2

Recognisers (each skipped with its reason when it cannot load):
- ours: `SenseVoice` on ONNX Runtime, int8 (`model_quant.onnx`) and fp32 (`model.onnx`);
- sherpa-onnx `OfflineRecognizer.from_sense_voice` on **the same two files**, copied with the
  metadata its `scripts/sense-voice/export-onnx.py` writes (LFR sizes, CMVN vectors, language and
  ITN ids, vocab size) and a `tokens.txt` written from the bpe model;
- funasr-onnx `SenseVoiceSmall` (quantize=True: the same int8 file);
- funasr `AutoModel(...).generate(...)` on `model.pt` (torch): what xiaozhi-esp32-server's
  `fun_local` provider runs.

Alone: every clip through every recogniser, interleaved (clip by clip, recogniser by recogniser,
`--repeat` rounds), so machine noise falls on all of them alike. Under concurrency: N utterances
at once, each recogniser used as its server uses it: ours through the server's scheduler
(`core.scheduler.InferenceQueue`) with the lanes and threads the server sizes for this machine
(`core.sizing`: two lanes of one thread on 2 cores), the others from `asyncio.to_thread` with no lock (as
xiaozhi-esp32-server calls `fun_local`); interleaved too (`--rounds` rounds, each a burst of every
recogniser in turn at every level), so a busy second of a shared machine does not decide a row.
The tables print medians and p95 per utterance (ms), the 11 s clip alone, and per concurrency the
median and worst latency and utterances per second over the rounds, each with its ratio to ours
(int8); the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asr_server.audio.io import decode_audio
from asr_server.config import load_config
from asr_server.core.scheduler import InferenceQueue
from asr_server.core.sizing import asr_parallel, asr_threads
from asr_server.engines.contracts import SENSEVOICE_BPE, SENSEVOICE_CMVN, SENSEVOICE_FP32, SENSEVOICE_INT8
from asr_server.engines.sensevoice import SenseVoice

from .stages import machine

Recognise = Callable[[np.ndarray], str]
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Entry:
    name: str
    fn: Recognise | None
    note: str = ""
    alone: list[float] = field(default_factory=list)
    long_ms: list[float] = field(default_factory=list)


def load_clips(audio_dir: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The clips of 3.5-6.2 s (what "per utterance" means here) and the longest clip."""
    mid, longest = [], None
    for p in sorted(audio_dir.iterdir()):
        if p.suffix not in (".wav", ".flac"):
            continue
        a = decode_audio(p.read_bytes()).samples
        if 3.5 <= len(a) / 16000 <= 6.2:
            mid.append(a)
        if longest is None or len(a) > len(longest):
            longest = a
    return mid, longest


# --- the peers ---------------------------------------------------------------------------------


def sherpa_copy(model_dir: Path, name: str, out: Path) -> Path:
    """`name` from `model_dir` with sherpa-onnx's SenseVoice metadata, and `tokens.txt` beside it."""
    import onnx
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tokens = out / "tokens.txt"
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / SENSEVOICE_BPE))
    if not tokens.is_file():
        tokens.write_text("".join(f"{sp.id_to_piece(i)} {i}\n" for i in range(sp.get_piece_size())), encoding="utf-8")
    if target.is_file() and target.stat().st_mtime >= (model_dir / name).stat().st_mtime:
        return target
    vectors = [
        ",".join(line.split()[3:-1]) for line in open(model_dir / SENSEVOICE_CMVN) if line.startswith("<LearnRateCoef>")
    ]
    meta = {
        "lfr_window_size": 7,
        "lfr_window_shift": 6,
        "normalize_samples": 0,
        "neg_mean": vectors[0],
        "inv_stddev": vectors[1],
        "model_type": "sense_voice_ctc",
        "version": "2",
        "vocab_size": sp.get_piece_size(),
        "lang_auto": 0,
        "lang_zh": 3,
        "lang_en": 4,
        "lang_yue": 7,
        "lang_ja": 11,
        "lang_ko": 12,
        "lang_nospeech": 13,
        "with_itn": 14,
        "without_itn": 15,
    }
    m = onnx.load(str(model_dir / name))
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.save(m, str(target))
    return target


def load_sherpa(model_dir: Path, name: str, work: Path, threads: int) -> Recognise:
    import sherpa_onnx

    path = sherpa_copy(model_dir, name, work / "sherpa")
    rec = sherpa_onnx.OfflineRecognizer.from_sense_voice(
        model=str(path), tokens=str(path.parent / "tokens.txt"), num_threads=threads, use_itn=True
    )

    def run(audio: np.ndarray) -> str:
        s = rec.create_stream()
        s.accept_waveform(16000, audio)
        rec.decode_stream(s)
        return str(s.result.text)

    return run


def load_funasr_onnx(model_dir: Path, threads: int) -> Recognise:
    from funasr_onnx import SenseVoiceSmall

    model = SenseVoiceSmall(str(model_dir), quantize=True, intra_op_num_threads=threads)
    # one array, not a list: 0.4.3 reads a list as file paths
    return lambda audio: str(model(audio, language="auto", textnorm="withitn")[0])


def load_funasr_torch(model_dir: Path, threads: int) -> Recognise:
    import torch
    from funasr import AutoModel

    torch.set_num_threads(threads)
    model = AutoModel(model=str(model_dir), device="cpu", disable_update=True, log_level="ERROR")
    return lambda audio: str(model.generate(input=audio, language="auto", use_itn=True)[0]["text"])


def entries(args: argparse.Namespace) -> tuple[list[Entry], dict[str, Served]]:
    """Every recogniser that loads (the others with the reason they did not) and, by entry name, our
    engines as the server runs them under concurrency."""
    model_dir = args.models / "SenseVoiceSmall"
    ours: dict[str, Served] = {}
    out: list[Entry] = []

    skip = [w for w in args.skip.split(",") if w]

    def add(name: str, load: Callable[[], Recognise], note: str = "") -> None:
        if any(w in name for w in skip):
            return
        try:
            out.append(Entry(name, load(), note))
        except Exception as e:  # a peer that is not installed is reported, not fatal
            out.append(Entry(name, None, f"skipped: {type(e).__name__}: {str(e)[:120]}"))

    for quant, label, file in (("yes", "int8", SENSEVOICE_INT8), ("no", "fp32", SENSEVOICE_FP32)):

        def load_ours(quant: str = quant, name: str = f"ours, {label} ({file})") -> Recognise:
            sv = SenseVoice.load(model_dir, quantized=quant, device="cpu", threads=args.threads)
            ours[name] = as_served(model_dir, quant)
            return lambda audio: sv.transcribe(audio).text

        add(f"ours, {label} ({file})", load_ours)
    for label, file in (("int8", SENSEVOICE_INT8), ("fp32", SENSEVOICE_FP32)):
        add(
            f"sherpa-onnx, {label} (same {file})",
            lambda file=file: load_sherpa(model_dir, file, args.work, args.threads),
        )
    add("funasr-onnx SenseVoiceSmall, quantize=True", lambda: load_funasr_onnx(model_dir, args.threads))
    add("funasr AutoModel.generate (torch, model.pt)", lambda: load_funasr_torch(model_dir, args.threads))
    return out, ours


# --- timing ------------------------------------------------------------------------------------


def time_alone(table: list[Entry], clips: list[np.ndarray], longest: np.ndarray | None, repeat: int) -> None:
    live = [e for e in table if e.fn is not None]
    for e in live:  # warm-up: first calls allocate
        assert e.fn is not None
        e.fn(clips[0])
    for _ in range(repeat):
        for audio in clips:
            for e in live:
                assert e.fn is not None
                t0 = time.perf_counter()
                e.fn(audio)
                e.alone.append((time.perf_counter() - t0) * 1000)
        if longest is not None:
            for e in live:
                assert e.fn is not None
                t0 = time.perf_counter()
                e.fn(longest)
                e.long_ms.append((time.perf_counter() - t0) * 1000)


@dataclass
class Served:
    """Our engine as the server sizes it on this machine: `lanes` recognitions at once (`asr.parallel`),
    each on `threads` intra-op threads (`engine.threads`: the cores shared among the lanes)."""

    engine: SenseVoice
    lanes: int
    threads: int


def as_served(model_dir: Path, quantized: str) -> Served:
    config = load_config(None, env={}, overrides={"engine": {"device": "cpu"}})
    lanes, threads = asr_parallel(config), asr_threads(config)
    return Served(SenseVoice.load(model_dir, quantized=quantized, device="cpu", threads=threads), lanes, threads)


async def burst(e: Entry, served: Served | None, clips: list[np.ndarray], n: int) -> tuple[list[float], float]:
    """N utterances submitted at once: each one's latency (ms) and the wall time of all of them (s)."""
    audios = [clips[i % len(clips)] for i in range(n)]
    queue: InferenceQueue[np.ndarray, str] | None = None
    if served is not None:
        sv = served.engine
        queue = InferenceQueue(
            "asr", lambda items: [t.text for t in sv.transcribe_batch(list(items))], parallel=served.lanes
        )

    async def one(audio: np.ndarray) -> float:
        t0 = time.perf_counter()
        if queue is not None:
            await queue.run(audio, size=len(audio))
        else:
            assert e.fn is not None
            await asyncio.to_thread(e.fn, audio)
        return (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    lat = await asyncio.gather(*(one(a) for a in audios))
    wall = time.perf_counter() - t0
    if queue is not None:
        await queue.close()
    return list(lat), wall


@dataclass
class Bursts:
    """One recogniser's bursts of one size over the rounds: every utterance's latency and each burst's wall time."""

    latency_ms: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)

    def rate(self, n: int) -> float:
        return n * len(self.wall_s) / sum(self.wall_s)


def time_bursts(
    live: list[tuple[Entry, Served | None]], clips: list[np.ndarray], levels: list[int], rounds: int
) -> dict[tuple[str, int], Bursts]:
    """Every recogniser's burst at every level, `rounds` times, interleaved: round by round, level by
    level, recogniser by recogniser, so load from outside falls on all of them alike."""
    out: dict[tuple[str, int], Bursts] = {(e.name, n): Bursts() for e, _ in live for n in levels}
    for _ in range(rounds):
        for n in levels:
            for e, sv in live:
                lat, wall = asyncio.run(burst(e, sv, clips, n))
                out[e.name, n].latency_ms += lat
                out[e.name, n].wall_s.append(wall)
    return out


def print_bursts(
    table: list[Entry], ours: dict[str, Served], clips: list[np.ndarray], levels: list[int], rounds: int
) -> None:
    live = [(e, ours.get(e.name)) for e in table if e.fn is not None]
    for name, served in ours.items():
        print(
            f"\n{name} under concurrency as the server sizes it here: {served.lanes} lanes x {served.threads} threads"
        )
    if not live:
        return
    results = time_bursts(live, clips, levels, rounds)
    base = live[0][0].name if live[0][0].name.startswith("ours, int8") else None
    print(f"\n{rounds} rounds, interleaved")
    print(
        "| recogniser (as its server calls it) | at once | median latency ms | worst ms | utterances/s | vs ours int8 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for e, sv in live:
        how = f"scheduler, {sv.lanes} lanes" if sv is not None else "to_thread, no lock"
        for n in levels:
            b = results[e.name, n]
            ratio = f"{b.rate(n) / results[base, n].rate(n):.2f}x" if base else ""
            med, worst = statistics.median(b.latency_ms), max(b.latency_ms)
            print(f"| {e.name} ({how}) | {n} | {med:.0f} | {worst:.0f} | {b.rate(n):.2f} | {ratio} |")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recognizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "build" / "bench-models")
    ap.add_argument(
        "--audio", type=Path, default=Path(os.environ.get("ASR_AUDIO_DIR", ROOT.parent / "shared" / "audio"))
    )
    ap.add_argument("--peers", type=Path, default=ROOT / "build" / "peers", help="--target folder of the peers")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "peer-models", help="sherpa-onnx's copies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", default="1,2,5,10")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of bursts per concurrency level")
    ap.add_argument("--skip", default="", help="comma-separated words: recognisers whose name holds one are left out")
    args = ap.parse_args(argv)
    if args.peers.is_dir():
        sys.path.append(str(args.peers))
    clips, longest = load_clips(args.audio)
    if not clips:
        print(f"no clips of 3.5-6.2 s in {args.audio}", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(f"machine: {machine()}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"weights: {args.models} (random), {args.threads} threads each, {len(clips)} clips of 3.5-6.2 s")
    table, ours = entries(args)
    time_alone(table, clips, longest, args.repeat)
    base = next((e for e in table if e.fn is not None and e.name.startswith("ours, int8")), None)
    base_ms = statistics.median(base.alone) if base is not None and base.alone else None
    print("\n| recogniser | median per utterance ms | p95 | 11 s clip ms | vs ours int8 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for e in table:
        if e.fn is None:
            print(f"| {e.name} | {e.note} | | | |")
            continue
        med = statistics.median(e.alone)
        ratio = f"{med / base_ms:.2f}x" if base_ms else ""
        longest_ms = f"{statistics.median(e.long_ms):.0f}" if e.long_ms else ""
        print(f"| {e.name} | {med:.0f} | {pct(e.alone, 95):.0f} | {longest_ms} | {ratio} |")

    print_bursts(table, ours, clips, [int(x) for x in args.concurrency.split(",")], args.rounds)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
