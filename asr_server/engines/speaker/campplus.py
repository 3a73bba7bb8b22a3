"""CAM++ speaker embeddings (3D-Speaker / funasr): the Kaldi fbank minus its mean, on ONNX Runtime or PyTorch.

The frontend (`features.campplus_features`) is shared by both runtimes, which only map features
[B,T,80] to raw embeddings [B,192]; `embedder.SpeakerEmbedder` batches equal lengths and normalises.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...errors import ModelFileError
from ..base import ModelInfo, read_yaml_mapping
from ..contracts import CAMPPLUS, CAMPPLUS_WEIGHTS
from ..features import campplus_features
from ..onnx import open_onnx
from ..torch import TorchPlacement, import_torch_module, load_into, load_state
from .embedder import SpeakerEmbedder, repeat_to

#: CAM++ downsamples time by 2 and convolves with kernels up to 5 wide; shorter inputs are
#: repeated up to this many frames (0.3 s) so that every utterance gets an embedding.
MIN_FRAMES = 30


class CampplusRuntime(Protocol):
    """Features [B,T,80] f32 in, raw embeddings [B,D] out."""

    info: ModelInfo
    dim: int | None

    def run(self, feats: np.ndarray) -> np.ndarray: ...


class OnnxCampplus:
    """CAM++ on ONNX Runtime: the exported `feature` [B,T,80] → `embedding` [B,D] graph."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.path = Path(path)
        self.session, self.info = open_onnx(self.path, device, threads, CAMPPLUS, name="speaker")
        dim = self.session.get_outputs()[0].shape[-1]
        self.dim: int | None = dim if isinstance(dim, int) else None

    def run(self, feats: np.ndarray) -> np.ndarray:
        (emb,) = self.session.run(CAMPPLUS.output_names, {"feature": np.ascontiguousarray(feats, dtype=np.float32)})
        return emb


def campplus_dims(model_dir: Path) -> dict[str, Any]:
    """`CAMPPlus` arguments for the weights in `model_dir`: funasr's config.yaml `model_conf`, else
    3D-Speaker's configuration.json (`fbank_dim`, `emb_size`); the defaults fit the hub model."""
    model_dir = Path(model_dir)
    if (model_dir / "config.yaml").is_file():
        conf = read_yaml_mapping(model_dir / "config.yaml")
        if isinstance(conf.get("model_conf"), dict):
            return dict(conf["model_conf"])
    try:
        mc = json.loads((model_dir / "configuration.json").read_text(encoding="utf-8"))["model"]["model_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    dims = {}
    if isinstance(mc, dict) and "fbank_dim" in mc:
        dims["feat_dim"] = int(mc["fbank_dim"])
    if isinstance(mc, dict) and "emb_size" in mc:
        dims["embedding_size"] = int(mc["emb_size"])
    return dims


class TorchCampplus:
    """CAM++ on PyTorch (funasr's `CAMPPlus`): features [B,T,80] in, raw embeddings [B,D] out."""

    def __init__(self, weights: Path, device: str = "auto", precision: str = "fp32", threads: int = 0) -> None:
        self.path = Path(weights)
        self._at = TorchPlacement(device, precision, threads, "CAM++")
        cam = import_torch_module("funasr.models.campplus.model", "funasr")
        t0 = time.perf_counter()
        state = load_state(self.path)
        dims = campplus_dims(self.path.parent)
        try:
            self.model = cam.CAMPPlus(**dims)
        except TypeError as e:
            raise ModelFileError(f"{self.path.parent}: CAM++ config does not fit funasr's CAMPPlus: {e}") from None
        load_into(self.model, state, self.path)
        gpu_mb = self._at.place(self.model)
        self.feat_dim = int(dims.get("feat_dim", 80))
        self.dim: int | None = None  # `CampplusEmbedder` probes it
        if self._at.cuda:
            self.forward(np.zeros((1, 100, self.feat_dim), np.float32))
            self._at.synchronize()
        self.info = self._at.info("speaker", self.path, t0, gpu_mb)

    @property
    def device(self) -> str:
        return self._at.device

    def forward(self, feats: np.ndarray) -> Any:
        if feats.ndim != 3 or feats.shape[2] != self.feat_dim:
            raise ValueError(f"features must be [B, T, {self.feat_dim}], got {list(feats.shape)}")
        with self._at.torch.inference_mode(), self._at.autocast():
            return self.model(self._at.tensor(np.asarray(feats, np.float32)))

    def run(self, feats: np.ndarray) -> np.ndarray:
        return self.forward(feats).float().cpu().numpy()


class CampplusEmbedder(SpeakerEmbedder):
    """CAM++ (or any model with the same signature) as an embedder."""

    def __init__(self, runtime: CampplusRuntime) -> None:
        self.runtime = runtime
        self.info = runtime.info
        if runtime.dim is None:
            probe = runtime.run(np.zeros((1, MIN_FRAMES, 80), dtype=np.float32))
            runtime.dim = int(probe.shape[-1])
        self.dim = int(runtime.dim)

    @classmethod
    def load(
        cls, path: Path, device: str = "cpu", threads: int = 0, backend: str = "onnx", precision: str = "fp32"
    ) -> CampplusEmbedder:
        """CAM++ from `path` (the ONNX file); `backend="torch"` reads the weights beside it instead
        (`campplus_cn_common.bin` with the dimensions of its `config.yaml`)."""
        if backend == "torch":
            return cls(TorchCampplus(Path(path).parent / CAMPPLUS_WEIGHTS, device, precision, threads))
        if backend != "onnx":
            raise ValueError(f"backend must be onnx or torch, not {backend!r}")
        return cls(OnnxCampplus(Path(path), device, threads))

    def features(self, audio: np.ndarray) -> np.ndarray:
        return repeat_to(campplus_features(audio), MIN_FRAMES)

    def run(self, feats: list[np.ndarray]) -> np.ndarray:
        return self.runtime.run(np.stack(feats))
