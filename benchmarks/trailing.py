"""How much trailing context the recogniser needs after a VAD-cut utterance, measured per clip.

    python -m benchmarks.trailing --models build/test-models/<hash> --pads 0,100,200,300,400

An utterance the segmenter cuts ends `vad.tail_ms` (96 ms) after its last voiced window. For each
shared clip this runs the device path's segmentation (Silero VAD and the segmenter, as a stream
would) and recognises each utterance with `pad` ms of silence added, against the offline path (the
whole clip at once), and prints the character error rate of each against the clip's transcript,
the clips whose streaming text lost characters the offline text has, and the audio the pad adds.
Use the tiny stand-in models (trained on these clips, so their text is right) or real weights.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
from pathlib import Path

import numpy as np

from asr_server.audio.io import decode_audio
from asr_server.audio.segmenter import Utterance
from asr_server.config import load_config
from asr_server.core.pipeline import Pipeline
from asr_server.core.recording import join_texts

from .stages import machine
from .standins import char_error_rate

ROOT = Path(__file__).resolve().parent.parent


async def run(args: argparse.Namespace) -> int:
    pads = [float(p) for p in args.pads.split(",")]
    rows = list(csv.DictReader(open(args.audio / "MANIFEST.tsv", encoding="utf-8"), delimiter="\t"))
    base = load_config(
        None,
        env={},
        overrides={
            "asr": {"model_dir": str(args.models / "SenseVoiceSmall")},
            "speaker": {"enabled": False},
            "vad": {"trailing_pad_ms": 0},
        },
    )
    pipeline = await asyncio.to_thread(Pipeline.load, base)
    try:
        results: dict[float, list[float]] = {p: [] for p in pads}
        offline_cer: list[float] = []
        lost: dict[float, list[str]] = {p: [] for p in pads}
        speech_s, n_pieces = 0.0, 0
        for row in rows:
            audio = decode_audio((args.audio / row["file"]).read_bytes()).samples
            ref = row["transcript"]
            whole = await pipeline.recognize(audio, identify=False)
            offline = char_error_rate(whole.transcript.text, ref, normalize=True)
            offline_cer.append(offline)
            pieces = [
                e.audio for e in await asyncio.to_thread(pipeline.segment_recording, audio) if isinstance(e, Utterance)
            ]
            speech_s += sum(len(p) for p in pieces) / 16000
            n_pieces += len(pieces)
            for pad in pads:
                pipeline.config.vad.trailing_pad_ms = pad
                recs = [await pipeline.recognize(p, identify=False, endpointed=True) for p in pieces]
                text = join_texts([r.transcript.text for r in recs if not r.is_empty])
                c = char_error_rate(text, ref, normalize=True)
                results[pad].append(c)
                if c > offline + 1e-9:
                    lost[pad].append(row["file"].split("_")[0] + ":" + row["file"].split("_")[1])
        load = os.getloadavg()
        print(f"machine: {machine()}; load average before: {load[0]:.2f}; models: {args.models}")
        print(f"{len(rows)} clips; offline (whole clip) mean CER {np.mean(offline_cer):.3f}\n")
        print("| trailing pad ms | mean CER (streaming) | clips worse than offline | audio added |")
        print("| ---: | ---: | --- | ---: |")
        for pad in pads:
            added = pad / 1000 * n_pieces / max(speech_s, 1e-9)
            worse = ", ".join(lost[pad]) or "none"
            print(f"| {pad:.0f} | {np.mean(results[pad]):.3f} | {len(lost[pad])}: {worse} | {added:.1%} |")
    finally:
        await pipeline.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument(
        "--audio", type=Path, default=Path(os.environ.get("ASR_AUDIO_DIR", ROOT.parent / "shared" / "audio"))
    )
    ap.add_argument("--pads", default="0,100,200,300,400")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
