"""Utterance segmentation from VAD probabilities: onset, pre-roll, endpoint, maximum length.

xiaozhi-style: a dual threshold (enter speech at `threshold`, leave at `threshold_low`, keep the
last decision in between), speech present when 3 of the last 5 windows are voiced, the utterance
ends after `min_silence_ms` without voice, and utterances with less than `min_speech_ms` of voice
are dropped. The segmenter also announces a *speculative* end as soon as `tail_ms` of silence
follows the speech: the recogniser can start then, and its result is final if the endpoint comes
before speech resumes (the audio is the same either way).

With phrases on (`phrase_pause_ms` > 0), a long utterance is recognised in pieces as it is
spoken: when speech resumes after a pause of at least `phrase_pause_ms` and the piece the last
speculation covered is at least `phrase_min_s` long, that speculation is kept as a finished
phrase instead of being thrown away, and the next speculation covers only the audio after it.
At the endpoint only the last piece is left to recognise, so the wait after a 9 s utterance is
that of its last phrase, and a speculation interrupted at a phrase boundary is not wasted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..constants import VAD_WINDOW as WINDOW
from ..constants import VAD_WINDOW_MS as _WINDOW_MS

_ONSET_OF = 5
_ONSET_NEED = 3


@dataclass(frozen=True, slots=True)
class SegmenterOptions:
    """How speech is turned into utterances (the `vad` section of the configuration gives them)."""

    threshold: float = 0.5
    """Probability at or above which a window enters speech."""
    threshold_low: float = 0.3
    """Probability at or below which a window leaves speech; in between the last decision holds."""
    min_silence_ms: float = 400
    """Silence that ends an utterance."""
    min_speech_ms: float = 250
    """Utterances with less voiced audio are dropped."""
    pre_roll_ms: float = 300
    """Audio kept from before the speech onset."""
    max_utterance_s: float = 30.0
    """An utterance is cut here even if speech goes on."""
    tail_ms: float = 96.0
    """Silence after the last voiced window that ends the utterance's audio and starts a speculation."""
    phrase_pause_ms: float = 0.0
    """A pause inside an utterance at least this long ends a phrase (0: no phrases, one piece)."""
    phrase_min_s: float = 2.0
    """A phrase is at least this long: shorter pieces stay with the speech that follows."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Speech onset; the utterance (pre-roll included) begins at `start_sample` of the stream."""

    utterance_id: int
    start_sample: int = 0


@dataclass(frozen=True, slots=True)
class Speculate:
    """Silence began after speech: `audio` is what the utterance's current piece will be if no
    speech resumes (the whole utterance without phrases; the audio since the last phrase with them)."""

    utterance_id: int
    audio: np.ndarray
    piece: int = 0


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """Speech came back before the endpoint. Without `phrase`, the speculation for `utterance_id`
    is void; with it, the speculated piece is a finished phrase and the utterance goes on after it."""

    utterance_id: int
    phrase: bool = False


@dataclass(frozen=True, slots=True)
class Utterance:
    """A finished utterance. `reason` is silence, max_length or flush; `speculated` when its last
    piece equals the last Speculate; `start_sample` is where `audio` begins in the stream fed to
    the segmenter. With phrases, `phrases` pieces were finished before it and the last piece is
    `audio[last_piece_from:]`."""

    utterance_id: int
    audio: np.ndarray
    reason: str
    speculated: bool
    start_sample: int = 0
    phrases: int = 0
    last_piece_from: int = 0

    @property
    def last_piece(self) -> np.ndarray:
        return self.audio[self.last_piece_from :]


@dataclass(frozen=True, slots=True)
class Dropped:
    """An utterance too short to recognise."""

    utterance_id: int
    speech_ms: float


Event = SpeechStarted | Speculate | SpeechResumed | Utterance | Dropped


class Segmenter:
    """Feeds on (chunk, probability) pairs of 512 samples, in order; emits events."""

    def __init__(self, options: SegmenterOptions) -> None:
        self.cfg = cfg = options
        self._pre_roll_windows = max(1, round(cfg.pre_roll_ms / _WINDOW_MS))
        self._silence_windows = max(1, int(np.ceil(cfg.min_silence_ms / _WINDOW_MS)))
        self._tail_windows = min(self._silence_windows, max(1, round(cfg.tail_ms / _WINDOW_MS)))
        self._phrase_windows = int(np.ceil(cfg.phrase_pause_ms / _WINDOW_MS)) if cfg.phrase_pause_ms > 0 else 0
        self._phrase_min_windows = max(1, round(cfg.phrase_min_s * 1000 / _WINDOW_MS))
        self._max_windows = max(1, int(cfg.max_utterance_s * 1000 / _WINDOW_MS))
        self._next_id = 1
        self._pushed = 0  # windows fed since construction: stream positions survive reset()
        self.reset()

    def reset(self) -> None:
        """Forget any utterance in progress (abort, listen start)."""
        self._voiced = False  # the dual-threshold decision
        self._recent: deque[bool] = deque(maxlen=_ONSET_OF)
        self._pre_roll: deque[np.ndarray] = deque(maxlen=self._pre_roll_windows)
        self._chunks: list[np.ndarray] = []
        self._in_speech = False
        self._voiced_windows = 0
        self._last_voice_end = 0  # index into _chunks after the last voiced window
        self._silence_run = 0
        self._speculated = False
        self._utterance_id = 0
        self._start_window = 0
        self._piece_start = 0  # index into _chunks where the current piece (after the last phrase) begins
        self._speculated_end = 0  # index into _chunks where the last speculation's audio ends
        self._phrases = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def windows_fed(self) -> int:
        """Windows pushed since construction: the stream position, in 512-sample windows."""
        return self._pushed

    def audio_so_far(self) -> np.ndarray:
        """The utterance in progress (pre-roll included), for partial results; empty outside speech."""
        return np.concatenate(self._chunks) if self._in_speech and self._chunks else np.zeros(0, np.float32)

    def _decide(self, prob: float) -> bool:
        if prob >= self.cfg.threshold:
            self._voiced = True
        elif prob <= self.cfg.threshold_low:
            self._voiced = False
        return self._voiced

    def push(self, chunk: np.ndarray, prob: float) -> list[Event]:
        voiced = self._decide(prob)
        self._recent.append(voiced)
        self._pushed += 1
        events: list[Event] = []
        if not self._in_speech:
            self._pre_roll.append(chunk)
            if voiced and sum(self._recent) >= _ONSET_NEED:
                self._in_speech = True
                self._utterance_id = self._next_id
                self._next_id += 1
                self._chunks = list(self._pre_roll)
                self._start_window = self._pushed - len(self._chunks)
                self._pre_roll.clear()
                self._voiced_windows = sum(self._recent)
                self._last_voice_end = len(self._chunks)
                self._silence_run = 0
                self._speculated = False
                events.append(SpeechStarted(self._utterance_id, self._start_window * WINDOW))
            return events

        self._chunks.append(chunk)
        if voiced:
            self._voiced_windows += 1
            if self._speculated:
                phrase = self._ends_phrase()
                events.append(SpeechResumed(self._utterance_id, phrase))
                self._speculated = False
                if phrase:
                    self._piece_start = self._speculated_end
                    self._phrases += 1
            self._last_voice_end = len(self._chunks)
            self._silence_run = 0
        else:
            self._silence_run += 1
            if self._silence_run == self._tail_windows and self._long_enough():
                self._speculated_end = self._speech_end()
                events.append(Speculate(self._utterance_id, self._audio(), self._phrases))
                self._speculated = True
            if self._silence_run >= self._silence_windows:
                events.append(self._finish("silence"))
                return events
        if len(self._chunks) >= self._max_windows:
            events.append(self._finish("max_length"))
        return events

    def flush(self) -> Event | None:
        """End the utterance in progress now (listen stop); None when there is none."""
        if not self._in_speech:
            return None
        return self._finish("flush")

    def _long_enough(self) -> bool:
        return self._voiced_windows * _WINDOW_MS >= self.cfg.min_speech_ms

    def _ends_phrase(self) -> bool:
        """Speech resumes: was the pause long enough, and the speculated piece long enough, for a phrase?"""
        return (
            self._phrase_windows > 0
            and self._silence_run >= self._phrase_windows
            and self._speculated_end - self._piece_start >= self._phrase_min_windows
        )

    def _speech_end(self) -> int:
        return min(len(self._chunks), self._last_voice_end + self._tail_windows)

    def _audio(self) -> np.ndarray:
        """The current piece up to the tail after its last voiced window."""
        chunks = self._chunks[self._piece_start : self._speech_end()]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def _finish(self, reason: str) -> Event:
        uid = self._utterance_id
        speech_ms = self._voiced_windows * _WINDOW_MS
        long_enough = self._long_enough()
        end = self._speech_end() if reason == "silence" else len(self._chunks)
        audio = np.concatenate(self._chunks[:end]) if end else np.zeros(0, np.float32)
        speculated = self._speculated and reason == "silence"
        start_sample = self._start_window * WINDOW
        phrases, last_from = self._phrases, self._piece_start * WINDOW
        # Keep the trailing silence as the next utterance's pre-roll.
        tail = self._chunks[-self._pre_roll_windows :]
        self.reset()
        self._pre_roll.extend(tail)
        if not long_enough:
            return Dropped(uid, speech_ms)
        return Utterance(uid, audio, reason, speculated, start_sample, phrases, last_from)
