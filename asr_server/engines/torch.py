"""The PyTorch runtime: device and precision placement shared by every model's torch runtime.

The torch runtimes (`sensevoice/torch.py`, `speaker/campplus.py`, `speaker/ecapa.py`) run funasr's
and speechbrain's own model classes behind the same "features in, outputs out" contract as the ONNX
runtimes, so frontends and decoding stay shared. They exist for GPUs without `onnxruntime-gpu` (or
without cuDNN 9) and for fp16. Weights are the files the hubs publish.

fp16 is CUDA only and means autocast (mixed precision): weights stay fp32, matmuls and
convolutions run in fp16 on the tensor cores, while the residual stream, the positional encoding
(sines of positions in the hundreds lose their phase in fp16), funasr's LayerNorm and softmax
stay fp32; outputs always come back as float32. On CPU fp16 is refused with a warning and fp32 runs instead.

torch and funasr are imported when a backend is built, never at import time: a server on the
ONNX backend never loads them, and a server without them gets `BackendUnavailableError` naming
the package to install.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ModelFileError
from .base import ModelInfo

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
INSTALL_HINT = "`scripts/setup.sh torch` (the torch lock)"


def import_torch() -> Any:
    """`torch`, or `BackendUnavailableError` saying how to install it."""
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError(
            f"engine.backend: torch needs PyTorch ({e}); install it with {INSTALL_HINT}, or set engine.backend: onnx"
        ) from None
    return torch


def import_torch_module(module: str, what: str) -> Any:
    """Import a module of the torch stack; funasr prints notices (no ffmpeg) to stdout on import,
    which go to the debug log instead of the server's output."""
    import importlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            mod = importlib.import_module(module)
        if printed.getvalue().strip():
            log.debug("importing %s printed: %s", module, printed.getvalue().strip())
        return mod
    except ImportError as e:
        raise BackendUnavailableError(
            f"engine.backend: torch needs {what} ({e}); install it with {INSTALL_HINT}, or set engine.backend: onnx"
        ) from None


def resolve_device(device: str) -> str:
    """`cpu` or `cuda:N` for `device` (auto | cpu | cuda | cuda:N).

    auto takes the first GPU when PyTorch sees one. Asking for CUDA where PyTorch sees none
    falls back to CPU with a warning that says why; a GPU index past the last one is an error.
    """
    if device == "cpu":
        return "cpu"
    torch = import_torch()
    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda:0" if available else "cpu"
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if not available:
        why = (
            "this PyTorch build has no CUDA support (a CPU wheel)"
            if torch.version.cuda is None
            else f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
        )
        log.warning("engine.device=%s but %s. FALLING BACK TO CPU.", device, why)
        return "cpu"
    index = int(device[5:]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise BackendUnavailableError(
            f"engine.device={device} but PyTorch sees {count} GPU(s) (cuda:0..cuda:{count - 1})"
        )
    return f"cuda:{index}"


def resolve_precision(precision: str, device: str, name: str) -> str:
    """The precision `name` will run in on `device` (already resolved): fp16 on CPU becomes fp32, loudly."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device == "cpu":
        log.warning("engine.precision=fp16 needs CUDA; %s runs in fp32 on CPU", name)
        return "fp32"
    return precision


def _unwrap_state(state: Any, path: Path) -> dict[str, Any]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ModelFileError(f"{path}: not a PyTorch state dict")
    return state


def load_state(path: Path) -> dict[str, Any]:
    """The tensors of a checkpoint (plain state dict or funasr's wrappers), read on the CPU."""
    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for truncated or foreign files
        raise ModelFileError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _unwrap_state(state, path)


def load_into(model: Any, state: dict[str, Any], path: Path) -> None:
    """Load strictly about what the model needs: a missing or misshapen tensor is an error, an extra
    one (training leftovers in published checkpoints) only a debug line."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches; torch lists one per line after a header
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ModelFileError(
            f"{path}: weights do not fit the model its config describes: "
            f"{lines[1] if len(lines) > 1 else lines[0] if lines else e}"
        ) from None
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5]) + (" …" if len(result.missing_keys) > 5 else "")
        raise ModelFileError(
            f"{path}: {len(result.missing_keys)} tensors missing ({shown}); wrong or truncated checkpoint?"
        )
    if result.unexpected_keys:
        log.debug("%s: %d tensors not used by the model", path, len(result.unexpected_keys))


class TorchPlacement:
    """Where a model runs, and the helpers every torch backend needs (autocast, GPU memory taken)."""

    def __init__(self, device: str, precision: str, threads: int, name: str) -> None:
        self.torch = import_torch()
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, name)
        if self.device == "cpu" and threads > 0:
            # torch has one intra-op pool per process: the last model loaded sets it for all.
            self.torch.set_num_threads(threads)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def provider(self) -> str:
        if self.cuda:
            return f"CUDA {self.torch.cuda.get_device_name(self.device)}"
        return "CPU"

    def place(self, model: Any) -> float | None:
        """Move `model` (fp32) to the device; returns the GPU memory it took (MiB), None on CPU."""
        model.eval()
        if not self.cuda:
            return None
        self.torch.cuda.synchronize(self.device)
        before = self.torch.cuda.memory_allocated(self.device)
        model.to(device=self.device)
        self.torch.cuda.synchronize(self.device)
        return (self.torch.cuda.memory_allocated(self.device) - before) / 2**20

    def autocast(self) -> Any:
        if self.cuda and self.precision == "fp16":
            return self.torch.autocast(device_type="cuda", dtype=self.torch.float16)
        return contextlib.nullcontext()

    def tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def info(self, name: str, path: Path, started: float, gpu_memory_mb: float | None) -> ModelInfo:
        """The start-up report of a model placed here, loaded since `started` (a perf_counter)."""
        return ModelInfo(
            name,
            Path(path),
            "torch",
            self.device,
            self.provider,
            self.precision,
            time.perf_counter() - started,
            gpu_memory_mb,
        )

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
