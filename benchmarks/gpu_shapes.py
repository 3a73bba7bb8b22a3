"""Two ways to run SenseVoice on a GPU that the server does not use yet: `python -m benchmarks.gpu_shapes`.

1. **ONNX Runtime's CUDA provider with IO binding** (`model.onnx`, fp32). Three calls per batch
   size: `run` as `OnnxSenseVoice` makes it today (host features in, the float32 logits
   [B, T+4, 25055] back on the host); `ids` with IO binding and an `ArgMax` appended to the graph
   (host features in, only each frame's best token id back: what greedy decoding reads); and
   `device` with the inputs already on the device and the outputs left there (the provider's compute
   alone). It answers whether ONNX Runtime on the GPU is worth its wheel against torch, and how
   much of a call is the copy of the logits.
2. **torch with CUDA graphs per length bucket**: utterances padded to a bucket (`--buckets`
   seconds), one graph captured per (bucket, batch), replayed per call, against the eager forward
   of the same padded batch (`TorchSenseVoice.best_path`). It answers how much of a small batch's
   time is the host launching ~2,000 kernels one by one (BENCHMARKS.md's H200 run: batch 1 took
   as long as batch 32).

On a CPU (`--device cpu`) the same code runs with the CPU provider and without graphs (their rows
say so): the dry run of the plumbing. Prints Markdown tables (and writes them with `--out`).
Random weights: the timing is representative, the text is not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asr_server.engines.contracts import SENSEVOICE, SENSEVOICE_FP32
from asr_server.engines.features import SenseVoiceFrontend

from .gpu import Timer, _int_list, cpu_name

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
BEST_PATH = "best_path"  # the ArgMax output appended to the graph


@dataclass(slots=True)
class Line:
    """One measured shape: its label and the median milliseconds of each of its calls (None: not run)."""

    label: str
    batch: int
    ms: dict[str, float | None]
    note: str = ""


def feeds(b: int, frames: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of `b` equally long synthetic utterances in the graph's input names."""
    rng = np.random.default_rng(seed)
    return {
        "speech": rng.standard_normal((b, frames, dim)).astype(np.float32),
        "speech_lengths": np.full(b, frames, np.int32),
        "language": np.zeros(b, np.int32),
        "textnorm": np.full(b, 14, np.int32),
    }


def with_argmax(path: Path) -> bytes:
    """`path` with an ArgMax over the vocabulary appended as the output `best_path` (int64 [B, T+4])."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    logits = SENSEVOICE.output_names[0]
    model.graph.node.append(helper.make_node("ArgMax", [logits], [BEST_PATH], axis=-1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info(BEST_PATH, onnx.TensorProto.INT64, None))
    return bytes(model.SerializeToString())


def onnx_lines(
    model_dir: Path, device: str, batches: list[int], frames: int, timer: Timer, deadline: float
) -> list[Line]:
    """ONNX Runtime on `device` (cuda[:N] → the CUDA provider; cpu → the CPU provider): `run`, `ids`, `device`."""
    import onnxruntime as ort

    cuda = device.startswith("cuda")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    label = f"onnxruntime {ort.__version__}, {'CUDAExecutionProvider' if cuda else 'CPUExecutionProvider'}"
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        why = "onnxruntime has no CUDAExecutionProvider here (install requirements/gpu.txt's onnxruntime-gpu, or --wheels)"
        return [Line(label, b, {}, f"skipped: {why}") for b in batches]
    providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index})] if cuda else []
    providers.append("CPUExecutionProvider")
    sess = ort.InferenceSession(with_argmax(model_dir / SENSEVOICE_FP32), providers=providers)
    if cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        return [
            Line(label, b, {}, "skipped: the CUDA provider failed to initialise (cuDNN 9 / CUDA 12 libraries?)")
            for b in batches
        ]
    where = ("cuda", index) if cuda else ("cpu", 0)
    out: list[Line] = []
    for b in batches:
        if time.perf_counter() > deadline:
            out.append(Line(label, b, {}, "skipped: time budget spent"))
            continue
        host = feeds(b, frames, 560)
        ids = sess.io_binding()
        for name, value in host.items():
            ids.bind_cpu_input(name, value)
        ids.bind_output(BEST_PATH, "cpu")
        ids.bind_output(SENSEVOICE.output_names[1], "cpu")
        dev = sess.io_binding()
        for name, value in host.items():
            dev.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, *where))
        for name in (BEST_PATH, SENSEVOICE.output_names[1]):
            dev.bind_output(name, where[0], where[1])
        calls: dict[str, Callable[[], object]] = {
            "run": lambda h=host: sess.run(list(SENSEVOICE.output_names), h),
            "ids": lambda i=ids: sess.run_with_iobinding(i),
            "device": lambda d=dev: sess.run_with_iobinding(d),
        }
        out.append(Line(label, b, {k: statistics.median(timer(fn)) for k, fn in calls.items()}))
        print(f"{label} batch {b}: {out[-1].ms}", file=sys.stderr, flush=True)
    return out


def graph_lines(
    model_dir: Path, device: str, batches: list[int], buckets: list[float], timer: Timer, deadline: float
) -> list[Line]:
    """The torch backend per (bucket, batch): the eager `best_path`, and one CUDA graph replayed."""
    from asr_server.engines.sensevoice.torch import TorchSenseVoice

    backend = TorchSenseVoice(model_dir, device, "fp32")
    torch = backend._at.torch
    cuda = device.startswith("cuda")
    out: list[Line] = []
    for seconds in buckets:
        frames = SenseVoiceFrontend.num_frames(int(seconds * SAMPLE_RATE))
        for b in batches:
            label = f"torch {torch.__version__}, {seconds:g} s bucket ({frames} frames)"
            if time.perf_counter() > deadline:
                out.append(Line(label, b, {}, "skipped: time budget spent"))
                continue
            host = feeds(b, frames, backend.input_size)
            args = (host["speech"], host["speech_lengths"], host["language"], host["textnorm"])
            line = Line(label, b, {"eager": statistics.median(timer(lambda a=args: backend.best_path(*a)))})
            if cuda:
                try:
                    replay = capture(torch, backend, host, device)
                    line.ms["graph"] = statistics.median(timer(lambda h=host["speech"], r=replay: r(h)))
                except Exception as e:  # a graph that cannot be captured is the finding: say why, keep the row
                    line.note = f"capture failed: {str(e).splitlines()[0][:140] if str(e) else type(e).__name__}"
            else:
                line.note = "no CUDA graphs on a CPU"
            out.append(line)
            print(f"{label} batch {b}: {line.ms} {line.note}", file=sys.stderr, flush=True)
    return out


def capture(torch: Any, backend: Any, host: dict[str, np.ndarray], device: str) -> Callable[[np.ndarray], np.ndarray]:
    """One CUDA graph of the forward and the argmax at this batch's shape; the call copies new features
    into its static input, replays it and returns the best path on the host."""
    static = {k: torch.from_numpy(v).to(device) for k, v in host.items()}
    pinned = torch.empty(static["speech"].shape, dtype=torch.float32).pin_memory()
    forward = backend._forward

    def step() -> Any:
        logits, _ = forward(
            backend.model, static["speech"], static["speech_lengths"], static["language"], static["textnorm"]
        )
        return logits.argmax(dim=-1)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            best = step()

    def replay(feats: np.ndarray) -> np.ndarray:
        pinned.numpy()[...] = feats
        static["speech"].copy_(pinned, non_blocking=True)
        graph.replay()
        return best.cpu().numpy()

    return replay


def table(lines: list[Line], columns: list[tuple[str, str]], served: list[str]) -> str:
    """One row per line; "ms per utterance" is the first of the `served` calls measured (host in, ids out)."""
    head = "| shape | batch | " + " | ".join(title for _, title in columns) + " | ms per utterance | note |"
    rows = [head, "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: | --- |"]
    for line in lines:
        cells = [f"{line.ms[k]:.1f}" if line.ms.get(k) is not None else "" for k, _ in columns]
        best = next((line.ms[k] for k in served if line.ms.get(k) is not None), None)
        per_utt = f"{best / line.batch:.2f}" if best is not None else ""
        rows.append(f"| {line.label} | {line.batch} | " + " | ".join(cells) + f" | {per_utt} | {line.note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / "build" / "bench-models", help="with SenseVoiceSmall/")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--batches", type=_int_list, default=[1, 8, 32, 64])
    ap.add_argument("--buckets", default="2,4,8", help="length buckets in seconds (torch, CUDA graphs)")
    ap.add_argument("--utterance-s", type=float, default=4.5, help="length of every utterance (ONNX Runtime)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="start no measurement after this many seconds")
    ap.add_argument("--max-repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    model_dir = args.models / "SenseVoiceSmall"
    buckets = [float(x) for x in args.buckets.split(",") if x.strip()]
    frames = SenseVoiceFrontend.num_frames(int(args.utterance_s * SAMPLE_RATE))

    sync: Callable[[], None] = lambda: None  # noqa: E731
    if args.device.startswith("cuda"):
        import torch

        sync = lambda: torch.cuda.synchronize(args.device)  # noqa: E731
    timer = Timer(sync, warmup=2, min_time_s=0.5, min_repeats=3, max_repeats=args.max_repeats)
    onnx = onnx_lines(model_dir, args.device, args.batches, frames, timer, deadline)
    graphs = graph_lines(model_dir, args.device, args.batches, buckets, timer, deadline)
    text = "\n".join(
        [
            f"Machine: {cpu_name()}; device {args.device}; random-weight SenseVoice ({args.models}).",
            "",
            f"ONNX Runtime, `model.onnx` (fp32) with an ArgMax appended, {args.utterance_s} s utterances "
            f"({frames} LFR frames): `run` = host in, logits out (today's call); `ids` = IO binding, host in, "
            "best path out; `device` = inputs on the device, outputs left there.",
            "",
            table(onnx, [("run", "run ms"), ("ids", "IO binding, ids ms"), ("device", "on device ms")], ["ids"]),
            "",
            "torch, fp32, utterances padded to their length bucket: `eager` = `best_path` as the server "
            "calls it; `graph` = the same call from one captured CUDA graph per (bucket, batch).",
            "",
            table(graphs, [("eager", "eager ms"), ("graph", "CUDA graph ms")], ["graph", "eager"]),
            "",
            f"Total {time.perf_counter() - t0:.0f} s.",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
