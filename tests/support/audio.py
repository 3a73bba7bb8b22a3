"""The shared speech clips (`../shared/audio`), read where they lie, and audio helpers for tests.

Tests that need the clips use `needs_audio` and skip, with that reason, where the folder is absent.
`ASR_SERVER_TEST_AUDIO` names the folder for a checkout that is not beside it (a worktree elsewhere).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

REPO = Path(__file__).resolve().parents[2]
AUDIO = Path(os.environ.get("ASR_SERVER_TEST_AUDIO") or REPO.parent / "shared" / "audio")
HAVE_AUDIO = (AUDIO / "MANIFEST.tsv").is_file()
needs_audio = pytest.mark.skipif(not HAVE_AUDIO, reason="../shared/audio absent")


@dataclass(frozen=True)
class ManifestClip:
    file: str
    language: str
    transcript: str
    duration_s: float

    @property
    def path(self) -> Path:
        return AUDIO / self.file


def manifest() -> list[ManifestClip]:
    if not HAVE_AUDIO:
        return []
    with open(AUDIO / "MANIFEST.tsv", encoding="utf-8") as f:
        return [
            ManifestClip(r["file"], r["language"].split()[0], r["transcript"], float(r["duration_s"]))
            for r in csv.DictReader(f, delimiter="\t")
        ]


def clip(name_prefix: str) -> ManifestClip:
    for c in manifest():
        if c.file.startswith(name_prefix):
            return c
    pytest.skip(f"no clip {name_prefix}* in ../shared/audio")


def cer(ref: str, hyp: str) -> float:
    """Character error rate, ignoring case, spaces and punctuation (the stand-in builder's own rule)."""
    from benchmarks.standins import char_error_rate

    return char_error_rate(hyp, ref, normalize=True)


def encode(samples: np.ndarray, rate: int, container: str, codec: str, channels: int = 1) -> bytes:
    """Encode 16 kHz float audio to a container in memory with FFmpeg (what a client would upload)."""
    if rate != 16000:
        samples = soxr.resample(samples, 16000, rate)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.tile(pcm, (channels, 1)), format="s16p", layout=stream.layout.name)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def voice(seconds: float, f0: float, seed: int) -> np.ndarray:
    """A synthetic voiced sound (harmonics of a wobbling f0, light noise): speakers differ by f0."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / 16000
    x = sum(np.sin(k * phase) / k**1.5 for k in range(1, 25))
    return (0.2 * x / np.abs(x).max() + 0.005 * rng.standard_normal(t.size)).astype(np.float32)
