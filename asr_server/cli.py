"""`asr-server` command line: serve, transcribe files offline, manage voiceprints and models."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from asr_server.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("config.yaml")

log = logging.getLogger("asr_server")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    cfg = load_config(path)
    if args.log_level:
        cfg.log_level = args.log_level
    return cfg


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    from asr_server.server import StartupError, serve_forever

    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    try:
        asyncio.run(serve_forever(cfg))
    except StartupError as e:
        print(f"asr-server: {e}", file=sys.stderr)
        return 2
    return 0


def _load_pipeline(cfg: Config, speaker: bool = True):
    from asr_server.pipeline import Pipeline
    from asr_server.server import check_model_files

    check_model_files(cfg)
    return Pipeline.load(cfg)


def cmd_transcribe(args: argparse.Namespace, cfg: Config) -> int:
    from asr_server.audio.io import AudioDecodeError, decode_audio
    from asr_server.recording import recognize_recording

    async def run() -> int:
        pipeline = _load_pipeline(cfg)
        status = 0
        try:
            for name in args.files:
                try:
                    audio = decode_audio(Path(name).read_bytes()).samples
                except (OSError, AudioDecodeError) as e:
                    print(f"{name}: {e}", file=sys.stderr)
                    status = 1
                    continue
                if args.no_vad:
                    recs = [await pipeline.recognize(audio, language=args.language)]
                    recs = [r for r in recs if not r.is_empty]
                else:
                    recs = [seg.recognition for seg in await recognize_recording(pipeline, audio, args.language)]
                if args.json:
                    print(json.dumps({"file": name, "utterances": [{
                        "text": r.transcript.text, "language": r.transcript.language,
                        "emotion": r.transcript.emotion, "event": r.transcript.event,
                        "speaker": r.speaker.as_dict() if r.speaker else None, "audio_ms": r.audio_ms,
                    } for r in recs]}, ensure_ascii=False))
                    continue
                if not recs:
                    print(f"{name}: (no speech)")
                for r in recs:
                    t = r.transcript
                    who = f"{r.speaker.name} ({r.speaker.score:.2f})" if r.speaker else "unknown"
                    print(f"{name}: {t.text}\t[language={t.language} emotion={t.emotion} event={t.event} speaker={who}]")
        finally:
            await pipeline.close()
        return status

    return asyncio.run(run())


def cmd_speakers_enroll(args: argparse.Namespace, cfg: Config) -> int:
    from asr_server.audio.io import decode_audio

    async def run() -> int:
        pipeline = _load_pipeline(cfg)
        try:
            if pipeline.voiceprints is None:
                print("speaker.enabled is false: nothing to enroll with", file=sys.stderr)
                return 2
            audios = [decode_audio(Path(w).read_bytes()).samples for w in args.wavs]
            embeddings = await asyncio.gather(*(pipeline.embed(a) for a in audios))
            vp = pipeline.voiceprints.enroll(args.name, embeddings)
            print(f"enrolled {vp.name} from {vp.samples} recording(s) ({vp.model}, {vp.dim} dims)")
        finally:
            await pipeline.close()
        return 0

    return asyncio.run(run())


def _store(cfg: Config):
    from asr_server.voiceprints import VoiceprintStore

    # Listing and removing need no model: open the file with whatever dimensions it holds.
    return VoiceprintStore(cfg.speaker.db, model=cfg.speaker.model.name, dim=0)


def cmd_speakers_list(args: argparse.Namespace, cfg: Config) -> int:
    store = _store(cfg)
    try:
        prints = store.list()
    finally:
        store.close()
    if not prints:
        print(f"no voiceprints in {cfg.speaker.db}")
    for vp in prints:
        print(f"{vp.name}\t{vp.samples} recording(s)\t{vp.model}\t{vp.dim} dims")
    return 0


def cmd_speakers_remove(args: argparse.Namespace, cfg: Config) -> int:
    store = _store(cfg)
    try:
        removed = store.remove(args.name)
    finally:
        store.close()
    if not removed:
        print(f"no voiceprint named {args.name!r}", file=sys.stderr)
        return 1
    print(f"removed {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr-server", description=__doc__)
    parser.add_argument("--config", "-c", type=Path, default=None,
                        help="config file (default: ./config.yaml when present; env ASR_SERVER__* overrides)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server (device WebSocket, HTTP API, FunASR-compatible socket)")
    p.add_argument("--host", default=None, help="override server.host")
    p.add_argument("--port", type=int, default=None, help="override server.port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("transcribe", help="recognise audio files offline: text, language, emotion, speaker")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--language", default=None, help="auto, zh, en, yue, ja, ko (default: asr.language)")
    p.add_argument("--no-vad", action="store_true",
                   help="recognise each file as one utterance (files over vad.max_utterance_s are otherwise cut by VAD)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.set_defaults(func=cmd_transcribe)

    sp = sub.add_parser("speakers", help="manage enrolled voiceprints").add_subparsers(
        dest="speakers_command", required=True, metavar="ACTION")
    p = sp.add_parser("enroll", help="enroll (or re-enroll) NAME from one or more recordings")
    p.add_argument("name")
    p.add_argument("wavs", nargs="+", metavar="WAV")
    p.set_defaults(func=cmd_speakers_enroll)
    p = sp.add_parser("list", help="list enrolled voiceprints")
    p.set_defaults(func=cmd_speakers_list)
    p = sp.add_parser("remove", help="delete a voiceprint")
    p.add_argument("name")
    p.set_defaults(func=cmd_speakers_remove)

    from asr_server.models import add_models_parser

    add_models_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"asr-server: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    try:
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a named, one-line error for the operator; the traceback at DEBUG
        from asr_server.engines.runtime import ModelFileError
        from asr_server.engines.torch_backend import BackendUnavailableError
        from asr_server.server import StartupError
        from asr_server.voiceprints import VoiceprintError

        if isinstance(e, (StartupError, ModelFileError, VoiceprintError, BackendUnavailableError)):
            print(f"asr-server: {e}", file=sys.stderr)
            return 2
        raise
