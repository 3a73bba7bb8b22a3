"""Silero VAD: one shared ONNX session, per-stream state, windows batched across streams.

Each stream (`VadStream`) keeps its own 64-sample context and recurrent state; the shared model
(`SileroVad`) runs many streams' windows as one batch, which gives the same probabilities as
separate calls at a fraction of the cost. A stream has at most one window in flight, so its
state advances in order.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from asr_server.engines.runtime import ModelInfo, ModelFileError, check_signature, open_onnx

SAMPLE_RATE = 16000
WINDOW = 512  # new samples per window at 16 kHz
CONTEXT = 64  # samples of the previous window prepended to each input
STATE_SHAPE = (2, 128)


def packaged_model_path() -> Path:
    """The `silero_vad.onnx` that the silero-vad package ships, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("vad.model is not set and the silero-vad package is not installed "
                             "(pip install silero-vad, or set vad.model to a silero_vad.onnx file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise ModelFileError(f"the silero-vad package has no {path.name} at {path}")
    return path


@dataclass(slots=True)
class VadWindow:
    """One model input: 64 context samples + 512 new ones, and the stream's state before it."""

    samples: np.ndarray  # float32 [576]
    state: np.ndarray  # float32 [2, 128]


class SileroVad:
    """The shared Silero ONNX model; `run_batch` is what the VAD micro-batcher calls."""

    def __init__(self, session, info: ModelInfo) -> None:
        self._session = session
        self.info = info
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    @classmethod
    def load(cls, path: Path | None = None) -> "SileroVad":
        path = Path(path) if path is not None else packaged_model_path()
        # One thread: VAD batches are tiny and the ASR engine needs the cores.
        sess, provider, device, load_s = open_onnx(path, "cpu", threads=1)
        check_signature(sess, path, {"input": "tensor(float)", "state": "tensor(float)", "sr": "tensor(int64)"},
                        ["output", "stateN"])
        return cls(sess, ModelInfo("silero-vad", path, "onnxruntime", device, provider, "fp32", load_s))

    def run_batch(self, windows: Sequence[VadWindow]) -> list[tuple[float, np.ndarray]]:
        x = np.stack([w.samples for w in windows]).astype(np.float32, copy=False)
        state = np.stack([w.state for w in windows], axis=1).astype(np.float32, copy=False)
        out, state_n = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
        return [(float(out[i, 0]), np.ascontiguousarray(state_n[:, i, :])) for i in range(len(windows))]


class VadStream:
    """Per-stream framing: turns arbitrary PCM chunks into model windows, carrying context and state."""

    def __init__(self) -> None:
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Add samples; return the complete 512-sample chunks now available, in order."""
        buf = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        n = len(buf) // WINDOW
        chunks = [buf[i * WINDOW:(i + 1) * WINDOW] for i in range(n)]
        self._pending = buf[n * WINDOW:]
        return chunks

    def window(self, chunk: np.ndarray) -> VadWindow:
        """The model input for `chunk` (the next chunk from `push`): context + chunk, current state."""
        samples = np.concatenate([self._context, chunk])
        self._context = chunk[-CONTEXT:].copy()
        return VadWindow(samples, self.state)

    def reset(self) -> None:
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)


def rms_dbfs(chunk: np.ndarray) -> float:
    """Level of a float chunk in dBFS, for the energy gate in front of the VAD."""
    power = float(np.mean(np.square(chunk, dtype=np.float64))) if len(chunk) else 0.0
    return 10.0 * np.log10(power) if power > 1e-20 else -200.0
