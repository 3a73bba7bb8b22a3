"""A whole recording (an upload, an offline FunASR request) to timed, recognised segments.

A recording no longer than one utterance (`vad.max_utterance_s`) is recognised as it is: the
client usually cut it already, and a VAD pass could only lose words. A longer one is cut by
the same VAD model and segmenter as live streams and its pieces go to the shared batchers, at
most `max_parallel` at a time so one long file cannot crowd the devices out of a batch.

The VAD of a recording runs in one worker thread rather than through the VAD batcher: each
window needs the state the previous one left, so a file has only one window to offer per
batch and would pay the batcher's wait on every 32 ms window (an hour of audio is 112,500).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ..audio.segmenter import Utterance
from ..constants import SAMPLE_RATE
from ..types import Hotword, Recognition, Transcript, Word, unspaced
from .pipeline import Pipeline


@dataclass(frozen=True, slots=True)
class Segment:
    """One recognised piece of a recording; times in seconds from its start."""

    start_s: float
    end_s: float
    recognition: Recognition

    @property
    def text(self) -> str:
        return self.recognition.transcript.text.strip()

    def words(self) -> list[Word]:
        """The segment's words, timed from the start of the recording; none past the segment's end
        (the recogniser heard `vad.trailing_pad_ms` of added silence after a VAD cut)."""
        return [
            Word(
                w.text,
                min(self.end_s, round(self.start_s + w.start_s, 3)),
                min(self.end_s, round(self.start_s + w.end_s, 3)),
            )
            for w in self.recognition.transcript.words
        ]


async def split_timed(pipeline: Pipeline, audio: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """VAD-cut `audio` into utterances, each with its first sample's index in `audio`."""
    t0 = time.perf_counter()
    events = await asyncio.to_thread(pipeline.segment_recording, audio)
    pipeline.metrics.stage.labels("file_vad").observe(time.perf_counter() - t0)
    return [(e.start_sample, e.audio) for e in events if isinstance(e, Utterance)]


async def recognize_recording(
    pipeline: Pipeline,
    audio: np.ndarray,
    language: str | None = None,
    use_itn: bool | None = None,
    identify: bool = True,
    max_parallel: int | None = None,
    hotwords: tuple[Hotword, ...] = (),
    device_id: str | None = None,
) -> list[Segment]:
    """Recognise a recording of any length; segments in time order, empty ones left out. Each is
    decoded with the request's `hotwords` beside the config's and `device_id`'s."""
    audio = np.asarray(audio, dtype=np.float32)
    cut = len(audio) > pipeline.config.vad.max_utterance_s * SAMPLE_RATE
    pieces = await split_timed(pipeline, audio) if cut else [(0, audio)]
    # A batch's worth in flight at a time: a long file shares the recogniser with live devices.
    gate = asyncio.Semaphore(max_parallel or pipeline.asr_max_batch)

    async def one(start: int, piece: np.ndarray) -> Segment:
        async with gate:
            rec = await pipeline.recognize(
                piece, language, use_itn, identify, endpointed=cut, hotwords=hotwords, device_id=device_id
            )
        return Segment(start / SAMPLE_RATE, (start + len(piece)) / SAMPLE_RATE, rec)

    segments = await asyncio.gather(*(one(s, p) for s, p in pieces))
    return [s for s in segments if not s.recognition.is_empty]


def _joins_with_space(left: str, right: str) -> bool:
    """Scripts without spaces (Chinese, Japanese) join directly; spaced scripts (English, Korean) get a space."""
    return bool(left) and bool(right) and not unspaced(left[-1]) and not unspaced(right[0])


def join_texts(texts: list[str]) -> str:
    out = ""
    for t in (t.strip() for t in texts):
        if not t:
            continue
        out = t if not out else out + (" " if _joins_with_space(out, t) else "") + t
    return out


def dominant(values: list[tuple[str | None, float]]) -> str | None:
    """The value covering the most seconds (language or emotion of a whole recording)."""
    totals: dict[str, float] = {}
    for value, seconds in values:
        if value:
            totals[value] = totals.get(value, 0.0) + seconds
    return max(totals, key=lambda k: totals[k]) if totals else None


def join_pieces(pieces: list[Recognition]) -> Recognition:
    """One utterance recognised in phrases, as one recognition: the texts joined, language,
    emotion and event those of most of its audio, the speaker of its longest piece that has one,
    and the timings of the last piece (what the endpoint waited for)."""
    if len(pieces) == 1:
        return pieces[0]
    heard = [p for p in pieces if not p.is_empty] or pieces[-1:]

    def most(attr: str) -> str | None:
        return dominant([(getattr(p.transcript, attr), float(p.audio_ms)) for p in heard])

    text = join_texts([p.transcript.text for p in heard])
    raw = "".join(p.transcript.raw for p in heard)
    uncorrected = join_texts([p.transcript.uncorrected_text or p.transcript.text for p in heard])
    hotwords = tuple(dict.fromkeys(w for p in heard for w in p.transcript.hotwords))
    speakers = [p for p in pieces if p.speaker is not None]
    last = pieces[-1]
    return dataclasses.replace(
        last,
        transcript=Transcript(
            text,
            most("language"),
            most("emotion"),
            most("event"),
            raw,
            hotwords=hotwords,
            uncorrected_text=uncorrected if uncorrected != text else None,
        ),
        speaker=max(speakers, key=lambda p: p.audio_ms).speaker if speakers else None,
        audio_ms=sum(p.audio_ms for p in pieces),
    )
