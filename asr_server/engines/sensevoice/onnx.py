"""SenseVoice on ONNX Runtime: the funasr-exported graph (or FunASR's pre-exported one), features in, logits out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contracts import SENSEVOICE
from ..onnx import Runs, open_onnx


class OnnxSenseVoice:
    """The funasr-exported graph under ONNX Runtime."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0, precision: str = "fp32") -> None:
        self.path = Path(path)
        self.session, self.info = open_onnx(
            self.path, device, threads, SENSEVOICE, name="sensevoice", precision=precision
        )
        out = {o.name: o for o in self.session.get_outputs()}["ctc_logits"]
        dim = out.shape[-1] if out.shape else None
        self.vocab_size: int | None = dim if isinstance(dim, int) else None
        self._run = Runs(self.session)

    def abort(self, thread: int | None = None) -> None:
        """Stop the computation `thread` runs, or all of them (their callers are gone)."""
        self._run.abort(thread)

    def run(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, lens = self._run(
            SENSEVOICE.output_names,
            {
                "speech": np.ascontiguousarray(feats, dtype=np.float32),
                "speech_lengths": np.asarray(lengths, dtype=np.int32),
                "language": np.asarray(lang_ids, dtype=np.int32),
                "textnorm": np.asarray(textnorm_ids, dtype=np.int32),
            },
        )
        return logits, lens

    def best_path(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, lens = self.run(feats, lengths, lang_ids, textnorm_ids)
        return logits.argmax(axis=-1).astype(np.int32), lens

    def top_k(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, lens = self.run(feats, lengths, lang_ids, textnorm_ids)
        return (*top_k(logits, k), lens)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's best `k` token ids [..., k] int32 (best first; among equals the lowest id, as
    argmax takes) and their logits less the frame's best [..., k] float32.

    `k` argmaxes, each best masked before the next: 10x faster than `np.argpartition` over 25,055
    classes (8 ms against 88 ms for two 5 s utterances' logits, 2 cores), since k is small."""
    k = min(k, logits.shape[-1])
    work = np.array(logits, dtype=np.float32).reshape(-1, logits.shape[-1])  # a copy: it is masked
    rows = np.arange(work.shape[0])
    ids = np.empty((work.shape[0], k), np.int32)
    vals = np.empty((work.shape[0], k), np.float32)
    for i in range(k):
        best = work.argmax(axis=-1)
        ids[:, i], vals[:, i] = best, work[rows, best]
        work[rows, best] = -np.inf
    shape = (*logits.shape[:-1], k)
    return ids.reshape(shape), (vals - vals[:, :1]).reshape(shape)
