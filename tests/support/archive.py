"""Archive records and audio checks the archive tests share."""

from __future__ import annotations

import io
import time

import av
import numpy as np

from asr_server.constants import SAMPLE_RATE
from asr_server.core.archive import UtteranceRecord
from asr_server.types import Recognition, SpeakerMatch, Transcript
from tests.support.audio import voice

PRE_SKIP = 312  # libopus's lookahead at 48 kHz, in the Ogg Opus header


def decoded_samples(data: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)), stream.sample_rate


def rec(text: str, speaker: str | None = None, audio_ms: int = 1000, hotwords: tuple[str, ...] = ()) -> Recognition:
    t = Transcript(text, "en", "NEUTRAL", "Speech", f"<|en|><|NEUTRAL|><|Speech|>{text}", hotwords=hotwords)
    return Recognition(t, SpeakerMatch(speaker, 0.8) if speaker else None, audio_ms, 12.0)


def record(text: str, device: str | None = "dev-1", speaker: str | None = None, when: float | None = None, n=8000):
    pcm = (voice(n / SAMPLE_RATE, 140.0, 1) * 0.3).astype(np.float32)
    return UtteranceRecord(
        protocol="openai",
        session_id="s1",
        device_id=device,
        recognition=rec(text, speaker, n * 1000 // SAMPLE_RATE),
        latency_ms=123.4,
        pcm=pcm,
        time=time.time() if when is None else when,
    )


def device_record(text: str, device: str, speaker: str, seconds: float) -> UtteranceRecord:
    """A device's utterance as its session hands it over: the Opus packets of `seconds` of voice."""
    from asr_server.audio.ogg_opus import PacketLog
    from loadtest.clips import encode_pcm

    log = PacketLog(seconds + 1)
    for packet in encode_pcm(0.3 * voice(seconds, 150.0, 3)):
        log.add(packet, 960)
    return UtteranceRecord(
        protocol="xiaozhi",
        session_id="s-dev",
        device_id=device,
        recognition=rec(text, speaker, int(seconds * 1000)),
        latency_ms=300.0,
        opus=log.between(0, log.samples),
    )
