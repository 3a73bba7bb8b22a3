"""Silero VAD for every live stream at once: one model call per tick, each stream's windows in order.

A window's input is the stream's audio, but its recurrent state is what the stream's previous
window left, so one stream's windows run one after another while many streams' windows share a
call. Every tick (`max_wait_ms`, or as soon as the last batch returns) the batcher takes every
frame waiting, and in one hop to its worker thread runs as many rounds as the longest stream
needs: round k holds the k-th model window of each stream. A frame whose windows all fall below
the energy gate never waits at all. One future per frame, one executor hop per tick: the per-window
cost on the event loop is a few list operations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..engines.base import VadModel
from ..errors import EngineBusy, EngineClosed
from .streaming import SpeechStream, Window

Probabilities = list[tuple[np.ndarray, float]]


@dataclass(slots=True)
class _Frame:
    """One call's windows for one stream, and the future of their probabilities."""

    stream: SpeechStream
    windows: list[Window]
    future: asyncio.Future[Probabilities]


class VadBatcher:
    """The shared VAD model behind every `SpeechStream`; `probabilities` is all a stream awaits."""

    def __init__(
        self,
        model: VadModel,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_queue: int = 10000,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._pending: list[_Frame] = []
        self._windows_waiting = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-vad")

    def depth(self) -> int:
        """Model windows waiting for the next tick."""
        return self._windows_waiting

    async def probabilities(self, stream: SpeechStream, pcm: np.ndarray) -> Probabilities:
        """Each complete window of `pcm` with its speech probability (0 below the energy gate)."""
        windows = stream.windows(pcm)
        n_model = sum(1 for w in windows if w.samples is not None)
        if n_model == 0:
            return [(w.chunk, 0.0) for w in windows]
        if self._closed:
            raise EngineClosed("the VAD is closed")
        if self._windows_waiting + n_model > self.max_queue:
            raise EngineBusy(f"vad is busy: {self._windows_waiting} windows waiting (vad.max_queue = {self.max_queue})")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="engine-vad")
        frame = _Frame(stream, windows, loop.create_future())
        self._pending.append(frame)
        self._windows_waiting += n_model
        assert self._wake is not None
        self._wake.set()
        return await frame.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait_s > 0 and self._windows_waiting < self.max_batch:
                await asyncio.sleep(self.max_wait_s)  # one tick: let other streams' frames join
            frames, self._pending = self._pending, []
            waiting, self._windows_waiting = self._windows_waiting, 0
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._compute, frames)
            except Exception as e:  # a model failure fails this tick's frames, never the batcher
                for f in frames:
                    if not f.future.done():
                        f.future.set_exception(e)
                continue
            if self._on_batch is not None:
                self._on_batch("vad", waiting, time.perf_counter() - t0)
            for f, probs in zip(frames, results, strict=True):
                if not f.future.done():
                    f.future.set_result(probs)

    def _compute(self, frames: list[_Frame]) -> list[Probabilities]:
        """In the worker: rounds of one window per stream, states carried from round to round."""
        by_stream: dict[int, list[tuple[_Frame, int]]] = {}
        for f in frames:
            queue = by_stream.setdefault(id(f.stream), [])
            queue.extend((f, i) for i, w in enumerate(f.windows) if w.samples is not None)
        probs: dict[tuple[int, int], float] = {}
        queues = list(by_stream.values())
        depth = 0
        while True:
            round_ = [q[depth] for q in queues if depth < len(q)]
            if not round_:
                break
            for start in range(0, len(round_), self.max_batch):
                part = round_[start : start + self.max_batch]
                samples = np.stack([f.windows[i].samples for f, i in part])  # type: ignore[misc]
                state = np.stack([f.stream.vad.state for f, _ in part], axis=1)
                p, state_n = self.model.run(samples, state)
                for k, (f, i) in enumerate(part):
                    f.stream.advance(np.ascontiguousarray(state_n[:, k, :]))
                    probs[(id(f), i)] = float(p[k])
            depth += 1
        return [[(w.chunk, probs.get((id(f), i), 0.0)) for i, w in enumerate(f.windows)] for f in frames]

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for f in self._pending:
            if not f.future.done():
                f.future.set_exception(EngineClosed("the VAD is closed"))
        self._pending = []
        self._executor.shutdown(wait=False, cancel_futures=True)
