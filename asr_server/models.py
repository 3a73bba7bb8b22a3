"""Model files: fetch them from a hub, export them to ONNX, and check them before an engine loads them.

The hubs publish PyTorch weights; serving runs ONNX. `pull` downloads (resumably, with the hubs'
own progress bars) only what is missing, exports what has no ONNX yet, and records every file
with its size and sha256 in `<models root>/manifest.json`. `list` and `verify` read each ONNX
file's signature and compare it with what the engines feed and read, and each file with the
manifest, so a wrong, truncated or corrupt file is named here instead of failing deep inside an
engine. Nothing in this module touches the network unless `pull` is asked to fetch something,
and the hub clients and torch are imported only there: `serve` never goes online.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from asr_server.config import Config
from asr_server.engines.ecapa import ECAPA_FILES, ECAPA_ONNX
from asr_server.engines.torch_backend import campplus_dims
from asr_server.engines.runtime import ModelFileError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

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
# ECAPA-TDNN: the files speechbrain's EncoderClassifier fetches (its hyperparams.yaml names them).
ECAPA_DIR = "ecapa"

DEFAULT_PROBE_TIMEOUT_S = 5.0
Source = Literal["modelscope", "huggingface"]
Echo = Callable[[str], None]


class ModelsError(RuntimeError):
    """A models command could not do what it was asked; the message says why and what to do."""


class HubUnreachableError(ModelsError):
    """The hub did not answer the connectivity probe; nothing was downloaded."""


class MissingDependencyError(ModelsError):
    """A package needed for this step (hub client, torch, funasr, speechbrain) is not installed."""


class DownloadError(ModelsError):
    """A download started but did not finish; running `pull` again resumes it."""


class ExportError(ModelsError):
    """PyTorch weights could not be turned into ONNX."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- what the engines expect

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
    """A tensor as an engine uses it: name, accepted element types, rank and the axes of fixed size."""

    name: str
    dtypes: tuple[str, ...]
    rank: int
    fixed: tuple[tuple[int, int], ...] = ()

    def describe(self) -> str:
        fixed = dict(self.fixed)
        dims = ", ".join(str(fixed.get(i, "*")) for i in range(self.rank))
        return f"{self.name} {'|'.join(self.dtypes)}[{dims}]"


@dataclass(frozen=True, slots=True)
class ModelContract:
    """The inputs an engine feeds and the outputs it reads; extra inputs are refused (none would be fed)."""

    model: str
    inputs: tuple[Expected, ...]
    outputs: tuple[Expected, ...]

    def describe(self) -> str:
        return (", ".join(e.describe() for e in self.inputs) + " -> "
                + ", ".join(e.describe() for e in self.outputs))


SENSEVOICE_CONTRACT = ModelContract(
    "SenseVoice",
    inputs=(Expected("speech", ("float32",), 3, ((2, 560),)),
            Expected("speech_lengths", ("int32",), 1),
            Expected("language", ("int32",), 1),
            Expected("textnorm", ("int32",), 1)),
    outputs=(Expected("ctc_logits", ("float32",), 3),
             Expected("encoder_out_lens", ("int32",), 1)),
)
CAMPPLUS_CONTRACT = ModelContract(
    "CAM++",
    inputs=(Expected("feature", ("float32",), 3, ((2, 80),)),),
    outputs=(Expected("embedding", ("float32",), 2, ((1, 192),)),),
)
#: ECAPA as `export.export_ecapa` writes it; the embedding size is whatever the checkpoint has
#: (192 for spkrec-ecapa-voxceleb), the voiceprint store records it.
ECAPA_CONTRACT = ModelContract(
    "ECAPA",
    inputs=(Expected("feats", ("float32",), 3, ((2, 80),)),
            Expected("lengths", ("float32",), 1)),
    outputs=(Expected("embedding", ("float32",), 2),),
)


def match_signature(sig: Signature, contract: ModelContract) -> list[str]:
    """What keeps `sig` from serving as `contract.model`; empty when the engine can use it."""
    problems: list[str] = []
    have_in = {t.name: t for t in sig.inputs}
    have_out = {t.name: t for t in sig.outputs}
    for kind, wanted, have in (("input", contract.inputs, have_in), ("output", contract.outputs, have_out)):
        for exp in wanted:
            got = have.get(exp.name)
            if got is None:
                problems.append(f"{kind} {exp.name!r} missing (has {', '.join(have) or 'none'})")
                continue
            if got.dtype not in exp.dtypes:
                problems.append(f"{kind} {exp.name!r} is {got.dtype}, expected {' or '.join(exp.dtypes)}")
            if got.shape is not None:
                if len(got.shape) != exp.rank:
                    problems.append(f"{kind} {exp.name!r} has rank {len(got.shape)} {got.describe()}, "
                                    f"expected rank {exp.rank}")
                    continue
                for axis, size in exp.fixed:
                    dim = got.shape[axis]
                    if isinstance(dim, int) and dim != size:
                        problems.append(f"{kind} {exp.name!r} axis {axis} is {dim}, expected {size}")
    extra = sorted(set(have_in) - {e.name for e in contract.inputs})
    if extra:
        problems.append(f"unexpected inputs {extra}: the {contract.model} engine feeds only "
                        f"{[e.name for e in contract.inputs]}")
    return problems


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(string)": "string"}


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
        raise ModelFileError(f"{path}: not a valid ONNX model (truncated or corrupt?): {_one_line(e)}") from None

    def spec(value: Any) -> TensorSpec:
        tt = value.type.tensor_type
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = f"onnx-type-{tt.elem_type}"
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tt.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    inits = {i.name for i in model.graph.initializer}
    return Signature(tuple(spec(v) for v in model.graph.input if v.name not in inits),
                     tuple(spec(v) for v in model.graph.output))


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature_ort(path: Path) -> Signature:
    try:
        sess = _ort_session(path)
    except Exception as e:
        raise ModelFileError(f"{path}: not a valid ONNX model (truncated or corrupt?): {_one_line(e)}") from None

    def spec(arg: Any) -> TensorSpec:
        shape = None if arg.shape is None else tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

    return Signature(tuple(spec(a) for a in sess.get_inputs()), tuple(spec(a) for a in sess.get_outputs()))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


# --------------------------------------------------------------------------- where the files go

def models_root(config: Config) -> Path:
    """The folder holding `manifest.json`: the parent of `asr.model_dir` (`models/` by default)."""
    return Path(config.asr.model_dir).parent


def speaker_model_type(config: Config) -> str:
    """`speaker.model_type` (campplus | ecapa) once the config has that key; CAM++ until then."""
    return str(getattr(config.speaker, "model_type", "campplus")).lower()


def ecapa_dir(config: Config) -> Path:
    return models_root(config) / ECAPA_DIR


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A file an engine reads or may read. Files sharing a `choice` label are alternatives: one must exist."""

    path: Path
    model: str
    required: bool
    contract: ModelContract | None = None
    choice: str | None = None


def expected_files(config: Config) -> list[ModelFile]:
    """Every file the configured engines read (required) or that belongs with them (optional)."""
    sv = Path(config.asr.model_dir)
    torch_backend = config.engine.backend == "torch"
    q = config.asr.quantized
    files = []
    for name in (SENSEVOICE_FP32, SENSEVOICE_INT8):
        wanted = (name == SENSEVOICE_INT8) == (q == "yes")
        files.append(ModelFile(sv / name, "SenseVoice",
                               required=not torch_backend and q != "auto" and wanted,
                               contract=SENSEVOICE_CONTRACT,
                               choice="sensevoice-onnx" if not torch_backend and q == "auto" else None))
    files += [ModelFile(sv / SENSEVOICE_WEIGHTS, "SenseVoice", required=torch_backend),
              ModelFile(sv / SENSEVOICE_CMVN, "SenseVoice", required=True),
              ModelFile(sv / SENSEVOICE_BPE, "SenseVoice", required=False, choice="sensevoice-tokens"),
              ModelFile(sv / SENSEVOICE_TOKENS, "SenseVoice", required=False, choice="sensevoice-tokens"),
              ModelFile(sv / SENSEVOICE_CONFIG, "SenseVoice", required=True)]
    if config.speaker.enabled and speaker_model_type(config) == "ecapa":
        files += [ModelFile(ecapa_dir(config) / ECAPA_ONNX, "ECAPA", required=not torch_backend,
                            contract=ECAPA_CONTRACT)]
        files += [ModelFile(ecapa_dir(config) / n, "ECAPA", required=torch_backend) for n in ECAPA_FILES]
    elif config.speaker.enabled:
        onnx_path = Path(config.speaker.model)
        files += [ModelFile(onnx_path, "CAM++", required=not torch_backend, contract=CAMPPLUS_CONTRACT),
                  ModelFile(onnx_path.parent / CAMPPLUS_WEIGHTS, "CAM++", required=torch_backend)]
    return files


def sensevoice_onnx_ready(config: Config) -> bool:
    """Whether the SenseVoice ONNX file that `asr.quantized` asks for is there (either one for auto)."""
    sv = Path(config.asr.model_dir)
    wanted = {"yes": (SENSEVOICE_INT8,), "no": (SENSEVOICE_FP32,)}.get(config.asr.quantized,
                                                                     (SENSEVOICE_FP32, SENSEVOICE_INT8))
    return any((sv / n).is_file() for n in wanted)


def missing_model_files(config: Config) -> list[Path]:
    """Files the configured engines need that are absent. With `asr.quantized: auto` either
    SenseVoice ONNX file will do, so both are listed only when neither exists."""
    files = expected_files(config)
    missing = [f.path for f in files if f.required and not f.path.is_file()]
    choices: dict[str, list[Path]] = {}
    for f in files:
        if f.choice:
            choices.setdefault(f.choice, []).append(f.path)
    for paths in choices.values():
        if not any(p.is_file() for p in paths):
            missing.extend(paths)
    return missing


# --------------------------------------------------------------------------- the manifest

@dataclass(frozen=True, slots=True)
class ManifestEntry:
    size: int
    sha256: str
    source: str


def manifest_path(config: Config) -> Path:
    return models_root(config) / MANIFEST_NAME


def _manifest_key(root: Path, path: Path) -> str:
    """Path relative to the manifest's folder, or absolute for a file outside it."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return Path(path).resolve().as_posix() if rel.startswith("..") else Path(rel).as_posix()


def read_manifest(path: Path) -> dict[str, ManifestEntry]:
    """Entries keyed by path relative to the manifest's folder; `ModelFileError` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        return {k: ManifestEntry(int(v["size"]), str(v["sha256"]), str(v.get("source", ""))) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{path}: unreadable manifest ({_one_line(e)}); delete it and run "
                             f"`asr-server models pull` to record the files again") from None


def write_manifest(path: Path, entries: dict[str, ManifestEntry]) -> None:
    """Write atomically, so an interrupted write never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": MANIFEST_FORMAT,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {k: {"size": e.size, "sha256": e.sha256, "source": e.source}
                      for k, e in sorted(entries.items())}}
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_files(config: Config, paths: Iterable[Path], source: str, *, replace: bool = True) -> list[Path]:
    """Hash `paths` into the manifest with `source`; with `replace=False` keep existing entries."""
    mpath = manifest_path(config)
    root = mpath.parent
    entries = read_manifest(mpath)
    recorded = []
    for p in paths:
        p = Path(p)
        key = _manifest_key(root, p)
        if not p.is_file() or (not replace and key in entries):
            continue
        entries[key] = ManifestEntry(p.stat().st_size, sha256_file(p), source)
        recorded.append(p)
    if recorded:
        write_manifest(mpath, entries)
    return recorded


def _model_dirs(config: Config) -> list[Path]:
    dirs = [Path(config.asr.model_dir), Path(config.speaker.model).parent, ecapa_dir(config)]
    return list(dict.fromkeys(dirs))


def _dir_files(d: Path) -> list[Path]:
    """Regular, non-hidden files directly in `d` (hub clients keep their state in dot-files)."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".incomplete"))


# --------------------------------------------------------------------------- list / verify

@dataclass(frozen=True, slots=True)
class FileStatus:
    """What `list`/`verify` found about one file."""

    path: Path
    model: str
    required: bool
    present: bool
    size: int | None = None
    manifest: ManifestEntry | None = None
    sha256_ok: bool | None = None
    signature: Signature | None = None
    contract: ModelContract | None = None
    problems: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        if self.problems:
            return "MISSING" if not self.present else "BAD"
        return "ok" if self.present else "absent"


@dataclass(frozen=True, slots=True)
class ModelsReport:
    root: Path
    manifest: Path
    manifest_entries: int
    files: tuple[FileStatus, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_models(config: Config, *, hashes: bool = True, signatures: bool = True,
                   load: bool = False) -> ModelsReport:
    """Check every expected, present or recorded model file. `hashes` compares sha256 with the
    manifest (reads every byte); `signatures` reads each ONNX file's inputs and outputs and matches
    them to its engine; `load` also opens each ONNX file in ONNX Runtime on the CPU, which catches
    what a valid graph can still hide from ONNX Runtime (an unsupported IR version or operator)."""
    root = models_root(config)
    mpath = manifest_path(config)
    global_problems: list[str] = []
    try:
        manifest = read_manifest(mpath)
    except ModelFileError as e:
        manifest, global_problems = {}, [str(e)]

    wanted = {f.path: f for f in expected_files(config)}
    paths: dict[Path, ModelFile] = dict(wanted)
    for d in _model_dirs(config):
        for p in _dir_files(d):
            if p not in paths:
                contract = None
                if p.suffix == ".onnx":
                    contract = SENSEVOICE_CONTRACT if d == Path(config.asr.model_dir) else (
                        ECAPA_CONTRACT if d == ecapa_dir(config) else (
                            CAMPPLUS_CONTRACT if d == Path(config.speaker.model).parent else None))
                paths[p] = ModelFile(p, _model_of(config, d), required=False, contract=contract)
    for key in manifest:
        p = Path(key) if Path(key).is_absolute() else root / key
        if p not in paths:
            paths[p] = ModelFile(p, "recorded", required=False)

    vocab: dict[Path, int] = {}
    token_files = (Path(config.asr.model_dir) / SENSEVOICE_BPE, Path(config.asr.model_dir) / SENSEVOICE_TOKENS)
    statuses = []
    for p, mf in paths.items():
        st = _inspect_file(mf, manifest.get(_manifest_key(root, p)), hashes, signatures, load)
        if p in token_files and st.present and not st.problems:
            pieces, problem = _token_count(p)
            if problem:
                st = _with_problem(st, problem)
            elif pieces is not None:
                vocab[p] = pieces
        statuses.append(st)
    # The logits must have one class per piece, or the text decodes to nonsense. The engine decodes
    # with the bpe model when there is one, else with tokens.json.
    used = next((p for p in token_files if p in vocab), None)
    if used is not None:
        statuses = [_check_vocab(st, vocab[used], used) for st in statuses]

    choices: dict[str, list[Path]] = {}
    for mf in wanted.values():
        if mf.choice:
            choices.setdefault(mf.choice, []).append(mf.path)
    for alternatives in choices.values():
        if not any(p.is_file() for p in alternatives):
            global_problems.append(f"{alternatives[0].parent}: neither "
                                   f"{' nor '.join(p.name for p in alternatives)} is present")
    problems = global_problems + [f"{s.path}: {msg}" for s in statuses for msg in s.problems]
    return ModelsReport(root, mpath, len(manifest), tuple(statuses), tuple(problems))


def _model_of(config: Config, d: Path) -> str:
    if d == Path(config.asr.model_dir):
        return "SenseVoice"
    if d == ecapa_dir(config):
        return "ECAPA"
    return "CAM++"


def _with_problem(st: FileStatus, msg: str) -> FileStatus:
    return FileStatus(st.path, st.model, st.required, st.present, st.size, st.manifest, st.sha256_ok,
                      st.signature, st.contract, st.problems + (msg,))


def _inspect_file(mf: ModelFile, entry: ManifestEntry | None, hashes: bool, signatures: bool,
                  load: bool) -> FileStatus:
    p = mf.path
    if not p.is_file():
        return FileStatus(p, mf.model, mf.required, False, manifest=entry, contract=mf.contract,
                          problems=("missing",) if mf.required else ())
    problems: list[str] = []
    size = p.stat().st_size
    sha_ok = None
    if entry is not None:
        if size != entry.size:
            problems.append(f"size {size} B differs from the manifest's {entry.size} B (truncated or replaced)")
        elif hashes:
            sha_ok = sha256_file(p) == entry.sha256
            if not sha_ok:
                problems.append("sha256 differs from the manifest (corrupt or replaced)")
    sig = None
    if signatures and p.suffix == ".onnx":
        try:
            sig = read_signature(p)
        except ModelFileError as e:
            problems.append(str(e).removeprefix(f"{p}: "))
        else:
            if mf.contract is not None:
                problems += [f"does not match the {mf.contract.model} engine: {m}"
                             for m in match_signature(sig, mf.contract)]
            if load and not problems and importlib.util.find_spec("onnx") is not None:
                try:
                    _ort_session(p)
                except Exception as e:  # onnxruntime raises its own untyped errors
                    problems.append(f"ONNX Runtime cannot load it: {_one_line(e)}")
    elif p.name == SENSEVOICE_CONFIG:
        problems += _check_yaml(p)
    elif p.name == SENSEVOICE_CMVN:
        problems += _check_cmvn(p)
    elif size == 0:
        problems.append("empty file")
    return FileStatus(p, mf.model, mf.required, True, size, entry, sha_ok, sig, mf.contract, tuple(problems))


def _check_yaml(p: Path) -> list[str]:
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"not readable YAML: {_one_line(e)}"]
    return [] if isinstance(data, dict) else ["not a YAML mapping"]


def _check_cmvn(p: Path) -> list[str]:
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return [f"unreadable: {e}"]
    missing = [tag for tag in ("<AddShift>", "<Rescale>") if tag not in text]
    return [f"not a Kaldi CMVN file (no {', '.join(missing)})"] if missing else []


def _token_count(p: Path) -> tuple[int | None, str | None]:
    """Pieces in the bpe model or the token table at `p`, or why it cannot be read."""
    from asr_server.engines.tokenizer import SentencePieceTokenizer, read_token_table

    try:
        if p.name == SENSEVOICE_TOKENS:
            return len(read_token_table(p)), None
        return SentencePieceTokenizer(p).size, None
    except ModelFileError as e:
        kind = "token table" if p.name == SENSEVOICE_TOKENS else "sentencepiece model"
        return None, f"not a readable {kind}: {_one_line(e).removeprefix(f'{p}: ')}"


def _check_vocab(st: FileStatus, pieces: int, token_path: Path) -> FileStatus:
    if st.signature is None or st.contract is not SENSEVOICE_CONTRACT:
        return st
    for out in st.signature.outputs:
        if out.name == "ctc_logits" and out.shape and isinstance(out.shape[-1], int) and out.shape[-1] != pieces:
            return _with_problem(st, f"ctc_logits has {out.shape[-1]} classes but {token_path.name} has {pieces} "
                                     f"pieces: the two files come from different models")
    return st


def check_models(config: Config, *, deep: bool = False) -> list[str]:
    """Problems that should stop `serve`, each naming its file; empty when the files look right.

    Cheap by default (presence, sizes against the manifest, small support files); `deep` also
    hashes every file and opens every ONNX file, as `asr-server models verify` does.
    """
    report = inspect_models(config, hashes=deep, signatures=deep, load=deep)
    return list(report.problems)


def require_models(config: Config, *, deep: bool = False) -> None:
    """Raise `ModelFileError` naming every missing or bad file and the command that fixes it."""
    problems = check_models(config, deep=deep)
    if problems:
        raise ModelFileError("model files are missing or bad:\n  " + "\n  ".join(problems) +
                             "\nRun `asr-server models pull` to fetch them (or place them by hand: "
                             f"see {models_root(config) / 'README.md'}), then `asr-server models verify`.")


# --------------------------------------------------------------------------- pull

@dataclass(frozen=True, slots=True)
class HubRepo:
    """One model as each hub names it, and which of its files to fetch.

    `pre_exported` repositories hold ONNX files ready for the engines; the others hold the PyTorch
    weights the hubs publish, which `export` turns into ONNX (and which the torch backend reads).
    A hub that does not offer a repository has None for it.
    """

    model: str
    modelscope: str | None
    huggingface: str | None
    allow: tuple[str, ...]
    pre_exported: bool = False

    def repo_id(self, source: Source) -> str | None:
        return self.modelscope if source == "modelscope" else self.huggingface


SENSEVOICE_REPO = HubRepo("SenseVoice", "iic/SenseVoiceSmall", "FunAudioLLM/SenseVoiceSmall",
                          (SENSEVOICE_WEIGHTS, SENSEVOICE_CMVN, SENSEVOICE_BPE, SENSEVOICE_CONFIG,
                           "configuration.json"))
#: FunASR's own ONNX runtime model (what its C++ and Python runtimes load): the int8 graph, the
#: frontend files and `tokens.json`, but no sentencepiece model (fetched alone from SENSEVOICE_REPO).
SENSEVOICE_ONNX_REPO = HubRepo("SenseVoice", "iic/SenseVoiceSmall-onnx", None,
                               (SENSEVOICE_INT8, SENSEVOICE_FP32, SENSEVOICE_CMVN, SENSEVOICE_CONFIG,
                                SENSEVOICE_TOKENS, "configuration.json"), pre_exported=True)
# funasr's own hub map (funasr/download/name_maps_from_hub.py) gives the HF mirror of CAM++.
CAMPPLUS_REPO = HubRepo("CAM++", "iic/speech_campplus_sv_zh-cn_16k-common", "funasr/campplus",
                        ("*.bin", "*.pt", "*.yaml", "*.json"))
#: The same ModelScope repository also carries 3D-Speaker's ONNX export (`campplus_cn_common.onnx`).
CAMPPLUS_ONNX_REPO = HubRepo("CAM++", "iic/speech_campplus_sv_zh-cn_16k-common", None,
                             ("*.onnx", "configuration.json"), pre_exported=True)
ECAPA_REPO = HubRepo("ECAPA", None, "speechbrain/spkrec-ecapa-voxceleb", ECAPA_FILES)
#: A pre-exported repository's fallback: the weights to export when its ONNX does not fit.
_WEIGHTS_OF = {id(SENSEVOICE_ONNX_REPO): SENSEVOICE_REPO, id(CAMPPLUS_ONNX_REPO): CAMPPLUS_REPO}

MODELSCOPE_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
HUGGINGFACE_DEFAULT_ENDPOINT = "https://huggingface.co"
TORCH_SETUP = "scripts/setup.sh torch"


def normalize_source(source: str) -> Source:
    s = source.lower()
    if s in ("ms", "modelscope"):
        return "modelscope"
    if s in ("hf", "huggingface"):
        return "huggingface"
    raise ModelsError(f"unknown model source {source!r}: use modelscope (ms) or huggingface (hf)")


def hub_endpoint(source: Source, endpoint: str | None = None) -> str:
    """The hub URL: `endpoint`, else the hub client's own environment variable, else the public hub."""
    if endpoint:
        url = endpoint
    elif source == "modelscope":
        url = (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN")
               or MODELSCOPE_DEFAULT_ENDPOINT)
    else:
        url = os.environ.get("HF_ENDPOINT") or HUGGINGFACE_DEFAULT_ENDPOINT
    url = url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else "https://" + url


@dataclass(frozen=True, slots=True)
class PullTarget:
    """One repository to fetch into one folder."""

    repo: HubRepo
    source: Source
    repo_id: str
    endpoint: str
    dest: Path
    ignore: tuple[str, ...] = ()
    allow: tuple[str, ...] | None = None  # a subset of `repo.allow` (one file of a repository)
    fallback: bool = False  # the weights fetched because the pre-exported files did not fit

    @property
    def url(self) -> str:
        return f"{self.endpoint}/models/{self.repo_id}" if self.source == "modelscope" else f"{self.endpoint}/{self.repo_id}"

    @property
    def patterns(self) -> list[str]:
        return [p for p in (self.allow or self.repo.allow) if p not in self.ignore]


def _target(repo: HubRepo, source: Source, endpoint: str, dest: Path, **kw: Any) -> PullTarget | None:
    repo_id = repo.repo_id(source)
    return PullTarget(repo, source, repo_id, endpoint, dest, **kw) if repo_id else None


def _sensevoice_support_ready(sv: Path) -> bool:
    return all((sv / n).is_file() for n in (SENSEVOICE_CMVN, SENSEVOICE_CONFIG)) and (
        (sv / SENSEVOICE_BPE).is_file() or (sv / SENSEVOICE_TOKENS).is_file())


def plan_pull(config: Config, source: str = "modelscope", *, endpoint: str | None = None,
              ecapa: bool = False, force: bool = False) -> list[PullTarget]:
    """The repositories whose files are missing (all of them with `force`).

    On the ONNX backend a model with no ONNX file yet comes from the hub's pre-exported repository
    when it has one, and from the PyTorch weights (to export) otherwise.
    """
    src = normalize_source(source)
    url = hub_endpoint(src, endpoint)
    sv = Path(config.asr.model_dir)
    onnx_backend = config.engine.backend != "torch"
    targets: list[PullTarget | None] = []

    sv_onnx = sensevoice_onnx_ready(config)
    if not onnx_backend:
        if force or not (_sensevoice_support_ready(sv) and (sv / SENSEVOICE_WEIGHTS).is_file()):
            targets.append(_target(SENSEVOICE_REPO, src, url, sv))
    elif force or not sv_onnx:
        pre = _target(SENSEVOICE_ONNX_REPO, src, url, sv)
        weights_here = (sv / SENSEVOICE_WEIGHTS).is_file() and _sensevoice_support_ready(sv)
        if pre is not None and not (weights_here and not force):
            targets.append(pre)
        elif not weights_here or force:
            targets.append(_target(SENSEVOICE_REPO, src, url, sv))
    elif not _sensevoice_support_ready(sv):
        # ONNX is here: the 900 MB of PyTorch weights are not needed, only the small files beside them.
        targets.append(_target(SENSEVOICE_REPO, src, url, sv, ignore=(SENSEVOICE_WEIGHTS,)))

    kind = speaker_model_type(config)
    if config.speaker.enabled and kind == "campplus":
        onnx_path = Path(config.speaker.model)
        weights = _find_campplus_weights(onnx_path.parent)
        if not onnx_backend:
            if force or weights is None:
                targets.append(_target(CAMPPLUS_REPO, src, url, onnx_path.parent))
        elif force or (not onnx_path.is_file() and weights is None):
            targets.append(_target(CAMPPLUS_ONNX_REPO, src, url, onnx_path.parent)
                           or _target(CAMPPLUS_REPO, src, url, onnx_path.parent))
    if ecapa or (config.speaker.enabled and kind == "ecapa"):
        d = ecapa_dir(config)
        if force or not all((d / n).is_file() for n in ECAPA_FILES):
            # speechbrain fetches from Hugging Face whatever --source says, at $HF_ENDPOINT if set.
            targets.append(_target(ECAPA_REPO, "huggingface", hub_endpoint("huggingface"), d))
    return [t for t in targets if t is not None]


def probe_endpoint(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
    """Raise `HubUnreachableError` unless `url` answers an HTTP request within `timeout` seconds.

    Any HTTP status counts as an answer. The request runs in a daemon thread bounded by the same
    deadline, so a hanging DNS lookup cannot stretch it either; proxies from the environment apply.
    """
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "asr-server-models-probe"})
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            outcome.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise HubUnreachableError(f"no answer from {url} within {timeout:g} s")
    err = outcome[0]
    if err is not None:
        reason = getattr(err, "reason", err)
        raise HubUnreachableError(f"{url} unreachable after {time.monotonic() - t0:.1f} s: {_one_line(reason)}")


def manual_instructions(config: Config, targets: list[PullTarget]) -> str:
    """Which files to copy where, for a machine that cannot reach the hubs."""
    lines = [("To place the files by hand, download them on a machine that can reach the hub "
              "(or copy them from another server) and put them here:")]
    for t in targets:
        if t.repo.model == "SenseVoice":
            lines.append(f"  {t.dest}/: {SENSEVOICE_FP32} and/or {SENSEVOICE_INT8} (or {SENSEVOICE_WEIGHTS}, then run "
                         f"`asr-server models export`), {SENSEVOICE_CMVN}, {SENSEVOICE_BPE} (or {SENSEVOICE_TOKENS}), "
                         f"{SENSEVOICE_CONFIG}  [from {t.url}]")
        elif t.repo.model == "CAM++":
            lines.append(f"  {Path(config.speaker.model)} (or {CAMPPLUS_WEIGHTS} in {t.dest}/, then run "
                         f"`asr-server models export`)  [from {t.url}]")
        else:
            lines.append(f"  {t.dest}/: {', '.join(ECAPA_FILES)}  [from {t.url}]")
    lines.append(f"Then run `asr-server models verify`; {models_root(config) / 'README.md'} has the details.")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PullResult:
    fetched: tuple[PullTarget, ...]
    exported: tuple[Path, ...]
    recorded: tuple[Path, ...]


def _probe_all(config: Config, targets: list[PullTarget], probe_timeout: float) -> None:
    for url in dict.fromkeys(t.endpoint for t in targets):
        try:
            probe_endpoint(url, probe_timeout)
        except HubUnreachableError as e:
            tried = "; ".join(f"{t.repo_id} ({t.url})" for t in targets if t.endpoint == url)
            hint = ("try `--source hf`, or `--endpoint URL` for a mirror, or "
                    if targets[0].source == "modelscope" else "try `--endpoint URL` for a mirror, or ")
            raise HubUnreachableError(
                f"cannot reach the model hub: {e}.\nTried to fetch: {tried}.\n"
                f"Nothing was downloaded. Check the network or proxy (HTTPS_PROXY), {hint}place the files by hand.\n"
                + manual_instructions(config, targets)) from None


def _fetch(config: Config, t: PullTarget, echo: Echo) -> list[Path]:
    """Download one target and record what came; `DownloadError` says how to resume."""
    echo(f"fetching {t.repo_id} from {t.endpoint} into {t.dest}/"
         + (f" (only {', '.join(t.allow)})" if t.allow else ""))
    try:
        _download(t)
    except ModelsError:
        raise
    except Exception as e:  # the hub clients' own error types differ by client and version
        raise DownloadError(f"downloading {t.repo_id} from {t.url} into {t.dest}/ failed: {_one_line(e)}\n"
                            "Run `asr-server models pull` again: finished files are kept and a partial "
                            "file resumes where it stopped.") from e
    fetched = [p for p in _dir_files(t.dest) if any(fnmatch.fnmatch(p.name, pat) for pat in t.patterns)]
    return record_files(config, fetched, f"{t.source}:{t.repo_id}")


def _reject(path: Path, why: str, echo: Echo) -> None:
    """Move a file the engine cannot use out of its way (kept, for a look), and say why."""
    aside = path.with_name(path.name + ".rejected")
    os.replace(path, aside)
    echo(f"{path} does not fit the engine ({why}); moved to {aside.name}, not used")


def accept_pre_exported(config: Config, t: PullTarget, echo: Echo = _stderr) -> bool:
    """Check what a pre-exported repository delivered against the engine's contract.

    Files that do not fit are moved aside with the mismatch named; True when the model is ready.
    """
    if t.repo is SENSEVOICE_ONNX_REPO:
        sv = t.dest
        pieces = None
        for name in (SENSEVOICE_BPE, SENSEVOICE_TOKENS):
            if (sv / name).is_file():
                pieces, problem = _token_count(sv / name)
                if problem:
                    _reject(sv / name, problem, echo)
                break
        for name in (SENSEVOICE_INT8, SENSEVOICE_FP32):
            path = sv / name
            if not path.is_file():
                continue
            problems = _contract_problems(path, SENSEVOICE_CONTRACT)
            if not problems and pieces is not None:
                st = _check_vocab(FileStatus(path, "SenseVoice", True, True, signature=read_signature(path),
                                             contract=SENSEVOICE_CONTRACT), pieces, sv / name)
                problems = list(st.problems)
            if problems:
                _reject(path, "; ".join(problems), echo)
        return sensevoice_onnx_ready(config) and _sensevoice_support_ready(sv)
    # CAM++: 3D-Speaker's file name differs from speaker.model; the first ONNX that fits becomes it.
    out = Path(config.speaker.model)
    for path in sorted(p for p in _dir_files(t.dest) if p.suffix == ".onnx" and p != out):
        problems = _contract_problems(path, CAMPPLUS_CONTRACT)
        if problems:
            _reject(path, "; ".join(problems), echo)
        elif not out.is_file():
            os.replace(path, out)
            echo(f"{path.name} from {t.repo_id} fits the CAM++ engine: saved as {out}")
    return out.is_file()


def _contract_problems(path: Path, contract: ModelContract) -> list[str]:
    try:
        return match_signature(read_signature(path), contract)
    except ModelFileError as e:
        return [str(e).removeprefix(f"{path}: ")]


def _exporter_missing() -> str | None:
    """Why the torch export cannot run here, or None when it can."""
    missing = [m for m in ("torch", "funasr", "onnx") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def pull_models(config: Config, source: str = "modelscope", *, endpoint: str | None = None,
                ecapa: bool = False, export: bool = True, quantize: bool = True, force: bool = False,
                probe_timeout: float = DEFAULT_PROBE_TIMEOUT_S, echo: Echo = _stderr) -> PullResult:
    """Fetch what is missing, export what has no ONNX yet, record everything in the manifest.

    Pre-exported ONNX files are preferred; only a model whose hub has none that fits falls back to
    its PyTorch weights and the export, which needs the torch lock (the error says how to install
    it before 900 MB of weights are fetched for nothing). Probes each hub first and raises
    `HubUnreachableError` at once when it does not answer, with what was tried and how to place
    the files by hand; nothing is downloaded then.
    """
    targets = plan_pull(config, source, endpoint=endpoint, ecapa=ecapa, force=force)
    if targets:
        for t in targets:
            _require_client(t)
        _probe_all(config, targets, probe_timeout)
    else:
        echo("all model files the configuration needs are present; nothing to download")
    recorded: list[Path] = []
    fetched: list[PullTarget] = []
    queue = list(targets)
    while queue:
        t = queue.pop(0)
        if not t.repo.pre_exported and export and config.engine.backend != "torch" and t.repo.model != "ECAPA" \
                and SENSEVOICE_WEIGHTS not in t.ignore and (why := _exporter_missing()):
            raise MissingDependencyError(
                f"{t.repo.model}: {'the pre-exported ONNX files do not fit' if t.fallback else 'no pre-exported ONNX on ' + t.source}"
                f", so it must be exported from its PyTorch weights ({t.repo_id}), which needs the torch lock ({why}). "
                f"Install it with `{TORCH_SETUP}`, then run `asr-server models pull` again.")
        recorded += _fetch(config, t, echo)
        fetched.append(t)
        if t.repo.pre_exported and not accept_pre_exported(config, t, echo):
            fallback = _target(_WEIGHTS_OF[id(t.repo)], t.source, t.endpoint, t.dest, fallback=True)
            if fallback is not None:
                echo(f"{t.repo.model}: nothing pre-exported fits; falling back to the PyTorch weights and the export")
                queue.insert(0, fallback)
        elif t.repo is SENSEVOICE_ONNX_REPO and not (t.dest / SENSEVOICE_BPE).is_file():
            # Decoding works from tokens.json; the sentencepiece model is what funasr itself decodes with.
            bpe = _target(SENSEVOICE_REPO, t.source, t.endpoint, t.dest, allow=(SENSEVOICE_BPE,))
            if bpe is not None:
                try:
                    recorded += _fetch(config, bpe, echo)
                    fetched.append(bpe)
                except DownloadError as e:
                    echo(f"{SENSEVOICE_BPE} not fetched ({_one_line(e)}); decoding with {SENSEVOICE_TOKENS}")

    exported: list[Path] = []
    if export:
        exported = export_models(config, quantize=quantize, force=False, echo=echo, missing_only=True)
        if _wants_fp32(config) and not (Path(config.asr.model_dir) / SENSEVOICE_FP32).is_file():
            more, fetched_weights = _fp32_for_cuda(config, source, endpoint, echo)
            exported += more
            fetched += fetched_weights
        recorded += exported
    # Files placed by hand are recorded as found, so `verify` notices when they change later.
    for d in _model_dirs(config):
        recorded += record_files(config, _dir_files(d), "local", replace=False)
    return PullResult(tuple(fetched), tuple(exported), tuple(dict.fromkeys(recorded)))


def _wants_fp32(config: Config) -> bool:
    """On CUDA the int8 graph (dynamic quantisation) runs slowly: `auto` wants the fp32 file there."""
    return (config.engine.backend != "torch" and config.engine.device.startswith("cuda")
            and config.asr.quantized in ("auto", "no"))


def _fp32_for_cuda(config: Config, source: str, endpoint: str | None, echo: Echo) -> tuple[list[Path], list[PullTarget]]:
    """Export `model.onnx` from the weights when a pre-exported repository brought only the int8 graph."""
    sv = Path(config.asr.model_dir)
    why = _exporter_missing()
    if why:
        echo(f"SenseVoice: only {SENSEVOICE_INT8} is here, and int8 runs slowly on CUDA. For {SENSEVOICE_FP32}, "
             f"install the torch lock (`{TORCH_SETUP}`; {why}) and run `asr-server models pull` again.")
        return [], []
    fetched = []
    if not (sv / SENSEVOICE_WEIGHTS).is_file():
        src = normalize_source(source)
        t = _target(SENSEVOICE_REPO, src, hub_endpoint(src, endpoint), sv)
        if t is None:
            return [], []
        _fetch(config, t, echo)
        fetched.append(t)
    echo(f"exporting {sv / SENSEVOICE_WEIGHTS} to {SENSEVOICE_FP32} for CUDA (opset 14, fp32)")
    produced = _export_sensevoice(sv, quantize=False)
    for p in produced:
        record_files(config, [p], f"export:{_manifest_key(models_root(config), p.parent)}")
    return produced, fetched


_CLIENTS = {"modelscope": ("modelscope", "modelscope"), "huggingface": ("huggingface_hub", "huggingface_hub")}


def _require_client(t: PullTarget) -> None:
    module, package = ("speechbrain", "speechbrain") if t.repo is ECAPA_REPO else _CLIENTS[t.source]
    if importlib.util.find_spec(module) is None:
        setup = TORCH_SETUP if t.repo is ECAPA_REPO else "scripts/setup.sh"
        raise MissingDependencyError(f"fetching {t.repo_id} needs the {package} package: run `{setup}` "
                                     f"(or pip install {package})")


def _download(t: PullTarget) -> None:
    t.dest.mkdir(parents=True, exist_ok=True)
    if t.repo is ECAPA_REPO:
        from speechbrain.inference.speaker import EncoderClassifier
        from speechbrain.utils.fetching import LocalStrategy

        # Files go straight into the folder (no symlinks into a cache outside the models volume).
        EncoderClassifier.from_hparams(source=t.repo_id, savedir=str(t.dest), download_only=True,
                                       local_strategy=LocalStrategy.COPY_SKIP_CACHE)
        return
    allow = t.patterns
    if t.source == "modelscope":
        from modelscope.hub.snapshot_download import snapshot_download

        kwargs: dict[str, Any] = {"local_dir": str(t.dest), "allow_patterns": allow}
        params = inspect.signature(snapshot_download).parameters
        if "endpoint" in params:
            kwargs["endpoint"] = t.endpoint
        if "progress_callbacks" in params:
            from modelscope.hub.callback import TqdmCallback

            kwargs["progress_callbacks"] = [TqdmCallback]
        snapshot_download(t.repo_id, **kwargs)
    else:
        from huggingface_hub import snapshot_download as hf_snapshot_download

        hf_snapshot_download(t.repo_id, local_dir=str(t.dest), allow_patterns=allow, endpoint=t.endpoint)


# --------------------------------------------------------------------------- export

def _find_campplus_weights(d: Path) -> Path | None:
    """The CAM++ state dict in `d`: as configuration.json names it, else the usual name, else the only one."""
    conf = _read_json(d / "configuration.json")
    names = [conf.get("file_path_metas", {}).get("init_param"), conf.get("model", {}).get("pretrained_model"),
             CAMPPLUS_WEIGHTS]
    for n in names:
        if isinstance(n, str) and (d / n).is_file():
            return d / n
    found = [p for p in _dir_files(d) if p.suffix in (".bin", ".pt", ".ckpt")]
    return found[0] if len(found) == 1 else None


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def export_models(config: Config, *, quantize: bool = True, force: bool = False, echo: Echo = _stderr,
                  missing_only: bool = False) -> list[Path]:
    """Turn the PyTorch weights in the model folders into the ONNX files the engines read.

    Exports SenseVoice (fp32, plus int8 with `quantize`), CAM++ and ECAPA (when its speechbrain
    files are in `models/ecapa/`) where their ONNX files are absent, or always with `force`.
    Raises `ExportError` when there is nothing to export from,
    unless `missing_only` (as `pull` calls it) just skips those.
    """
    produced: list[Path] = []
    sv = Path(config.asr.model_dir)
    if force or not sensevoice_onnx_ready(config):
        weights = sv / SENSEVOICE_WEIGHTS
        if weights.is_file():
            echo(f"exporting {weights} to ONNX (opset 14, fp32{' + int8' if quantize else ''})")
            produced += _export_sensevoice(sv, quantize)
        elif not missing_only:
            raise ExportError(f"{weights} not found: nothing to export SenseVoice from; run `asr-server models pull`")
    elif not missing_only:
        echo(f"{sv}: ONNX present, not exported again (use --force)")

    if config.speaker.enabled and speaker_model_type(config) == "campplus":
        out = Path(config.speaker.model)
        if force or not out.is_file():
            weights = _find_campplus_weights(out.parent)
            if weights is not None:
                echo(f"exporting {weights} to {out} (opset 14, fp32)")
                produced += _export_campplus(weights, out)
            elif not missing_only:
                raise ExportError(f"no CAM++ weights ({CAMPPLUS_WEIGHTS}) in {out.parent}: nothing to export; "
                                  f"run `asr-server models pull`")
        elif not missing_only:
            echo(f"{out}: present, not exported again (use --force)")

    ed = ecapa_dir(config)
    wants_ecapa = config.speaker.enabled and speaker_model_type(config) == "ecapa"
    if all((ed / n).is_file() for n in ECAPA_FILES):
        out = ed / ECAPA_ONNX
        if force or not out.is_file():
            echo(f"exporting {ed} (speechbrain ECAPA-TDNN) to {out} (opset 14, fp32)")
            produced += _export_ecapa(ed, out)
        elif not missing_only:
            echo(f"{out}: present, not exported again (use --force)")
    elif wants_ecapa and not missing_only and (force or not (ed / ECAPA_ONNX).is_file()):
        raise ExportError(f"no speechbrain ECAPA files ({', '.join(ECAPA_FILES)}) in {ed}: nothing to export; "
                          "run `asr-server models pull --ecapa`")
    for p in produced:
        record_files(config, [p], f"export:{_manifest_key(models_root(config), p.parent)}")
    return produced


def _import_exporters() -> Any:
    try:
        import torch  # noqa: F401

        from asr_server import export
    except ImportError as e:
        raise MissingDependencyError(f"exporting to ONNX needs torch, funasr and onnx ({e.name or e} is missing): "
                                     f"install the torch lock with `{TORCH_SETUP}`") from None
    return export


def _export_sensevoice(sv: Path, quantize: bool) -> list[Path]:
    export = _import_exporters()
    try:
        # A local folder: funasr reads configuration.json/config.yaml there and never calls a hub.
        model = export.load_funasr_sensevoice(sv, device="cpu")
        export.export_sensevoice(model, sv, quantize=quantize)
    except ModelsError:
        raise
    except Exception as e:
        raise ExportError(f"exporting SenseVoice from {sv} failed: {_one_line(e)}") from e
    return [p for p in (sv / SENSEVOICE_FP32, sv / SENSEVOICE_INT8) if p.is_file() and (quantize or p.name == SENSEVOICE_FP32)]


def _export_campplus(weights: Path, out: Path) -> list[Path]:
    export = _import_exporters()
    try:
        model = export.load_funasr_campplus(weights, device="cpu", **campplus_dims(weights.parent))
        export.export_campplus(model, out)
    except ModelsError:
        raise
    except Exception as e:
        raise ExportError(f"exporting CAM++ from {weights} failed: {_one_line(e)}") from e
    if not out.is_file():
        raise ExportError(f"exporting CAM++ from {weights} wrote no {out}")
    return [out]


def _export_ecapa(model_dir: Path, out: Path) -> list[Path]:
    export = _import_exporters()
    try:
        export.export_ecapa(model_dir, out)
    except ModelsError:
        raise
    except Exception as e:
        raise ExportError(f"exporting ECAPA from {model_dir} failed: {_one_line(e)}") from e
    return [out]


# --------------------------------------------------------------------------- command line

def add_models_parser(subparsers: Any) -> None:
    """Add `models {pull,export,list,verify}`; each handler is `func(args, config) -> exit status`."""
    p = subparsers.add_parser("models", help="fetch, export and check the model files",
                              description="Fetch, export and check the model files (see models/README.md).")
    sub = p.add_subparsers(dest="models_command", metavar="{pull,export,list,verify}")
    sub.required = True

    pull = sub.add_parser("pull", help="download what is missing, export it to ONNX, record it in the manifest")
    pull.add_argument("--source", default="modelscope", choices=["modelscope", "ms", "huggingface", "hf"],
                      help="hub to fetch from (default: modelscope)")
    pull.add_argument("--endpoint", metavar="URL",
                      help="hub URL, e.g. a mirror (default: $MODELSCOPE_ENDPOINT / $HF_ENDPOINT or the public hub)")
    pull.add_argument("--ecapa", action="store_true",
                      help="also fetch ECAPA-TDNN (speechbrain/spkrec-ecapa-voxceleb, through speechbrain, "
                           "from Hugging Face at $HF_ENDPOINT or huggingface.co)")
    pull.add_argument("--no-export", dest="export", action="store_false", help="download only, export later")
    pull.add_argument("--no-quantize", dest="quantize", action="store_false", help="skip the int8 SenseVoice")
    pull.add_argument("--force", action="store_true", help="fetch again even when the files are present")
    pull.add_argument("--timeout", type=_positive_float, default=DEFAULT_PROBE_TIMEOUT_S, metavar="S",
                      help=f"seconds to wait for the hub to answer before giving up (default {DEFAULT_PROBE_TIMEOUT_S:g})")
    pull.set_defaults(func=cmd_pull)

    exp = sub.add_parser("export", help="turn the PyTorch weights in the model folders into ONNX")
    exp.add_argument("--no-quantize", dest="quantize", action="store_false", help="skip the int8 SenseVoice")
    exp.add_argument("--force", action="store_true", help="export again over existing ONNX files")
    exp.set_defaults(func=cmd_export)

    ls = sub.add_parser("list", help="show the model files, their signatures and whether the engines can use them")
    ls.set_defaults(func=cmd_list)

    ver = sub.add_parser("verify", help="like list, and compare sha256 with the manifest; exits 1 on any problem")
    ver.add_argument("--quiet", "-q", action="store_true", help="print only the problems (nothing when all is well)")
    ver.set_defaults(func=cmd_verify)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def cmd_pull(args: argparse.Namespace, config: Config) -> int:
    try:
        result = pull_models(config, args.source, endpoint=args.endpoint, ecapa=args.ecapa, export=args.export,
                             quantize=args.quantize, force=args.force, probe_timeout=args.timeout)
    except (ModelsError, ModelFileError) as e:
        _stderr(f"error: {e}")
        return 1
    missing = missing_model_files(config)
    if missing and not args.export:
        _stderr("downloaded without exporting; run `asr-server models export` next. Still missing:\n  "
                + "\n  ".join(str(p) for p in missing))
        return 0
    if missing:
        _stderr("still missing after pull:\n  " + "\n  ".join(str(p) for p in missing))
        return 1
    _stderr(f"models ready in {models_root(config)}/ ({len(result.recorded)} files recorded in "
            f"{manifest_path(config)})")
    return 0


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    try:
        produced = export_models(config, quantize=args.quantize, force=args.force)
    except (ModelsError, ModelFileError) as e:
        _stderr(f"error: {e}")
        return 1
    for p in produced:
        print(f"wrote {p}")
    return 0


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    print(format_report(inspect_models(config, hashes=False, signatures=True)))
    return 0


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    report = inspect_models(config, hashes=True, signatures=True, load=True)
    if not args.quiet:
        print(format_report(report))
    elif report.problems:
        print("\n".join(report.problems))
    return 0 if report.ok else 1


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else (f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B")


def format_report(report: ModelsReport) -> str:
    """The text `list` and `verify` print: one block per model, one line per file, then the problems."""
    out = [f"models root: {report.root}/  manifest: {report.manifest} "
           f"({report.manifest_entries} files recorded)" if report.manifest.is_file()
           else f"models root: {report.root}/  manifest: {report.manifest} (none yet)"]
    for model in dict.fromkeys(s.model for s in report.files):
        out.append(f"\n{model}")
        for s in (f for f in report.files if f.model == model):
            size = _mib(s.size) if s.size is not None else ""
            tags = [] if s.required or s.present else ["optional"]
            if s.manifest is not None and s.present:
                tags.append("manifest: size differs" if s.size != s.manifest.size else
                            {True: "sha256 ok", False: "manifest: sha256 differs", None: "size ok"}[s.sha256_ok])
            elif s.present:
                tags.append("not in manifest")
            out.append(f"  {s.status:<8} {s.path}  {size}  {', '.join(tags)}".rstrip())
            if s.signature is not None:
                out.append("           in : " + "; ".join(t.describe() for t in s.signature.inputs))
                out.append("           out: " + "; ".join(t.describe() for t in s.signature.outputs))
                if s.contract is not None and not s.problems:
                    out.append(f"           matches the {s.contract.model} engine")
                elif s.contract is not None and any("does not match" in p for p in s.problems):
                    out.append(f"           expected: {s.contract.describe()}")
            for msg in s.problems:
                if s.present:
                    out.append(f"           ! {msg}")
    if report.problems:
        out.append(f"\n{len(report.problems)} problem(s):")
        out += [f"  - {p}" for p in report.problems]
        out.append("Fix: `asr-server models pull` fetches missing files; delete a bad file and pull again "
                   "(or `asr-server models export --force` for an ONNX file).")
    else:
        out.append("\nall model files OK")
    return "\n".join(out)
