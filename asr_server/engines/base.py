"""What an engine is: one small `Protocol` per task, and the start-up report every engine gives.

The core talks to engines only through these: a recogniser maps utterances to transcripts, an
embedder maps utterances to unit-length voiceprint vectors, a VAD model maps windows to speech
probabilities. Each is implemented once per model, with a runtime (ONNX Runtime or PyTorch) behind
it that only maps features to model outputs; frontends and decoding are shared by both runtimes.
None of them is thread-safe: the core calls each from one worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import yaml

from ..errors import ModelFileError
from ..types import Hotword, Transcript


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the start-up log says about one loaded model."""

    name: str
    path: Path
    backend: str
    """The runtime: onnxruntime or torch."""
    device: str
    provider: str
    precision: str
    load_s: float
    gpu_memory_mb: float | None = None

    def describe(self) -> str:
        mem = f", GPU memory {self.gpu_memory_mb:.0f} MiB" if self.gpu_memory_mb is not None else ""
        return (
            f"{self.name}: {self.path} on {self.backend}/{self.provider} ({self.device}, {self.precision}), "
            f"loaded in {self.load_s:.2f} s{mem}"
        )


class Recognizer(Protocol):
    """Utterances (16 kHz mono float32) in, transcripts out, in one batched call."""

    info: ModelInfo

    def transcribe_batch(
        self,
        audios: Sequence[np.ndarray],
        languages: Sequence[str] | None = None,
        use_itn: Sequence[bool] | None = None,
        hotwords: Sequence[Sequence[Hotword]] | None = None,
    ) -> list[Transcript]: ...


class Embedder(Protocol):
    """Utterances in, speaker embeddings [B, dim] of unit length out."""

    info: ModelInfo
    dim: int

    def embed_batch(self, audios: Sequence[np.ndarray]) -> np.ndarray: ...


@runtime_checkable
class RemoteRecognizer(Protocol):
    """A recogniser that runs elsewhere (a Ray Serve deployment): the same call, awaited; it batches
    where the model is, so the caller sends one utterance per call and many calls at once."""

    info: ModelInfo

    async def transcribe_batch_async(
        self,
        audios: Sequence[np.ndarray],
        languages: Sequence[str] | None = None,
        use_itn: Sequence[bool] | None = None,
        hotwords: Sequence[Sequence[Hotword]] | None = None,
    ) -> list[Transcript]: ...

    def close(self) -> None:
        """Release the connection (blocking)."""
        ...


@runtime_checkable
class RemoteEmbedder(Protocol):
    """An embedder that runs elsewhere, awaited (see `RemoteRecognizer`)."""

    info: ModelInfo
    dim: int

    async def embed_batch_async(self, audios: Sequence[np.ndarray]) -> np.ndarray: ...

    def close(self) -> None:
        """Release the connection (blocking)."""
        ...


class VadModel(Protocol):
    """Many streams' windows in, each one's speech probability and next recurrent state out."""

    info: ModelInfo

    def run(self, samples: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows [B, 576] and states [2, B, 128] → probabilities [B] and the new states [2, B, 128]."""
        ...


def read_yaml_mapping(path: Path) -> dict:
    """A model directory's YAML config as a mapping; an unreadable or non-mapping file is a `ModelFileError`."""
    try:
        conf = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelFileError(f"cannot read {path}: {e}") from None
    if not isinstance(conf, dict):
        raise ModelFileError(f"{path}: top level is not a mapping")
    return conf
