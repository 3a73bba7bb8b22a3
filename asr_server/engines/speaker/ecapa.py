"""ECAPA-TDNN speaker embeddings (speechbrain `spkrec-ecapa-voxceleb`) on PyTorch or ONNX Runtime.

The model folder is what `asr-server models pull --ecapa` writes (`models/ecapa/`): speechbrain's
`hyperparams.yaml` and the checkpoints it names. It is loaded with speechbrain's own
`EncoderClassifier`, pointed at the folder and barred from the network, so features are
speechbrain's (its Fbank and sentence mean normalisation), not the Kaldi fbank of CAM++.

On ONNX Runtime (`EcapaOnnx`) the embedding network is `ecapa.onnx` beside those files, written
by `asr-server models export`, and the features are speechbrain's re-implemented in numpy
(`features.ecapa_features`, held to speechbrain's output by the tests).

Both are `SpeakerEmbedder`s with its batching rule: only utterances of equal length share a call.
The ONNX graph does take relative lengths and masks padding in its pooling, but its "same"
convolutions still see the padding near the end of a shorter utterance (cosine ~0.9998 to the
single call on the test stand-in).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...constants import SAMPLE_RATE
from ...errors import ModelFileError
from ..contracts import ECAPA, ECAPA_FILES, ECAPA_ONNX
from ..features import as_mono_float, ecapa_features
from ..onnx import open_onnx
from ..torch import TorchPlacement, import_torch_module
from .embedder import SpeakerEmbedder, repeat_to

#: Shorter utterances are repeated up to 0.3 s, as CAM++ does, so that every one gets an embedding.
MIN_SAMPLES = SAMPLE_RATE * 3 // 10


def load_encoder_classifier(model_dir: Path, device: str) -> Any:
    """speechbrain's `EncoderClassifier` from a local folder, never the hub: `pretrained_path` is
    pointed at the folder, nothing is linked or copied, and network fetches are refused."""
    model_dir = Path(model_dir).resolve()
    inference = import_torch_module("speechbrain.inference.speaker", "speechbrain")
    fetching = import_torch_module("speechbrain.utils.fetching", "speechbrain")
    try:
        return inference.EncoderClassifier.from_hparams(
            source=str(model_dir),
            savedir=None,
            overrides={"pretrained_path": str(model_dir)},
            overrides_must_match=False,
            run_opts={"device": device},
            fetch_config=fetching.FetchConfig(allow_network=False),
        )
    except Exception as e:  # hyperpyyaml, torch and speechbrain raise many unrelated types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFileError(f"cannot load ECAPA from {model_dir}: {first}") from None


class EcapaTorch(SpeakerEmbedder):
    """ECAPA-TDNN on speechbrain: waveforms of equal length in, raw embeddings out."""

    def __init__(self, model_dir: Path, device: str = "auto", precision: str = "fp32", threads: int = 0) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelFileError(
                f"ECAPA model directory not found: {self.model_dir}; fetch it with `asr-server models pull --ecapa`"
            )
        missing = [n for n in ECAPA_FILES if not (self.model_dir / n).is_file()]
        if missing:
            raise ModelFileError(
                f"{self.model_dir}: missing {', '.join(missing)}; fetch them with `asr-server models pull --ecapa`"
            )
        self._at = TorchPlacement(device, precision, threads, "ECAPA")
        torch = self._at.torch
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated(self._at.device) if self._at.cuda else 0
        self.classifier = load_encoder_classifier(self.model_dir, self._at.device)
        gpu_mb = None
        if self._at.cuda:
            self._at.synchronize()
            gpu_mb = (torch.cuda.memory_allocated(self._at.device) - before) / 2**20
        self.dim = int(self.run([np.zeros(MIN_SAMPLES, np.float32)]).shape[-1])
        self.info = self._at.info("speaker", self.model_dir, t0, gpu_mb)

    @property
    def device(self) -> str:
        return self._at.device

    def features(self, audio: np.ndarray) -> np.ndarray:
        return repeat_to(as_mono_float(audio), MIN_SAMPLES)

    def run(self, feats: list[np.ndarray]) -> np.ndarray:
        """speechbrain's `encode_batch` steps on equal-length waveforms, with only the embedding
        network under fp16 autocast when asked (features stay fp32)."""
        torch = self._at.torch
        mods = self.classifier.mods
        with torch.inference_mode():
            x = self._at.tensor(np.stack(feats).astype(np.float32, copy=False))
            lens = torch.ones(x.shape[0], device=self._at.device)
            fbank = mods.mean_var_norm(mods.compute_features(x), lens)
            with self._at.autocast():
                emb = mods.embedding_model(fbank, lens)
            return emb.float().reshape(x.shape[0], -1).cpu().numpy()


def relative_lengths(frames: Sequence[int]) -> np.ndarray:
    """speechbrain's relative lengths for a batch padded to `max(frames)`. The graph keeps frame
    `t` where `t < length · T`; shorter rows get half a frame less than `n / T`, so float rounding
    of `n / T · T` can never let a padding frame in."""
    longest = max(frames)
    return np.array([1.0 if n == longest else (n - 0.5) / longest for n in frames], dtype=np.float32)


class EcapaOnnx(SpeakerEmbedder):
    """ECAPA-TDNN on ONNX Runtime (`ecapa.onnx`: `feats` [B,T,80], relative `lengths` [B] →
    `embedding` [B,D]) with numpy features."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(
                f"ECAPA ONNX model not found: {self.path}; write it with `asr-server models export` "
                "(after `asr-server models pull --ecapa`)"
            )
        self.session, self.info = open_onnx(self.path, device, threads, ECAPA, name="speaker")
        self.dim = int(self.run([self.features(np.zeros(MIN_SAMPLES, np.float32))]).shape[-1])

    @property
    def device(self) -> str:
        return self.info.device

    def features(self, audio: np.ndarray) -> np.ndarray:
        return ecapa_features(repeat_to(as_mono_float(audio), MIN_SAMPLES))

    def run(self, feats: list[np.ndarray]) -> np.ndarray:
        """Raw embeddings [B, D]; rows of different lengths are zero-padded and masked by `lengths`."""
        frames = [f.shape[0] for f in feats]
        batch = np.zeros((len(feats), max(frames), feats[0].shape[1]), np.float32)
        for row, f in zip(batch, feats, strict=True):
            row[: f.shape[0]] = f
        (emb,) = self.session.run(ECAPA.output_names, {"feats": batch, "lengths": relative_lengths(frames)})
        return emb.reshape(len(feats), -1)


def load_ecapa(
    model_dir: Path, device: str = "auto", threads: int = 0, backend: str = "torch", precision: str = "fp32"
) -> SpeakerEmbedder:
    """ECAPA from its folder: speechbrain on torch, or `ecapa.onnx` in it on ONNX Runtime (which,
    like CAM++ there, runs in fp32 whatever `precision` says)."""
    if backend == "onnx":
        return EcapaOnnx(Path(model_dir) / ECAPA_ONNX, device, threads)
    if backend != "torch":
        raise ValueError(f"backend must be onnx or torch, not {backend!r}")
    return EcapaTorch(model_dir, device, precision, threads)
