"""The embedder every speaker model shares: utterances in, unit-length voiceprint vectors out.

A speaker model gives a different embedding for an utterance padded with zeros than for the
utterance alone (CAM++ has no length input; ECAPA's "same" convolutions still see the padding
near the end), so voiceprints would depend on what an utterance happened to be batched with.
The rule, written once here: only utterances of equal feature length share a model call, and
each embedding is scaled to unit length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ..base import ModelInfo


class SpeakerEmbedder(ABC):
    """An `engines.base.Embedder`: a model's features and its runtime call, batched by equal length.
    Not thread-safe: one caller at a time (the micro-batcher's worker thread)."""

    info: ModelInfo
    dim: int

    @abstractmethod
    def features(self, audio: np.ndarray) -> np.ndarray:
        """What the runtime reads for one 16 kHz mono utterance; its first axis is its length."""

    @abstractmethod
    def run(self, feats: list[np.ndarray]) -> np.ndarray:
        """Raw embeddings [n, D] of features of equal length."""

    def embed_batch(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings [B, D] of 16 kHz mono utterances, each of unit L2 norm, in input order."""
        out = np.zeros((len(audios), self.dim), dtype=np.float32)
        feats = [self.features(a) for a in audios]
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            groups.setdefault(f.shape[0], []).append(i)
        for idx in groups.values():
            out[idx] = self.run([feats[i] for i in idx]).reshape(len(idx), -1)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return self.embed_batch([audio])[0]


def repeat_to(x: np.ndarray, length: int) -> np.ndarray:
    """`x` repeated along its first axis up to `length` rows (zeros for empty input): short
    utterances still get an embedding, without the padding changing it."""
    if x.shape[0] >= length:
        return x
    if x.shape[0] == 0:
        return np.zeros((length, *x.shape[1:]), dtype=x.dtype)
    reps = -(-length // x.shape[0])
    return np.tile(x, (reps,) + (1,) * (x.ndim - 1))[:length]
