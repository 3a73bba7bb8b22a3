"""Partials of the utterance in progress (core/turn.py, `on_partial`): recognised again every
`partial_interval_ms` of its audio, one at a time, below every final; the text handed over only
while the utterance goes on. A real `Pipeline` (fake engines, real Silero VAD) whose `transcribe`
the test answers."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from asr_server.audio.segmenter import Dropped, SpeechStarted, Utterance
from asr_server.config import load_config
from asr_server.constants import VAD_WINDOW
from asr_server.core.scheduler import Priority
from asr_server.core.turn import Turn
from asr_server.types import Transcript
from tests.support.fakes import fake_pipeline

INTERVAL_MS = 320  # ten VAD windows


class Partials:
    """Stands in for `Pipeline.transcribe` and for the session that is told the text."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.answers: list[asyncio.Future[Transcript]] = []
        self.told: list[tuple[int, str]] = []

    async def transcribe(self, audio, language=None, use_itn=None, priority=None, **kw) -> Transcript:
        self.calls.append({"priority": priority, "language": language, **kw})
        self.answers.append(asyncio.get_running_loop().create_future())
        return await self.answers[-1]

    async def tell(self, utterance_id: int, text: str) -> None:
        self.told.append((utterance_id, text))


@pytest.fixture
async def turn(tmp_path, monkeypatch):
    cfg = load_config(None, env={}, overrides={"speaker": {"db": str(tmp_path / "vp.sqlite")}})
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite", speaker=False)
    partials = Partials()
    monkeypatch.setattr(pipeline, "transcribe", partials.transcribe)
    t = Turn(pipeline, "test", on_partial=partials.tell, partial_interval_ms=INTERVAL_MS)
    t.partials = partials  # type: ignore[attr-defined]
    yield t
    await t.close()
    await pipeline.close()


def feed(turn: Turn, windows: int) -> None:
    for _ in range(windows):
        turn.stream.push(np.zeros(VAD_WINDOW, np.float32), 0.0)


async def settle() -> None:
    await asyncio.sleep(0.01)


async def one_partial_running(turn: Turn) -> None:
    """Utterance 1 started and an interval of it fed: its first partial is asked for."""
    turn.on_event(SpeechStarted(1, 0))
    feed(turn, 10)
    turn.start_partial()
    await settle()
    assert len(turn.partials.calls) == 1


async def test_a_partial_every_interval_one_at_a_time_and_its_text_handed_over(turn):
    p = turn.partials
    turn.language = "en"
    turn.start_partial()
    assert p.calls == []  # no utterance in progress
    turn.on_event(SpeechStarted(3, 0))
    feed(turn, 9)
    turn.start_partial()
    await settle()
    assert p.calls == []  # not an interval of its audio yet
    feed(turn, 1)
    turn.start_partial()
    await settle()
    assert p.calls == [{"priority": Priority.PARTIAL, "language": "en", "hotwords": (), "device_id": None}]
    feed(turn, 20)
    turn.start_partial()  # the first is still running: no second
    await settle()
    assert len(p.calls) == 1
    p.answers[0].set_result(Transcript("turn on", "en"))
    await settle()
    assert p.told == [(3, "turn on")]
    turn.start_partial()  # 20 windows since: the next one
    await settle()
    assert len(p.calls) == 2
    p.answers[1].set_result(Transcript("", "nospeech"))
    await settle()
    assert p.told == [(3, "turn on")]  # nothing heard is not handed over


@pytest.mark.parametrize("end", ["utterance", "dropped", "reset"])
async def test_an_utterance_that_ends_cancels_its_partial(turn, end):
    p = turn.partials
    await one_partial_running(turn)
    if end == "utterance":
        turn.on_event(Utterance(1, np.zeros(8000, np.float32), "silence", False)).cancel()
    elif end == "dropped":
        turn.on_event(Dropped(1, 100))
    else:
        turn.reset()
    await settle()
    assert p.answers[0].cancelled() and p.told == []
    feed(turn, 10)
    turn.start_partial()  # no utterance in progress: none
    await settle()
    assert len(p.calls) == 1


async def test_a_failed_partial_is_logged_and_the_next_one_still_runs(turn, caplog):
    p = turn.partials
    await one_partial_running(turn)
    with caplog.at_level(logging.WARNING, logger="asr_server.core.turn"):
        p.answers[0].set_exception(RuntimeError("engine gone"))
        await settle()
    assert "test: partial decode failed" in caplog.text and p.told == []
    feed(turn, 10)
    turn.start_partial()
    await settle()
    p.answers[1].set_result(Transcript("still here", "en"))
    await settle()
    assert p.told == [(1, "still here")]


async def test_without_on_partial_a_turn_runs_none(tmp_path, monkeypatch):
    cfg = load_config(None, env={}, overrides={"speaker": {"db": str(tmp_path / "vp.sqlite")}})
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite", speaker=False)
    partials = Partials()
    monkeypatch.setattr(pipeline, "transcribe", partials.transcribe)
    turn = Turn(pipeline, "device")
    turn.on_event(SpeechStarted(1, 0))
    feed(turn, 40)
    turn.start_partial()
    await settle()
    assert partials.calls == []
    await turn.close()
    await pipeline.close()
