"""Speech clips for the load test, encoded to Opus once before the run.

The generator replays the same packets for every client, so encoding costs nothing during the
run. Each clip also records where its speech ends (an energy estimate), because end-of-speech
latency is measured from the send time of the last frame that still contains speech, not from
the end of the file, whose trailing room noise the server's VAD counts as silence.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import opuslib
import soundfile
import soxr

SAMPLE_RATE = 16000
FRAME_MS_CHOICES = (10, 20, 40, 60)
AUDIO_SUFFIXES = (".wav", ".flac")
#: The workplace's shared speech clips beside the checkout; `ASR_AUDIO_DIR` points elsewhere.
DEFAULT_AUDIO_DIR = Path(os.environ.get("ASR_AUDIO_DIR") or Path(__file__).resolve().parents[2] / "shared" / "audio")

_WINDOW_MS = 10
_FLOOR_DBFS = -60.0  # below this a window is silence whatever the clip's level
_BELOW_PEAK_DB = 35.0  # a window this far under the loudest one is not speech
_ABOVE_NOISE_DB = 12.0  # speech stands this far above the clip's noise floor (10th percentile)
_MIN_RUN = 3  # windows in a row: a click is not speech


class ClipError(ValueError):
    """An audio file or folder that cannot become load-test clips."""


@dataclass(frozen=True, slots=True)
class Clip:
    """One utterance, ready to send: Opus packets of `frame_ms` each, 16 kHz mono."""

    name: str
    packets: tuple[bytes, ...]
    frame_ms: int
    speech_end_ms: float  # where the last speech sample lies, from the clip start

    @property
    def duration_ms(self) -> float:
        return len(self.packets) * self.frame_ms

    @property
    def last_speech_frame(self) -> int:
        """Index of the packet holding the last speech sample."""
        idx = math.ceil(self.speech_end_ms / self.frame_ms) - 1
        return min(max(idx, 0), len(self.packets) - 1)


def _check_frame_ms(frame_ms: int) -> None:
    if frame_ms not in FRAME_MS_CHOICES:
        raise ClipError(f"frame duration {frame_ms} ms is not an Opus frame size {FRAME_MS_CHOICES}")


def read_audio(path: str | Path) -> np.ndarray:
    """Read a wav/flac file as 16 kHz mono float32 in [-1, 1]."""
    p = Path(path)
    try:
        data, rate = soundfile.read(str(p), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as e:  # type: ignore[attr-defined]
        raise ClipError(f"cannot read audio file {p}: {e}") from None
    if data.shape[0] == 0:
        raise ClipError(f"audio file {p} holds no samples")
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def speech_end_sample(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> int:
    """Estimate the sample after the last speech: the end of the last run of three 10 ms windows
    whose energy is above -60 dBFS, within 35 dB of the loudest window and 12 dB over the noise
    floor. On the shared clips this lands 0-200 ms before Silero's end of speech, except where
    a clip ends in loud noise (applause), where it gives the clip end. Silent audio gives 0."""
    win = max(1, sample_rate * _WINDOW_MS // 1000)
    n = len(pcm) // win
    if n == 0:
        return 0
    frames = pcm[: n * win].astype(np.float64).reshape(n, win)
    db = 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-12)
    threshold = max(_FLOOR_DBFS, float(db.max()) - _BELOW_PEAK_DB, float(np.percentile(db, 10)) + _ABOVE_NOISE_DB)
    loud = (db > threshold).astype(np.int32)
    run = min(_MIN_RUN, n)
    starts = np.flatnonzero(np.convolve(loud, np.ones(run, dtype=np.int32), "valid") >= run)
    if starts.size == 0:
        return 0
    return min(len(pcm), int(starts[-1] + run) * win)


def _encoder(application: Literal["voip", "audio"]) -> opuslib.Encoder:
    app = opuslib.APPLICATION_VOIP if application == "voip" else opuslib.APPLICATION_AUDIO
    return opuslib.Encoder(SAMPLE_RATE, 1, app)


def encode_pcm(pcm: np.ndarray, frame_ms: int = 60, application: Literal["voip", "audio"] = "voip") -> list[bytes]:
    """Encode float PCM (16 kHz mono) to Opus packets; the last frame is padded with zeros."""
    _check_frame_ms(frame_ms)
    size = SAMPLE_RATE * frame_ms // 1000
    pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2")
    pad = (-len(pcm16)) % size
    if pad:
        pcm16 = np.concatenate([pcm16, np.zeros(pad, dtype="<i2")])
    enc = _encoder(application)
    return [enc.encode(pcm16[i : i + size].tobytes(), size) for i in range(0, len(pcm16), size)]


@functools.lru_cache(maxsize=16)
def silence_packet(frame_ms: int = 60, application: Literal["voip", "audio"] = "voip") -> bytes:
    """One Opus packet of digital silence; the encoder settles after a few frames, so take a
    later one (what a device sends while the room is quiet)."""
    zeros = np.zeros(SAMPLE_RATE * frame_ms // 1000 * 8, dtype=np.float32)
    return encode_pcm(zeros, frame_ms, application)[-1]


def make_clip(name: str, pcm: np.ndarray, frame_ms: int = 60, application: Literal["voip", "audio"] = "voip") -> Clip:
    """Encode 16 kHz mono float PCM into a `Clip`."""
    if len(pcm) == 0:
        raise ClipError(f"clip {name!r} holds no samples")
    end = speech_end_sample(pcm)
    if end == 0:
        raise ClipError(f"clip {name!r} holds no speech (all of it is below {_FLOOR_DBFS} dBFS)")
    packets = encode_pcm(pcm, frame_ms, application)
    return Clip(name, tuple(packets), frame_ms, end * 1000.0 / SAMPLE_RATE)


def load_clip(path: str | Path, frame_ms: int = 60, application: Literal["voip", "audio"] = "voip") -> Clip:
    p = Path(path)
    return make_clip(p.name, read_audio(p), frame_ms, application)


def load_clips(
    directory: str | Path, frame_ms: int = 60, application: Literal["voip", "audio"] = "voip"
) -> tuple[Clip, ...]:
    """Every wav/flac file of `directory` (sorted by name, so a seed picks the same clips)."""
    _check_frame_ms(frame_ms)
    d = Path(directory)
    if not d.is_dir():
        raise ClipError(f"audio folder not found: {d}")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ClipError(f"no .wav or .flac files in {d}")
    return tuple(load_clip(f, frame_ms, application) for f in files)
