"""`asr-server speakers enroll | list | remove`: the voiceprints the server identifies speakers against."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ..config import Config


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("speakers", help="manage enrolled voiceprints").add_subparsers(
        dest="speakers_command", required=True, metavar="ACTION"
    )
    p = sp.add_parser("enroll", help="enroll (or re-enroll) NAME from one or more recordings")
    p.add_argument("name")
    p.add_argument("wavs", nargs="+", metavar="WAV")
    p.set_defaults(func=enroll)
    p = sp.add_parser("list", help="list enrolled voiceprints")
    p.set_defaults(func=list_speakers)
    p = sp.add_parser("remove", help="delete a voiceprint")
    p.add_argument("name")
    p.set_defaults(func=remove)


def enroll(args: argparse.Namespace, cfg: Config) -> int:
    from ..audio.io import decode_audio
    from .transcribe import load_pipeline

    async def main() -> int:
        pipeline = load_pipeline(cfg)
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

    return asyncio.run(main())


def _store(cfg: Config):
    from ..core.pipeline import voiceprint_model_id
    from ..core.voiceprints import VoiceprintStore

    # Listing and removing need no model: open the file with whatever dimensions it holds.
    return VoiceprintStore(cfg.speaker.db, model=voiceprint_model_id(cfg), dim=0)


def list_speakers(args: argparse.Namespace, cfg: Config) -> int:
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


def remove(args: argparse.Namespace, cfg: Config) -> int:
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
