"""SenseVoice's int8 graph against ONNX Runtime's other CPU options: speed and logit parity, in one run.

    python -m pip install --no-deps --target build/quant-tools onnx_ir   # for MatMulNBits (not in the locks)
    python -m benchmarks.quantization --models build/bench-models --work build/quant --threads 1,2

Variants, built once from `model.onnx` into `--work`:
- `shipped`: the `model_quant.onnx` of `--models` as it is (this project's export: `s8-per-channel-rr`);
- `u8-per-channel`: funasr's own recipe (dynamic QUInt8 MatMul, per channel), what the hub's
  `model_quant.onnx` holds;
- `s8-per-channel-rr` / `s8-per-channel` / `s8-per-tensor`: dynamic QInt8 MatMul, with and without
  `reduce_range` (7-bit weights; without it, the u8×s8 products of CPUs without VNNI saturate);
- `nbits8` / `nbits4`: `MatMulNBits` weight-only blocks of 32 (accuracy level 4);
- `fp32` and `fp32-optimised`: the float graph, and the same saved after ONNX Runtime's offline
  optimisation (`optimized_model_filepath`), so the load skips the rewrite.

Each variant's CTC logits are compared with fp32's on every shared clip (max |Δlogit|, share of
frames whose best token agrees), and each is timed per utterance, interleaved clip by clip so
machine noise falls on all of them alike. Random weights make the logits a test of arithmetic
only: agreement near 1.0 says the variant computes what the float graph does.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asr_server.audio.io import decode_audio
from asr_server.engines.contracts import SENSEVOICE_CMVN, SENSEVOICE_FP32, SENSEVOICE_INT8
from asr_server.engines.features import SenseVoiceFrontend

from .stages import machine

ROOT = Path(__file__).resolve().parent.parent


def _exclude(src: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    return [n.name for n in graph.node if "output" in n.name or "bias_encoder" in n.name or "bias_decoder" in n.name]


def _dynamic(per_channel: bool, reduce_range: bool, unsigned: bool = False) -> Callable[[Path, Path], None]:
    def build(src: Path, dst: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
            nodes_to_exclude=_exclude(src),
        )

    return build


def _nbits(bits: int) -> Callable[[Path, Path], None]:
    def build(src: Path, dst: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits)
        q = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            block_size=32,
            is_symmetric=True,
            accuracy_level=4,
            nodes_to_exclude=_exclude(src),
            algo_config=cfg,
        )
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)

    return build


def _optimised(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "u8-per-channel": _dynamic(True, False, unsigned=True),
    "s8-per-channel-rr": _dynamic(True, True),
    "s8-per-channel": _dynamic(True, False),
    "s8-per-tensor": _dynamic(False, False),
    "nbits8": _nbits(8),
    "nbits4": _nbits(4),
    "fp32-optimised": _optimised,
}


def variant_files(model_dir: Path, work: Path, names: list[str]) -> dict[str, Path]:
    files = {"shipped": model_dir / SENSEVOICE_INT8, "fp32": model_dir / SENSEVOICE_FP32}
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in files:
            continue
        dst = work / f"model_{name}.onnx"
        if not dst.is_file():
            t0 = time.perf_counter()
            logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every skipped node
            BUILDERS[name](model_dir / SENSEVOICE_FP32, dst)
            print(f"built {dst.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        files[name] = dst
    return {n: files[n] for n in ["fp32", *[x for x in names if x != "fp32"]]}


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, feats: np.ndarray) -> np.ndarray:
    out = sess.run(
        None,
        {
            "speech": feats[None],
            "speech_lengths": np.array([feats.shape[0]], np.int32),
            "language": np.zeros(1, np.int32),
            "textnorm": np.full(1, 14, np.int32),
        },
    )
    return np.asarray(out[0][0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "build" / "bench-models")
    ap.add_argument(
        "--audio", type=Path, default=Path(os.environ.get("ASR_AUDIO_DIR", ROOT.parent / "shared" / "audio"))
    )
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "quant")
    ap.add_argument("--variants", default=",".join(BUILDERS), help="also: shipped")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--tools", type=Path, default=ROOT / "build" / "quant-tools", help="--target folder holding onnx_ir"
    )
    args = ap.parse_args(argv)
    if args.tools.is_dir():
        sys.path.append(str(args.tools))
    model_dir = args.models / "SenseVoiceSmall"
    files = variant_files(model_dir, args.work, args.variants.split(","))
    frontend = SenseVoiceFrontend(model_dir / SENSEVOICE_CMVN)
    clips = [
        frontend(decode_audio(p.read_bytes()).samples)
        for p in sorted(args.audio.iterdir())
        if p.suffix in (".wav", ".flac")
    ]
    mid = [f for f in clips if 3.5 <= f.shape[0] * 0.06 <= 6.2]  # LFR frames are 60 ms
    load = os.getloadavg()
    print(f"machine: {machine()}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{len(clips)} clips for parity, {len(mid)} of 3.5-6.2 s timed, {args.repeat} rounds interleaved\n")
    threads = [int(t) for t in args.threads.split(",")]
    sessions = {(n, t): session(p, t) for n, p in files.items() for t in threads}
    reference = [run(sessions[("fp32", threads[0])], f) for f in clips]
    times: dict[tuple[str, int], list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        run(s, mid[0])  # warm-up
    for _ in range(args.repeat):
        for f in mid:
            for k, s in sessions.items():
                t0 = time.perf_counter()
                run(s, f)
                times[k].append((time.perf_counter() - t0) * 1000)
    head = " | ".join(f"{t} thread{'s' if t > 1 else ''} ms" for t in threads)
    print(f"| variant | file MB | max abs dlogit | argmax agreement | {head} | vs u8, {threads[-1]} threads |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(threads) + " ---: |")
    base = (
        statistics.median(times[("u8-per-channel", threads[-1])]) if ("u8-per-channel", threads[-1]) in times else None
    )
    for name, path in files.items():
        got = [run(sessions[(name, threads[0])], f) for f in clips]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(reference, got, strict=True))
        agree = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(reference, got, strict=True)]))
        cols = " | ".join(f"{statistics.median(times[(name, t)]):.0f}" for t in threads)
        ratio = f"{statistics.median(times[(name, threads[-1])]) / base:.2f}" if base else ""
        print(f"| {name} | {path.stat().st_size / 2**20:.0f} | {diff:.3f} | {agree:.3f} | {cols} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
