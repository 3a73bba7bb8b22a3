"""`asr-server models pull | export | list | verify`."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import Config
from ..errors import ModelFileError, ModelsError
from ..modelfiles.export import export_models
from ..modelfiles.export import stderr as _stderr
from ..modelfiles.hub import DEFAULT_PROBE_TIMEOUT_S, pull_models
from ..modelfiles.inspect import format_report, inspect_models, remedy
from ..modelfiles.layout import missing_model_files, models_root
from ..modelfiles.manifest import manifest_path


def add_parser(subparsers: Any) -> None:
    """Add `models {pull,export,list,verify}`; each handler is `func(args, config) -> exit status`."""
    p = subparsers.add_parser(
        "models",
        help="fetch, export and check the model files",
        description="Fetch, export and check the model files (see models/README.md).",
    )
    sub = p.add_subparsers(dest="models_command", metavar="{pull,export,list,verify}")
    sub.required = True

    pull = sub.add_parser("pull", help="download what is missing, export it to ONNX, record it in the manifest")
    pull.add_argument(
        "--source",
        default="modelscope",
        choices=["modelscope", "ms", "huggingface", "hf"],
        help="hub to fetch from (default: modelscope)",
    )
    pull.add_argument(
        "--endpoint",
        metavar="URL",
        help="hub URL, e.g. a mirror (default: $MODELSCOPE_ENDPOINT / $HF_ENDPOINT or the public hub)",
    )
    pull.add_argument(
        "--ecapa",
        action="store_true",
        help="also fetch ECAPA-TDNN (speechbrain/spkrec-ecapa-voxceleb, through speechbrain, "
        "from Hugging Face at $HF_ENDPOINT or huggingface.co)",
    )
    pull.add_argument("--no-export", dest="export", action="store_false", help="download only, export later")
    pull.add_argument("--no-quantize", dest="quantize", action="store_false", help="skip the int8 SenseVoice")
    pull.add_argument("--force", action="store_true", help="fetch again even when the files are present")
    pull.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_PROBE_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the hub to answer before giving up (default {DEFAULT_PROBE_TIMEOUT_S:g})",
    )
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
        result = pull_models(
            config,
            args.source,
            endpoint=args.endpoint,
            ecapa=args.ecapa,
            export=args.export,
            quantize=args.quantize,
            force=args.force,
            probe_timeout=args.timeout,
        )
    except (ModelsError, ModelFileError) as e:
        _stderr(f"error: {e}")
        return 1
    missing = missing_model_files(config)
    if missing and not args.export:
        _stderr(
            "downloaded without exporting; run `asr-server models export` next. Still missing:\n  "
            + "\n  ".join(str(p) for p in missing)
        )
        return 0
    if missing:
        _stderr("still missing after pull:\n  " + "\n  ".join(str(p) for p in missing))
        return 1
    _stderr(
        f"models ready in {models_root(config)}/ ({len(result.recorded)} files recorded in {manifest_path(config)})"
    )
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
    print(format_report(inspect_models(config, hashes=False, signatures=True), remedy(config)))
    return 0


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    report = inspect_models(config, hashes=True, signatures=True, load=True)
    if not args.quiet:
        print(format_report(report, remedy(config)))
    elif report.problems:
        print("\n".join(report.problems))
    return 0 if report.ok else 1
