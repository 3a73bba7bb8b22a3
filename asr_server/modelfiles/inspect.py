"""`models list` and `models verify`: every expected, present or recorded file, checked against its
engine's contract and the manifest, so a wrong, truncated or corrupt file is named before an engine
loads it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import Config
from ..engines import contracts
from ..engines.contracts import ModelContract, Signature, match_signature, one_line, ort_session, read_signature
from ..errors import ModelFileError
from .layout import ModelFile, dir_files, ecapa_dir, expected_files, model_dirs, models_root
from .manifest import ManifestEntry, manifest_key, manifest_path, read_manifest, sha256_file
from .repos import SENSEVOICE_ONNX_REPO, SENSEVOICE_REPO, models_readme


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


def inspect_models(config: Config, *, hashes: bool = True, signatures: bool = True, load: bool = False) -> ModelsReport:
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
    for d in model_dirs(config):
        for p in dir_files(d):
            if p not in paths:
                contract = None
                if p.suffix == ".onnx":
                    contract = (
                        contracts.SENSEVOICE
                        if d == Path(config.asr.model_dir)
                        else (
                            contracts.ECAPA
                            if d == ecapa_dir(config)
                            else (contracts.CAMPPLUS if d == Path(config.speaker.model).parent else None)
                        )
                    )
                paths[p] = ModelFile(p, _model_of(config, d), required=False, contract=contract)
    for key in manifest:
        p = Path(key) if Path(key).is_absolute() else root / key
        if p not in paths:
            paths[p] = ModelFile(p, "recorded", required=False)

    vocab: dict[Path, int] = {}
    token_files = (
        Path(config.asr.model_dir) / contracts.SENSEVOICE_BPE,
        Path(config.asr.model_dir) / contracts.SENSEVOICE_TOKENS,
    )
    statuses = []
    for p, mf in paths.items():
        st = _inspect_file(mf, manifest.get(manifest_key(root, p)), hashes, signatures, load)
        if p in token_files and st.present and not st.problems:
            pieces, problem = token_count(p)
            if problem:
                st = _with_problem(st, problem)
            elif pieces is not None:
                vocab[p] = pieces
        statuses.append(st)
    # The logits must have one class per piece, or the text decodes to nonsense. The engine decodes
    # with the bpe model when there is one, else with tokens.json.
    used = next((p for p in token_files if p in vocab), None)
    if used is not None:
        statuses = [check_vocab(st, vocab[used], used) for st in statuses]

    choices: dict[str, list[Path]] = {}
    for mf in wanted.values():
        if mf.choice:
            choices.setdefault(mf.choice, []).append(mf.path)
    for alternatives in choices.values():
        if not any(p.is_file() for p in alternatives):
            global_problems.append(
                f"{alternatives[0].parent}: neither {' nor '.join(p.name for p in alternatives)} is present"
            )
    problems = global_problems + [f"{s.path}: {msg}" for s in statuses for msg in s.problems]
    return ModelsReport(root, mpath, len(manifest), tuple(statuses), tuple(problems))


def _model_of(config: Config, d: Path) -> str:
    if d == Path(config.asr.model_dir):
        return "SenseVoice"
    if d == ecapa_dir(config):
        return "ECAPA"
    return "CAM++"


def _with_problem(st: FileStatus, msg: str) -> FileStatus:
    return FileStatus(
        st.path,
        st.model,
        st.required,
        st.present,
        st.size,
        st.manifest,
        st.sha256_ok,
        st.signature,
        st.contract,
        (*st.problems, msg),
    )


def _inspect_file(mf: ModelFile, entry: ManifestEntry | None, hashes: bool, signatures: bool, load: bool) -> FileStatus:
    p = mf.path
    if not p.is_file():
        return FileStatus(
            p,
            mf.model,
            mf.required,
            False,
            manifest=entry,
            contract=mf.contract,
            problems=("missing",) if mf.required else (),
        )
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
                problems += [
                    f"does not match the {mf.contract.model} engine: {m}" for m in match_signature(sig, mf.contract)
                ]
            if load and not problems and importlib.util.find_spec("onnx") is not None:
                try:
                    ort_session(p)
                except Exception as e:  # onnxruntime raises its own untyped errors
                    problems.append(f"ONNX Runtime cannot load it: {one_line(e)}")
    elif p.name == contracts.SENSEVOICE_CONFIG:
        problems += _check_yaml(p)
    elif p.name == contracts.SENSEVOICE_CMVN:
        problems += _check_cmvn(p)
    elif size == 0:
        problems.append("empty file")
    return FileStatus(p, mf.model, mf.required, True, size, entry, sha_ok, sig, mf.contract, tuple(problems))


def _check_yaml(p: Path) -> list[str]:
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"not readable YAML: {one_line(e)}"]
    return [] if isinstance(data, dict) else ["not a YAML mapping"]


def _check_cmvn(p: Path) -> list[str]:
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return [f"unreadable: {e}"]
    missing = [tag for tag in ("<AddShift>", "<Rescale>") if tag not in text]
    return [f"not a Kaldi CMVN file (no {', '.join(missing)})"] if missing else []


def token_count(p: Path) -> tuple[int | None, str | None]:
    """Pieces in the bpe model or the token table at `p`, or why it cannot be read."""
    from ..engines.sensevoice.tokenizer import SentencePieceTokenizer, read_token_table

    try:
        if p.name == contracts.SENSEVOICE_TOKENS:
            return len(read_token_table(p)), None
        return SentencePieceTokenizer(p).size, None
    except ModelFileError as e:
        kind = "token table" if p.name == contracts.SENSEVOICE_TOKENS else "sentencepiece model"
        return None, f"not a readable {kind}: {one_line(e).removeprefix(f'{p}: ')}"


def check_vocab(st: FileStatus, pieces: int, token_path: Path) -> FileStatus:
    if st.signature is None or st.contract is not contracts.SENSEVOICE:
        return st
    for out in st.signature.outputs:
        if out.name == "ctc_logits" and out.shape and isinstance(out.shape[-1], int) and out.shape[-1] != pieces:
            return _with_problem(
                st,
                f"ctc_logits has {out.shape[-1]} classes but {token_path.name} has {pieces} "
                f"pieces: the two files come from different models",
            )
    return st


def check_models(config: Config, *, deep: bool = False) -> list[str]:
    """Problems that should stop `serve`, each naming its file; empty when the files look right.

    Cheap by default (presence, sizes against the manifest, small support files); `deep` also
    hashes every file and opens every ONNX file, as `asr-server models verify` does.
    """
    report = inspect_models(config, hashes=deep, signatures=deep, load=deep)
    return list(report.problems)


def remedy(config: Config) -> str:
    """What to run about missing or bad files, for this folder: `models pull` always; `models export`
    where the PyTorch weights are here without ONNX (an xiaozhi-esp32-server user's folder), and
    where `am.mvn`, which such a folder lacks, lives on the hubs."""
    sv = Path(config.asr.model_dir)
    lines = [
        "Fix: `asr-server models pull` fetches what is missing (the pre-exported ONNX files: no torch needed); "
        "delete a bad file and pull again (or `asr-server models export --force` for an ONNX file)."
    ]
    if (
        config.engine.backend != "torch"
        and (sv / contracts.SENSEVOICE_WEIGHTS).is_file()
        and not any((sv / n).is_file() for n in (contracts.SENSEVOICE_FP32, contracts.SENSEVOICE_INT8))
    ):
        lines.append(
            f"{sv} holds {contracts.SENSEVOICE_WEIGHTS} (as xiaozhi-esp32-server's folder does): without a hub, "
            "`asr-server models export` turns it into ONNX here, with the torch lock (`scripts/setup.sh torch`)."
        )
    if not (sv / contracts.SENSEVOICE_CMVN).is_file():
        lines.append(
            f"{contracts.SENSEVOICE_CMVN} (the feature statistics; xiaozhi-esp32-server's folder has none) is in "
            f"ModelScope {SENSEVOICE_REPO.modelscope} and {SENSEVOICE_ONNX_REPO.modelscope}, Hugging Face "
            f"{SENSEVOICE_REPO.huggingface}: `models pull` fetches it alone, or copy it into {sv}/."
        )
    lines.append("Then run `asr-server models verify`." + models_readme(config))
    return "\n".join(lines)


def require_models(config: Config, *, deep: bool = False) -> None:
    """Raise `ModelFileError` naming every missing or bad file and what fixes it."""
    problems = check_models(config, deep=deep)
    if problems:
        raise ModelFileError("model files are missing or bad:\n  " + "\n  ".join(problems) + "\n" + remedy(config))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else (f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B")


def format_report(report: ModelsReport, fix: str = "") -> str:
    """The text `list` and `verify` print: one block per model, one line per file, then the problems."""
    out = [
        f"models root: {report.root}/  manifest: {report.manifest} ({report.manifest_entries} files recorded)"
        if report.manifest.is_file()
        else f"models root: {report.root}/  manifest: {report.manifest} (none yet)"
    ]
    for model in dict.fromkeys(s.model for s in report.files):
        out.append(f"\n{model}")
        for s in (f for f in report.files if f.model == model):
            size = _mib(s.size) if s.size is not None else ""
            tags = [] if s.required or s.present else ["optional"]
            if s.manifest is not None and s.present:
                tags.append(
                    "manifest: size differs"
                    if s.size != s.manifest.size
                    else {True: "sha256 ok", False: "manifest: sha256 differs", None: "size ok"}[s.sha256_ok]
                )
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
        if fix:
            out.append(fix)
    else:
        out.append("\nall model files OK")
    return "\n".join(out)
