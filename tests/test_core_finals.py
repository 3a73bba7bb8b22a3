"""What becomes of a final utterance (core/finals.py): counted, published as a `TranscriptEvent`
with who heard it, kept in the archive with its audio; an empty one is none of these."""

from __future__ import annotations

import numpy as np

from asr_server.audio.ogg_opus import OpusPacket
from asr_server.core.finals import Finals
from asr_server.core.metrics import Metrics
from asr_server.core.recording import Segment
from asr_server.types import Recognition, SpeakerMatch, Transcript


class Kept:
    """Stands in for the `Archive`: what it was handed."""

    def __init__(self) -> None:
        self.records: list = []

    def keep(self, record) -> None:
        self.records.append(record)


def rec(text: str, speaker: str | None = None, language: str = "en") -> Recognition:
    return Recognition(Transcript(f" {text} ", language), SpeakerMatch(speaker, 0.9) if speaker else None, 800, 5.0)


def test_a_final_is_counted_published_with_its_source_and_kept_with_its_audio():
    metrics, events, archive = Metrics(), [], Kept()
    finals = Finals("xiaozhi", "s1", metrics, events.append, archive, device_id="dev", client_id="cli", scope="fp")
    packets = [OpusPacket(b"\x01\x02", 960, 960)]
    finals.add(rec("hello", "alice"), latency_ms=312.345, opus=packets)
    assert (finals.count, finals.last_text, finals.last_speaker) == (1, " hello ", "alice")
    assert metrics.utterances.labels("xiaozhi")._value.get() == 1
    (event,) = events
    assert (event.text, event.device_id, event.client_id, event.scope, event.latency_ms) == (
        "hello",
        "dev",
        "cli",
        "fp",
        312.3,
    )
    (record,) = archive.records
    assert (record.protocol, record.session_id, record.device_id, record.opus, record.pcm) == (
        "xiaozhi",
        "s1",
        "dev",
        packets,
        None,
    )
    assert record.time == event.timestamp


def test_an_empty_final_or_one_without_audio_is_not_kept():
    metrics, events, archive = Metrics(), [], Kept()
    finals = Finals("funasr", "s2", metrics, events.append, archive)
    finals.add(rec(""))
    finals.add(rec("noise", language="nospeech"), pcm=np.zeros(160, np.float32))
    assert (finals.count, events, archive.records) == (0, [], [])
    finals.add(rec("no packets logged"), opus=[])  # counted and published, nothing to keep
    assert (finals.count, len(events), archive.records) == (1, 1, [])


def test_a_recording_keeps_each_segment_with_its_own_audio_at_one_time():
    events, archive = [], Kept()
    finals = Finals("openai", "http-1", Metrics(), events.append, archive)
    audio = np.arange(32000, dtype=np.float32)
    segments = [Segment(0.0, 0.5, rec("one")), Segment(1.0, 2.0, rec("two", "bob"))]
    finals.add_recording(segments, audio, latency_ms=50.0)
    assert [e.text for e in events] == ["one", "two"] and finals.count == 2 and finals.last_speaker == "bob"
    assert [len(r.pcm) for r in archive.records] == [8000, 16000] and archive.records[1].pcm[0] == 16000
    assert len({e.timestamp for e in events} | {r.time for r in archive.records}) == 1


def test_without_a_bus_or_an_archive_a_final_is_still_counted():
    finals = Finals("funasr", "s3", Metrics(), None, None)
    finals.add(rec("counted"), pcm=np.zeros(16, np.float32))
    assert finals.count == 1 and finals.last_text == " counted "
