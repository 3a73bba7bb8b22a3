"""What becomes of a final utterance, whichever front end heard it: counted (`asr_utterances`, and
the session's own tally the console shows), published to the event bus as a `TranscriptEvent`,
and kept in the archive with its audio (a device's Opus packets, or 16 kHz samples).

Each session (an HTTP request is one) holds one `Finals` that says who heard the utterances; the
adapter hands it each final it replied with, and nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..audio.ogg_opus import OpusPacket
from ..types import Recognition, TranscriptEvent
from .archive import Archive, UtteranceRecord, segment_audio
from .metrics import Metrics
from .recording import Segment

Publish = Callable[[TranscriptEvent], None]
"""Where transcript events go (`EventBus.publish`)."""


class Finals:
    """One session's final utterances: who heard them, where they go, and how many there were."""

    def __init__(
        self,
        protocol: str,
        session_id: str,
        metrics: Metrics,
        publish: Publish | None,
        archive: Archive | None,
        *,
        device_id: str | None = None,
        client_id: str | None = None,
        scope: str | None = None,
    ) -> None:
        self.protocol = protocol
        self.session_id = session_id
        self.device_id = device_id
        self.client_id = client_id  # FunASR: the request's `wav_name`, set per request
        self.scope = scope  # the device token's fingerprint (`TranscriptEvent.scope`)
        self._utterances = metrics.utterances.labels(protocol)
        self._publish = publish
        self._archive = archive  # None where this protocol's utterances are not kept (`archive.*`)
        # What the console's live view shows.
        self.count = 0
        self.last_text: str | None = None
        self.last_speaker: str | None = None

    def add(
        self,
        rec: Recognition,
        *,
        latency_ms: float | None = None,
        pcm: np.ndarray | None = None,
        opus: list[OpusPacket] | None = None,
        at: float | None = None,
    ) -> None:
        """One final utterance the client was sent; one without text or audio is not kept."""
        if rec.is_empty:
            return
        now = time.time() if at is None else at
        self.count += 1
        self.last_text = rec.transcript.text
        self.last_speaker = rec.speaker.name if rec.speaker is not None else None
        self._utterances.inc()
        if self._publish is not None:
            event = TranscriptEvent.of(
                rec,
                protocol=self.protocol,
                session_id=self.session_id,
                device_id=self.device_id,
                client_id=self.client_id,
                latency_ms=latency_ms,
                timestamp=now,
                scope=self.scope,
            )
            self._publish(event)
        if self._archive is not None and (opus or pcm is not None):
            record = UtteranceRecord(
                protocol=self.protocol,
                session_id=self.session_id,
                device_id=self.device_id,
                recognition=rec,
                latency_ms=latency_ms,
                opus=opus,
                pcm=pcm,
                time=now,
            )
            self._archive.keep(record)

    def add_recording(self, segments: list[Segment], audio: np.ndarray, latency_ms: float | None = None) -> None:
        """A whole recording's segments (an upload, an offline request), each with its audio."""
        now = time.time()
        for s in segments:
            self.add(s.recognition, latency_ms=latency_ms, pcm=segment_audio(audio, s), at=now)
