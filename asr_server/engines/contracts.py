"""The one table of model files and ONNX contracts: what each engine loads, feeds and reads.

The engines check a session against these contracts when they open it, and `asr-server models
list/verify` check files on disk against the same ones, so a file that verifies is a file that
loads. File names live here and nowhere else.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

# --- file names --------------------------------------------------------------------------------

# SenseVoice-Small: the files the engines read, and the weights they are exported from.
SENSEVOICE_FP32 = "model.onnx"
SENSEVOICE_INT8 = "model_quant.onnx"
SENSEVOICE_WEIGHTS = "model.pt"
SENSEVOICE_CMVN = "am.mvn"
SENSEVOICE_BPE = "chn_jpn_yue_eng_ko_spectok.bpe.model"
SENSEVOICE_TOKENS = "tokens.json"  # the token table a pre-exported SenseVoice ships instead of the bpe model
SENSEVOICE_CONFIG = "config.yaml"
# CAM++: weights as 3D-Speaker publishes them; exported to `speaker.model`.
CAMPPLUS_WEIGHTS = "campplus_cn_common.bin"
# ECAPA-TDNN: the files speechbrain's EncoderClassifier loads (its hyperparams.yaml names them),
# and the ONNX file `models export` writes beside them.
ECAPA_DIR = "ecapa"
ECAPA_FILES = (
    "hyperparams.yaml",
    "embedding_model.ckpt",
    "mean_var_norm_emb.ckpt",
    "classifier.ckpt",
    "label_encoder.txt",
)
ECAPA_ONNX = "ecapa.onnx"
# Silero VAD, as the silero-vad package ships it.
SILERO_ONNX = "silero_vad.onnx"


# --- tensors -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output as the ONNX file declares it; a dim is a size, a symbolic name or None."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name} {self.dtype}[?]"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True, slots=True)
class Expected:
    """A tensor as an engine uses it: name (or another name the same tensor has in a published
    export), accepted element types, rank and the axes of fixed size."""

    name: str
    dtypes: tuple[str, ...]
    rank: int
    fixed: tuple[tuple[int, int], ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def describe(self) -> str:
        fixed = dict(self.fixed)
        dims = ", ".join(str(fixed.get(i, "*")) for i in range(self.rank))
        return f"{'|'.join(self.names)} {'|'.join(self.dtypes)}[{dims}]"


@dataclass(frozen=True, slots=True)
class ModelContract:
    """The inputs an engine feeds and the outputs it reads; extra inputs are refused (none would be fed)."""

    model: str
    inputs: tuple[Expected, ...]
    outputs: tuple[Expected, ...]

    def describe(self) -> str:
        return ", ".join(e.describe() for e in self.inputs) + " -> " + ", ".join(e.describe() for e in self.outputs)

    @property
    def output_names(self) -> list[str]:
        return [e.name for e in self.outputs]


SENSEVOICE = ModelContract(
    "SenseVoice",
    inputs=(
        Expected("speech", ("float32",), 3, ((2, 560),)),
        Expected("speech_lengths", ("int32",), 1),
        Expected("language", ("int32",), 1),
        Expected("textnorm", ("int32",), 1),
    ),
    outputs=(Expected("ctc_logits", ("float32",), 3), Expected("encoder_out_lens", ("int32",), 1)),
)
#: `feature` as 3D-Speaker's and funasr's exports (and `models export`) name it; `x` in sherpa-onnx's.
CAMPPLUS = ModelContract(
    "CAM++",
    inputs=(Expected("feature", ("float32",), 3, ((2, 80),), aliases=("x",)),),
    outputs=(Expected("embedding", ("float32",), 2, ((1, 192),)),),
)
#: ECAPA as `models export` writes it; the embedding size is whatever the checkpoint has
#: (192 for spkrec-ecapa-voxceleb), the voiceprint store records it.
ECAPA = ModelContract(
    "ECAPA",
    inputs=(Expected("feats", ("float32",), 3, ((2, 80),)), Expected("lengths", ("float32",), 1)),
    outputs=(Expected("embedding", ("float32",), 2),),
)
SILERO = ModelContract(
    "Silero VAD",
    inputs=(Expected("input", ("float32",), 2), Expected("state", ("float32",), 3), Expected("sr", ("int64",), 0)),
    outputs=(Expected("output", ("float32",), 2), Expected("stateN", ("float32",), 3)),
)


def match_signature(sig: Signature, contract: ModelContract) -> list[str]:
    """What keeps `sig` from serving as `contract.model`; empty when the engine can use it."""
    problems: list[str] = []
    have_in = {t.name: t for t in sig.inputs}
    have_out = {t.name: t for t in sig.outputs}
    for kind, wanted, have in (("input", contract.inputs, have_in), ("output", contract.outputs, have_out)):
        for exp in wanted:
            got = next((have[n] for n in exp.names if n in have), None)
            if got is None:
                named = " or ".join(repr(n) for n in exp.names)
                problems.append(f"{kind} {named} missing (has {', '.join(have) or 'none'})")
                continue
            if got.dtype not in exp.dtypes:
                problems.append(f"{kind} {exp.name!r} is {got.dtype}, expected {' or '.join(exp.dtypes)}")
            if got.shape is not None:
                if len(got.shape) != exp.rank:
                    problems.append(
                        f"{kind} {exp.name!r} has rank {len(got.shape)} {got.describe()}, expected rank {exp.rank}"
                    )
                    continue
                for axis, size in exp.fixed:
                    dim = got.shape[axis]
                    if isinstance(dim, int) and dim != size:
                        problems.append(f"{kind} {exp.name!r} axis {axis} is {dim}, expected {size}")
    extra = sorted(set(have_in) - {n for e in contract.inputs for n in e.names})
    if extra:
        problems.append(
            f"unexpected inputs {extra}: the {contract.model} engine feeds only {[e.name for e in contract.inputs]}"
        )
    return problems


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def session_signature(sess: Any) -> Signature:
    """The signature of an open ONNX Runtime session."""

    def spec(arg: Any) -> TensorSpec:
        shape = None if arg.shape is None else tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

    return Signature(tuple(spec(a) for a in sess.get_inputs()), tuple(spec(a) for a in sess.get_outputs()))


def read_signature(path: Path) -> Signature:
    """Inputs and outputs of an ONNX file, read with `onnx` when installed, else ONNX Runtime.

    Raises `ModelFileError` for a file that is not a complete, valid ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: not found")
    if importlib.util.find_spec("onnx") is not None:
        return _signature_onnx(path)
    return _signature_ort(path)


def _signature_onnx(path: Path) -> Signature:
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, onnx ValidationError: both mean a broken file
        raise ModelFileError(f"{path}: not a valid ONNX model (truncated or corrupt?): {one_line(e)}") from None

    def spec(value: Any) -> TensorSpec:
        tt = value.type.tensor_type
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = f"onnx-type-{tt.elem_type}"
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    inits = {i.name for i in model.graph.initializer}
    return Signature(
        tuple(spec(v) for v in model.graph.input if v.name not in inits), tuple(spec(v) for v in model.graph.output)
    )


def ort_session(path: Path) -> Any:
    """A plain CPU session, to see whether ONNX Runtime can load a file at all."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature_ort(path: Path) -> Signature:
    try:
        sess = ort_session(path)
    except Exception as e:
        raise ModelFileError(f"{path}: not a valid ONNX model (truncated or corrupt?): {one_line(e)}") from None
    return session_signature(sess)


def one_line(e: BaseException | str) -> str:
    """An exception's text on one line, at most 300 characters: for messages that name a file."""
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")
