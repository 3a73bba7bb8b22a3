"""The VAD batcher: many streams' windows in one model call per tick, each stream's state in order,
the energy gate skipping the model, and limits and failures that stay with their callers."""

import asyncio

import numpy as np
import pytest
import soundfile as sf

from asr_server.audio.segmenter import SegmenterOptions
from asr_server.core.streaming import SpeechStream
from asr_server.core.vad_batching import VadBatcher
from asr_server.engines.vad import SileroVad
from asr_server.errors import EngineBusy
from tests.support.audio import AUDIO, needs_audio


@pytest.fixture(scope="module")
def vad():
    return SileroVad.load()


class Counting:
    """Wraps a VAD model, recording the batch size of each call."""

    def __init__(self, model, fail=False):
        self.model, self.fail, self.calls = model, fail, []
        self.info = getattr(model, "info", None)

    def run(self, samples, state):
        self.calls.append(samples.shape[0])
        if self.fail:
            raise RuntimeError("model exploded")
        return self.model.run(samples, state)


def stream(gate_dbfs=-200.0):
    return SpeechStream(SegmenterOptions(), gate_dbfs)


def sequential(vad, audio):
    """Each window on its own, the reference the batched streams must match."""
    s = stream()
    out = []
    for w in s.windows(audio):
        if w.samples is None:  # digital silence: gated
            out.append(0.0)
            continue
        (p,), state = vad.run(w.samples[None], s.vad.state[:, None, :])
        s.advance(state[:, 0, :])
        out.append(p)
    return np.array(out)


@needs_audio
async def test_streams_batched_per_tick_equal_separate_calls(vad):
    clips = [
        sf.read(AUDIO / n, dtype="float32")[0]
        for n in (
            "en_tts_living_room_light_wyoming.wav",
            "ko_tts_living_room_light_wyoming.wav",
            "zh_aishell_BAC009S0724W0121_wenet.wav",
        )
    ]
    n = min(len(c) for c in clips)
    model = Counting(vad)
    batcher = VadBatcher(model, max_batch=64, max_wait_ms=2)
    streams = [stream() for _ in clips]
    got: list[list[float]] = [[] for _ in clips]

    async def feed(i):
        for k in range(0, n, 960):  # 60 ms frames, as a device sends them
            for _, p in await batcher.probabilities(streams[i], clips[i][k : k + 960]):
                got[i].append(p)

    await asyncio.gather(*(feed(i) for i in range(len(clips))))
    await batcher.close()
    for i, clip in enumerate(clips):
        np.testing.assert_allclose(got[i], sequential(vad, clip[: len(got[i]) * 512]), atol=1e-5)
    assert max(model.calls) > 1  # streams shared calls


async def test_frames_below_the_gate_never_reach_the_model(vad):
    model = Counting(vad)
    batcher = VadBatcher(model)
    quiet = stream(gate_dbfs=-40.0)
    probs = await batcher.probabilities(quiet, np.full(1920, 1e-4, np.float32))
    assert [p for _, p in probs] == [0.0, 0.0, 0.0] and model.calls == []
    loud = await batcher.probabilities(quiet, np.random.default_rng(0).uniform(-0.5, 0.5, 1024).astype(np.float32))
    assert len(loud) == 2 and model.calls
    await batcher.close()


async def test_a_frame_over_the_queue_limit_is_refused_naming_the_key(vad):
    batcher = VadBatcher(Counting(vad), max_queue=2)
    with pytest.raises(EngineBusy, match=r"vad.max_queue = 2"):
        await batcher.probabilities(stream(), np.ones(512 * 3, np.float32) * 0.1)
    await batcher.close()


async def test_a_model_failure_fails_that_tick_and_the_batcher_goes_on(vad):
    model = Counting(vad, fail=True)
    batcher = VadBatcher(model)
    s = stream()
    with pytest.raises(RuntimeError, match="model exploded"):
        await batcher.probabilities(s, np.ones(512, np.float32) * 0.1)
    model.fail = False
    assert len(await batcher.probabilities(s, np.ones(512, np.float32) * 0.1)) == 1
    await batcher.close()
