"""One live stream's turns: speech → utterance → recognition → reply, in utterance order.

A `Turn` is fed the segmenter's events (through its `LiveFeed`, or by a caller that feeds the
stream itself) and answers each utterance with an `Ended`: its recognition in flight and when its
speech ended. It owns what every live front end needs the same way:

- speculation: recognise when silence begins (`Speculate`), queued behind every final so it
  costs only idle time; voided if speech resumes, used at the endpoint if not (`asr.speculative`);
- phrases: with `phrases`, a long utterance comes in pieces at its pauses, each recognised as it
  ends and joined into one recognition at the utterance's end;
- promotion: a speculation or phrase that someone now waits for runs as a final;
- push-to-talk: audio held until the client says the talk is over (`hold`, `release`);
- partials: with `on_partial`, the utterance in progress is recognised again every
  `partial_interval_ms` of its audio (`start_partial`), below every final, and its text so far
  handed over; an utterance that ends cancels its partial;
- reply order: `heard()` yields each utterance's outcome in utterance order, whatever order the
  recogniser finishes them in.

The latency clock starts when the speech ended: the live audio's spoken time (`InputClock`) less
the silence the segmenter waited for before it decided. Front ends only translate: the xiaozhi
session sends an `stt` (or relays a turn) per `Heard`; the FunASR session awaits each `Ended`
itself, since its protocol answers between the client's messages, and sends partials as deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from ..audio.clock import InputClock
from ..audio.ogg_opus import OpusPacket, PacketLog
from ..audio.segmenter import Dropped, Event, Speculate, SpeechResumed, SpeechStarted, Utterance
from ..constants import SAMPLE_RATE, VAD_WINDOW, VAD_WINDOW_MS
from ..types import Hotword, Recognition
from .live_feed import LiveFeed
from .pipeline import Pipeline, Recognizing
from .recording import join_pieces
from .scheduler import Priority

log = logging.getLogger(__name__)

Meter = Callable[[float, bool], Awaitable[None]]
"""Told, per frame of a client that asked, the frame's highest speech probability and whether
the stream is in speech (the console's VAD meter)."""
OnPartial = Callable[[int, str], Awaitable[None]]
"""Told the text so far of the utterance in progress (its `utterance_id`, counted from 1)."""


@dataclass(slots=True)
class Ended:
    """An utterance found over: its recognition in flight (in phrases, joined at the end)."""

    pieces: list[Recognizing]
    endpoint: float
    """When the utterance was found over (`time.perf_counter`)."""
    speech_end: float | None
    """When its speech ended: the endpoint less the silence waited for (the same in push-to-talk,
    where the client ends it); None where the audio is not live (a file sent faster than spoken)."""
    speculated: bool
    """A speculation, started before the endpoint, supplied the result."""
    utterance: Utterance | None = None
    """The segmenter's event (None for push-to-talk)."""
    opus: list[OpusPacket] | None = None
    """The client's Opus packets that carried it, where the turn keeps a `PacketLog` (the archive)."""

    @property
    def phrases(self) -> int:
        """Phrases recognised before the last piece."""
        return len(self.pieces) - 1

    async def recognition(self) -> Recognition:
        """The pieces as one recognition; if one fails (or the wait is cancelled), the others are
        cancelled too: none of them is needed any more."""
        try:
            return join_pieces(list(await asyncio.gather(*(p.task for p in self.pieces))))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for piece in self.pieces:
            piece.cancel()


@dataclass(slots=True)
class _Live:
    """The utterance in progress, for its partials: the stream position of the last one started,
    and the one in flight."""

    utterance_id: int
    last_window: int
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class Heard:
    """One utterance's outcome, as `Turn.heard` yields them: its recognition or why there is none."""

    ended: Ended
    recognition: Recognition | None
    error: BaseException | None = None


class Turn:
    """The turns of one live stream: its `SpeechStream`, its speculation and phrases, its replies."""

    def __init__(
        self,
        pipeline: Pipeline,
        name: str,
        *,
        phrases: bool = False,
        observe_delay: Callable[[float], None] = lambda _: None,
        meter: Meter | None = None,
        on_speech: Callable[[], None] | None = None,
        packets: PacketLog | None = None,
        on_partial: OnPartial | None = None,
        partial_interval_ms: float = 600.0,
    ) -> None:
        self.pipeline = pipeline
        self.name = name  # for log lines: the session id
        self.stream = pipeline.open_stream(phrases=phrases)
        self.clock = InputClock()
        self._meter = meter
        self._on_speech = on_speech  # told when speech starts (a relay's barge-in)
        # The client's packets by sample position, logged by its session as it pushes or holds their audio.
        self.packets = packets
        self.feed = LiveFeed(
            pipeline, self.stream, self.clock, self.take, observe_delay, name, self._probs if meter else None
        )
        self.language: str | None = None  # what recognition is asked for (None: detected, the config's ITN)
        self.itn: bool | None = None
        self.hotwords: tuple[Hotword, ...] = ()  # the request's own (FunASR's `hotwords`), beside the config's
        self.device_id: str | None = None  # whose hotword list (HTTP API) applies, read per utterance
        self._speculation: tuple[int, Recognizing] | None = None
        self._phrases: list[Recognizing] = []  # finished phrases of the utterance in progress
        self._held: list[np.ndarray] = []  # push-to-talk audio since `listen start`
        self._held_samples = 0
        self._held_speech = False
        self._ended: deque[Ended] = deque()  # utterances not yet replied to, oldest first
        self._more = asyncio.Event()
        self._none_owed = asyncio.Event()
        self._none_owed.set()
        self._speculations = pipeline.metrics.speculations
        self._on_partial = on_partial
        self._partial_windows = partial_interval_ms / VAD_WINDOW_MS
        self._live: _Live | None = None  # the utterance in progress, where partials are asked for

    @property
    def in_speech(self) -> bool:
        """The VAD hears speech now (push-to-talk: it heard some since the talk began)."""
        return self._held_speech if self._held else self.stream.in_speech

    # --- live audio ---------------------------------------------------------------------------

    def stop(self) -> None:
        """The client ends the stream (`listen stop`): speech still running is an utterance."""
        event = self.stream.flush()
        if event is not None:
            self.take(event)

    def take(self, event: Event) -> None:
        """An event of the live stream: its utterance is queued for `heard`, in order."""
        ended = self.on_event(event)
        if ended is not None:
            self._owe(ended)
        elif isinstance(event, SpeechStarted) and self._on_speech is not None:
            self._on_speech()

    async def _probs(self, probs: list[tuple[np.ndarray, float]]) -> None:
        if probs and self._meter is not None:
            await self._meter(max(p for _, p in probs), self.in_speech)

    # --- segmenter events ---------------------------------------------------------------------

    def on_event(self, event: Event) -> Ended | None:
        """One segmenter event; an `Utterance` gives its `Ended` (its recognitions promoted: now
        someone waits for them)."""
        if isinstance(event, SpeechStarted):
            if self._on_partial is not None:
                self._live = _Live(event.utterance_id, self.stream.windows_fed)
        elif isinstance(event, Speculate):
            self._cancel_speculation()
            if self.pipeline.config.asr.speculative:
                # Its speech ended `tail_ms` of silence ago, the speculation's reason to be.
                spoken = self.feed.spoken
                speech_end = None if spoken is None else spoken - self.stream.options.tail_ms / 1000
                self._speculation = (event.utterance_id, self._recognize(event.audio, True, True, speech_end))
        elif isinstance(event, SpeechResumed):
            spec = self._speculation
            if event.phrase and spec is not None and spec[0] == event.utterance_id:
                # The speculated piece is a finished phrase: keep it, ahead of other speculations.
                spec[1].promote(Priority.PARTIAL)
                self._phrases.append(spec[1])
                self._speculation = None
                self._speculations.labels("phrase").inc()
            else:
                self._cancel_speculation()
        elif isinstance(event, Utterance):
            self._end_live()
            return self._utterance(event)
        elif isinstance(event, Dropped):
            self._end_live()
            self._cancel_speculation()
            self._cancel_phrases()
        return None

    def _utterance(self, event: Utterance) -> Ended:
        endpoint = time.perf_counter()
        spoken = self.feed.spoken
        speech_end = None if spoken is None else spoken - self._silence_s(event)
        spec = self._speculation
        speculated = event.speculated and spec is not None and spec[0] == event.utterance_id
        if speculated:
            assert spec is not None
            recognizing = spec[1]
            self._speculation = None
            self._speculations.labels("used").inc()
        else:
            self._cancel_speculation()
            audio = event.last_piece if self._phrases else event.audio
            recognizing = self._recognize(audio, False, event.reason == "silence", speech_end)
        pieces, self._phrases = [*self._phrases, recognizing], []
        for piece in pieces:
            piece.promote()
        opus = self._opus(event.start_sample, event.start_sample + len(event.audio))
        return Ended(pieces, endpoint, speech_end, speculated, event, opus)

    def _opus(self, start: int, end: int) -> list[OpusPacket] | None:
        return None if self.packets is None else self.packets.between(start, end)

    def _recognize(
        self, audio: np.ndarray, speculative: bool, endpointed: bool, speech_end: float | None
    ) -> Recognizing:
        recognizing = self.pipeline.start_recognition(
            audio,
            self.language,
            self.itn,
            speculative=speculative,
            endpointed=endpointed,
            speech_end=speech_end,
            hotwords=self.hotwords,
            device_id=self.device_id,
        )
        # Its failure is the awaiter's to report; one nobody awaits any more (voided) is dropped quietly.
        recognizing.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return recognizing

    def _silence_s(self, event: Utterance) -> float:
        """How long before the end of the audio fed so far its speech ended: the stream audio after
        the utterance's last voiced window (live audio comes in real time: audio seconds are wall
        seconds)."""
        if event.reason != "silence":
            return 0.0
        after = self.stream.windows_fed * VAD_WINDOW - (event.start_sample + len(event.audio))
        return max(0.0, after / SAMPLE_RATE + self.stream.options.tail_ms / 1000)

    def _cancel_speculation(self) -> None:
        """Speech went on: the speculation is useless. Free if it has not run yet ("dropped"),
        aborted if it is running, its compute wasted ("discarded")."""
        if self._speculation is not None:
            recognizing = self._speculation[1]
            self._speculations.labels("discarded" if recognizing.started else "dropped").inc()
            recognizing.cancel()
            self._speculation = None

    def _cancel_phrases(self) -> None:
        for phrase in self._phrases:
            phrase.cancel()
        self._phrases = []

    # --- partials -----------------------------------------------------------------------------

    def start_partial(self) -> None:
        """After audio is fed: recognise the utterance so far if `partial_interval_ms` of it came
        since the last partial and that one is over."""
        live = self._live
        if live is None or (live.task is not None and not live.task.done()):
            return
        fed = self.stream.windows_fed
        if fed - live.last_window < self._partial_windows:
            return
        live.last_window = fed
        live.task = asyncio.create_task(self._partial(live, self.stream.audio_so_far()))
        live.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (`on_partial` reports its own)

    async def _partial(self, live: _Live, audio: np.ndarray) -> None:
        try:
            t0 = time.perf_counter()
            transcript = await self.pipeline.transcribe(
                audio, self.language, self.itn, Priority.PARTIAL, hotwords=self.hotwords, device_id=self.device_id
            )
            self.pipeline.metrics.stage.labels("partial").observe(time.perf_counter() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s: partial decode failed", self.name, exc_info=True)
            return
        if self._live is live and self._on_partial is not None and transcript.language != "nospeech":
            await self._on_partial(live.utterance_id, transcript.text)

    def _end_live(self) -> None:
        if self._live is not None and self._live.task is not None:
            self._live.task.cancel()
        self._live = None

    # --- push-to-talk -------------------------------------------------------------------------

    async def hold(self, pcm: np.ndarray) -> None:
        """Push-to-talk audio: kept whole until `release`; through the VAD until it heard speech
        (or for the meter); past `vad.max_utterance_s` released as it is."""
        self._held.append(pcm)
        self._held_samples += len(pcm)
        if not self._held_speech or self._meter is not None:
            probs = await self.pipeline.probabilities(self.stream, pcm)
            self._held_speech = self._held_speech or any(self.stream.is_voiced(prob) for _, prob in probs)
            await self._probs(probs)
        if self._held_samples >= self.pipeline.config.vad.max_utterance_s * SAMPLE_RATE:
            self.release()

    def release(self) -> None:
        """The talk is over: the held audio is one utterance, if it held speech long enough."""
        audio = np.concatenate(self._held) if self._held else np.zeros(0, np.float32)
        logged = 0 if self.packets is None else self.packets.samples  # (the held audio is its last samples)
        opus = self._opus(logged - len(audio), logged)
        had_speech = self._held_speech
        self._held, self._held_samples, self._held_speech = [], 0, False
        self.stream.reset()
        if had_speech and len(audio) * 1000 >= self.pipeline.config.vad.min_speech_ms * SAMPLE_RATE:
            now = time.perf_counter()
            # The talk ended with its last frame, lag included (`listen stop` waited in the same socket).
            ended = now - self.clock.lag
            self._owe(Ended([self._recognize(audio, False, False, ended)], now, ended, False, opus=opus))

    # --- replies ------------------------------------------------------------------------------

    def _owe(self, ended: Ended) -> None:
        self._ended.append(ended)
        self._more.set()
        self._none_owed.clear()

    async def heard(self) -> AsyncIterator[Heard]:
        """Each utterance's outcome, in utterance order, as it is ready (forever: cancel the task
        that reads it). An utterance dropped by `abort` is skipped."""
        while True:
            while not self._ended:
                self._more.clear()
                await self._more.wait()
            ended = self._ended[0]
            task = asyncio.ensure_future(ended.recognition())
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not self._ended or self._ended[0] is not ended:
                continue  # aborted while it was recognised
            if not task.cancelled():  # (cancelled: its recognition was, with nobody to tell)
                error = task.exception()
                yield Heard(ended, None, error) if error is not None else Heard(ended, task.result())
            if self._ended and self._ended[0] is ended:
                self._ended.popleft()
            if not self._ended:
                self._none_owed.set()

    @property
    def pending(self) -> int:
        """Utterances ended and not yet replied to."""
        return len(self._ended)

    def reset(self) -> None:
        """A new stream (`listen start`): drop the speech in progress, keep the replies owed."""
        self._end_live()
        self._cancel_speculation()
        self._cancel_phrases()
        self.clock.reset()
        self.feed.clear()
        self.stream.reset()
        if self.packets is not None:
            self.packets.reset()
        self._held, self._held_samples, self._held_speech = [], 0, False

    def abort(self) -> None:
        """Drop the utterance in progress and every reply not yet given."""
        self.reset()
        for ended in self._ended:
            ended.cancel()
        self._ended.clear()
        self._none_owed.set()

    async def drain(self, timeout_s: float) -> int:
        """Shutdown: let the audio already read end its utterances and their replies be given
        (within `timeout_s` each); returns how many replies were pending when it began."""
        await self.feed.drain(timeout_s)
        pending = self.pending
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_owed.wait(), timeout_s)
        return pending

    async def close(self) -> None:
        """The stream is gone: nothing of it may outlive it."""
        await self.feed.close()
        self.abort()
