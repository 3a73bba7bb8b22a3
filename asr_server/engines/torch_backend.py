"""PyTorch backends: funasr's own model classes behind the same "features in, logits out" contract.

`TorchSenseVoiceBackend` and `TorchSpeakerBackend` are drop-in replacements for the ONNX Runtime
backends in `sensevoice.py` and `speaker.py`: the frontend and the decoder stay the project's, so
both backends see the same features and their outputs are decoded the same way. They exist for
GPUs without `onnxruntime-gpu` (or without cuDNN 9) and for fp16.

SenseVoice runs through funasr's export forward (`sense_voice/export_meta.export_forward`), the
very code the ONNX graph was traced from: four learned queries prepended, the encoder, the CTC
projection. CAM++ runs funasr's `CAMPPlus`. Weights are the files the hub publishes (`model.pt`,
`campplus_cn_common.bin`), read with the dimensions of the `config.yaml` beside them.

fp16 is CUDA only and means autocast (mixed precision): weights stay fp32, matmuls and
convolutions run in fp16 on the tensor cores, while the residual stream, the positional encoding
(sines of positions in the hundreds lose their phase in fp16), funasr's LayerNorm and softmax
stay fp32; outputs always come back as float32. On CPU fp16 is refused with a warning and fp32 runs instead.

torch and funasr are imported when a backend is built, never at import time: a server on the
ONNX backend never loads them, and a server without them gets `BackendUnavailableError` naming
the package to install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import ModelFileError, ModelInfo, read_yaml_mapping

log = logging.getLogger(__name__)

SENSEVOICE_WEIGHTS = "model.pt"
SENSEVOICE_CONFIG = "config.yaml"
CAMPPLUS_WEIGHTS = "campplus_cn_common.bin"
PRECISIONS = ("fp32", "fp16")
INSTALL_HINT = "`scripts/setup.sh torch` (the torch lock)"


class BackendUnavailableError(RuntimeError):
    """The torch backend was asked for but cannot run here (torch/funasr missing, no such GPU)."""


def import_torch() -> Any:
    """`torch`, or `BackendUnavailableError` saying how to install it."""
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError(f"engine.backend: torch needs PyTorch ({e}); install it with {INSTALL_HINT}, "
                                      "or set engine.backend: onnx") from None
    return torch


def import_torch_module(module: str, what: str) -> Any:
    """Import a module of the torch stack; funasr prints notices (no ffmpeg) to stdout on import,
    which go to the debug log instead of the server's output."""
    import importlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            mod = importlib.import_module(module)
        if printed.getvalue().strip():
            log.debug("importing %s printed: %s", module, printed.getvalue().strip())
        return mod
    except ImportError as e:
        raise BackendUnavailableError(f"engine.backend: torch needs {what} ({e}); install it with {INSTALL_HINT}, "
                                      "or set engine.backend: onnx") from None


def resolve_device(device: str) -> str:
    """`cpu` or `cuda:N` for `device` (auto | cpu | cuda | cuda:N).

    auto takes the first GPU when PyTorch sees one. Asking for CUDA where PyTorch sees none
    falls back to CPU with a warning that says why; a GPU index past the last one is an error.
    """
    if device == "cpu":
        return "cpu"
    torch = import_torch()
    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda:0" if available else "cpu"
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if not available:
        why = ("this PyTorch build has no CUDA support (a CPU wheel)" if torch.version.cuda is None
               else f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver")
        log.warning("engine.device=%s but %s. FALLING BACK TO CPU.", device, why)
        return "cpu"
    index = int(device[5:]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise BackendUnavailableError(f"engine.device={device} but PyTorch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return f"cuda:{index}"


def resolve_precision(precision: str, device: str, name: str) -> str:
    """The precision `name` will run in on `device` (already resolved): fp16 on CPU becomes fp32, loudly."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device == "cpu":
        log.warning("engine.precision=fp16 needs CUDA; %s runs in fp32 on CPU", name)
        return "fp32"
    return precision


def _unwrap_state(state: Any, path: Path) -> dict[str, Any]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ModelFileError(f"{path}: not a PyTorch state dict")
    return state


def load_state(path: Path) -> dict[str, Any]:
    """The tensors of a checkpoint (plain state dict or funasr's wrappers), read on the CPU."""
    torch = import_torch()
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for truncated or foreign files
        raise ModelFileError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _unwrap_state(state, path)


def _load_into(model: Any, state: dict[str, Any], path: Path) -> None:
    """Load strictly about what the model needs: a missing or misshapen tensor is an error, an extra
    one (training leftovers in published checkpoints) only a debug line."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches; torch lists one per line after a header
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ModelFileError(f"{path}: weights do not fit the model its config describes: "
                             f"{lines[1] if len(lines) > 1 else lines[0] if lines else e}") from None
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5]) + (" …" if len(result.missing_keys) > 5 else "")
        raise ModelFileError(f"{path}: {len(result.missing_keys)} tensors missing ({shown}); "
                             "wrong or truncated checkpoint?")
    if result.unexpected_keys:
        log.debug("%s: %d tensors not used by the model", path, len(result.unexpected_keys))


class TorchPlacement:
    """Where a model runs, and the helpers every torch backend needs (autocast, GPU memory taken)."""

    def __init__(self, device: str, precision: str, threads: int, name: str) -> None:
        self.torch = import_torch()
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, name)
        if self.device == "cpu" and threads > 0:
            # torch has one intra-op pool per process: the last model loaded sets it for all.
            self.torch.set_num_threads(threads)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def provider(self) -> str:
        if self.cuda:
            return f"CUDA {self.torch.cuda.get_device_name(self.device)}"
        return "CPU"

    def place(self, model: Any) -> float | None:
        """Move `model` (fp32) to the device; returns the GPU memory it took (MiB), None on CPU."""
        model.eval()
        if not self.cuda:
            return None
        self.torch.cuda.synchronize(self.device)
        before = self.torch.cuda.memory_allocated(self.device)
        model.to(device=self.device)
        self.torch.cuda.synchronize(self.device)
        return (self.torch.cuda.memory_allocated(self.device) - before) / 2**20

    def autocast(self) -> Any:
        if self.cuda and self.precision == "fp16":
            return self.torch.autocast(device_type="cuda", dtype=self.torch.float16)
        return contextlib.nullcontext()

    def tensor(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)


def build_sensevoice(model_dir: Path) -> Any:
    """funasr's `SenseVoiceSmall` with the weights of `model_dir/model.pt` and the encoder of its
    `config.yaml` (vocabulary and input sizes come from the weights), on the CPU, in eval mode."""
    model_dir = Path(model_dir)
    conf = read_yaml_mapping(model_dir / SENSEVOICE_CONFIG)
    weights = model_dir / SENSEVOICE_WEIGHTS
    state = load_state(weights)
    sv = import_torch_module("funasr.models.sense_voice.model", "funasr")
    try:
        vocab_size = int(state["ctc.ctc_lo.weight"].shape[0])
        input_size = int(state["embed.weight"].shape[1])
    except (KeyError, IndexError, AttributeError):
        raise ModelFileError(f"{weights}: no ctc.ctc_lo.weight/embed.weight tensors: not a SenseVoice checkpoint") from None
    if not isinstance(conf.get("encoder_conf"), dict):
        raise ModelFileError(f"{model_dir / SENSEVOICE_CONFIG}: no encoder_conf mapping")
    model_conf = conf.get("model_conf") if isinstance(conf.get("model_conf"), dict) else {}
    ctc_conf = conf.get("ctc_conf") if isinstance(conf.get("ctc_conf"), dict) else None
    try:
        model = sv.SenseVoiceSmall(encoder=conf.get("encoder", "SenseVoiceEncoderSmall"),
                                   encoder_conf=conf["encoder_conf"], ctc_conf=ctc_conf, input_size=input_size,
                                   vocab_size=vocab_size, **model_conf)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise ModelFileError(f"{model_dir / SENSEVOICE_CONFIG}: funasr cannot build SenseVoiceSmall from it: {e}") from None
    _load_into(model, state, weights)
    return model.eval()


class TorchSenseVoiceBackend:
    """SenseVoice-Small on PyTorch: padded features [B,T,560] in, CTC logits [B,T+4,V] out, like
    `OnnxSenseVoiceBackend`. Not thread-safe (one caller: the micro-batcher's worker)."""

    def __init__(self, model_dir: Path, device: str = "auto", precision: str = "fp32", threads: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.path = self.model_dir / SENSEVOICE_WEIGHTS
        self._at = TorchPlacement(device, precision, threads, "SenseVoice")
        self._forward = import_torch_module("funasr.models.sense_voice.export_meta", "funasr").export_forward
        t0 = time.perf_counter()
        self.model = build_sensevoice(self.model_dir)
        gpu_mb = self._at.place(self.model)
        self.vocab_size: int | None = int(self.model.ctc.ctc_lo.out_features)
        self.input_size = int(self.model.embed.weight.shape[1])
        if self._at.cuda:  # first call initialises cuBLAS; pay it at start, not on the first request
            self.forward(np.zeros((1, 8, self.input_size), np.float32), np.array([8], np.int32),
                         np.zeros(1, np.int32), np.full(1, 15, np.int32))
            self._at.synchronize()
        self.info = ModelInfo(name="sensevoice", path=self.path, backend="torch", device=self._at.device,
                              provider=self._at.provider, precision=self._at.precision,
                              load_s=time.perf_counter() - t0, gpu_memory_mb=gpu_mb)

    @property
    def device(self) -> str:
        return self._at.device

    def forward(self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray,
                textnorm_ids: np.ndarray) -> tuple[Any, Any]:
        """The model call without the copy back: device tensors (logits fp16 under autocast)."""
        torch = self._at.torch
        if feats.ndim != 3 or feats.shape[2] != self.input_size:
            raise ValueError(f"features must be [B, T, {self.input_size}], got {list(feats.shape)}")
        with torch.inference_mode(), self._at.autocast():
            speech = self._at.tensor(np.asarray(feats, np.float32))
            lens = self._at.tensor(np.asarray(lengths, np.int32))
            lang = self._at.tensor(np.asarray(lang_ids, np.int32))
            tn = self._at.tensor(np.asarray(textnorm_ids, np.int32))
            return self._forward(self.model, speech, lens, lang, tn)

    def run(self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray,
            textnorm_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, lens = self.forward(feats, lengths, lang_ids, textnorm_ids)
        return logits.float().cpu().numpy(), lens.to(self._at.torch.int32).cpu().numpy()


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


class TorchSpeakerBackend:
    """CAM++ on PyTorch: features [B,T,80] in, raw embeddings [B,D] out, like `OnnxSpeakerBackend`."""

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
        _load_into(self.model, state, self.path)
        gpu_mb = self._at.place(self.model)
        self.feat_dim = int(dims.get("feat_dim", 80))
        self.dim: int | None = None  # `SpeakerEmbedder` probes it
        if self._at.cuda:
            self.forward(np.zeros((1, 100, self.feat_dim), np.float32))
            self._at.synchronize()
        self.info = ModelInfo(name="speaker", path=self.path, backend="torch", device=self._at.device,
                              provider=self._at.provider, precision=self._at.precision,
                              load_s=time.perf_counter() - t0, gpu_memory_mb=gpu_mb)

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
