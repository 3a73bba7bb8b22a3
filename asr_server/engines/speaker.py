"""Speaker embeddings with CAM++: utterances in, unit-length voiceprint vectors out.

As with SenseVoice, the frontend (`features.campplus_features`) is shared and the backend only
maps features to embeddings. CAM++ has no length input and zero padding changes its output, so a
batch is split into groups of equal feature length and each group is one backend call; equal
lengths are common because the session layer crops utterances to a few fixed durations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .features import campplus_features
from .runtime import ModelFileError, ModelInfo, check_signature, open_onnx

_ONNX_INPUTS = {"feature": "tensor(float)"}
_ONNX_OUTPUTS = ["embedding"]
#: CAM++ downsamples time by 2 and convolves with kernels up to 5 wide; shorter inputs are
#: repeated up to this many frames (0.3 s) so that every utterance gets an embedding.
MIN_FRAMES = 30


class SpeakerBackend(Protocol):
    """Features [B,T,80] f32 in, raw embeddings [B,D] out."""

    info: ModelInfo
    dim: int | None

    def run(self, feats: np.ndarray) -> np.ndarray: ...


class OnnxSpeakerBackend:
    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.path = Path(path)
        self.session, provider, used_device, load_s = open_onnx(self.path, device, threads)
        check_signature(self.session, self.path, _ONNX_INPUTS, _ONNX_OUTPUTS)
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 3 or shape[2] not in (80, "80"):
            raise ModelFileError(f"{self.path}: input 'feature' has shape {shape}, expected [B, T, 80]")
        dim = self.session.get_outputs()[0].shape[-1]
        self.dim: int | None = dim if isinstance(dim, int) else None
        self.info = ModelInfo(name="speaker", path=self.path, backend="onnxruntime", device=used_device,
                              provider=provider, precision="fp32", load_s=load_s)

    def run(self, feats: np.ndarray) -> np.ndarray:
        (emb,) = self.session.run(_ONNX_OUTPUTS, {"feature": np.ascontiguousarray(feats, dtype=np.float32)})
        return emb


def _pad_short(feats: np.ndarray) -> np.ndarray:
    if feats.shape[0] >= MIN_FRAMES:
        return feats
    reps = -(-MIN_FRAMES // feats.shape[0])
    return np.tile(feats, (reps, 1))[:MIN_FRAMES]


class SpeakerEmbedder:
    """CAM++ (or any model with the same ONNX signature) as an embedder. Not thread-safe."""

    def __init__(self, backend: SpeakerBackend) -> None:
        self.backend = backend
        self.info = backend.info
        if backend.dim is None:
            probe = backend.run(np.zeros((1, MIN_FRAMES, 80), dtype=np.float32))
            backend.dim = int(probe.shape[-1])
        self.dim: int = int(backend.dim)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", threads: int = 0, backend: str = "onnx",
             precision: str = "fp32") -> "SpeakerEmbedder":
        """CAM++ from `path` (the ONNX file); `backend="torch"` reads the weights beside it instead
        (`campplus_cn_common.bin` with the dimensions of its `config.yaml`)."""
        if backend == "torch":
            from .torch_backend import CAMPPLUS_WEIGHTS, TorchSpeakerBackend

            return cls(TorchSpeakerBackend(Path(path).parent / CAMPPLUS_WEIGHTS, device, precision, threads))
        if backend != "onnx":
            raise ValueError(f"backend must be onnx or torch, not {backend!r}")
        return cls(OnnxSpeakerBackend(Path(path), device, threads))

    def features(self, audio: np.ndarray) -> np.ndarray:
        return _pad_short(campplus_features(audio))

    def embed_batch(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings [B, D] of 16 kHz mono utterances, each of unit L2 norm, in input order."""
        out = np.zeros((len(audios), self.dim), dtype=np.float32)
        feats = [self.features(a) for a in audios]
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            groups.setdefault(f.shape[0], []).append(i)
        for idx in groups.values():
            emb = self.backend.run(np.stack([feats[i] for i in idx]))
            out[idx] = emb
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return self.embed_batch([audio])[0]
