"""The values that cross layers: engines produce them, the core passes them on, adapters serialise them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def unspaced(ch: str) -> bool:
    """Whether the character `ch` belongs to a script written without spaces between words: Chinese
    and Japanese (Han, kana, their punctuation and full-width forms). Korean and alphabetic scripts
    put spaces between words, so their words are units and joined texts need a space between them."""
    if not ch:
        return False
    o = ord(ch[0])
    if 0x3130 <= o <= 0x318F:  # Hangul compatibility jamo sit inside the CJK block range
        return False
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF or 0x20000 <= o <= 0x3FFFF


@dataclass(frozen=True, slots=True)
class Word:
    """One word (a word of a spaced script such as English or Korean, one Chinese or Japanese
    character) and when it was said, in seconds from the start of the audio recognised: from the
    CTC frames where its tokens peak."""

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class Hotword:
    """A word or phrase recognition should favour (a name, a room, a product) and how strongly: the
    bonus per sentencepiece piece of it, in log-probability units; None: `asr.hotword_weight`."""

    text: str
    weight: float | None = None


@dataclass(frozen=True, slots=True)
class Transcript:
    """One decoded SenseVoice utterance: clean text plus the rich tags as fields."""

    text: str
    """Clean text, tags removed, whitespace collapsed."""
    language: str | None = None
    """The language tag without brackets (zh, en, yue, ja, ko, nospeech), None when the model emitted none."""
    emotion: str | None = None
    """NEUTRAL, HAPPY, SAD, ANGRY, ... or None."""
    event: str | None = None
    """Speech, BGM, Laughter, Applause, ... or None."""
    raw: str = ""
    """The whole decoded string with its tags, for debugging."""
    words: tuple[Word, ...] = ()
    """The words of `text` with their times (empty when the decoder gave none)."""
    hotwords: tuple[str, ...] = ()
    """The hotwords the biased decoding put in the text (empty where it decoded greedily: none were set)."""
    uncorrected_text: str | None = None
    """`text` before `asr.corrections` rewrote it; None where no rule applied."""


@dataclass(frozen=True, slots=True)
class SpeakerMatch:
    """The enrolled voiceprint closest to an utterance, when its cosine reaches the threshold."""

    name: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": round(self.score, 4)}


@dataclass(frozen=True, slots=True)
class Recognition:
    """Everything the server knows about one utterance, as handed to every adapter."""

    transcript: Transcript
    speaker: SpeakerMatch | None
    audio_ms: int
    """Length of the utterance's audio."""
    asr_ms: float
    """Time the recognition took, queue wait included."""
    embed_ms: float | None = None
    """Time the speaker embedding took, queue wait included; None when none was computed."""
    asr_queue_ms: float | None = None
    """Of `asr_ms`, the wait for the recogniser (the rest is the compute of its batch)."""
    asr_compute_ms: float | None = None
    embed_queue_ms: float | None = None
    embed_compute_ms: float | None = None

    @property
    def is_empty(self) -> bool:
        return not self.transcript.text.strip() or self.transcript.language == "nospeech"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who is on the other end, from the upgrade headers (or the same names as query parameters)."""

    device_id: str | None
    client_id: str | None
    protocol_version: int
    remote: str = ""
    scope: str | None = None  # fingerprint of the device token it authenticated with (events it may read)


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptEvent:
    """One final transcript and where it came from: what the webhook and `/v1/events` receive.

    Times are milliseconds: `audio_ms` the utterance, `latency_ms` end of speech to reply,
    `asr_ms`/`embed_ms` the engine calls. `timestamp` is Unix seconds at the reply. `id` is
    unique per event, so a receiver can drop the duplicate a retried delivery may cause.
    """

    text: str
    language: str | None
    emotion: str | None
    event: str | None
    speaker: SpeakerMatch | None
    device_id: str | None
    client_id: str | None
    session_id: str
    protocol: str
    audio_ms: int
    latency_ms: float | None
    asr_ms: float | None
    embed_ms: float | None
    timestamp: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    scope: str | None = None  # the device token's fingerprint: subscribers with that token see it; not sent

    @classmethod
    def of(
        cls,
        rec: Recognition,
        *,
        protocol: str,
        session_id: str,
        device_id: str | None = None,
        client_id: str | None = None,
        latency_ms: float | None = None,
        timestamp: float | None = None,
        scope: str | None = None,
    ) -> TranscriptEvent:
        """The event of one recognised utterance (`core.finals` builds it for every adapter)."""
        t = rec.transcript
        return cls(
            text=t.text.strip(),
            language=t.language,
            emotion=t.emotion,
            event=t.event,
            speaker=rec.speaker,
            device_id=device_id,
            client_id=client_id,
            session_id=session_id,
            protocol=protocol,
            audio_ms=rec.audio_ms,
            latency_ms=round(latency_ms, 1) if latency_ms is not None else None,
            asr_ms=round(rec.asr_ms, 1),
            embed_ms=round(rec.embed_ms, 1) if rec.embed_ms is not None else None,
            timestamp=time.time() if timestamp is None else timestamp,
            scope=scope,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "transcript",
            "id": self.id,
            "text": self.text,
            "language": self.language,
            "emotion": self.emotion,
            "event": self.event,
            "speaker": self.speaker.as_dict() if self.speaker is not None else None,
            "device_id": self.device_id,
            "client_id": self.client_id,
            "session_id": self.session_id,
            "protocol": self.protocol,
            "audio_ms": self.audio_ms,
            "latency_ms": self.latency_ms,
            "asr_ms": self.asr_ms,
            "embed_ms": self.embed_ms,
            "timestamp": self.timestamp,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def to_peer_bytes(self) -> bytes:
        """The event whole (its `scope` too), for another worker of this server."""
        return json.dumps({**self.to_dict(), "scope": self.scope}).encode()

    @classmethod
    def from_peer_bytes(cls, data: bytes) -> TranscriptEvent:
        d = json.loads(data)
        d.pop("type", None)
        speaker = d.pop("speaker")
        return cls(speaker=SpeakerMatch(**speaker) if speaker is not None else None, **d)
