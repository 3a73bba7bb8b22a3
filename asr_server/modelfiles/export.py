"""`models export` and the export step of `pull`: PyTorch weights in the model folders to the ONNX
files the engines load. The graphs themselves are written by `onnx_export` (torch, funasr and onnx
are imported only there, so everything else here runs without them)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from ..engines import contracts
from ..engines.contracts import one_line
from ..errors import ExportError, MissingDependencyError, ModelsError
from .layout import dir_files, ecapa_dir, models_root, sensevoice_onnx_ready
from .manifest import manifest_key, record_files

#: Where model commands report progress: one line per call (stderr on the command line).
Echo = Callable[[str], None]
TORCH_SETUP = "scripts/setup.sh torch"


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def exporter_missing() -> str | None:
    """Why the torch export cannot run here, or None when it can."""
    missing = [m for m in ("torch", "funasr", "onnx") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def find_campplus_weights(d: Path) -> Path | None:
    """The CAM++ state dict in `d`: as configuration.json names it, else the usual name, else the only one."""
    conf = _read_json(d / "configuration.json")
    names = [
        conf.get("file_path_metas", {}).get("init_param"),
        conf.get("model", {}).get("pretrained_model"),
        contracts.CAMPPLUS_WEIGHTS,
    ]
    for n in names:
        if isinstance(n, str) and (d / n).is_file():
            return d / n
    found = [p for p in dir_files(d) if p.suffix in (".bin", ".pt", ".ckpt")]
    return found[0] if len(found) == 1 else None


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_exported(config: Config, paths: list[Path]) -> None:
    """Record exported files in the manifest, their source the folder they were exported from."""
    for p in paths:
        record_files(config, [p], f"export:{manifest_key(models_root(config), p.parent)}")


def export_models(
    config: Config, *, quantize: bool = True, force: bool = False, echo: Echo = stderr, missing_only: bool = False
) -> list[Path]:
    """Turn the PyTorch weights in the model folders into the ONNX files the engines read.

    Exports SenseVoice (fp32, plus int8 with `quantize`), CAM++ and ECAPA (when its speechbrain
    files are in `models/ecapa/`) where their ONNX files are absent, or always with `force`.
    Raises `ExportError` when there is nothing to export from,
    unless `missing_only` (as `pull` calls it) just skips those.
    """
    produced: list[Path] = []
    sv = Path(config.asr.model_dir)
    if force or not sensevoice_onnx_ready(config):
        weights = sv / contracts.SENSEVOICE_WEIGHTS
        if weights.is_file():
            echo(f"exporting {weights} to ONNX (opset 14, fp32{' + int8' if quantize else ''})")
            produced += export_sensevoice_files(sv, quantize)
        elif not missing_only:
            raise ExportError(f"{weights} not found: nothing to export SenseVoice from; run `asr-server models pull`")
    elif not missing_only:
        echo(f"{sv}: ONNX present, not exported again (use --force)")

    if config.speaker.enabled and config.speaker.model_type == "campplus":
        out = Path(config.speaker.model)
        if force or not out.is_file():
            cam_weights = find_campplus_weights(out.parent)
            if cam_weights is not None:
                echo(f"exporting {cam_weights} to {out} (opset 14, fp32)")
                produced += _export_campplus(cam_weights, out)
            elif not missing_only:
                raise ExportError(
                    f"no CAM++ weights ({contracts.CAMPPLUS_WEIGHTS}) in {out.parent}: nothing to export; "
                    f"run `asr-server models pull`"
                )
        elif not missing_only:
            echo(f"{out}: present, not exported again (use --force)")

    ed = ecapa_dir(config)
    wants_ecapa = config.speaker.enabled and config.speaker.model_type == "ecapa"
    if all((ed / n).is_file() for n in contracts.ECAPA_FILES):
        out = ed / contracts.ECAPA_ONNX
        if force or not out.is_file():
            echo(f"exporting {ed} (speechbrain ECAPA-TDNN) to {out} (opset 14, fp32)")
            produced += _export_ecapa(ed, out)
        elif not missing_only:
            echo(f"{out}: present, not exported again (use --force)")
    elif wants_ecapa and not missing_only and (force or not (ed / contracts.ECAPA_ONNX).is_file()):
        raise ExportError(
            f"no speechbrain ECAPA files ({', '.join(contracts.ECAPA_FILES)}) in {ed}: nothing to export; "
            "run `asr-server models pull --ecapa`"
        )
    record_exported(config, produced)
    return produced


def _import_exporters() -> Any:
    try:
        import torch  # noqa: F401

        from . import onnx_export as export
    except ImportError as e:
        raise MissingDependencyError(
            f"exporting to ONNX needs torch, funasr and onnx ({e.name or e} is missing): "
            f"install the torch lock with `{TORCH_SETUP}`"
        ) from None
    return export


#: funasr's hub metadata beside model.pt: its `file_path_metas` name the files funasr loads.
TORCH_CONFIGURATION = "configuration.json"


def not_the_torch_configuration(sv: Path) -> str | None:
    """Why `sv/configuration.json` would break funasr's loader, or None. funasr reads the weights'
    file names from its `file_path_metas` and ignores config.yaml when the file lacks them; the
    `configuration.json` of `iic/SenseVoiceSmall-onnx` (which an earlier `pull` fetched) has none."""
    path = sv / TORCH_CONFIGURATION
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"{path} is not readable JSON ({one_line(e)})"
    if isinstance(conf, dict) and "file_path_metas" in conf:
        return None
    return (
        f"{path} is not the PyTorch model's (no file_path_metas; iic/SenseVoiceSmall-onnx ships such a "
        "one): `asr-server models pull` puts iic/SenseVoiceSmall's in its place (or copy that one here)"
    )


def export_sensevoice_files(sv: Path, quantize: bool) -> list[Path]:
    if why := not_the_torch_configuration(sv):
        raise ExportError(f"cannot export SenseVoice: {why}")
    export = _import_exporters()
    try:
        # A local folder: funasr reads configuration.json/config.yaml there and never calls a hub.
        model = export.load_funasr_sensevoice(sv, device="cpu")
        export.export_sensevoice(model, sv, quantize=quantize)
    except ModelsError:
        raise
    except Exception as e:
        raise ExportError(f"exporting SenseVoice from {sv} failed: {one_line(e)}") from e
    return [
        p
        for p in (sv / contracts.SENSEVOICE_FP32, sv / contracts.SENSEVOICE_INT8)
        if p.is_file() and (quantize or p.name == contracts.SENSEVOICE_FP32)
    ]


def _export_campplus(weights: Path, out: Path) -> list[Path]:
    export = _import_exporters()
    try:
        from ..engines.speaker.campplus import campplus_dims

        model = export.load_funasr_campplus(weights, device="cpu", **campplus_dims(weights.parent))
        export.export_campplus(model, out)
    except ModelsError:
        raise
    except Exception as e:
        raise ExportError(f"exporting CAM++ from {weights} failed: {one_line(e)}") from e
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
        raise ExportError(f"exporting ECAPA from {model_dir} failed: {one_line(e)}") from e
    return [out]
