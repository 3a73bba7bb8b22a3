"""One device connection: protocol state, Opus decoder, speech stream, pending replies.

The server feeds each message in order; the session decodes, runs its `SpeechStream` through the
shared VAD batcher and, at each endpoint, starts recognition as a task of its own so the next
frames keep flowing. Replies leave in utterance order. Nothing here blocks the event loop: model
calls are awaited on the pipeline's batchers, which run them in worker threads.

Live audio goes through a `LiveFeed`, which catches up when the loop is busy; text messages wait
for the audio before them, so `listen stop` still ends the utterance after its last frame. The
latency clock starts when the speech was spoken (`InputClock`), not when its frames were read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ...audio.clock import InputClock
from ...audio.opus import OpusStreamDecoder
from ...audio.segmenter import Dropped, Event, Speculate, SpeechResumed, SpeechStarted, Utterance
from ...config import Config
from ...constants import SAMPLE_RATE, VAD_WINDOW, XIAOZHI
from ...core.live import SessionView
from ...core.pipeline import Pipeline, Recognizing
from ...core.recording import join_pieces
from ...core.scheduler import Priority
from ...errors import EngineBusy, EngineFailed, OpusDecodeError
from ...types import ClientInfo, Recognition, TranscriptEvent
from .live_feed import LiveFeed
from .upstream import Upstream
from .wire import Abort, AudioFrame, Hello, Listen, Other, error_message, parse_message, unpack_audio

log = logging.getLogger(__name__)

PROTOCOL = XIAOZHI

Send = Callable[[dict[str, Any]], Awaitable[None]]
Publish = Callable[[TranscriptEvent], None]


class Session:
    """State of one xiaozhi connection after `hello`."""

    def __init__(
        self,
        session_id: str,
        client: ClientInfo,
        config: Config,
        pipeline: Pipeline,
        send: Send,
        publish: Publish | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        self.session_id = session_id  # ours: the key of the server's sessions, its logs and events
        self.upstream = upstream  # relay mode: turns go to the chatbot server, its answers come back
        self.client = client
        self.config = config
        self.pipeline = pipeline
        self._send = send
        self._publish = publish
        self._metrics = pipeline.metrics
        self._decoder = OpusStreamDecoder()
        self._stream = pipeline.open_stream(phrases=True)
        self._clock = InputClock()
        self._live = LiveFeed(
            pipeline,
            self._stream,
            self._clock,
            self._on_segment_event,
            self._metrics.input_delay.labels(PROTOCOL).observe,
            session_id,
        )
        self.listening = False
        self.mode = "auto"
        self._manual: list[np.ndarray] = []
        self._manual_samples = 0
        self._manual_speech = False
        self._speculation: tuple[int, Recognizing] | None = None
        self._phrases: list[Recognizing] = []  # finished phrases of the utterance in progress
        self._replies: set[asyncio.Task[None]] = set()
        self._last_reply: asyncio.Task[None] | None = None
        self._corrupt_logged = False
        self.frames = 0
        self.utterances = 0
        self.last_active = 0.0  # loop time of the last message (the server's idle sweep reads it)
        self.idle_closed = False
        self.shed = False  # closed by the server because the recogniser stayed behind
        self.vad_meter = False  # the client's hello asked for `vad` messages (the browser console does)
        self.opened_at = time.time()
        self.last_text: str | None = None
        self.last_speaker: str | None = None
        self._observe_decode = self._metrics.stage.labels("decode").observe

    @property
    def device_session_id(self) -> str:
        """The session id the device knows: the upstream's when relayed (its hello gave it)."""
        return (self.upstream.session_id if self.upstream is not None else None) or self.session_id

    async def send_error(self, message: str) -> None:
        await self._send(error_message(message, self.device_session_id))

    def view(self, worker: int = 0) -> SessionView:
        """What the console's live view shows of this session."""
        speech = self._manual_speech if self.mode == "manual" else self._stream.in_speech
        return SessionView(
            session_id=self.session_id,
            protocol=PROTOCOL,
            device_id=self.client.device_id,
            client_id=self.client.client_id,
            version=self.client.protocol_version,
            mode=self.mode,
            state="idle" if not self.listening else "speech" if speech else "listening",
            frames=self.frames,
            utterances=self.utterances,
            last_text=self.last_text,
            speaker=self.last_speaker,
            opened_at=self.opened_at,
            remote=self.client.remote,
            worker=worker,
            upstream_session_id=self.upstream.session_id if self.upstream is not None else None,
        )

    async def _meter(self, probs: list[tuple[np.ndarray, float]]) -> None:
        """A `vad` message per frame, for a client that asked for one in its hello (the console's
        VAD meter): the frame's highest speech probability and whether the stream is in speech."""
        if probs:
            speech = self._manual_speech if self.mode == "manual" else self._stream.in_speech
            await self._send({"type": "vad", "prob": round(max(p for _, p in probs), 3), "speech": speech})

    # --- input ------------------------------------------------------------------------------

    async def on_text(self, text: str | bytes) -> None:
        msg = parse_message(text)
        await self._live.caught_up()  # the audio before this message first (listen stop ends after it)
        if self.upstream is not None and not isinstance(msg, Hello):
            # Relayed as it came (listen, abort, mcp, goodbye...): the upstream keeps the device's state too.
            await self.upstream.send(text if isinstance(text, str) else text.decode("utf-8", "replace"))
        if isinstance(msg, Listen):
            await self._on_listen(msg)
        elif isinstance(msg, Abort):
            log.info("session %s: abort (%s)", self.session_id, msg.reason or "no reason")
            self._abort()
        elif isinstance(msg, Hello):
            log.debug("session %s: repeated hello ignored", self.session_id)
        elif isinstance(msg, Other):
            log.debug("session %s: %s message ignored", self.session_id, msg.type)

    async def on_binary(self, data: bytes) -> float:
        """Take one binary frame; returns the seconds of audio it held (the server's rate limit)."""
        frame = unpack_audio(data, self.client.protocol_version)
        if not isinstance(frame, AudioFrame):  # protocol v2 carries JSON in binary frames too
            await self.on_text(frame)
            return 0.0
        t0 = time.perf_counter()
        try:
            pcm = self._decoder.decode(frame.payload)
        except OpusDecodeError as e:
            self._metrics.errors.labels("opus").inc()
            if not self._corrupt_logged:
                self._corrupt_logged = True
                log.warning(
                    "session %s (device %s): %s; dropping such frames", self.session_id, self.client.device_id, e
                )
                await self.send_error(f"{e}; frame dropped")
            return 0.0
        self._observe_decode(time.perf_counter() - t0)
        self.frames += 1
        seconds = len(pcm) / SAMPLE_RATE
        spoken = self._clock.note(t0, seconds)
        if not self.listening:
            return seconds  # wake-word audio before `listen start`: decoded to keep the decoder in step, then dropped
        if self.mode == "manual":
            await self._manual_audio(pcm)
            return seconds
        if self.upstream is not None and self.upstream.speaking and self.mode == "auto":
            return seconds  # auto mode takes no turn while the answer plays (the firmware's own rule)
        if self.vad_meter:
            probs = await self.pipeline.probabilities(self._stream, pcm)
            self._live.fed(spoken)
            for chunk, prob in probs:
                for event in self._stream.push(chunk, prob):
                    self._on_segment_event(event)
            await self._meter(probs)
            return seconds
        await self._live.push(pcm, spoken)
        return seconds

    def input_delay(self, now: float, within_s: float = 2.0) -> float | None:
        """How late this device's live audio reaches the VAD (`LiveFeed.input_delay`)."""
        return self._live.input_delay(now, within_s)

    @property
    def turn_in_flight(self) -> bool:
        """Waiting for a reply, speaking, or listening for its first: shedding it would cut its user off."""
        return bool(self._replies) or self.listening and (not self.utterances or self.view().state == "speech")

    async def _on_listen(self, msg: Listen) -> None:
        if msg.state == "start":
            mode = msg.mode or self.mode
            log.info("session %s: listen start (%s)", self.session_id, mode)
            if self.listening and self.mode == "manual":
                self._finish_manual()
            self.mode = mode
            self.listening = True
            self._reset_audio()
        elif msg.state == "stop":
            log.info("session %s: listen stop", self.session_id)
            if self.mode == "manual":
                self._finish_manual()
            else:
                event = self._stream.flush()
                if event is not None:
                    self._on_segment_event(event)
            self.listening = False
        else:  # detect: the wake word the device heard; it recognised it itself
            log.info("session %s: wake word detected: %r", self.session_id, msg.text)

    # --- auto / realtime: VAD endpointing ----------------------------------------------------

    def _on_segment_event(self, event: Event) -> None:
        if isinstance(event, SpeechStarted):
            if self.upstream is not None and self.upstream.speaking and self.mode == "realtime":
                self._queue_task(self.upstream.barge_in())  # the user talks over the answer: stop it
            return
        if isinstance(event, Speculate):
            self._cancel_speculation()
            if self.config.asr.speculative:
                # Queued behind every final and cancelled for free until it runs: it costs only idle time.
                # Its speech ended `tail_ms` of silence ago, the speculation's reason to be.
                speech_end = self._live.spoken - self._stream.options.tail_ms / 1000
                self._speculation = (
                    event.utterance_id,
                    self.pipeline.start_recognition(
                        event.audio, speculative=True, endpointed=True, speech_end=speech_end
                    ),
                )
        elif isinstance(event, SpeechResumed):
            spec = self._speculation
            if event.phrase and spec is not None and spec[0] == event.utterance_id:
                # The speculated piece is a finished phrase: keep it, ahead of other speculations.
                spec[1].promote(Priority.PARTIAL)
                self._phrases.append(spec[1])
                self._speculation = None
                self._metrics.speculations.labels("phrase").inc()
            else:
                self._cancel_speculation()
        elif isinstance(event, Utterance):
            endpoint = time.perf_counter()
            speech_end = self._live.spoken - self._silence_s(event)
            spec = self._speculation
            speculated = event.speculated and spec is not None and spec[0] == event.utterance_id
            if speculated:
                assert spec is not None
                recognizing = spec[1]
                self._speculation = None
                self._metrics.speculations.labels("used").inc()
            else:
                self._cancel_speculation()
                recognizing = self.pipeline.start_recognition(
                    event.last_piece if self._phrases else event.audio,
                    endpointed=event.reason == "silence",
                    speech_end=speech_end,
                )
            pieces, self._phrases = [*self._phrases, recognizing], []
            for piece in pieces:
                piece.promote()  # now someone waits for them
            self._queue_reply([p.task for p in pieces], endpoint, speculated, speech_end)
        elif isinstance(event, Dropped):
            self._cancel_speculation()
            self._cancel_phrases()
            log.debug(
                "session %s: utterance %d dropped (%.0f ms of speech)",
                self.session_id,
                event.utterance_id,
                event.speech_ms,
            )

    def _silence_s(self, event: Utterance) -> float:
        """How long before the end of the audio fed so far its speech ended: the stream audio after
        the utterance's last voiced window (devices stream in real time, so audio seconds are wall
        seconds)."""
        if event.reason != "silence":
            return 0.0
        after = self._stream.windows_fed * VAD_WINDOW - (event.start_sample + len(event.audio))
        return max(0.0, after / SAMPLE_RATE + self._stream.options.tail_ms / 1000)

    def _cancel_speculation(self) -> None:
        """Speech went on: the speculation is useless. Free if it has not run yet ("dropped"),
        aborted if it is running, its compute wasted ("discarded")."""
        if self._speculation is not None:
            recognizing = self._speculation[1]
            self._metrics.speculations.labels("discarded" if recognizing.started else "dropped").inc()
            recognizing.cancel()
            self._speculation = None

    def _cancel_phrases(self) -> None:
        for phrase in self._phrases:
            phrase.cancel()
        self._phrases = []

    # --- manual: push-to-talk ----------------------------------------------------------------

    async def _manual_audio(self, pcm: np.ndarray) -> None:
        self._manual.append(pcm)
        self._manual_samples += len(pcm)
        if not self._manual_speech or self.vad_meter:  # VAD until the first speech (or for the meter)
            probs = await self.pipeline.probabilities(self._stream, pcm)
            self._manual_speech = self._manual_speech or any(self._stream.is_voiced(prob) for _, prob in probs)
            if self.vad_meter:
                await self._meter(probs)
        if self._manual_samples >= self.config.vad.max_utterance_s * SAMPLE_RATE:
            self._finish_manual()

    def _finish_manual(self) -> None:
        audio = np.concatenate(self._manual) if self._manual else np.zeros(0, np.float32)
        had_speech = self._manual_speech
        self._manual, self._manual_samples, self._manual_speech = [], 0, False
        self._stream.reset()
        if had_speech and len(audio) * 1000 >= self.config.vad.min_speech_ms * SAMPLE_RATE:
            now = time.perf_counter()
            # The talk ended with its last frame, lag included (`listen stop` waited in the same socket).
            ended = now - self._clock.lag
            self._queue_reply([self.pipeline.start_recognition(audio, speech_end=ended).task], now, speech_end=ended)

    # --- replies ------------------------------------------------------------------------------

    def _queue_reply(
        self,
        pieces: list[asyncio.Task[Recognition]],
        endpoint: float,
        speculated: bool = False,
        speech_end: float | None = None,
    ) -> None:
        """`endpoint`: when the utterance was found over; `speech_end`: when its speech ended (the
        endpoint less the silence it waited for; the same in manual mode, where `listen stop` ends it)."""
        ended = endpoint if speech_end is None else speech_end
        self._last_reply = self._queue_task(self._reply(pieces, endpoint, ended, self._last_reply, speculated))

    def _queue_task(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)
        return task

    async def _reply(
        self,
        pieces: list[asyncio.Task[Recognition]],
        endpoint: float,
        speech_end: float,
        previous: asyncio.Task[None] | None,
        speculated: bool,
    ) -> None:
        """Send one utterance's `stt` (its phrases joined), after the previous utterance's."""
        try:
            try:
                rec = await _joined(pieces)
            except EngineBusy as e:
                self._metrics.errors.labels("busy").inc()
                self.pipeline.note_reply(None, age_ms=(time.perf_counter() - speech_end) * 1000)
                log.warning("session %s: utterance refused: %s", self.session_id, e)
                await self.send_error(f"utterance not recognised: {e}")
                return
            except EngineFailed as e:  # a remote replica died or timed out: this utterance only
                self._metrics.errors.labels("engine_failed").inc()
                log.warning("session %s: utterance lost: %s", self.session_id, e)
                await self.send_error(f"utterance not recognised: {e}")
                return
            except Exception as e:
                self._metrics.errors.labels("recognition").inc()
                log.error("session %s: recognition failed: %s", self.session_id, e)
                await self.send_error("recognition failed")
                return
            if previous is not None:
                await asyncio.shield(previous)  # keep replies in utterance order
            if rec.is_empty:
                log.debug("session %s: empty or no-speech utterance (%d ms), no reply", self.session_id, rec.audio_ms)
                return
            now = time.perf_counter()
            latency_ms, processing_ms = (now - speech_end) * 1000, (now - endpoint) * 1000
            if self.upstream is not None:
                # The upstream answers the turn and sends the device its own `stt` (one bubble, not two).
                speaker = rec.speaker.name if rec.speaker is not None and self.config.upstream.send_speaker else None
                await self.upstream.send_turn(rec.transcript.text, speaker, speech_end)
            else:
                await self._send(self._stt(rec, latency_ms, processing_ms, speculated, len(pieces) - 1))
            self.utterances += 1
            self.last_text = rec.transcript.text
            self.last_speaker = rec.speaker.name if rec.speaker is not None else None
            self._metrics.utterances.labels(PROTOCOL).inc()
            self._metrics.reply_latency.labels(PROTOCOL).observe(latency_ms / 1000)
            self.pipeline.note_reply(latency_ms)
            self._metrics.processing.labels(PROTOCOL).observe(processing_ms / 1000)
            log.info(
                "session %s: stt %r (%s, %d ms audio, %.0f ms after the end of speech, %.0f after the endpoint)",
                self.session_id,
                rec.transcript.text,
                rec.transcript.language,
                rec.audio_ms,
                latency_ms,
                processing_ms,
            )
            if self._publish is not None:
                self._publish(
                    TranscriptEvent.of(
                        rec,
                        protocol=PROTOCOL,
                        session_id=self.session_id,
                        device_id=self.client.device_id,
                        client_id=self.client.client_id,
                        latency_ms=latency_ms,
                        scope=self.client.scope,
                    )
                )
        except asyncio.CancelledError:
            pass

    def _stt(
        self, rec: Recognition, latency_ms: float, processing_ms: float, speculated: bool, phrases: int
    ) -> dict[str, Any]:
        return {
            "type": "stt",
            "text": rec.transcript.text,
            "session_id": self.session_id,
            "language": rec.transcript.language,
            "emotion": rec.transcript.emotion,
            "event": rec.transcript.event,
            "speaker": rec.speaker.as_dict() if rec.speaker is not None else None,
            "audio_ms": rec.audio_ms,
            "latency_ms": round(latency_ms, 1),  # from the end of speech
            "processing_ms": round(processing_ms, 1),  # from the endpoint decision (vad.min_silence_ms later)
            "timings": timings(rec, speculated, phrases),
        }

    # --- control ------------------------------------------------------------------------------

    def _reset_audio(self) -> None:
        self._cancel_speculation()
        self._cancel_phrases()
        self._clock.reset()
        self._live.clear()
        self._stream.reset()
        self._manual, self._manual_samples, self._manual_speech = [], 0, False

    def _abort(self) -> None:
        """Drop the utterance in progress and every reply not yet sent."""
        self._reset_audio()
        for task in list(self._replies):
            task.cancel()
        self._last_reply = None

    async def drain(self, timeout_s: float) -> int:
        """Shutdown: take no more audio, send the replies of utterances already ended (within
        `timeout_s`); returns how many were still pending when it began."""
        self.listening = False
        await self._live.drain(timeout_s)
        pending = [t for t in self._replies if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        return len(pending)

    async def close(self) -> None:
        """The connection is gone: cancel pending work so nothing outlives the session."""
        await self._live.close()
        self._abort()
        if self._replies:
            await asyncio.gather(*self._replies, return_exceptions=True)


def timings(rec: Recognition, speculated: bool, phrases: int) -> dict[str, Any]:
    """Where the utterance's time went (milliseconds): the wait for each engine and its compute (of
    the last piece, when it came in phrases), whether a speculation started before the endpoint
    supplied the result, and how many phrases were recognised before the last piece. Load tests read it."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {
        "asr_queue_ms": ms(rec.asr_queue_ms),
        "asr_ms": ms(rec.asr_compute_ms),
        "embed_queue_ms": ms(rec.embed_queue_ms),
        "embed_ms": ms(rec.embed_compute_ms),
        "speculated": speculated,
        "phrases": phrases,
    }


async def _joined(pieces: list[asyncio.Task[Recognition]]) -> Recognition:
    """The pieces of one utterance as one recognition; if one fails (or the wait is cancelled), the
    others are cancelled too: none of them is needed any more."""
    try:
        return join_pieces(list(await asyncio.gather(*pieces)))
    except BaseException:
        for piece in pieces:
            piece.cancel()
        raise
