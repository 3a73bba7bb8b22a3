"""Export funasr's PyTorch models to the ONNX files the engines load.

This is the one export path of the project: `asr-server models export` runs it on downloaded
weights and the stand-in builder (`benchmarks/standins.py`) runs it on the models the tests use, so
what the tests load was produced exactly the way a real model would be. The graphs follow funasr's own export
(`sense_voice/export_meta.py`, opset 14, int8 by dynamic MatMul quantisation), but call the
TorchScript-based exporter explicitly: under torch ≥ 2.9 funasr's `AutoModel.export()` takes the
dynamo exporter, which writes opset 18 with external weight files.

torch, funasr and onnx are imported lazily: the server itself never needs them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engines.contracts import SENSEVOICE_FP32 as SENSEVOICE_ONNX
from ..engines.contracts import SENSEVOICE_INT8 as SENSEVOICE_ONNX_INT8
from ..errors import ExportError

log = logging.getLogger(__name__)

OPSET = 14
CAMPPLUS_DUMMY_FRAMES = 200


@dataclass(frozen=True, slots=True)
class SenseVoiceExport:
    fp32: Path
    int8: Path | None


def _torch_onnx_export(module: Any, args: tuple, path: Path, **kwargs: Any) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter warns about every traced Python branch; none matters here.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True, **kwargs
            )
    if not path.is_file() or path.stat().st_size == 0:
        raise ExportError(f"torch.onnx.export wrote nothing to {path}")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization reports every skipped node (and a pre-processing hint) through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of the MatMul weights: QInt8, per channel, 7-bit range.

    funasr quantises to QUInt8; QInt8 with `reduce_range` computes the same logits as closely
    (agreement with fp32 0.930 against 0.933) and runs 0.81x the time on CPUs without VNNI, where
    full-range QInt8 saturates its u8×s8 products (agreement 0.25): `python -m
    benchmarks.quantization` measures every option. Nodes named like the output projection or the
    encoder/decoder biases stay in float, which is funasr's own exclusion list.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    exclude = [n.name for n in graph.node if "output" in n.name or "bias_encoder" in n.name or "bias_decoder" in n.name]
    with _quiet_root_logger():
        quantize_dynamic(
            model_input=str(src),
            model_output=str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
        )
    if not dst.is_file():
        raise ExportError(f"quantisation wrote nothing to {dst}")
    return dst


def export_sensevoice(model: Any, out_dir: Path, quantize: bool = True) -> SenseVoiceExport:
    """Write `model.onnx` (and `model_quant.onnx`) for a funasr `SenseVoiceSmall` into `out_dir`.

    Inputs `speech` f32 [B,T,560], `speech_lengths` i32 [B], `language` i32 [B], `textnorm`
    i32 [B]; outputs `ctc_logits` f32 [B,T+4,V] and `encoder_out_lens` i32 [B]. The caller's
    model is left untouched (funasr's `export()` rebinds `forward` on the instance it gets, so
    it is given a copy).
    """
    out_dir = Path(out_dir)
    m = copy.deepcopy(model).eval()
    m = m.export(max_seq_len=512)
    fp32 = out_dir / SENSEVOICE_ONNX
    _torch_onnx_export(
        m,
        m.export_dummy_inputs(),
        fp32,
        input_names=m.export_input_names(),
        output_names=m.export_output_names(),
        dynamic_axes=m.export_dynamic_axes(),
    )
    int8 = quantize_int8(fp32, out_dir / SENSEVOICE_ONNX_INT8) if quantize else None
    return SenseVoiceExport(fp32=fp32, int8=int8)


def export_campplus(model: Any, out_path: Path) -> Path:
    """Write a funasr `CAMPPlus` as ONNX: `feature` f32 [B,T,80] → `embedding` f32 [B,D]."""
    import torch

    out_path = Path(out_path)
    m = copy.deepcopy(model).eval()
    dummy = torch.randn(1, CAMPPLUS_DUMMY_FRAMES, 80)
    _torch_onnx_export(
        m,
        (dummy,),
        out_path,
        input_names=["feature"],
        output_names=["embedding"],
        dynamic_axes={"feature": {0: "batch_size", 1: "frames"}, "embedding": {0: "batch_size"}},
    )
    return out_path


def load_funasr_sensevoice(model_dir: Path, device: str = "cpu") -> Any:
    """Build funasr's `SenseVoiceSmall` from a local model directory (no hub access).

    Reads `config.yaml`/`configuration.json` and `model.pt` the way funasr's `AutoModel` does, so
    a directory that loads here is a directory funasr itself accepts.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model.pt").is_file():
        raise ExportError(f"{model_dir}: no model.pt to export")
    from funasr import AutoModel

    auto = AutoModel(
        model=str(model_dir), device=device, disable_update=True, disable_pbar=True, disable_log=True, log_level="ERROR"
    )
    return auto.model


def load_funasr_campplus(weights: Path, device: str = "cpu", **dims: Any) -> Any:
    """Build funasr's `CAMPPlus` and load a state dict (`campplus_cn_common.bin` or a `model.pt`)."""
    import torch
    from funasr.models.campplus.model import CAMPPlus

    model = CAMPPlus(**dims)
    state = torch.load(str(weights), map_location=device, weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model.load_state_dict(state)
    return model.eval()


ECAPA_DUMMY_FRAMES = 200


def _ecapa_module(embedding_model: Any) -> Any:
    import torch

    class EcapaEmbedding(torch.nn.Module):
        """`embedding_model(feats, lengths)` with the speaker axis squeezed: [B,T,80] → [B,D]."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, feats: Any, lengths: Any) -> Any:
            return self.model(feats, lengths).squeeze(1)

    return EcapaEmbedding(embedding_model).eval()


@contextlib.contextmanager
def _traceable_length_to_mask() -> Iterator[None]:
    """speechbrain's `length_to_mask` sizes its mask with `len(length)`, which the tracer freezes
    to the dummy batch size; while exporting, ECAPA gets a broadcasting equivalent instead."""
    import torch
    from speechbrain.lobes.models import ECAPA_TDNN

    def length_to_mask(length: Any, max_len: Any = None, dtype: Any = None, device: Any = None) -> Any:
        steps = torch.arange(max_len, device=length.device, dtype=length.dtype)
        mask = steps.unsqueeze(0) < length.unsqueeze(1)
        return mask.to(dtype=dtype or length.dtype, device=device or length.device)

    original = ECAPA_TDNN.length_to_mask
    ECAPA_TDNN.length_to_mask = length_to_mask
    try:
        yield
    finally:
        ECAPA_TDNN.length_to_mask = original


def export_ecapa(model_dir: Path, out_path: Path) -> Path:
    """Write speechbrain's ECAPA-TDNN (`models/ecapa/`) as ONNX: `feats` f32 [B,T,80] and relative
    `lengths` f32 [B] → `embedding` f32 [B,D].

    Only the embedding network is in the graph. What `EncoderClassifier.encode_batch` does before
    it (Fbank, then sentence mean normalisation) is `features.ecapa_features` in numpy; the
    optional `mean_var_norm_emb` after it is not applied by `encode_batch` by default, nor here.
    """
    import torch

    from ..engines.speaker.ecapa import load_encoder_classifier

    out_path = Path(out_path)
    classifier = load_encoder_classifier(Path(model_dir), "cpu")
    m = _ecapa_module(copy.deepcopy(classifier.mods.embedding_model).float())
    dummy = (torch.randn(2, ECAPA_DUMMY_FRAMES, 80), torch.tensor([1.0, 0.75]))
    with _traceable_length_to_mask():
        _torch_onnx_export(
            m,
            dummy,
            out_path,
            input_names=["feats", "lengths"],
            output_names=["embedding"],
            dynamic_axes={
                "feats": {0: "batch_size", 1: "frames"},
                "lengths": {0: "batch_size"},
                "embedding": {0: "batch_size"},
            },
        )
    return out_path
