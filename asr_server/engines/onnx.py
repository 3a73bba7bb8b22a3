"""ONNX Runtime sessions with an honest account of where they run.

Every engine opens its model through `open_onnx`, so the choice of execution provider, the loud
fallback from CUDA to CPU, the check against the model's contract and the start-up report are the
same for all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import EngineAborted, ModelFileError
from .base import ModelInfo
from .contracts import ModelContract, match_signature, session_signature

log = logging.getLogger(__name__)


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
        log.warning(
            "engine.device=%s but ONNX Runtime has no CUDAExecutionProvider (available: %s); "
            "install onnxruntime-gpu with CUDA 12 and cuDNN 9 to run on the GPU. FALLING BACK TO CPU.",
            device,
            ", ".join(available),
        )
    return ["CPUExecutionProvider"], "cpu"


def open_onnx(
    path: Path,
    device: str = "cpu",
    threads: int = 0,
    contract: ModelContract | None = None,
    *,
    name: str = "model",
    precision: str = "fp32",
) -> tuple[ort.InferenceSession, ModelInfo]:
    """Open an ONNX model and check it against `contract`; the session and the start-up report of
    where it really runs (the provider actually used, which may be the CPU after a CUDA fallback)."""
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
        log.warning(
            "CUDA provider failed to initialise for %s (a missing cuDNN 9 is the usual cause); RUNNING ON CPU.", path
        )
        used_device = "cpu"
    if contract is not None:
        check_contract(sess, path, contract)
    return sess, ModelInfo(name, path, "onnxruntime", used_device, used, precision, load_s)


def check_contract(sess: ort.InferenceSession, path: Path, contract: ModelContract) -> None:
    """Raise `ModelFileError` naming every way the session differs from what its engine feeds and reads."""
    problems = match_signature(session_signature(sess), contract)
    if problems:
        raise ModelFileError(f"{path}: does not match the {contract.model} engine: {'; '.join(problems)}")


class Runs:
    """`session.run` calls that another thread can stop: each call gets its own `RunOptions`, and
    `abort` sets `terminate` on the one a thread runs (or on all of them; ONNX Runtime checks it
    between kernels), so a computation nobody wants any more frees the cores within milliseconds."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._running: dict[int, ort.RunOptions] = {}

    def __call__(self, outputs: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        opts = ort.RunOptions()
        me = threading.get_ident()
        with self._lock:
            self._running[me] = opts
        try:
            return self.session.run(outputs, feeds, opts)
        except Exception as e:
            if opts.terminate:
                raise EngineAborted("the computation was aborted: nobody waits for its result") from e
            raise
        finally:
            with self._lock:
                self._running.pop(me, None)

    def abort(self, thread: int | None = None) -> None:
        """Stop the call that `thread` runs, or every call in flight (called from another thread)."""
        with self._lock:
            for ident, opts in self._running.items():
                if thread is None or ident == thread:
                    opts.terminate = True
