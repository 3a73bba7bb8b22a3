"""Silero VAD: one shared ONNX session, per-stream framing and state, windows batched across streams.

Each stream (`VadStream`) keeps its own 64-sample context and recurrent state and frames its audio
into model inputs a block at a time; the shared model (`SileroVad`) runs many streams' windows as
one batch, which gives the same probabilities as separate calls at a fraction of the cost. A
stream has at most one window in flight, and only the stream applies the state a result brings
(`VadStream.advance`), so its state advances in order.
"""

from __future__ import annotations

import importlib.util
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


class SileroVad:
    """The shared Silero ONNX model; `run` takes many streams' windows at once (the VAD batcher's call)."""

    def __init__(self, session, info: ModelInfo) -> None:
        self._session = session
        self.info = info
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    @classmethod
    def load(cls, path: Path | None = None) -> SileroVad:
        path = Path(path) if path is not None else packaged_model_path()
        # One thread: VAD batches are tiny and the ASR engine needs the cores.
        return cls(*open_onnx(path, "cpu", threads=1, contract=SILERO, name="silero-vad"))

    def run(self, samples: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows [B, 576] and their streams' states [2, B, 128] → probabilities [B] and new states."""
        out, state_n = self._session.run(None, {"input": samples, "state": state, "sr": self._sr})
        return out[:, 0], state_n


class VadStream:
    """Per-stream framing: turns arbitrary PCM chunks into model windows, carrying context and state."""

    def __init__(self) -> None:
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(VAD_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def push_block(self, pcm: np.ndarray) -> np.ndarray:
        """Add samples; the complete chunks now available as one array [n, 512] (n may be 0)."""
        buf = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)]) if len(self._pending) else pcm
        n = len(buf) // VAD_WINDOW
        self._pending = np.array(buf[n * VAD_WINDOW :], dtype=np.float32)
        return np.asarray(buf[: n * VAD_WINDOW], dtype=np.float32).reshape(n, VAD_WINDOW)

    def inputs(self, block: np.ndarray) -> np.ndarray:
        """The model inputs [n, 576] for the next chunks `block` [n, 512] (from `push_block`): each
        chunk with the 64 samples before it as context, in one array."""
        n = block.shape[0]
        out = np.empty((n, VAD_CONTEXT + VAD_WINDOW), dtype=np.float32)
        if n:
            out[:, VAD_CONTEXT:] = block
            out[0, :VAD_CONTEXT] = self._context
            out[1:, :VAD_CONTEXT] = block[:-1, -VAD_CONTEXT:]
            self._context = block[-1, -VAD_CONTEXT:].copy()
        return out

    def advance(self, state: np.ndarray) -> None:
        """Take the recurrent state the model returned for this stream's last window."""
        self.state = state

    def reset(self) -> None:
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(VAD_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
