"""`asr-server transcribe FILE...`: recognise audio files offline, with the same engines as the server."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import AudioDecodeError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("transcribe", help="recognise audio files offline: text, language, emotion, speaker")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--language", default=None, help="auto, zh, en, yue, ja, ko (default: asr.language)")
    p.add_argument(
        "--no-vad",
        action="store_true",
        help="recognise each file as one utterance (files over vad.max_utterance_s are otherwise cut by VAD)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.set_defaults(func=run)


def load_pipeline(cfg: Config):
    """The pipeline of `serve`, after the same check of the model files."""
    from ..app import check_model_files
    from ..core.pipeline import Pipeline

    check_model_files(cfg)
    return Pipeline.load(cfg)


def run(args: argparse.Namespace, cfg: Config) -> int:
    # In this process, not the server's decoder processes: the operator's own files, one command;
    # a decoder's crash ends this command and no one else's session.
    from ..audio.io import decode_audio
    from ..core.recording import recognize_recording

    async def main() -> int:
        pipeline = load_pipeline(cfg)
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
                    print(
                        json.dumps(
                            {
                                "file": name,
                                "utterances": [
                                    {
                                        "text": r.transcript.text,
                                        "language": r.transcript.language,
                                        "emotion": r.transcript.emotion,
                                        "event": r.transcript.event,
                                        "speaker": r.speaker.as_dict() if r.speaker else None,
                                        "audio_ms": r.audio_ms,
                                    }
                                    for r in recs
                                ],
                            },
                            ensure_ascii=False,
                        )
                    )
                    continue
                if not recs:
                    print(f"{name}: (no speech)")
                for r in recs:
                    t = r.transcript
                    who = f"{r.speaker.name} ({r.speaker.score:.2f})" if r.speaker else "unknown"
                    print(
                        f"{name}: {t.text}\t[language={t.language} emotion={t.emotion} event={t.event} speaker={who}]"
                    )
        finally:
            await pipeline.close()
        return status

    return asyncio.run(main())
