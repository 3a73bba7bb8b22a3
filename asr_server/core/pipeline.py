"""The shared engines behind every protocol adapter: VAD, recognition, speaker embedding.

One `Pipeline` per server process. It owns the models and one micro-batcher per model, so the
device path, the FunASR-compatible socket and the HTTP API all batch into the same calls, and it
hands out the `SpeechStream`s adapters stream audio into. Adapters never touch a model directly:
they await `feed`/`probabilities`, `recognize`, `transcribe`, `embed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..audio.segmenter import Event
from ..config import Config
from ..constants import SAMPLE_RATE
from ..engines.base import Embedder, ModelInfo, Recognizer, VadModel
from ..engines.contracts import ECAPA_DIR
from ..engines.vad import VadWindow
from ..errors import VoiceprintError
from ..types import Recognition, SpeakerMatch, Transcript
from .batching import MicroBatcher
from .metrics import Metrics
from .streaming import SpeechStream, segmenter_options
from .voiceprints import VoiceprintStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AsrRequest:
    audio: np.ndarray
    language: str
    use_itn: bool


def speaker_model_path(config: Config) -> Path:
    """The speaker model the configuration names: CAM++'s ONNX file, or the ECAPA folder."""
    if config.speaker.model_type == "ecapa":
        return Path(config.asr.model_dir).parent / ECAPA_DIR
    return Path(config.speaker.model)


def voiceprint_model_id(config: Config) -> str:
    """What voiceprints are keyed by: the same weights give the same voiceprints on either runtime,
    so CAM++ is named after its ONNX file and ECAPA is `ecapa`."""
    return "ecapa" if config.speaker.model_type == "ecapa" else Path(config.speaker.model).name


class Pipeline:
    """Models plus their batchers; construct with `Pipeline.load(config)`."""

    def __init__(
        self,
        config: Config,
        vad: VadModel,
        asr: Recognizer,
        speaker: Embedder | None,
        voiceprints: VoiceprintStore | None,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.vad = vad
        self.asr = asr
        self.speaker = speaker
        self.voiceprints = voiceprints
        self.metrics = metrics
        self._vad_batcher: MicroBatcher[VadWindow, tuple[float, np.ndarray]] = self._batcher(
            "vad", vad.run_batch, "vad"
        )
        self._asr_batcher: MicroBatcher[AsrRequest, Transcript] = self._batcher("asr", self._asr_batch, "asr")
        self._spk_batcher: MicroBatcher[np.ndarray, np.ndarray] | None = (
            self._batcher("embedding", self._embed_batch, "speaker") if speaker is not None else None
        )
        self._segmenter_options = segmenter_options(config.vad)
        for b in (self._vad_batcher, self._asr_batcher, self._spk_batcher):
            if b is not None:
                metrics.queue_depths.add(b.name, b.depth)

    def _batcher(self, name: str, fn: Callable[[Sequence[Any]], Sequence[Any]], section: str) -> MicroBatcher:
        """A micro-batcher with the batch size, wait and queue limit of its config section."""
        cfg = getattr(self.config, section)
        return MicroBatcher(
            name,
            fn,
            cfg.max_batch,
            cfg.max_wait_ms,
            self.metrics.on_batch,
            max_queue=cfg.max_queue,
            limit_key=f"{section}.max_queue",
        )

    @classmethod
    def load(cls, config: Config, metrics: Metrics | None = None) -> Pipeline:
        """Load every configured model and log the start-up report (file, provider, load time)."""
        from ..engines.sensevoice import SenseVoice
        from ..engines.speaker import load_embedder
        from ..engines.vad import SileroVad

        eng = config.engine
        vad = SileroVad.load(config.vad.model)
        asr = SenseVoice.load(
            config.asr.model_dir,
            quantized=config.asr.quantized,
            device=eng.device,
            threads=eng.threads,
            backend=eng.backend,
            precision=eng.precision,
        )
        speaker = voiceprints = None
        if config.speaker.enabled:
            speaker = load_embedder(
                config.speaker.model_type,
                speaker_model_path(config),
                device=eng.device,
                threads=eng.threads,
                backend=eng.backend,
                precision=eng.precision,
            )
            voiceprints = VoiceprintStore(config.speaker.db, model=voiceprint_model_id(config), dim=speaker.dim)
        pipeline = cls(config, vad, asr, speaker, voiceprints, metrics or Metrics())
        for info in pipeline.models:
            log.info("model %s", info.describe())
        return pipeline

    @property
    def models(self) -> list[ModelInfo]:
        return [m.info for m in (self.vad, self.asr, self.speaker) if m is not None]

    # --- VAD -------------------------------------------------------------------------------

    def open_stream(self) -> SpeechStream:
        """A new stream with the configured energy gate, VAD framing and segmenter."""
        return SpeechStream(self._segmenter_options, self.config.vad.energy_gate_dbfs)

    async def vad_window(self, window: VadWindow) -> tuple[float, np.ndarray]:
        return await self._vad_batcher.submit(window)

    async def probabilities(self, stream: SpeechStream, pcm: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Each complete window of `pcm` with its speech probability, through the shared VAD batcher."""
        out = []
        for w in stream.windows(pcm):
            if w.model_input is None:
                out.append((w.chunk, 0.0))
                continue
            prob, state = await self.vad_window(w.model_input)
            stream.advance(state)
            out.append((w.chunk, prob))
        return out

    async def feed(self, stream: SpeechStream, pcm: np.ndarray) -> list[Event]:
        """Live audio into `stream`: the segmenter events it causes, in order."""
        events: list[Event] = []
        for chunk, prob in await self.probabilities(stream, pcm):
            events.extend(stream.push(chunk, prob))
        return events

    def segment_recording(self, audio: np.ndarray) -> list[Event]:
        """A whole recording through a fresh stream, blocking, straight on the model (call it in a
        worker thread), ending with the flush of the utterance in progress.

        A recording offers one window at a time (each needs the state the last one left), so
        through the batcher it would pay `max_wait_ms` on every 32 ms window.
        """
        stream = self.open_stream()
        events: list[Event] = []
        for w in stream.windows(audio):
            prob = 0.0
            if w.model_input is not None:
                ((prob, state),) = self.vad.run_batch([w.model_input])
                stream.advance(state)
            events.extend(stream.push(w.chunk, prob))
        last = stream.flush()
        if last is not None:
            events.append(last)
        return events

    # --- recognition -----------------------------------------------------------------------

    def _asr_batch(self, requests: Sequence[AsrRequest]) -> list[Transcript]:
        return self.asr.transcribe_batch(
            [r.audio for r in requests], [r.language for r in requests], [r.use_itn for r in requests]
        )

    async def transcribe(
        self, audio: np.ndarray, language: str | None = None, use_itn: bool | None = None
    ) -> Transcript:
        cfg = self.config.asr
        req = AsrRequest(
            np.asarray(audio, dtype=np.float32), language or cfg.language, cfg.use_itn if use_itn is None else use_itn
        )
        return await self._asr_batcher.submit(req)

    def _embed_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        assert self.speaker is not None
        return list(self.speaker.embed_batch(audios))

    async def embed(self, audio: np.ndarray) -> np.ndarray:
        if self._spk_batcher is None:
            raise RuntimeError("speaker embedding is disabled (speaker.enabled: false)")
        return await self._spk_batcher.submit(np.asarray(audio, dtype=np.float32))

    @property
    def asr_backlogged(self) -> bool:
        """Utterances are waiting for the recogniser: speculative work would only delay them."""
        return self._asr_batcher.queue_depth > 0

    def identify(self, embedding: np.ndarray) -> SpeakerMatch | None:
        """The enrolled speaker of `embedding`, or None; a degenerate embedding (silence) is an unknown speaker."""
        if self.voiceprints is None:
            return None
        try:
            return self.voiceprints.identify(embedding, self.config.speaker.threshold)
        except VoiceprintError as e:
            log.debug("speaker not identified: %s", e)
            return None

    async def recognize(
        self, audio: np.ndarray, language: str | None = None, use_itn: bool | None = None, identify: bool = True
    ) -> Recognition:
        """Text, tags and speaker of one utterance; recognition and embedding run concurrently."""
        audio_ms = int(len(audio) * 1000 / SAMPLE_RATE)
        want_speaker = identify and self._spk_batcher is not None and audio_ms >= self.config.speaker.min_audio_ms

        async def timed(coro):
            t0 = time.perf_counter()
            result = await coro
            return result, (time.perf_counter() - t0) * 1000

        asr_task = timed(self.transcribe(audio, language, use_itn))
        if want_speaker:
            (transcript, asr_ms), (embedding, embed_ms) = await asyncio.gather(asr_task, timed(self.embed(audio)))
            speaker = self.identify(embedding)
        else:
            transcript, asr_ms = await asr_task
            speaker, embed_ms = None, None
        return Recognition(transcript, speaker, audio_ms, asr_ms, embed_ms)

    async def close(self) -> None:
        for b in (self._vad_batcher, self._asr_batcher, self._spk_batcher):
            if b is not None:
                await b.close()
        if self.voiceprints is not None:
            self.voiceprints.close()
