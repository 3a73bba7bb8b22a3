"""The turn lifecycle (core/turn.py): segmenter events in, recognitions out in utterance order,
with speculation, phrases, promotion and abort. A real `Pipeline` (fake engines, real Silero VAD)
whose `start_recognition` is replaced by one the test answers, so the order in which the
recogniser finishes is the test's to choose."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asr_server.audio.segmenter import Dropped, Speculate, SpeechResumed, SpeechStarted, Utterance
from asr_server.config import load_config
from asr_server.core.pipeline import Recognizing
from asr_server.core.turn import Heard, Turn
from asr_server.types import Recognition, Transcript
from tests.support.fakes import fake_pipeline

AUDIO = np.zeros(8000, np.float32)


class Recogniser:
    """Stands in for `Pipeline.start_recognition`: each call waits until the test answers it."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.answers: list[asyncio.Future[Recognition]] = []
        self.tasks: list[asyncio.Task[Recognition]] = []

    def __call__(self, audio, language=None, use_itn=None, identify=True, **kw) -> Recognizing:
        answer: asyncio.Future[Recognition] = asyncio.get_running_loop().create_future()
        self.calls.append({"audio": audio, **kw})
        self.answers.append(answer)
        self.tasks.append(asyncio.ensure_future(_wait(answer)))
        return Recognizing(self.tasks[-1], [])

    async def cancelled(self) -> list[int]:
        """Which calls were cancelled (once their tasks have seen it)."""
        await asyncio.sleep(0.01)
        return [i for i, t in enumerate(self.tasks) if t.cancelled()]

    def answer(self, i: int, text: str | Exception) -> None:
        if isinstance(text, Exception):
            self.answers[i].set_exception(text)
        else:
            self.answers[i].set_result(Recognition(Transcript(text, "en"), None, 500, 1.0))


async def _wait(answer: asyncio.Future[Recognition]) -> Recognition:
    return await answer


@pytest.fixture
async def turn(tmp_path, monkeypatch):
    cfg = load_config(None, env={}, overrides={"speaker": {"db": str(tmp_path / "vp.sqlite")}})
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite", speaker=False)
    recogniser = Recogniser()
    monkeypatch.setattr(pipeline, "start_recognition", recogniser)
    t = Turn(pipeline, "test", phrases=True)
    t.recogniser = recogniser  # type: ignore[attr-defined]
    yield t
    await t.close()
    await pipeline.close()


def utterance(uid: int, speculated: bool = False, **kw) -> Utterance:
    return Utterance(uid, AUDIO, "silence", speculated, **kw)


async def next_heard(replies, timeout: float = 2.0) -> Heard:
    return await asyncio.wait_for(anext(replies), timeout)


async def test_replies_come_in_utterance_order_whatever_order_the_recogniser_finishes_in(turn):
    texts: list[str] = []

    async def read() -> None:
        async for heard in turn.heard():
            texts.append(heard.recognition.transcript.text)

    reader = asyncio.ensure_future(read())
    turn.take(utterance(1))
    turn.take(utterance(2))
    turn.recogniser.answer(1, "second")
    await asyncio.sleep(0.1)
    assert texts == []  # the second is ready, the first is not: nothing yet
    turn.recogniser.answer(0, "first")
    await asyncio.sleep(0.1)
    assert texts == ["first", "second"] and turn.pending == 0
    reader.cancel()


async def test_a_failed_recognition_is_an_outcome_and_the_next_reply_still_comes(turn):
    replies = turn.heard()
    turn.take(utterance(1))
    turn.take(utterance(2))
    turn.recogniser.answer(0, RuntimeError("engine gone"))
    turn.recogniser.answer(1, "after")
    failed = await next_heard(replies)
    assert failed.recognition is None and isinstance(failed.error, RuntimeError)
    assert (await next_heard(replies)).recognition.transcript.text == "after"


async def test_abort_drops_the_replies_owed_and_cancels_their_recognition(turn):
    replies = turn.heard()
    turn.take(utterance(1))
    turn.abort()
    assert turn.pending == 0
    turn.take(utterance(2))
    turn.recogniser.answer(1, "kept")
    assert (await next_heard(replies)).recognition.transcript.text == "kept"
    assert await turn.recogniser.cancelled() == [0]


async def test_a_speculation_is_used_at_its_endpoint_and_promoted(turn):
    turn.take(SpeechStarted(1))
    turn.take(Speculate(1, AUDIO))
    assert turn.recogniser.calls[0]["speculative"] is True
    ended = turn.on_event(utterance(1, speculated=True))
    assert ended is not None and ended.speculated and len(turn.recogniser.calls) == 1  # no second recognition
    turn.recogniser.answer(0, "spoken")
    assert (await ended.recognition()).transcript.text == "spoken"


async def test_resumed_speech_voids_the_speculation_and_a_phrase_keeps_it(turn):
    turn.take(Speculate(1, AUDIO))
    turn.take(SpeechResumed(1))  # not a phrase: void
    turn.take(Speculate(1, AUDIO))
    turn.take(SpeechResumed(1, phrase=True))  # a finished phrase: kept
    ended = turn.on_event(utterance(1, phrases=1, last_piece_from=4000))
    assert ended is not None and ended.phrases == 1 and not ended.speculated
    assert len(turn.recogniser.calls[2]["audio"]) == 4000  # only the piece after the phrase is recognised
    turn.recogniser.answer(1, "one phrase")
    turn.recogniser.answer(2, "and the rest")
    assert (await ended.recognition()).transcript.text == "one phrase and the rest"
    assert await turn.recogniser.cancelled() == [0]  # the voided speculation


async def test_a_dropped_utterance_cancels_its_speculation_and_phrases(turn):
    turn.take(Speculate(1, AUDIO))
    turn.take(SpeechResumed(1, phrase=True))
    turn.take(Speculate(1, AUDIO))
    turn.take(Dropped(1, 120.0))
    assert await turn.recogniser.cancelled() == [0, 1]
    assert turn.pending == 0


async def test_drain_waits_for_the_replies_owed(turn):
    async def read() -> list[str]:
        return [h.recognition.transcript.text async for h in turn.heard()]

    reader = asyncio.ensure_future(read())
    turn.take(utterance(1))
    asyncio.get_running_loop().call_later(0.1, turn.recogniser.answer, 0, "late")
    assert await turn.drain(2.0) == 1
    assert turn.pending == 0
    reader.cancel()


async def test_a_recognition_cancelled_elsewhere_is_skipped_and_the_next_reply_comes(turn):
    replies = turn.heard()
    turn.take(utterance(1))
    turn.take(utterance(2))
    turn.recogniser.tasks[0].cancel()  # the engine went away under it (no abort)
    turn.recogniser.answer(1, "next")
    assert (await next_heard(replies)).recognition.transcript.text == "next"
    assert turn.pending == 1  # owed until its reader comes back for the next (it was being given)
