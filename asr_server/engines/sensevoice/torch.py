"""SenseVoice on PyTorch: funasr's own `SenseVoiceSmall` behind the ONNX runtime's contract.

It runs through funasr's export forward (`sense_voice/export_meta.export_forward`), the very code
the ONNX graph was traced from: four learned queries prepended, the encoder, the CTC projection,
so both runtimes see the same features and their logits decode the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFileError
from ..base import read_yaml_mapping
from ..contracts import SENSEVOICE_CONFIG, SENSEVOICE_WEIGHTS
from ..torch import TorchPlacement, import_torch_module, load_into, load_state


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
        raise ModelFileError(
            f"{weights}: no ctc.ctc_lo.weight/embed.weight tensors: not a SenseVoice checkpoint"
        ) from None
    if not isinstance(conf.get("encoder_conf"), dict):
        raise ModelFileError(f"{model_dir / SENSEVOICE_CONFIG}: no encoder_conf mapping")
    model_conf: dict[str, Any] = conf["model_conf"] if isinstance(conf.get("model_conf"), dict) else {}
    ctc_conf = conf.get("ctc_conf") if isinstance(conf.get("ctc_conf"), dict) else None
    try:
        model = sv.SenseVoiceSmall(
            encoder=conf.get("encoder", "SenseVoiceEncoderSmall"),
            encoder_conf=conf["encoder_conf"],
            ctc_conf=ctc_conf,
            input_size=input_size,
            vocab_size=vocab_size,
            **model_conf,
        )
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise ModelFileError(
            f"{model_dir / SENSEVOICE_CONFIG}: funasr cannot build SenseVoiceSmall from it: {e}"
        ) from None
    load_into(model, state, weights)
    return model.eval()


class TorchSenseVoice:
    """SenseVoice-Small on PyTorch: padded features [B,T,560] in, CTC logits [B,T+4,V] out, like
    `OnnxSenseVoice`. Not thread-safe (one caller: the micro-batcher's worker)."""

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
            self.forward(
                np.zeros((1, 8, self.input_size), np.float32),
                np.array([8], np.int32),
                np.zeros(1, np.int32),
                np.full(1, 15, np.int32),
            )
            self._at.synchronize()
        self.info = self._at.info("sensevoice", self.path, t0, gpu_mb)

    @property
    def device(self) -> str:
        return self._at.device

    def forward(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[Any, Any]:
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

    def run(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, lens = self.forward(feats, lengths, lang_ids, textnorm_ids)
        return logits.float().cpu().numpy(), lens.to(self._at.torch.int32).cpu().numpy()

    def best_path(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The argmax on the device: [B, T+4] ids cross to the host instead of [B, T+4, V] logits
        (1 GB at batch 128 on the H200, where the copy took 80 % of the call; BENCHMARKS.md)."""
        logits, lens = self.forward(feats, lengths, lang_ids, textnorm_ids)
        int32 = self._at.torch.int32
        return logits.argmax(dim=-1).to(int32).cpu().numpy(), lens.to(int32).cpu().numpy()

    def top_k(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each frame's best `k` on the device, like `best_path`: [B, T+4, k] ids and logits less the
        frame's best cross to the host, not the logits."""
        logits, lens = self.forward(feats, lengths, lang_ids, textnorm_ids)
        vals, ids = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
        int32 = self._at.torch.int32
        vals = vals - vals[..., :1]
        return ids.to(int32).cpu().numpy(), vals.cpu().numpy(), lens.to(int32).cpu().numpy()
