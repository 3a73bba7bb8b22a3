"""Deterministic stand-ins for the ASR and speaker engines, for protocol-shape tests.

They have the engines' interface (`transcribe_batch`, `embed_batch`, `.info`, `.dim`) and sit in
a real `Pipeline` with the real Silero VAD, micro-batchers and voiceprint store, so everything
the adapters do is real except what the models would say. The fake text is a function of the
audio's length ("w1 w2 ..." one word per half second), which makes segment times, partials and
resampling checkable; the fake embedding is a function of the audio's spectrum.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import numpy as np
from aiohttp import web

from asr_server.config import Config
from asr_server.constants import SAMPLE_RATE
from asr_server.core.hotwords import HotwordStore
from asr_server.core.metrics import Metrics
from asr_server.core.voiceprints import VoiceprintStore
from asr_server.engines.base import ModelInfo
from asr_server.engines.vad import SileroVad
from asr_server.types import SpeakerMatch, Transcript, TranscriptEvent

WORD_S = 0.5


def fake_text(n_samples: int) -> str:
    return " ".join(f"w{i}" for i in range(1, int(n_samples / SAMPLE_RATE / WORD_S) + 1))


class FakeAsr:
    def __init__(self) -> None:
        self.info = ModelInfo("fake-sensevoice", Path("fake"), "fake", "cpu", "none", "fp32", 0.0)
        self.batches: list[int] = []
        self.hotwords: list[tuple] = []  # each utterance's hotwords, as the recogniser was asked
        self.fail = False

    def transcribe_batch(self, audios, languages, itns, hotwords=None) -> list[Transcript]:
        if self.fail:
            raise RuntimeError("engine exploded")
        self.batches.append(len(audios))
        self.hotwords.extend(hotwords if hotwords is not None else [()] * len(audios))
        out = []
        for audio, lang in zip(audios, languages):
            if float(np.sqrt(np.mean(np.square(audio)))) < 1e-4:
                out.append(Transcript("", "nospeech", "EMO_UNKNOWN", "Speech", "<|nospeech|>"))
                continue
            language = "en" if lang == "auto" else lang
            text = fake_text(len(audio))
            out.append(Transcript(text, language, "NEUTRAL", "Speech", f"<|{language}|><|NEUTRAL|><|Speech|>{text}"))
        return out


class FakeSpeaker:
    dim = 32

    def __init__(self) -> None:
        self.info = ModelInfo("fake-campplus", Path("fake-campplus.onnx"), "fake", "cpu", "none", "fp32", 0.0)

    def embed_batch(self, audios) -> list[np.ndarray]:
        out = []
        for audio in audios:
            spec = np.abs(np.fft.rfft(audio[: SAMPLE_RATE * 4], n=2 * 1024))[1:]
            bands = np.log1p(np.array([b.sum() for b in np.array_split(spec, self.dim)], dtype=np.float32))
            v = bands - bands.mean() + np.linspace(0.0, 1e-3, self.dim, dtype=np.float32)  # never all zero
            out.append((v / np.linalg.norm(v)).astype(np.float32))
        return out


@functools.cache
def _silero() -> SileroVad:
    return SileroVad.load()


def fake_pipeline(config: Config, db: Path, speaker: bool = True, metrics: Metrics | None = None):
    """A real `Pipeline` around the fake engines and the real (shared) Silero VAD."""
    from asr_server.core.pipeline import Pipeline

    spk = FakeSpeaker() if speaker else None
    store = VoiceprintStore(db, model=spk.info.path.name, dim=spk.dim) if spk is not None else None
    hotwords = HotwordStore(db)
    return Pipeline(config, _silero(), FakeAsr(), spk, store, metrics or Metrics(), hotwords)


class WebhookReceiver:
    """A webhook backend on a free loopback port whose answer the test scripts."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.statuses: list[int] = []  # answers to give, in order; 200 after they run out
        self.delay_s = 0.0
        self.got = asyncio.Event()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        self.headers.append(dict(request.headers))
        self.bodies.append({"status": status, **body})
        self.got.set()
        return web.json_response({}, status=status)

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n:
            self.got.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"webhook got {len(self.bodies)} of {n} posts: {self.bodies}"
            try:
                await asyncio.wait_for(self.got.wait(), remaining)
            except TimeoutError:
                pass


def make_event(
    text: str = "打开客厅的灯", device_id: str | None = "aa:bb:cc:dd:ee:ff", protocol: str = "xiaozhi", **kw
) -> TranscriptEvent:
    base = dict(
        text=text,
        language="zh",
        emotion="NEUTRAL",
        event="Speech",
        speaker=SpeakerMatch("alice", 0.71),
        device_id=device_id,
        client_id="c-1",
        session_id="s-1",
        protocol=protocol,
        audio_ms=1870,
        latency_ms=212.5,
        asr_ms=80.1,
        embed_ms=20.3,
        timestamp=1_700_000_000.5,
    )
    base.update(kw)
    return TranscriptEvent(**base)
