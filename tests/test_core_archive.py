"""The archive: records written off the loop, Ogg Opus that decodes to the utterance's length,
search that treats every filter as data, retention, and the paused path."""

from __future__ import annotations

import io
import logging
import tarfile
import time

import numpy as np
import pytest

from asr_server.audio.ogg_opus import PacketLog, mux_ogg_opus
from asr_server.config import ArchiveConfig
from asr_server.constants import SAMPLE_RATE
from asr_server.core import archive as archive_mod
from asr_server.core.archive import Archive, Query
from asr_server.core.metrics import Metrics
from asr_server.errors import StartupError
from loadtest.clips import encode_pcm
from tests.support.archive import PRE_SKIP, decoded_samples, record
from tests.support.audio import voice


@pytest.fixture
def metrics():
    return Metrics()


@pytest.fixture
def archive(tmp_path, metrics):
    a = Archive(ArchiveConfig(enabled=True, dir=tmp_path / "archive"), metrics)
    yield a
    a.close()


def test_an_utterances_packets_mux_into_ogg_opus_that_decodes_to_its_length():
    pcm = voice(3.0, 180.0, 7).astype(np.float32) * 0.3
    log = PacketLog(keep_s=10)
    for packet in encode_pcm(pcm):  # 60 ms frames, as the firmware sends them
        log.add(packet, 960)
    start, end = 10_000, 40_000  # an utterance found in the stream: samples since its start
    packets = log.between(start, end)
    assert packets[0].start <= start < packets[0].start + 960 and packets[-1].start < end <= packets[-1].start + 960
    data = mux_ogg_opus(packets)
    n, rate = decoded_samples(data)
    assert rate == 48000
    assert n == len(packets) * 2880 - PRE_SKIP  # every packet, as it came
    covered = n / rate * SAMPLE_RATE
    assert (end - start) <= covered + PRE_SKIP / 3 <= (end - start) + 2 * 960  # at most a frame either side
    assert sum(len(p.data) for p in packets) <= len(data) <= sum(len(p.data) for p in packets) + 600  # not re-encoded


def test_the_packet_log_forgets_what_no_utterance_can_still_need():
    log = PacketLog(keep_s=1.0)
    for _ in range(100):
        log.add(b"x", 960)  # 6 s
    assert log.between(0, 16000) == []
    assert len(log.between(0, log.samples)) <= 18
    log.reset()
    assert log.samples == 0 and log.between(0, 10**9) == []


def test_records_are_written_and_found_with_every_filter(archive):
    t0 = time.time() - 3600
    archive.keep(record("turn on the kitchen light", "dev-1", "alice", when=t0 + 1000))
    archive.keep(record("what is the weather", "dev-2", "bob", when=t0 + 2000))
    archive.keep(record("50% off_sale", "dev-1", None, when=t0 + 3000))
    archive.flush()
    rows, nxt = archive.search(Query())
    assert [r.text for r in rows] == ["50% off_sale", "what is the weather", "turn on the kitchen light"]
    assert nxt is None
    row = rows[-1]
    assert (row.device_id, row.speaker, row.speaker_score, row.language, row.emotion, row.event) == (
        "dev-1", "alice", 0.8, "en", "NEUTRAL", "Speech",
    )  # fmt: skip
    assert row.raw_text.startswith("<|en|>") and row.latency_ms == 123.4 and row.hotwords is None
    assert [r.text for r in archive.search(Query(device_id="dev-2"))[0]] == ["what is the weather"]
    assert [r.text for r in archive.search(Query(speaker="alice"))[0]] == ["turn on the kitchen light"]
    assert [r.text for r in archive.search(Query(q="WEATHER"))[0]] == ["what is the weather"]  # case-blind (ASCII)
    assert [r.text for r in archive.search(Query(since=t0 + 1500, until=t0 + 2500))[0]] == ["what is the weather"]
    # LIKE's wildcards are literal characters in a search
    assert [r.text for r in archive.search(Query(q="%"))[0]] == ["50% off_sale"]
    assert [r.text for r in archive.search(Query(q="f_s"))[0]] == ["50% off_sale"]
    assert archive.search(Query(q="o_f"))[0] == []
    # the FLAC decodes to the utterance's samples
    path, kind = archive.audio(row)
    assert kind == "audio/flac" and decoded_samples(path.read_bytes()) == (8000, SAMPLE_RATE)


def test_pages_follow_the_cursor_and_are_bounded(archive, monkeypatch):
    for i in range(7):
        archive.keep(record(f"utterance {i}"))
    archive.flush()
    seen, cursor = [], None
    while True:
        page, cursor = archive.search(Query(limit=3, cursor=cursor))
        assert len(page) <= 3
        seen += [r.text for r in page]
        if cursor is None:
            break
    assert seen == [f"utterance {i}" for i in reversed(range(7))]
    monkeypatch.setattr(archive_mod, "MAX_PAGE", 4)
    assert len(archive.search(Query(limit=10**9))[0]) == 4


@pytest.mark.parametrize(
    "q",
    ["' OR 1=1 --", "'; DROP TABLE utterances; --", '" OR ""="', "\\", "%%", "_", "\x00", "日本語", "a" * 5000],
)
def test_fuzzed_search_strings_are_data(archive, q):
    archive.keep(record("hello"))
    archive.flush()
    rows, _ = archive.search(Query(q=q, device_id=q, speaker=q))
    assert rows == []
    rows, _ = archive.search(Query(q=q))
    assert rows == []
    assert len(archive.search(Query())[0]) == 1  # the table is still there


def test_retention_removes_the_oldest_first_beyond_max_gb(tmp_path, metrics):
    a = Archive(ArchiveConfig(enabled=True, dir=tmp_path / "a", max_gb=1.0), metrics)
    try:
        a.keep(record("first"))
        a.flush()
        size = a.search(Query())[0][0].audio_bytes
        a.config = ArchiveConfig(enabled=True, dir=tmp_path / "a", max_gb=2.5 * size / 2**30)  # room for two
        for text in ("second", "third", "fourth"):
            a.keep(record(text))  # the limit is reached while writing: each write makes room
            a.flush()
        rows = a.search(Query())[0]
        assert [r.text for r in rows] == ["fourth", "third"]
        assert sorted(p.name for p in (tmp_path / "a").rglob("*.flac")) == sorted(f"{r.id}.flac" for r in rows)
        a.config = ArchiveConfig(enabled=True, dir=tmp_path / "a", max_gb=1e-9)
        a.keep(record("huge"))  # one over the limit alone: kept, everything older goes
        a.flush()
        assert [r.text for r in a.search(Query())[0]] == ["huge"]
    finally:
        a.close()


def test_retention_removes_what_is_older_than_max_days(tmp_path, metrics):
    a = Archive(ArchiveConfig(enabled=True, dir=tmp_path / "a", max_days=1.0), metrics)
    try:
        a.keep(record("old", when=time.time() - 2 * 86400))
        a.keep(record("new"))
        a.flush()
        assert [r.text for r in a.search(Query())[0]] == ["new"]
        assert len(list((tmp_path / "a").rglob("*.flac"))) == 1
    finally:
        a.close()


def test_a_failing_write_pauses_the_archive_with_one_line_and_a_metric(archive, metrics, caplog, monkeypatch):
    day = archive.dir / time.strftime("%Y-%m-%d", time.gmtime())
    day.parent.mkdir(exist_ok=True)
    day.write_bytes(b"")  # where the day's folder should be: every write fails
    with caplog.at_level(logging.WARNING, logger="asr_server.core.archive"):
        archive.keep(record("lost"))
        archive.flush()
        for _ in range(3):
            archive.keep(record("dropped while paused"))
        archive.flush()
    assert archive.paused and metrics.archive_paused._value.get() == 1
    assert [r.getMessage() for r in caplog.records if "archive paused" in r.getMessage()].__len__() == 1
    assert metrics.archive_dropped.labels("write_failed")._value.get() == 1
    assert metrics.archive_dropped.labels("paused")._value.get() == 3
    assert archive.search(Query())[0] == []
    # the disk has room again: after the retry delay the archive writes and says so
    day.unlink()
    monkeypatch.setattr(archive_mod, "RETRY_AFTER_S", 0.0)
    archive._paused_until = time.monotonic()
    archive.keep(record("kept again"))
    archive.flush()
    assert not archive.paused and metrics.archive_paused._value.get() == 0
    assert [r.text for r in archive.search(Query())[0]] == ["kept again"]


def test_a_directory_that_cannot_be_written_stops_the_start_with_one_line(tmp_path, metrics):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError) as e:
        Archive(ArchiveConfig(enabled=True, dir=blocker / "archive"), metrics)
    assert "archive.dir" in str(e.value) and "\n" not in str(e.value)


def test_corrections_deletions_and_the_export_manifest(archive):
    archive.keep(record("turn on the lihgt", "dev-1", "alice"))
    archive.keep(record("goodbye", "dev-2"))
    archive.flush()
    rows = {r.text: r for r in archive.search(Query())[0]}
    fixed = archive.correct(rows["turn on the lihgt"].id, "turn on the light")
    assert fixed is not None and fixed.corrected_text == "turn on the light"
    assert [r.text for r in archive.search(Query(q="light"))[0]] == ["turn on the lihgt"]  # corrections are searched
    assert archive.correct("nope", "x") is None
    out = io.BytesIO()
    assert archive.export(Query(), out, 10) == 2
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = tar.getnames()
        manifest = [__import__("json").loads(line) for line in tar.extractfile("metadata.jsonl").read().splitlines()]
        line = next(m for m in manifest if m["speaker"] == "alice")
        assert line["text"] == "turn on the light" and line["recognized_text"] == "turn on the lihgt"
        assert line["file_name"] == line["audio_filepath"] and line["file_name"] in names
        assert line["duration"] == 0.5 and line["language"] == "en"
        audio = tar.extractfile(line["file_name"]).read()
        assert decoded_samples(audio) == (8000, SAMPLE_RATE)
    assert archive.delete_device("dev-1") == 1
    assert archive.delete(rows["goodbye"].id) and not archive.delete(rows["goodbye"].id)
    assert archive.search(Query())[0] == [] and list(archive.dir.rglob("*.flac")) == []


def test_a_writer_too_far_behind_drops_utterances_instead_of_holding_them(archive, metrics, monkeypatch):
    import threading

    gate = threading.Event()
    archive._writer.submit(gate.wait)  # the disk hangs
    monkeypatch.setattr(archive_mod, "MAX_PENDING_BYTES", 3 * record("x").audio_bytes)
    for i in range(5):
        archive.keep(record(f"utterance {i}"))
    assert metrics.archive_dropped.labels("backlog")._value.get() == 2
    gate.set()
    archive.flush()
    assert len(archive.search(Query())[0]) == 3 and archive._pending == 0


def test_the_hotwords_the_decoding_applied_are_kept_with_the_utterance(archive):
    from dataclasses import replace

    from tests.support.archive import rec

    archive.keep(
        replace(record("打开小米台灯", "dev-1"), recognition=rec("打开小米台灯", hotwords=("小米台灯", "打开")))
    )
    archive.flush()
    assert [r.hotwords for r in archive.search(Query())[0]] == ["小米台灯, 打开"]
