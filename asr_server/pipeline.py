"""The shared engines behind every protocol adapter: VAD, recognition, speaker embedding.

One `Pipeline` per server process. It owns the models and one micro-batcher per model, so the
device path, the FunASR-compatible socket and the HTTP API all batch into the same calls.
Adapters never touch a model directly: they await `vad_window`, `recognize`, `embed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_server.audio.vad import SAMPLE_RATE, SileroVad, VadStream, VadWindow, rms_dbfs
from asr_server.config import Config
from asr_server.engines.batching import MicroBatcher
from asr_server.engines.ecapa import EcapaEmbedder, OnnxEcapaBackend
from asr_server.engines.runtime import ModelInfo
from asr_server.engines.sensevoice import SenseVoice
from asr_server.engines.speaker import SpeakerEmbedder
from asr_server.metrics import Metrics
from asr_server.results import Recognition, SpeakerMatch, Transcript
from asr_server.voiceprints import VoiceprintError, VoiceprintStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AsrRequest:
    audio: np.ndarray
    language: str
    use_itn: bool


class Pipeline:
    """Models plus their batchers; construct with `Pipeline.load(config)`."""

    def __init__(self, config: Config, vad: SileroVad, asr: SenseVoice,
                 speaker: SpeakerEmbedder | EcapaEmbedder | OnnxEcapaBackend | None, voiceprints: VoiceprintStore | None,
                 metrics: Metrics) -> None:
        self.config = config
        self.vad = vad
        self.asr = asr
        self.speaker = speaker
        self.voiceprints = voiceprints
        self.metrics = metrics
        on_batch = metrics.on_batch
        self._vad_batcher = MicroBatcher("vad", vad.run_batch, config.vad.max_batch, config.vad.max_wait_ms, on_batch)
        self._asr_batcher = MicroBatcher("asr", self._asr_batch, config.asr.max_batch, config.asr.max_wait_ms, on_batch)
        self._spk_batcher = (MicroBatcher("embedding", speaker.embed_batch, config.speaker.max_batch,
                                          config.speaker.max_wait_ms, on_batch) if speaker is not None else None)
        for b in (self._vad_batcher, self._asr_batcher, self._spk_batcher):
            if b is not None:
                metrics.queue_depths.add(b.name, lambda b=b: b.queue_depth)

    @classmethod
    def load(cls, config: Config, metrics: Metrics | None = None) -> "Pipeline":
        """Load every configured model and log the start-up report (file, provider, load time)."""
        eng = config.engine
        vad = SileroVad.load(config.vad.model)
        asr = SenseVoice.load(config.asr.model_dir, quantized=config.asr.quantized, device=eng.device,
                              threads=eng.threads, backend=eng.backend, precision=eng.precision)
        speaker = voiceprints = None
        if config.speaker.enabled and config.speaker.model_type == "ecapa":
            from asr_server.models import ecapa_dir

            speaker = EcapaEmbedder.load(ecapa_dir(config), device=eng.device, threads=eng.threads,
                                         backend=eng.backend, precision=eng.precision)
            voiceprints = VoiceprintStore(config.speaker.db, model="ecapa", dim=speaker.dim)
        elif config.speaker.enabled:
            speaker = SpeakerEmbedder.load(config.speaker.model, device=eng.device, threads=eng.threads,
                                           backend=eng.backend, precision=eng.precision)
            # Named after the ONNX file on both backends: the same weights give the same voiceprints.
            voiceprints = VoiceprintStore(config.speaker.db, model=Path(config.speaker.model).name, dim=speaker.dim)
        pipeline = cls(config, vad, asr, speaker, voiceprints, metrics or Metrics())
        for info in pipeline.models:
            log.info("model %s", info.describe())
        return pipeline

    @property
    def models(self) -> list[ModelInfo]:
        return [m.info for m in (self.vad, self.asr, self.speaker) if m is not None]

    # --- VAD -------------------------------------------------------------------------------

    async def vad_window(self, window: VadWindow) -> tuple[float, np.ndarray]:
        return await self._vad_batcher.submit(window)

    def _gated_windows(self, stream: VadStream, pcm: np.ndarray):
        """Each 512-sample chunk of `pcm` with its model input, or None below the energy gate
        (silence without a model call: cheap work first)."""
        gate = self.config.vad.energy_gate_dbfs
        for chunk in stream.push(pcm):
            window = stream.window(chunk)
            yield chunk, (None if rms_dbfs(chunk) < gate else window)

    async def vad_chunks(self, stream: VadStream, pcm: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Run a live stream's `pcm` through the shared VAD batcher: each chunk with its speech probability."""
        out = []
        for chunk, window in self._gated_windows(stream, pcm):
            if window is None:
                out.append((chunk, 0.0))
                continue
            prob, stream.state = await self.vad_window(window)
            out.append((chunk, prob))
        return out

    def vad_recording(self, audio: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """The same for a whole recording, blocking, straight on the model (call it in a worker thread).

        A recording offers one window at a time (each needs the state the last one left), so
        through the batcher it would pay `max_wait_ms` on every 32 ms window.
        """
        stream = VadStream()
        out = []
        for chunk, window in self._gated_windows(stream, audio):
            if window is None:
                out.append((chunk, 0.0))
                continue
            (prob, stream.state), = self.vad.run_batch([window])
            out.append((chunk, prob))
        return out

    # --- recognition -----------------------------------------------------------------------

    def _asr_batch(self, requests: list[AsrRequest]) -> list[Transcript]:
        return self.asr.transcribe_batch([r.audio for r in requests], [r.language for r in requests],
                                         [r.use_itn for r in requests])

    async def transcribe(self, audio: np.ndarray, language: str | None = None,
                         use_itn: bool | None = None) -> Transcript:
        cfg = self.config.asr
        req = AsrRequest(np.asarray(audio, dtype=np.float32), language or cfg.language,
                         cfg.use_itn if use_itn is None else use_itn)
        return await self._asr_batcher.submit(req)

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

    async def recognize(self, audio: np.ndarray, language: str | None = None, use_itn: bool | None = None,
                        identify: bool = True) -> Recognition:
        """Text, tags and speaker of one utterance; recognition and embedding run concurrently."""
        audio_ms = int(len(audio) * 1000 / SAMPLE_RATE)
        want_speaker = (identify and self._spk_batcher is not None
                        and audio_ms >= self.config.speaker.min_audio_ms)

        async def timed(coro):
            t0 = time.perf_counter()
            result = await coro
            return result, (time.perf_counter() - t0) * 1000

        asr_task = timed(self.transcribe(audio, language, use_itn))
        if want_speaker:
            (transcript, asr_ms), (embedding, embed_ms) = await asyncio.gather(
                asr_task, timed(self.embed(audio)))
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
