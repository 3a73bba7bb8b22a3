"""Result types that cross module boundaries: engines produce them, adapters serialise them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Transcript:
    """One decoded SenseVoice utterance: clean text plus the rich tags as fields.

    `language` is the tag without brackets (zh, en, yue, ja, ko, nospeech) or None when the
    model emitted none; `emotion` (NEUTRAL, HAPPY, ...) and `event` (Speech, BGM, ...) likewise.
    `raw` is the full decoded string with tags, for debugging.
    """

    text: str
    language: str | None = None
    emotion: str | None = None
    event: str | None = None
    raw: str = ""


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
    asr_ms: float
    embed_ms: float | None = None

    @property
    def is_empty(self) -> bool:
        return not self.transcript.text.strip() or self.transcript.language == "nospeech"
