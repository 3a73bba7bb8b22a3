"""ECAPA-TDNN speaker embeddings (speechbrain `spkrec-ecapa-voxceleb`) on PyTorch or ONNX Runtime.

The model folder is what `asr-server models pull --ecapa` writes (`models/ecapa/`): speechbrain's
`hyperparams.yaml` and the checkpoints it names. It is loaded with speechbrain's own
`EncoderClassifier`, pointed at the folder and barred from the network, so features are
speechbrain's (its Fbank and sentence mean normalisation), not the Kaldi fbank of CAM++.

On ONNX Runtime (`OnnxEcapaBackend`) the embedding network is `ecapa.onnx` beside those files,
written by `asr-server models export` (`export.export_ecapa`), and the features are speechbrain's
re-implemented in numpy (`features.ecapa_features`, held to speechbrain's output by the tests).

Both have the public face of `SpeakerEmbedder` (`info`, `dim`, `embed_batch`, `embed`) and its
batching rule: only utterances of equal length share a call, so a batch gives exactly the
embeddings of single calls. The ONNX graph does take relative lengths and masks padding in its
pooling, but its "same" convolutions still see the padding near the end of a shorter utterance
(cosine ~0.9998 to the single call on the test stand-in): voiceprints would depend on what an
utterance happened to be batched with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .features import as_mono_float, ecapa_features
from .runtime import ModelFileError, ModelInfo, check_signature, open_onnx
from .torch_backend import TorchPlacement, import_torch_module

#: The files speechbrain's `EncoderClassifier` loads (its hyperparams.yaml names them).
ECAPA_FILES = ("hyperparams.yaml", "embedding_model.ckpt", "mean_var_norm_emb.ckpt", "classifier.ckpt",
               "label_encoder.txt")
#: What `asr-server models export` writes into the ECAPA folder for the ONNX backend.
ECAPA_ONNX = "ecapa.onnx"
SAMPLE_RATE = 16000
#: Shorter utterances are repeated up to 0.3 s, as CAM++ does, so that every one gets an embedding.
MIN_SAMPLES = 4800


def _pad_short(audio: np.ndarray) -> np.ndarray:
    if audio.shape[0] >= MIN_SAMPLES:
        return audio
    if audio.shape[0] == 0:
        return np.zeros(MIN_SAMPLES, np.float32)
    return np.tile(audio, -(-MIN_SAMPLES // audio.shape[0]))[:MIN_SAMPLES]


def load_encoder_classifier(model_dir: Path, device: str) -> Any:
    """speechbrain's `EncoderClassifier` from a local folder, never the hub: `pretrained_path` is
    pointed at the folder, nothing is linked or copied, and network fetches are refused."""
    model_dir = Path(model_dir).resolve()
    inference = import_torch_module("speechbrain.inference.speaker", "speechbrain")
    fetching = import_torch_module("speechbrain.utils.fetching", "speechbrain")
    try:
        return inference.EncoderClassifier.from_hparams(
            source=str(model_dir), savedir=None, overrides={"pretrained_path": str(model_dir)},
            overrides_must_match=False, run_opts={"device": device},
            fetch_config=fetching.FetchConfig(allow_network=False))
    except Exception as e:  # hyperpyyaml, torch and speechbrain raise many unrelated types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFileError(f"cannot load ECAPA from {model_dir}: {first}") from None


class EcapaEmbedder:
    """ECAPA-TDNN as an embedder: 16 kHz mono utterances in, unit-length vectors out. Not thread-safe."""

    def __init__(self, model_dir: Path, device: str = "auto", precision: str = "fp32", threads: int = 0) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelFileError(f"ECAPA model directory not found: {self.model_dir}; "
                                 "fetch it with `asr-server models pull --ecapa`")
        missing = [n for n in ECAPA_FILES if not (self.model_dir / n).is_file()]
        if missing:
            raise ModelFileError(f"{self.model_dir}: missing {', '.join(missing)}; "
                                 "fetch them with `asr-server models pull --ecapa`")
        self._at = TorchPlacement(device, precision, threads, "ECAPA")
        torch = self._at.torch
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated(self._at.device) if self._at.cuda else 0
        self.classifier = load_encoder_classifier(self.model_dir, self._at.device)
        gpu_mb = None
        if self._at.cuda:
            self._at.synchronize()
            gpu_mb = (torch.cuda.memory_allocated(self._at.device) - before) / 2**20
        self.dim = int(self._embed_group(np.zeros((1, MIN_SAMPLES), np.float32)).shape[-1])
        self.info = ModelInfo(name="speaker", path=self.model_dir, backend="torch", device=self._at.device,
                              provider=self._at.provider, precision=self._at.precision,
                              load_s=time.perf_counter() - t0, gpu_memory_mb=gpu_mb)

    @classmethod
    def load(cls, model_dir: Path, device: str = "auto", threads: int = 0, backend: str = "torch",
             precision: str = "fp32") -> "EcapaEmbedder | OnnxEcapaBackend":
        """ECAPA from its folder: speechbrain on torch, or `ecapa.onnx` in it on ONNX Runtime (which,
        like CAM++ there, runs in fp32 whatever `precision` says)."""
        if backend == "onnx":
            return OnnxEcapaBackend(Path(model_dir) / ECAPA_ONNX, device, threads)
        if backend != "torch":
            raise ValueError(f"backend must be onnx or torch, not {backend!r}")
        return cls(model_dir, device, precision, threads)

    @property
    def device(self) -> str:
        return self._at.device

    def _embed_group(self, wavs: np.ndarray) -> np.ndarray:
        """Raw embeddings [B, D] of equal-length waveforms [B, N]: speechbrain's `encode_batch`
        steps, with only the embedding network under fp16 autocast when asked (features stay fp32)."""
        torch = self._at.torch
        mods = self.classifier.mods
        with torch.inference_mode():
            x = self._at.tensor(wavs.astype(np.float32, copy=False))
            lens = torch.ones(x.shape[0], device=self._at.device)
            feats = mods.mean_var_norm(mods.compute_features(x), lens)
            with self._at.autocast():
                emb = mods.embedding_model(feats, lens)
            return emb.float().reshape(x.shape[0], -1).cpu().numpy()

    def embed_batch(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings [B, D] of 16 kHz mono utterances, each of unit L2 norm, in input order."""
        out = np.zeros((len(audios), self.dim), dtype=np.float32)
        wavs = [_pad_short(as_mono_float(a)) for a in audios]
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(wavs):
            groups.setdefault(w.shape[0], []).append(i)
        for idx in groups.values():
            out[idx] = self._embed_group(np.stack([wavs[i] for i in idx]))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return self.embed_batch([audio])[0]


_ONNX_INPUTS = {"feats": "tensor(float)", "lengths": "tensor(float)"}
_ONNX_OUTPUTS = ["embedding"]


def relative_lengths(frames: Sequence[int]) -> np.ndarray:
    """speechbrain's relative lengths for a batch padded to `max(frames)`. The graph keeps frame
    `t` where `t < length · T`; shorter rows get half a frame less than `n / T`, so float rounding
    of `n / T · T` can never let a padding frame in."""
    longest = max(frames)
    return np.array([1.0 if n == longest else (n - 0.5) / longest for n in frames], dtype=np.float32)


class OnnxEcapaBackend:
    """ECAPA-TDNN on ONNX Runtime (`ecapa.onnx`: `feats` [B,T,80], relative `lengths` [B] →
    `embedding` [B,D]) with numpy features. Not thread-safe."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"ECAPA ONNX model not found: {self.path}; write it with `asr-server models export` "
                                 "(after `asr-server models pull --ecapa`)")
        self.session, provider, used_device, load_s = open_onnx(self.path, device, threads)
        check_signature(self.session, self.path, _ONNX_INPUTS, _ONNX_OUTPUTS)
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 3 or shape[2] not in (80, "80"):
            raise ModelFileError(f"{self.path}: input 'feats' has shape {shape}, expected [B, T, 80]")
        self.dim = int(self._run([ecapa_features(np.zeros(MIN_SAMPLES, np.float32))]).shape[-1])
        self.info = ModelInfo(name="speaker", path=self.path, backend="onnxruntime", device=used_device,
                              provider=provider, precision="fp32", load_s=load_s)

    @property
    def device(self) -> str:
        return self.info.device

    def _run(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        """Raw embeddings [B, D]; rows of different lengths are zero-padded and masked by `lengths`."""
        frames = [f.shape[0] for f in feats]
        batch = np.zeros((len(feats), max(frames), feats[0].shape[1]), np.float32)
        for row, f in zip(batch, feats):
            row[:f.shape[0]] = f
        (emb,) = self.session.run(_ONNX_OUTPUTS, {"feats": batch, "lengths": relative_lengths(frames)})
        return emb.reshape(len(feats), -1)

    def embed_batch(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings [B, D] of 16 kHz mono utterances, each of unit L2 norm, in input order."""
        out = np.zeros((len(audios), self.dim), dtype=np.float32)
        feats = [ecapa_features(_pad_short(as_mono_float(a))) for a in audios]
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            groups.setdefault(f.shape[0], []).append(i)
        for idx in groups.values():
            out[idx] = self._run([feats[i] for i in idx])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return self.embed_batch([audio])[0]
