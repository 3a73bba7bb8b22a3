"""Batch scaling of the torch backend on a GPU: `python -m benchmarks.gpu`.

Builds full-size random-weight SenseVoice and CAM++ once (`random_models.build_models(size="full")`,
funasr's classes at the real dimensions: timing is representative, text is not) or reuses them,
then times the torch backends' batched calls at each batch size and precision on synthetic
features of one fixed utterance length: SenseVoice (`run`: features in, float32 logits on the
host; and the device-side forward alone) and CAM++ (`run`: embeddings on the host). Reports
per-call and per-utterance latency, throughput in utterance-seconds per second, the model's GPU
memory and the peak during the calls, and the machine. Prints a Markdown table (and writes JSON
with `--json`).

Built to finish inside a 10-minute slot: repeats stop at `--min-time-s` or `--max-repeats`,
every shape gets warm-up calls first, and once `--budget-s` is spent the remaining rows are
reported as skipped. `--device cpu --batches 1,2 --precisions fp32` runs it on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000


@dataclass(slots=True)
class Row:
    model: str
    precision: str
    batch: int
    status: str = "ok"  # ok | oom | skipped | error
    calls: int = 0
    call_ms: float | None = None  # median wall time of one batched call as the server makes it (host in, host out)
    call_p90_ms: float | None = None
    device_ms: float | None = None  # median forward alone (device-side, no copy of the outputs to the host)
    logits_ms: float | None = None  # SenseVoice: median `run`, the whole logits copied to the host instead of ids
    utt_ms: float | None = None  # call_ms / batch
    throughput: float | None = None  # utterance-seconds of audio per wall second
    peak_mib: float | None = None  # GPU memory peak during these calls (model included)
    note: str = ""


@dataclass(slots=True)
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    total_s: float = 0.0


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(torch: Any, device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        info["funasr"] = importlib.metadata.version("funasr")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}",
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run(
                    [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                info["driver"] = (
                    out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
                )
            except (OSError, subprocess.TimeoutExpired):
                info["driver"] = None
    return info


def write_torch_models(models: Path, seed: int = 0) -> None:
    """Only what the torch backends read (`model.pt` + `config.yaml`, CAM++ weights + `config.yaml`),
    at the full dimensions of `random_models`: seconds instead of a minute, and no onnx needed."""
    import torch
    import yaml
    from funasr.models.campplus.model import CAMPPlus

    from benchmarks import standins as R

    torch.manual_seed(seed)
    sv = models / R.SENSEVOICE_DIR
    cam = models / R.CAMPPLUS_DIR
    sv.mkdir(parents=True, exist_ok=True)
    cam.mkdir(parents=True, exist_ok=True)
    torch.save(R.new_sensevoice(R.FULL, R.FULL_VOCAB_SIZE).state_dict(), sv / "model.pt")
    (sv / "config.yaml").write_text(yaml.safe_dump(R.sensevoice_config(R.FULL), sort_keys=False), encoding="utf-8")
    torch.save(CAMPPlus(**R.FULL_CAMPPLUS).state_dict(), cam / R.CAMPPLUS_WEIGHTS)
    (cam / "config.yaml").write_text(
        yaml.safe_dump({"model": "CAMPPlus", "model_conf": dict(R.FULL_CAMPPLUS)}), encoding="utf-8"
    )


def ensure_models(models: Path, rebuild: bool, torch_only: bool) -> Path:
    """The full-size stand-ins in `models`: reused when the torch weights are there, else built
    with `random_models.build_models` (or, with `torch_only` or without onnx, just the torch files)."""
    need = [
        models / "SenseVoiceSmall" / "model.pt",
        models / "SenseVoiceSmall" / "config.yaml",
        models / "campplus" / "campplus_cn_common.bin",
    ]
    if not rebuild and all(p.is_file() for p in need):
        return models
    t0 = time.perf_counter()
    if not torch_only:
        try:
            from benchmarks.standins import build_models

            print(
                f"building full-size random-weight models in {models} (about a minute) …", file=sys.stderr, flush=True
            )
            build_models(models, size="full", force=rebuild)
        except ImportError as e:
            print(f"cannot run the full build ({e}); writing the torch weights only", file=sys.stderr, flush=True)
            torch_only = True
    if torch_only:
        write_torch_models(models)
    print(f"models ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return models


class Timer:
    """Median wall time of a callable after warm-up, stopping at a time or repeat cap."""

    def __init__(
        self, sync: Callable[[], None], warmup: int, min_time_s: float, min_repeats: int, max_repeats: int
    ) -> None:
        self.sync, self.warmup = sync, warmup
        self.min_time_s, self.min_repeats, self.max_repeats = min_time_s, min_repeats, max_repeats

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        self.sync()
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < self.max_repeats and (
            len(samples) < self.min_repeats or time.perf_counter() - start < self.min_time_s
        ):
            t0 = time.perf_counter()
            fn()
            self.sync()
            samples.append((time.perf_counter() - t0) * 1000)
        return samples


def _is_oom(torch: Any, e: BaseException) -> bool:
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def _release(torch: Any, cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def bench_model(
    name: str,
    make: Callable[[str], Any],
    calls: Callable[[Any, int], tuple[Callable, Callable | None]],
    args: argparse.Namespace,
    torch: Any,
    report: Report,
    deadline: float,
    utt_s: float,
) -> None:
    """Every precision and batch size of one model; `calls(backend, B)` gives the host call and the
    device-only call (or None) for batch B."""
    cuda = args.device.startswith("cuda")
    for precision in args.precisions:
        if time.perf_counter() > deadline:
            report.rows += [Row(name, precision, b, status="skipped", note="time budget spent") for b in args.batches]
            continue
        _release(torch, cuda)
        try:
            backend = make(precision)
        except Exception as e:  # report and go on with the next precision/model
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            report.rows += [Row(name, precision, b, status="error", note=f"load: {msg}") for b in args.batches]
            continue
        if backend.info.precision != precision:
            report.rows += [
                Row(
                    name,
                    precision,
                    b,
                    status="skipped",
                    note=f"runs as {backend.info.precision} on {backend.info.device}",
                )
                for b in args.batches
            ]
            del backend
            continue
        report.models[f"{name} {precision}"] = {
            "device": backend.info.device,
            "provider": backend.info.provider,
            "load_s": round(backend.info.load_s, 2),
            "gpu_memory_mib": None if backend.info.gpu_memory_mb is None else round(backend.info.gpu_memory_mb, 1),
        }
        sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)
        timer = Timer(sync, args.warmup, args.min_time_s, args.min_repeats, args.max_repeats)
        for b in args.batches:
            row = Row(name, precision, b)
            if time.perf_counter() > deadline:
                row.status, row.note = "skipped", "time budget spent"
                report.rows.append(row)
                continue
            try:
                host_call, device_call, logits_call = calls(backend, b)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(args.device)
                t = timer(host_call)
                row.calls = len(t)
                row.call_ms = statistics.median(t)
                row.call_p90_ms = float(np.percentile(t, 90))
                row.utt_ms = row.call_ms / b
                row.throughput = b * utt_s / (row.call_ms / 1000)
                if cuda:  # the server's call's peak (the forward's is lower; the logits copy's higher)
                    row.peak_mib = torch.cuda.max_memory_allocated(args.device) / 2**20
                if device_call is not None:
                    row.device_ms = statistics.median(timer(device_call))
                if logits_call is not None:
                    try:
                        row.logits_ms = statistics.median(timer(logits_call))
                    except Exception as e:  # the full logits need more memory than the ids: say so, keep the row
                        row.note = f"with logits: {'oom' if _is_oom(torch, e) else type(e).__name__}"
                        _release(torch, cuda)
            except Exception as e:  # one bad shape must not lose the rest of a GPU slot
                row.status = "oom" if _is_oom(torch, e) else "error"
                row.note = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                _release(torch, cuda)
            report.rows.append(row)
            print(
                f"{name} {precision} batch {b}: {row.status} "
                f"{'' if row.call_ms is None else f'{row.call_ms:.1f} ms/call'}",
                file=sys.stderr,
                flush=True,
            )
        del backend
    _release(torch, cuda)


def sensevoice_calls(utt_frames: int, seed: int) -> Callable[[Any, int], tuple[Callable, Callable, Callable | None]]:
    def calls(backend: Any, b: int) -> tuple[Callable, Callable, Callable | None]:
        rng = np.random.default_rng(seed)
        feats = rng.standard_normal((b, utt_frames, backend.input_size)).astype(np.float32)
        lens = np.full(b, utt_frames, np.int32)
        lang = np.zeros(b, np.int32)
        tn = np.full(b, 14, np.int32)
        return (
            (lambda: backend.best_path(feats, lens, lang, tn)),
            (lambda: backend.forward(feats, lens, lang, tn)),
            (lambda: backend.run(feats, lens, lang, tn)),
        )

    return calls


def campplus_calls(frames: int, seed: int) -> Callable[[Any, int], tuple[Callable, Callable, Callable | None]]:
    def calls(backend: Any, b: int) -> tuple[Callable, Callable, Callable | None]:
        rng = np.random.default_rng(seed)
        feats = rng.standard_normal((b, frames, backend.feat_dim)).astype(np.float32)
        return (lambda: backend.run(feats)), (lambda: backend.forward(feats)), None

    return calls


def fp16_check(models: Path, device: str, utt_frames: int, seed: int) -> dict[str, Any]:
    """How far fp16 logits are from fp32 on the same input: max abs difference, argmax agreement."""
    from asr_server.engines.sensevoice.torch import TorchSenseVoice

    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((4, utt_frames, 560)).astype(np.float32)
    lens = np.array([utt_frames, utt_frames - 7, utt_frames // 2, utt_frames], np.int32)
    args = (feats, lens, np.zeros(4, np.int32), np.full(4, 14, np.int32))
    out = {}
    for precision in ("fp32", "fp16"):
        backend = TorchSenseVoice(models / "SenseVoiceSmall", device, precision)
        out[precision] = backend.run(*args)
        del backend
    (a, la), (h, lh) = out["fp32"], out["fp16"]
    valid = np.arange(a.shape[1])[None, :] < la[:, None]
    return {
        "sensevoice_fp16_max_abs_logit_diff": round(float(np.abs(a - h)[valid].max()), 4),
        "sensevoice_fp16_argmax_agreement": round(float((a.argmax(-1) == h.argmax(-1))[valid].mean()), 4),
        "sensevoice_fp16_finite": bool(np.isfinite(h).all()),
        "lengths_equal": bool((la == lh).all()),
    }


def _fmt(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def markdown(report: Report) -> str:
    m = report.machine
    s = report.settings
    lines = []
    gpu = (
        f"{m['gpu']} ({m['gpu_memory_gib']} GiB, compute {m['capability']}), driver {m.get('driver') or '?'}, "
        f"CUDA {m['cuda']}, cuDNN {m['cudnn']}; "
        if "gpu" in m
        else "no GPU; "
    )
    lines.append(
        f"Machine: {gpu}{m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}"
        f"{', funasr ' + m['funasr'] if 'funasr' in m else ''}."
    )
    lines.append(
        f"Input: synthetic features of a {s['utterance_s']} s utterance ({s['sensevoice_frames']} LFR frames "
        f"for SenseVoice, {s['campplus_frames']} fbank frames for CAM++), all items of a batch equally long; "
        f"device {s['device']}; median of up to {s['max_repeats']} calls after {s['warmup']} warm-up calls. "
        "A call is what the server makes: host features in, each frame's best token id (SenseVoice's "
        "`best_path`: the argmax taken on the device) or the embeddings (CAM++) back on the host; "
        '"with logits" is SenseVoice\'s `run`, the whole float32 logits copied back instead; '
        '"forward only" leaves the outputs on the device. fp16 is autocast (weights stay fp32).'
    )
    lines.append("")
    lines.append(
        "| model | precision | batch | ms per call | p90 ms | ms with logits | ms forward only | "
        "ms per utterance | utt-s per s | peak GPU MiB | calls | note |"
    )
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in report.rows:
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}".rstrip(": ")
        lines.append(
            f"| {r.model} | {r.precision} | {r.batch} | {_fmt(r.call_ms)} | {_fmt(r.call_p90_ms)} | "
            f"{_fmt(r.logits_ms)} | {_fmt(r.device_ms)} | {_fmt(r.utt_ms, 2)} | {_fmt(r.throughput, 0)} | {_fmt(r.peak_mib, 0)} | "
            f"{r.calls or ''} | {note} |"
        )
    lines.append("")
    lines.append("| model | device | provider | load s | model GPU MiB |")
    lines.append("| --- | --- | --- | ---: | ---: |")
    for name, info in report.models.items():
        lines.append(
            f"| {name} | {info['device']} | {info['provider']} | {info['load_s']} | {_fmt(info['gpu_memory_mib'], 0)} |"
        )
    if report.checks:
        lines.append("")
        lines.append("Checks: " + ", ".join(f"{k} {v}" for k, v in report.checks.items()) + ".")
    lines.append(f"\nTotal {report.total_s:.0f} s.")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return values


def _precisions(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in ("fp32", "fp16")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"precisions are fp32 and fp16, not {', '.join(bad) or text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        type=Path,
        default=REPO / "build" / "bench-models",
        help="full-size random-weight models: reused when present, else built here",
    )
    ap.add_argument("--rebuild", action="store_true", help="build the models even if present")
    ap.add_argument(
        "--torch-only",
        action="store_true",
        help="build only the torch weights (no ONNX export, no tokenizer): fastest on a GPU slot",
    )
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--batches", type=_int_list, default=[1, 8, 32, 128])
    ap.add_argument("--precisions", type=_precisions, default=["fp32", "fp16"])
    ap.add_argument("--utterance-s", type=float, default=4.5, help="length of every utterance")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-time-s", type=float, default=1.0, help="time each shape at least this long …")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, default=30, help="… but with at most this many calls")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting new measurements after this many seconds (the rest are reported skipped)",
    )
    ap.add_argument("--skip-campplus", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    from asr_server.engines.features import SenseVoiceFrontend
    from asr_server.engines.sensevoice.torch import TorchSenseVoice
    from asr_server.engines.speaker.campplus import TorchCampplus
    from asr_server.engines.torch import import_torch, resolve_device
    from asr_server.errors import BackendUnavailableError

    try:
        torch = import_torch()
        device = resolve_device(args.device)
    except (BackendUnavailableError, ValueError) as e:
        print(f"bench_gpu: {e}", file=sys.stderr)
        return 2
    if args.device != "cpu" and device == "cpu":
        print(
            f"bench_gpu: --device {args.device} but no CUDA device is usable here (see the warning above); "
            "pass --device cpu to measure the CPU",
            file=sys.stderr,
        )
        return 2
    args.device = device
    models = ensure_models(args.models, args.rebuild, args.torch_only)

    samples = int(args.utterance_s * SAMPLE_RATE)
    sv_frames = SenseVoiceFrontend.num_frames(samples)
    cam_frames = 1 + (samples - 400) // 160
    report = Report(
        machine=machine_info(torch, device),
        settings={
            "device": device,
            "batches": args.batches,
            "precisions": args.precisions,
            "utterance_s": args.utterance_s,
            "sensevoice_frames": sv_frames,
            "campplus_frames": cam_frames,
            "warmup": args.warmup,
            "min_time_s": args.min_time_s,
            "max_repeats": args.max_repeats,
            "models": str(models),
        },
    )

    bench_model(
        "SenseVoice",
        lambda p: TorchSenseVoice(models / "SenseVoiceSmall", device, p),
        sensevoice_calls(sv_frames, 0),
        args,
        torch,
        report,
        deadline,
        args.utterance_s,
    )
    if not args.skip_campplus:
        bench_model(
            "CAM++",
            lambda p: TorchCampplus(models / "campplus" / "campplus_cn_common.bin", device, p),
            campplus_calls(cam_frames, 1),
            args,
            torch,
            report,
            deadline,
            args.utterance_s,
        )
    if device.startswith("cuda") and "fp16" in args.precisions and time.perf_counter() < deadline:
        try:
            report.checks.update(fp16_check(models, device, sv_frames, 2))
        except Exception as e:  # the timings above are the point; a failed check is reported, not fatal
            report.checks["fp16_check_error"] = str(e).splitlines()[0][:160]
    report.total_s = time.perf_counter() - t_start

    text = markdown(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
