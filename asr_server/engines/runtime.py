"""ONNX Runtime sessions with an honest account of where they run.

Every engine opens its model through `open_onnx`, so the choice of execution provider, the loud
fallback from CUDA to CPU and the start-up report (`ModelInfo`) are the same for all of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import yaml

log = logging.getLogger(__name__)


class ModelFileError(RuntimeError):
    """A model file is missing, truncated or of the wrong signature."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the start-up log says about one loaded model."""

    name: str
    path: Path
    backend: str
    device: str
    provider: str
    precision: str
    load_s: float
    gpu_memory_mb: float | None = None

    def describe(self) -> str:
        mem = f", GPU memory {self.gpu_memory_mb:.0f} MiB" if self.gpu_memory_mb is not None else ""
        return (f"{self.name}: {self.path} on {self.backend}/{self.provider} ({self.device}, {self.precision}), "
                f"loaded in {self.load_s:.2f} s{mem}")


def read_yaml_mapping(path: Path) -> dict:
    """A model directory's YAML config as a mapping; an unreadable or non-mapping file is a `ModelFileError`."""
    try:
        conf = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelFileError(f"cannot read {path}: {e}") from None
    if not isinstance(conf, dict):
        raise ModelFileError(f"{path}: top level is not a mapping")
    return conf


def resolve_providers(device: str) -> tuple[list, str]:
    """Pick ONNX Runtime providers for `device` (auto | cpu | cuda | cuda:N).

    Returns the provider list and the device actually used. Asking for CUDA where the CUDA
    provider is absent falls back to CPU with a warning that says why.
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    want_cuda = device.startswith("cuda")
    if "CUDAExecutionProvider" in available:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"
    if want_cuda:
        log.warning("engine.device=%s but ONNX Runtime has no CUDAExecutionProvider (available: %s); "
                    "install onnxruntime-gpu with CUDA 12 and cuDNN 9 to run on the GPU. FALLING BACK TO CPU.",
                    device, ", ".join(available))
    return ["CPUExecutionProvider"], "cpu"


def open_onnx(path: Path, device: str = "cpu", threads: int = 0) -> tuple[ort.InferenceSession, str, str, float]:
    """Open an ONNX model; returns (session, provider actually used, device, load seconds)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    providers, used_device = resolve_providers(device)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Several sessions share the cores (VAD, recogniser, speaker): idle intra-op threads must sleep,
    # not spin, or each model's pool burns the CPU the others need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
        raise ModelFileError(f"cannot load {path}: {e}") from None
    load_s = time.perf_counter() - t0
    used = sess.get_providers()[0]
    if used_device.startswith("cuda") and used != "CUDAExecutionProvider":
        log.warning("CUDA provider failed to initialise for %s (a missing cuDNN 9 is the usual cause); "
                    "RUNNING ON CPU.", path)
        used_device = "cpu"
    return sess, used, used_device, load_s


def check_signature(sess: ort.InferenceSession, path: Path, inputs: dict[str, str], outputs: list[str]) -> None:
    """Raise `ModelFileError` unless the session has these input names (with ONNX element types) and outputs."""
    got_in = {i.name: i.type for i in sess.get_inputs()}
    got_out = [o.name for o in sess.get_outputs()]
    for name, typ in inputs.items():
        if name not in got_in:
            raise ModelFileError(f"{path}: input {name!r} missing (has {sorted(got_in)})")
        if got_in[name] != typ:
            raise ModelFileError(f"{path}: input {name!r} is {got_in[name]}, expected {typ}")
    for name in outputs:
        if name not in got_out:
            raise ModelFileError(f"{path}: output {name!r} missing (has {got_out})")
