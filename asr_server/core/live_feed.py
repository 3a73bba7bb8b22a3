"""A device's live audio on its way to the VAD: one call in flight, the rest queued for the next.

Awaiting each 60 ms frame's VAD call in turn made a session read at most one frame per batcher
tick, so on a busy loop (ticks past 60 ms) it read slower than its device sent and the backlog
waited in the socket, unseen. Here the frames that came during a call go into the next call
together, so a session catches up by itself; past `MAX_QUEUED_S` it stops reading (the socket
holds the rest) and tells the input clock so. What it measures, how long after the audio was
spoken the VAD saw it, is the overload governor's front-end signal (`core.governor`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

import numpy as np

from ..audio.clock import InputClock
from ..audio.segmenter import Event
from ..constants import SAMPLE_RATE
from ..errors import EngineBusy, EngineClosed
from .pipeline import Pipeline
from .streaming import SpeechStream

log = logging.getLogger(__name__)

MAX_QUEUED_S = 2.0
"""Live audio a session holds for its next VAD call before it stops reading its socket."""

Meter = Callable[[list[tuple[np.ndarray, float]]], Awaitable[None]]
"""Told each frame's VAD windows with their speech probabilities, after their events."""


class LiveFeed:
    """The queue between one session's socket and the shared VAD batcher."""

    def __init__(
        self,
        pipeline: Pipeline,
        stream: SpeechStream,
        clock: InputClock,
        on_event: Callable[[Event], None],
        observe_delay: Callable[[float], None],
        name: str,
        meter: Meter | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.stream = stream
        self.clock = clock
        self._on_event = on_event
        self._observe_delay = observe_delay
        self._name = name  # for log lines: the session id
        self._meter = meter
        self._queued: list[np.ndarray] = []
        self._queued_samples = 0
        self._queued_spoken = 0.0  # when the end of the queued audio was spoken
        self.spoken: float | None = None
        """When the end of the audio the stream has been fed was spoken (the latency clock's start);
        None before any was fed."""
        self._task: asyncio.Task[None] | None = None
        self._error: Exception | None = None  # raised at the next push, for the server to report
        self._fed_at = -math.inf  # when the VAD last returned for this audio
        self._delay = 0.0  # ... and how long after its end was spoken

    async def push(self, pcm: np.ndarray, spoken: float) -> None:
        """Queue a frame whose end was spoken at `spoken`; raises the error the last call met
        (EngineBusy, EngineClosed: that audio is lost and the device should hear of it)."""
        if self._meter is not None:
            probs = await self.pipeline.probabilities(self.stream, pcm)
            self._fed(spoken)
            for chunk, prob in probs:
                for event in self.stream.push(chunk, prob):
                    self._on_event(event)
            await self._meter(probs)
            return
        self._queued.append(pcm)
        self._queued_samples += len(pcm)
        self._queued_spoken = spoken
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        elif self._queued_samples > MAX_QUEUED_S * SAMPLE_RATE:
            await self.caught_up()  # the VAD is that far behind: let the socket hold the rest
            self.clock.held(time.perf_counter())
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def _run(self) -> None:
        """Feed the audio queued while the last VAD call ran, all of it in one call, until none is left."""
        try:
            while self._queued:
                pcm = self._queued[0] if len(self._queued) == 1 else np.concatenate(self._queued)
                spoken = self._queued_spoken
                self._queued, self._queued_samples = [], 0
                try:
                    events = await self.pipeline.feed(self.stream, pcm)
                except (EngineBusy, EngineClosed) as e:
                    self._error = e
                    continue
                self._fed(spoken)
                for event in events:
                    self._on_event(event)
        except Exception:
            log.exception("session %s: feeding audio failed", self._name)
        finally:
            self._task = None

    async def caught_up(self) -> None:
        """Wait until the queued audio has been through the VAD."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def _fed(self, spoken: float) -> None:
        """The VAD has seen the audio up to what was spoken at `spoken`."""
        self.spoken = spoken
        self._fed_at = time.perf_counter()
        self._delay = self._fed_at - spoken
        self._observe_delay(self._delay)

    def input_delay(self, now: float, within_s: float = 2.0) -> float | None:
        """Seconds between when the live audio the VAD last saw was spoken and when it saw it
        (socket, read and VAD queue together); None when none was fed in the last `within_s`
        (the device is not streaming: idle, manual mode, or the answer is playing)."""
        return self._delay if now - self._fed_at <= within_s else None

    def clear(self) -> None:
        """Drop the audio not yet fed (a new turn, an abort)."""
        self._queued, self._queued_samples = [], 0

    async def drain(self, timeout_s: float) -> None:
        """Let the audio already read reach the VAD (it can still end an utterance)."""
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
