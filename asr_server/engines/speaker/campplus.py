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
import onnxruntime as ort

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


#: What sherpa-onnx's export declares in its metadata about the frontend it was made for, and what
#: `campplus_features` computes: samples in [-1, 1], 16 kHz, the fbank minus its mean over time.
FRONTEND_METADATA = {"normalize_samples": "1", "feature_normalize_type": "global-mean", "sample_rate": "16000"}


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata properties of an ONNX file (empty for exports that declare none)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
        raise ModelFileError(f"cannot load {path}: {e}") from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def frontend_problems(meta: dict[str, str]) -> list[str]:
    """Where an export's declared frontend differs from the engine's; a key it does not declare is
    taken to agree (3D-Speaker's and our own exports declare none)."""
    return [
        f"metadata {key}={meta[key]!r}, but the engine feeds {want!r}"
        for key, want in FRONTEND_METADATA.items()
        if key in meta and meta[key] != want
    ]


class OnnxCampplus:
    """CAM++ on ONNX Runtime: features [B,T,80] → `embedding` [B,D]. The input is `feature` in
    3D-Speaker's and our exports, `x` in sherpa-onnx's (whose metadata must declare our frontend).
    A graph exported with a batch of one fixed in its shapes runs one utterance per call."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.path = Path(path)
        self.session, self.info = open_onnx(self.path, device, threads, CAMPPLUS, name="speaker")
        problems = frontend_problems(dict(self.session.get_modelmeta().custom_metadata_map))
        if problems:
            raise ModelFileError(f"{self.path}: does not match the CAM++ engine's frontend: {'; '.join(problems)}")
        (feature,) = self.session.get_inputs()
        self.input = feature.name
        out = self.session.get_outputs()[0].shape
        self.one_at_a_time = feature.shape[0] == 1 or out[0] == 1
        dim = out[-1]
        self.dim: int | None = dim if isinstance(dim, int) else None

    def run(self, feats: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if self.one_at_a_time and len(feats) > 1:
            return np.concatenate([self.run(feats[i : i + 1]) for i in range(len(feats))])
        (emb,) = self.session.run(CAMPPLUS.output_names, {self.input: feats})
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
