"""Silero VAD: one shared ONNX session, per-stream framing and state, windows batched across streams.

Each stream (`VadStream`) keeps its own 64-sample context and recurrent state; the shared model
(`SileroVad`) runs many streams' windows as one batch, which gives the same probabilities as
separate calls at a fraction of the cost. A stream has at most one window in flight, and only the
stream itself applies the state a result brings (`VadStream.advance`), so its state advances in order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import SAMPLE_RATE, VAD_CONTEXT, VAD_WINDOW
from ..errors import ModelFileError
from .base import ModelInfo
from .contracts import SILERO, SILERO_ONNX
from .onnx import open_onnx

STATE_SHAPE = (2, 128)


def packaged_model_path() -> Path:
    """The `silero_vad.onnx` that the silero-vad package ships, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "vad.model is not set and the silero-vad package is not installed "
            "(pip install silero-vad, or set vad.model to a silero_vad.onnx file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SILERO_ONNX
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
    def load(cls, path: Path | None = None) -> SileroVad:
        path = Path(path) if path is not None else packaged_model_path()
        # One thread: VAD batches are tiny and the ASR engine needs the cores.
        return cls(*open_onnx(path, "cpu", threads=1, contract=SILERO, name="silero-vad"))

    def run_batch(self, windows: Sequence[VadWindow]) -> list[tuple[float, np.ndarray]]:
        x = np.stack([w.samples for w in windows]).astype(np.float32, copy=False)
        state = np.stack([w.state for w in windows], axis=1).astype(np.float32, copy=False)
        out, state_n = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
        return [(float(out[i, 0]), np.ascontiguousarray(state_n[:, i, :])) for i in range(len(windows))]


class VadStream:
    """Per-stream framing: turns arbitrary PCM chunks into model windows, carrying context and state."""

    def __init__(self) -> None:
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(VAD_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Add samples; return the complete 512-sample chunks now available, in order."""
        buf = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        n = len(buf) // VAD_WINDOW
        chunks = [buf[i * VAD_WINDOW : (i + 1) * VAD_WINDOW] for i in range(n)]
        self._pending = buf[n * VAD_WINDOW :]
        return chunks

    def window(self, chunk: np.ndarray) -> VadWindow:
        """The model input for `chunk` (the next chunk from `push`): context + chunk, current state."""
        samples = np.concatenate([self._context, chunk])
        self._context = chunk[-VAD_CONTEXT:].copy()
        return VadWindow(samples, self.state)

    def advance(self, state: np.ndarray) -> None:
        """Take the recurrent state the model returned for this stream's last window."""
        self.state = state

    def reset(self) -> None:
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(VAD_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
