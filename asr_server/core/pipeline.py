"""The shared engines behind every protocol adapter: VAD, recognition, speaker embedding.

One `Pipeline` per server process. It owns the models, the VAD batcher every live stream feeds,
and one scheduler per recognition model, so the device path, the FunASR-compatible socket and the
HTTP API all share the same calls and the same order (finals before speculations). It hands out
the `SpeechStream`s adapters stream audio into. Adapters never touch a model directly: they await
`feed`/`probabilities` and `recognize`, or hold a `Recognizing` they can promote or cancel.
Its `governor` (`core.governor`) says whether the recogniser can take one more connection.
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
from ..engines.base import Embedder, ModelInfo, Recognizer, RemoteEmbedder, RemoteRecognizer, VadModel
from ..errors import ConfigError, EngineBusy, HotwordError, VoiceprintError
from ..types import Hotword, Recognition, SpeakerMatch, Transcript
from .corrections import Corrections
from .governor import Governor
from .hotwords import HotwordSources, HotwordStore
from .loading import load_recognizer, load_speaker
from .metrics import Metrics
from .scheduler import InferenceQueue, Job, Priority
from .sizing import asr_parallel, asr_threads, batch_size
from .streaming import SpeechStream, segmenter_options
from .vad_batching import VadBatcher
from .voiceprints import VoiceprintStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AsrRequest:
    audio: np.ndarray
    language: str
    use_itn: bool
    hotwords: tuple[Hotword, ...] = ()  # every source's, merged, with weights (none: greedy decoding)


@dataclass(eq=False)
class Recognizing:
    """A recognition in flight: await `task`; `promote` makes a speculation final; `cancel` drops it
    (free while it waits, aborted while it runs)."""

    task: asyncio.Task[Recognition]
    jobs: list[Job]

    def promote(self, priority: Priority = Priority.FINAL) -> None:
        for job in self.jobs:
            job.promote(priority)

    def cancel(self) -> None:
        self.task.cancel()

    @property
    def started(self) -> bool:
        """Some of its compute began (cancelling it now wastes that compute)."""
        return any(j.started for j in self.jobs)


def voiceprint_model_id(config: Config) -> str:
    """What voiceprints are keyed by: the same weights give the same voiceprints on either runtime,
    so CAM++ is named after its ONNX file and ECAPA is `ecapa`."""
    return "ecapa" if config.speaker.model_type == "ecapa" else Path(config.speaker.model).name


class Pipeline:
    """Models plus their schedulers; construct with `Pipeline.load(config)`."""

    def __init__(
        self,
        config: Config,
        vad: VadModel,
        asr: Recognizer | RemoteRecognizer,
        speaker: Embedder | RemoteEmbedder | None,
        voiceprints: VoiceprintStore | None,
        metrics: Metrics,
        hotword_store: HotwordStore | None = None,
    ) -> None:
        self.config = config
        try:
            self.hotwords = HotwordSources(config.asr.hotwords, config.asr.hotword_weight, hotword_store)
            self.corrections = Corrections(config.asr.corrections)
        except HotwordError as e:
            raise ConfigError(str(e)) from None
        self.vad = vad
        self.asr = asr
        self.speaker = speaker
        self.voiceprints = voiceprints
        self.metrics = metrics
        self._vad = VadBatcher(
            vad,
            max_batch=config.vad.max_batch,
            max_wait_ms=config.vad.max_wait_ms,
            max_queue=config.vad.max_queue,
            on_batch=metrics.on_batch,
        )
        remote = isinstance(asr, RemoteRecognizer)
        self._asr: InferenceQueue[AsrRequest, Transcript] = self._queue(
            "asr",
            self._asr_remote if remote else self._asr_batch,
            "asr",
            abort=getattr(asr, "abort", None),
            parallel=asr_parallel(config),
            deadline_s=config.asr.deadline_ms / 1000 if config.asr.deadline_ms else None,
        )
        self._spk: InferenceQueue[np.ndarray, np.ndarray] | None = (
            self._queue(
                "embedding",
                self._embed_remote if remote else self._embed_batch,
                "speaker",
                parallel=config.inference.max_in_flight if remote else 1,
                nice=EMBEDDER_NICE,
            )
            if speaker is not None
            else None
        )
        self.governor = Governor(config.asr.budget_ms, config.vad.min_silence_ms, self._asr)
        self._segmenter_options = segmenter_options(config.vad)
        self._phrase_options = segmenter_options(config.vad, phrases=True)
        metrics.queue_depths.add("vad", self._vad.depth)
        metrics.queue_depths.add("asr", self._asr.depth)
        if self._spk is not None:
            metrics.queue_depths.add("embedding", self._spk.depth)

    def _queue(
        self,
        name: str,
        fn: Callable[[Sequence[Any]], Any],
        section: str,
        abort: Callable[[int | None], None] | None = None,
        parallel: int = 1,
        deadline_s: float | None = None,
        nice: int = 0,
    ) -> InferenceQueue:
        """A scheduler with the batch size, wait and queue limit of its config section."""
        cfg = getattr(self.config, section)
        return InferenceQueue(
            name,
            fn,
            max_batch=batch_size(self.config, cfg.max_batch),
            max_wait_ms=cfg.max_wait_ms,
            max_queue=cfg.max_queue,
            limit_key=f"{section}.max_queue",
            parallel=parallel,
            deadline_s=deadline_s,
            abort=abort,
            on_batch=self.metrics.on_batch,
            on_wait=self.metrics.on_wait,
            on_discard=self.metrics.on_discard,
            on_shed=self.metrics.on_shed,
            nice=nice,
        )

    @classmethod
    def load(cls, config: Config, metrics: Metrics | None = None) -> Pipeline:
        """Load every configured model and log the start-up report (file, provider, load time).
        With `inference.mode: ray` the recogniser and the embedder are handles to their Ray Serve
        deployments (deployed here unless `inference.deploy` is false); VAD stays in this process."""
        from ..engines.vad import SileroVad

        vad = SileroVad.load(config.vad.model)
        asr: Recognizer | RemoteRecognizer
        speaker: Embedder | RemoteEmbedder | None
        if config.inference.mode == "ray":
            from .ray_serve import connect  # imports ray: only a server in ray mode pays for it

            asr, speaker = connect(config)
        else:
            asr, speaker = load_recognizer(config, asr_threads(config)), load_speaker(config)
        voiceprints = None
        if speaker is not None:
            voiceprints = VoiceprintStore(config.speaker.db, model=voiceprint_model_id(config), dim=speaker.dim)
        pipeline = cls(config, vad, asr, speaker, voiceprints, metrics or Metrics(), HotwordStore(config.speaker.db))
        for info in pipeline.models:
            log.info("model %s", info.describe())
        return pipeline

    @property
    def models(self) -> list[ModelInfo]:
        return [m.info for m in (self.vad, self.asr, self.speaker) if m is not None]

    # --- VAD -------------------------------------------------------------------------------

    def open_stream(self, phrases: bool = False) -> SpeechStream:
        """A new stream with the configured energy gate, VAD framing and segmenter; with `phrases`,
        long utterances come in phrases (`vad.phrase_pause_ms`) for a consumer that joins them."""
        options = self._phrase_options if phrases else self._segmenter_options
        return SpeechStream(options, self.config.vad.energy_gate_dbfs)

    async def probabilities(self, stream: SpeechStream, pcm: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Each complete window of `pcm` with its speech probability, through the shared VAD batcher."""
        return await self._vad.probabilities(stream, pcm)

    async def feed(self, stream: SpeechStream, pcm: np.ndarray) -> list[Event]:
        """Live audio into `stream`: the segmenter events it causes, in order."""
        events: list[Event] = []
        for chunk, prob in await self._vad.probabilities(stream, pcm):
            events.extend(stream.push(chunk, prob))
        return events

    def segment_recording(self, audio: np.ndarray) -> list[Event]:
        """A whole recording through a fresh stream, blocking, straight on the model (call it in a
        worker thread), ending with the flush of the utterance in progress.

        A recording offers one window at a time (each needs the state the last one left), so
        through the batcher it would wait a tick on every 32 ms window.
        """
        stream = self.open_stream()
        events: list[Event] = []
        for w in stream.windows(audio):
            prob = 0.0
            if w.samples is not None:
                probs, state = self.vad.run(w.samples[None], stream.vad.state[:, None, :])
                stream.advance(np.ascontiguousarray(state[:, 0, :]))
                prob = float(probs[0])
            events.extend(stream.push(w.chunk, prob))
        last = stream.flush()
        if last is not None:
            events.append(last)
        return events

    # --- recognition -----------------------------------------------------------------------

    def _asr_batch(self, requests: Sequence[AsrRequest]) -> list[Transcript]:
        assert not isinstance(self.asr, RemoteRecognizer)
        return self.asr.transcribe_batch(*_columns(requests))

    def _embed_batch(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        assert self.speaker is not None and not isinstance(self.speaker, RemoteEmbedder)
        return list(self.speaker.embed_batch(audios))

    async def _asr_remote(self, requests: Sequence[AsrRequest]) -> list[Transcript]:
        assert isinstance(self.asr, RemoteRecognizer)
        return await self.asr.transcribe_batch_async(*_columns(requests))

    async def _embed_remote(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        assert isinstance(self.speaker, RemoteEmbedder)
        return list(await self.speaker.embed_batch_async(audios))

    async def warm_up(self) -> None:
        """Run the recogniser and the embedder once on `WARM_UP_S` of quiet noise before the first
        client: the first call of a session allocates what later ones reuse (slow), and the second
        one, through the queues, is what the governor and the speaker wait know an utterance to
        cost before a wave of devices shows it (`Governor.admit`, `InferenceQueue.eta`)."""
        audio = np.random.default_rng(0).normal(0.0, 0.01, int(WARM_UP_S * SAMPLE_RATE)).astype(np.float32)
        for _ in range(2):
            await self.transcribe(audio, priority=Priority.SPECULATION)
            if self._spk is not None:
                await self._spk.run(audio, Priority.SPECULATION, len(audio))

    async def transcribe(
        self,
        audio: np.ndarray,
        language: str | None = None,
        use_itn: bool | None = None,
        priority: Priority = Priority.FINAL,
        hotwords: tuple[Hotword, ...] = (),
        device_id: str | None = None,
    ) -> Transcript:
        """Text only (a FunASR partial, a health probe): biased like a final, not corrected."""
        request = self._asr_request(audio, language, use_itn, hotwords=self.hotwords.of(device_id, hotwords))
        return (await self._asr.run(request, priority, len(audio)))[0]

    def _asr_request(
        self,
        audio: np.ndarray,
        language: str | None,
        use_itn: bool | None,
        endpointed: bool = False,
        hotwords: tuple[Hotword, ...] = (),
    ) -> AsrRequest:
        """The recogniser's request. An utterance the VAD cut (`endpointed`) ends `vad.tail_ms` after
        its last voiced window; the model needs more trailing context than that to emit its last
        token, so `vad.trailing_pad_ms` of silence is added (the speech itself is not touched)."""
        cfg = self.config.asr
        audio = np.asarray(audio, dtype=np.float32)
        pad = int(self.config.vad.trailing_pad_ms * SAMPLE_RATE / 1000) if endpointed else 0
        if pad:
            audio = np.concatenate([audio, np.zeros(pad, np.float32)])
        return AsrRequest(audio, language or cfg.language, cfg.use_itn if use_itn is None else use_itn, hotwords)

    async def embed(self, audio: np.ndarray) -> np.ndarray:
        if self._spk is None:
            raise RuntimeError("speaker embedding is disabled (speaker.enabled: false)")
        return (await self._spk.run(np.asarray(audio, dtype=np.float32), Priority.FINAL, len(audio)))[0]

    @property
    def asr_max_batch(self) -> int:
        """Utterances the recogniser takes per call (the configured or automatic batch size)."""
        return self._asr.max_batch

    def recogniser_load(self) -> float:
        """The share of the recogniser's lanes the last seconds' work took, what waits included
        (`core.utilisation`): it grows with the devices before any reply is late."""
        return self._asr.load()

    def note_reply(self, latency_ms: float | None, age_ms: float | None = None) -> None:
        """A device utterance was answered `latency_ms` after its end of speech (None: shed
        unanswered, `age_ms` after it ended): the governor's lateness signal."""
        self.governor.note_reply(latency_ms, age_ms)

    def identify(self, embedding: np.ndarray) -> SpeakerMatch | None:
        """The enrolled speaker of `embedding`, or None; a degenerate embedding (silence) is an unknown speaker."""
        if self.voiceprints is None:
            return None
        try:
            return self.voiceprints.identify(embedding, self.config.speaker.threshold)
        except VoiceprintError as e:
            log.debug("speaker not identified: %s", e)
            return None

    def _wants_speaker(self, audio_ms: int, identify: bool) -> bool:
        """Embed only where a speaker can be identified: a voiceprint is enrolled, and the utterance
        is long enough to embed (an empty store makes every embedding wasted compute)."""
        return (
            identify
            and self._spk is not None
            and audio_ms >= self.config.speaker.min_audio_ms
            and self.voiceprints is not None
            and self.voiceprints.count() > 0
        )

    def start_recognition(
        self,
        audio: np.ndarray,
        language: str | None = None,
        use_itn: bool | None = None,
        identify: bool = True,
        speculative: bool = False,
        endpointed: bool = False,
        speech_end: float | None = None,
        hotwords: tuple[Hotword, ...] = (),
        device_id: str | None = None,
    ) -> Recognizing:
        """Queue one utterance for text and speaker (both at once) and return the handle that awaits
        them. `endpointed`: the VAD cut it (it gets `vad.trailing_pad_ms` of trailing context);
        `speech_end`: when its speech ended (`time.perf_counter`), for a live stream whose reply
        keeps `asr.budget_ms`: the speaker is not waited for past it. The text is decoded with the
        config's, `device_id`'s and the request's `hotwords`, and corrected (`asr.corrections`)."""
        audio = np.asarray(audio, dtype=np.float32)
        audio_ms = int(len(audio) * 1000 / SAMPLE_RATE)
        priority = Priority.SPECULATION if speculative else Priority.FINAL
        request = self._asr_request(audio, language, use_itn, endpointed, self.hotwords.of(device_id, hotwords))
        asr_job = self._asr.submit(request, priority, len(request.audio))
        jobs: list[Job] = [asr_job]
        spk_job = None
        if self._wants_speaker(audio_ms, identify):
            assert self._spk is not None
            try:
                spk_job = self._spk.submit(audio, priority, len(audio))
                jobs.append(spk_job)
            except EngineBusy as e:  # its queue is full: answer without a speaker
                self._speaker_skipped(e)
        started = time.perf_counter()

        async def finish() -> Recognition:
            try:
                transcript = await asr_job.future
                embedding = None if spk_job is None else await self._embedding(spk_job, speech_end)
            except asyncio.CancelledError:
                for job in jobs:
                    job.future.cancel()
                raise
            asr_t = asr_job.timing
            spk_t = spk_job.timing if spk_job is not None else None
            return Recognition(
                self.corrections.apply(transcript),
                self.identify(embedding) if embedding is not None else None,
                audio_ms,
                asr_ms=(time.perf_counter() - started) * 1000 if asr_t is None else asr_t.queue_ms + asr_t.compute_ms,
                embed_ms=None if spk_t is None else spk_t.queue_ms + spk_t.compute_ms,
                asr_queue_ms=asr_t.queue_ms if asr_t else None,
                asr_compute_ms=asr_t.compute_ms if asr_t else None,
                embed_queue_ms=spk_t.queue_ms if spk_t else None,
                embed_compute_ms=spk_t.compute_ms if spk_t else None,
            )

        return Recognizing(asyncio.get_running_loop().create_task(finish()), jobs)

    async def _embedding(self, job: Job[np.ndarray, np.ndarray], speech_end: float | None) -> np.ndarray | None:
        """The utterance's embedding, or None once `speaker.deadline_ms` has passed since it was queued
        or, for a live stream, once waiting longer would answer it later than `asr.budget_ms` after
        its `speech_end` (the text is ready: a speaker that would make the reply late is dropped,
        not waited for), or when the embedder failed or refused it. The text never fails because of
        the speaker. The deadline is the waiter's, not the queue's: enrolment and identification
        (`embed`) wait. When the text is ready and the embedder's queue already says the embedding
        would come past that point (`InferenceQueue.eta`), it is given up at once instead of waited
        for: the reply goes out with its text, and the embedder's time goes to the others."""
        limit = self.config.speaker.deadline_ms / 1000
        try:
            if not limit or job.future.done():
                return await job.future
            deadline, why = job.submitted + limit, f"speaker.deadline_ms = {self.config.speaker.deadline_ms:g}"
            budget = self.config.asr.budget_ms / 1000
            if speech_end is not None and budget and speech_end + budget - _REPLY_MARGIN_S < deadline:
                deadline, why = speech_end + budget - _REPLY_MARGIN_S, f"asr.budget_ms = {self.config.asr.budget_ms:g}"
            assert self._spk is not None
            eta = self._spk.eta(job)
            if eta is not None and time.perf_counter() + eta > deadline:
                # The text is ready and the embedder's queue says the speaker comes too late: answer
                # now, and give its compute to the embeddings that can still be used.
                raise TimeoutError
            return await asyncio.wait_for(asyncio.shield(job.future), max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            job.future.cancel()  # a waiting job leaves the queue unrun; a running one's result is discarded
            self._speaker_skipped(f"no embedding within {why}")
        except EngineBusy as e:  # the remote embedder's back-pressure
            self._speaker_skipped(e)
        except Exception as e:
            log.warning("speaker embedding failed, answering without a speaker: %s", e)
        return None

    def _speaker_skipped(self, why: object) -> None:
        """An utterance answered without its speaker because the embedder is behind (`asr_shed{engine="embedding"}`)."""
        self.metrics.on_shed("embedding")
        log.debug("speaker not identified: %s", why)

    async def recognize(
        self,
        audio: np.ndarray,
        language: str | None = None,
        use_itn: bool | None = None,
        identify: bool = True,
        endpointed: bool = False,
        hotwords: tuple[Hotword, ...] = (),
        device_id: str | None = None,
    ) -> Recognition:
        """Text, tags and speaker of one utterance, as a final (a caller waits for it)."""
        r = self.start_recognition(
            audio, language, use_itn, identify, endpointed=endpointed, hotwords=hotwords, device_id=device_id
        )
        try:
            return await r.task
        except asyncio.CancelledError:
            r.cancel()
            raise

    async def close(self) -> None:
        await self._vad.close()
        await self._asr.close()
        if self._spk is not None:
            await self._spk.close()
        if self.voiceprints is not None:
            self.voiceprints.close()
        self.hotwords.close()
        for remote in (self.asr, self.speaker):
            if isinstance(remote, RemoteRecognizer | RemoteEmbedder):
                await asyncio.to_thread(remote.close)


EMBEDDER_NICE = 10
"""The embedder's thread runs this much nicer than the process: where it and the recogniser's lanes want the same
cores, the text (the budget) goes first and the speaker (optional: given up when late) waits.
At 3x the sustainable wake rate with full-size models it took the late turns from 5 to 0 and the
served wake-ups from 90-93 to 105 of ~156, with a speaker on 79-83 % of the replies against 95 %
(BENCHMARKS.md, "Devices not heard yet")."""

WARM_UP_S = 4.0
"""The warm-up utterance's length: a typical command to a voice device."""

_REPLY_MARGIN_S = 0.2
"""How long before `asr.budget_ms` (after the server's end of speech) a reply stops waiting for its
speaker. The VAD's end of speech trails the voice: on the shared clips the server's latency reads
5-167 ms less than the device's, which hears the speech end where the clip's energy does (group
wake of 150, BENCHMARKS.md); and the reply still has to be joined, identified and sent. At 50 ms
the replies that waited out the speaker reached the device at 810-990 ms."""


def _columns(requests: Sequence[AsrRequest]) -> tuple[list, list, list, list | None]:
    """A batch of requests as the recogniser's argument lists: audio, language, ITN, hotwords (None
    where no request has any: the recogniser's plain greedy call)."""
    hotwords = [r.hotwords for r in requests]
    audio, language, itn = [r.audio for r in requests], [r.language for r in requests], [r.use_itn for r in requests]
    return audio, language, itn, hotwords if any(hotwords) else None
