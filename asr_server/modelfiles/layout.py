"""Where the model files go: the folders of the configuration, and which files each engine needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..engines import contracts
from ..engines.contracts import ModelContract


def models_root(config: Config) -> Path:
    """The folder holding `manifest.json`: the parent of `asr.model_dir` (`models/` by default)."""
    return Path(config.asr.model_dir).parent


def ecapa_dir(config: Config) -> Path:
    return models_root(config) / contracts.ECAPA_DIR


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
    for name in (contracts.SENSEVOICE_FP32, contracts.SENSEVOICE_INT8):
        wanted = (name == contracts.SENSEVOICE_INT8) == (q == "yes")
        files.append(
            ModelFile(
                sv / name,
                "SenseVoice",
                required=not torch_backend and q != "auto" and wanted,
                contract=contracts.SENSEVOICE,
                choice="sensevoice-onnx" if not torch_backend and q == "auto" else None,
            )
        )
    files += [
        ModelFile(sv / contracts.SENSEVOICE_WEIGHTS, "SenseVoice", required=torch_backend),
        ModelFile(sv / contracts.SENSEVOICE_CMVN, "SenseVoice", required=True),
        ModelFile(sv / contracts.SENSEVOICE_BPE, "SenseVoice", required=False, choice="sensevoice-tokens"),
        ModelFile(sv / contracts.SENSEVOICE_TOKENS, "SenseVoice", required=False, choice="sensevoice-tokens"),
        ModelFile(sv / contracts.SENSEVOICE_CONFIG, "SenseVoice", required=True),
    ]
    if config.speaker.enabled and config.speaker.model_type == "ecapa":
        files += [
            ModelFile(
                ecapa_dir(config) / contracts.ECAPA_ONNX, "ECAPA", required=not torch_backend, contract=contracts.ECAPA
            )
        ]
        files += [ModelFile(ecapa_dir(config) / n, "ECAPA", required=torch_backend) for n in contracts.ECAPA_FILES]
    elif config.speaker.enabled:
        onnx_path = Path(config.speaker.model)
        files += [
            ModelFile(onnx_path, "CAM++", required=not torch_backend, contract=contracts.CAMPPLUS),
            ModelFile(onnx_path.parent / contracts.CAMPPLUS_WEIGHTS, "CAM++", required=torch_backend),
        ]
    return files


def sensevoice_onnx_ready(config: Config) -> bool:
    """Whether the SenseVoice ONNX file that `asr.quantized` asks for is there (either one for auto)."""
    sv = Path(config.asr.model_dir)
    wanted = {"yes": (contracts.SENSEVOICE_INT8,), "no": (contracts.SENSEVOICE_FP32,)}.get(
        config.asr.quantized, (contracts.SENSEVOICE_FP32, contracts.SENSEVOICE_INT8)
    )
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


def model_dirs(config: Config) -> list[Path]:
    dirs = [Path(config.asr.model_dir), Path(config.speaker.model).parent, ecapa_dir(config)]
    return list(dict.fromkeys(dirs))


def dir_files(d: Path) -> list[Path]:
    """Regular, non-hidden files directly in `d` (hub clients keep their state in dot-files)."""
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".incomplete")
    )
