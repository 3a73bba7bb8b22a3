"""The order in which one engine serves its callers: finals before speculations, batches only of alike items.

On a CPU a batch costs the sum of its items plus the padding to the longest, and every caller
waits for the whole batch, so there the scheduler's job is order, not size: the utterance a
device is waiting for goes before the speculative recognition of an utterance that may not be
over yet, and a speculation that speech made useless is dropped before it runs, or aborted while
it runs (ONNX Runtime's `RunOptions.terminate`). Within a priority the oldest goes first: every
final has the same budget from its endpoint, so oldest first is earliest deadline first (shortest
first would lower the mean and starve long utterances). On a GPU, where a batch costs little more
than one item, it batches, but only items of similar length, so padding stays small.

Each request is a `Job`: its priority can be raised (a speculation becomes the final when the
endpoint confirms it), it can be cancelled (cancelling the task that awaits it is enough), and
it reports how long it waited and how long its compute took. A queue at its limit refuses at once
(`EngineBusy`), a job that waited past `deadline_s` is shed (`EngineBusy`) instead of run late;
a batch that fails is retried item by item, so one bad input fails only its caller.

`fn` may also be a coroutine function: a remote engine (a Ray Serve deployment, `core.ray_serve`)
whose batching happens where the model is. Its calls then run on the event loop, `parallel` of them
at once, with the same order, deadlines, refusals and timings as a local engine: the front end
keeps one queue and one admission signal whatever runs the model, and a remote call costs no
thread while it waits. Every caller of such a call leaving cancels it (the remote request too),
as `abort` stops a local one.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

from ..errors import EngineAborted, EngineBusy, EngineClosed
from .utilisation import Utilisation

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class Priority(IntEnum):
    """Lower runs first."""

    FINAL = 0  # a caller is waiting for this result now
    PARTIAL = 1  # a streaming client's partial text
    SPECULATION = 2  # an utterance that may still go on: useful only if it ends here


@dataclass(frozen=True, slots=True)
class Timing:
    """What one request spent in the queue and in compute (its batch's compute), milliseconds."""

    queue_ms: float
    compute_ms: float
    batch: int


@dataclass(eq=False)
class Job(Generic[T, R]):
    """One request: its item, its place in the order, and the future its caller awaits."""

    item: T
    priority: Priority
    size: float
    future: asyncio.Future[R]
    submitted: float
    seq: int
    timing: Timing | None = None
    running: bool = False
    _queue: InferenceQueue[T, R] | None = field(default=None, repr=False)
    _lane: _Lane | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        """Its compute began (cancelling it now wastes what it has computed)."""
        return self.running or self.timing is not None

    def promote(self, priority: Priority) -> None:
        """Raise the job's priority (a speculation the endpoint confirmed becomes a final)."""
        if self._queue is not None and priority < self.priority:
            self._queue._reprioritise(self, priority)


@dataclass(eq=False)
class _Lane:
    """One worker thread of a queue and the batch it computes now."""

    executor: ThreadPoolExecutor
    running: list = field(default_factory=list)
    thread: int | None = None  # the worker thread's ident, once it has run something
    call: asyncio.Future | None = None  # a coroutine engine's call in flight


class InferenceQueue(Generic[T, R]):
    """Jobs for `fn` (a list of items → a list of results), run in one worker thread in priority order
    (or, for a coroutine function, awaited on the event loop).

    `max_batch` items of the same priority whose `size` is within `similar`× of the first share a
    call; up to `max_wait_ms` is waited for them when fewer are queued. `parallel` batches run at
    once, each in its own worker thread (a lane). `abort` is called (from the event loop's thread,
    with the lane's thread ident) when every job of a running batch was cancelled; `on_discard` is
    told the compute spent on results nobody took (seconds, each item's share of its batch).
    `nice`: its lanes' threads run that much nicer than the process (an engine whose work may
    wait, such as the optional speaker, yields the cores to the one the budget is about).
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[Sequence[T]], Sequence[R]] | Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 1,
        max_wait_ms: float = 0.0,
        max_queue: int | None = None,
        limit_key: str = "max_queue",
        similar: float = 1.25,
        parallel: int = 1,
        deadline_s: float | None = None,
        abort: Callable[[int | None], None] | None = None,
        on_batch: Callable[[str, int, float], None] | None = None,
        on_wait: Callable[[str, float], None] | None = None,
        on_discard: Callable[[str, float], None] | None = None,
        on_shed: Callable[[str], None] | None = None,
        nice: int = 0,
    ) -> None:
        if max_batch < 1 or parallel < 1:
            raise ValueError("max_batch and parallel must be at least 1")
        self.name = name
        self.deadline_s = deadline_s
        self._on_shed = on_shed
        self._nice = nice
        self._fn = fn
        self._async = inspect.iscoroutinefunction(fn)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._limit_key = limit_key
        self._similar = similar
        self._abort = abort
        self._on_batch = on_batch
        self._on_wait = on_wait
        self._on_discard = on_discard
        self._heap: list[tuple[int, int, Job[T, R]]] = []
        self._waiting = 0  # jobs queued, not running, not cancelled
        self._waiting_size = 0.0  # ... and their sizes together
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._full = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._lanes = [
            _Lane(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}-{i}")) for i in range(parallel)
        ]
        self._utilisation = Utilisation(parallel)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting to run (the running batch not counted)."""
        return self._waiting

    def depth(self) -> int:
        return self._waiting

    def load(self) -> float:
        """The share of the lanes' time the last seconds' work took, the queued work included
        (`core.utilisation`): over 1 the engine falls behind."""
        return self._utilisation.load(time.perf_counter(), self._waiting_size)

    def call_load(self) -> float | None:
        """The load one more call adds (`Utilisation.call_load`); None before any was measured."""
        return self._utilisation.call_load()

    def _unqueue(self, job: Job[T, R]) -> None:
        self._waiting -= 1
        self._waiting_size -= job.size

    def submit(self, item: T, priority: Priority = Priority.FINAL, size: float = 0.0) -> Job[T, R]:
        """Queue one item; await `job.future` for its result. Refused at once (`EngineBusy`) when
        `max_queue` jobs are already waiting, and after `close` (`EngineClosed`)."""
        if self._closed:
            raise EngineClosed(f"{self.name} is closed")
        if self.max_queue is not None and self._waiting >= self.max_queue:
            raise EngineBusy(
                f"{self.name} is busy: {self._waiting} requests waiting ({self._limit_key} = {self.max_queue})"
            )
        loop = asyncio.get_running_loop()
        if not self._tasks:
            self._wake = asyncio.Event()
            self._tasks = [loop.create_task(self._run(lane), name=f"engine-{self.name}") for lane in self._lanes]
        job: Job[T, R] = Job(item, priority, size, loop.create_future(), time.perf_counter(), next(self._seq))
        job._queue = self
        job.future.add_done_callback(lambda _: self._on_done(job))
        heapq.heappush(self._heap, (int(priority), job.seq, job))
        self._waiting += 1
        self._waiting_size += size
        assert self._wake is not None
        self._wake.set()
        if self._waiting >= self.max_batch:
            self._full.set()  # a full batch: no reason to wait out max_wait
        return job

    async def run(self, item: T, priority: Priority = Priority.FINAL, size: float = 0.0) -> tuple[R, Timing]:
        """Submit and await: the result and its timing. Cancelling the caller cancels the job."""
        job = self.submit(item, priority, size)
        result = await job.future
        assert job.timing is not None
        return result, job.timing

    def _reprioritise(self, job: Job[T, R], priority: Priority) -> None:
        job.priority = priority
        if not job.running and not job.future.done():
            # The old heap entry stays; `_pop` skips entries whose priority is no longer the job's.
            heapq.heappush(self._heap, (int(priority), job.seq, job))

    def _on_done(self, job: Job[T, R]) -> None:
        if not job.future.cancelled():
            # Marks an error as seen: a caller cancelled after its job was shed (or a gather that
            # stopped at a sibling's error) must not leave "exception was never retrieved" behind.
            job.future.exception()
        if job.running:
            lane = job._lane
            if (
                job.future.cancelled()
                and lane is not None
                and job in lane.running
                and all(j.future.cancelled() for j in lane.running)
            ):
                # Nobody wants the running batch any more.
                if lane.call is not None:
                    lane.call.cancel()
                elif self._abort is not None:
                    self._abort(lane.thread)
        elif job.future.cancelled():
            self._unqueue(job)

    def eta(self, job: Job[T, R]) -> float | None:
        """Seconds until a job waiting behind other work has its result, at the cost per unit of
        size the lanes measured in the last seconds: what runs now and what waits ahead of it
        (`priority`, then age) shared out among the lanes, then its own compute. None when it does
        not wait behind anything (it runs, is done, or is next with a lane free: only a deadline
        can end its wait) or no call ended in the last seconds (a stall long past says nothing)."""
        if job.running or job.future.done():
            return None
        now = time.perf_counter()
        cost = self._utilisation.cost_per_size(now)
        if cost is None:
            return None
        key = (int(job.priority), job.seq)
        ahead = sum(
            j.size
            for p, seq, j in self._heap
            if (p, seq) < key and p == int(j.priority) and not (j.running or j.future.done())
        )
        busy = [lane for lane in self._lanes if lane.running]
        if not ahead and len(busy) < len(self._lanes):
            return None
        running = sum(
            max(0.0, self._utilisation.started_at(id(lane), now) + cost * sum(j.size for j in lane.running) - now)
            for lane in busy
        )
        return (running + cost * ahead) / len(self._lanes) + cost * job.size

    def head_wait(self) -> float:
        """Seconds the job that runs next has waited (0 when none waits): how far behind the queue is."""
        while self._heap:
            prio, _, job = self._heap[0]
            if job.running or job.future.done() or prio != int(job.priority):
                heapq.heappop(self._heap)  # a stale entry: drop it here as `_pop` would
                continue
            return time.perf_counter() - job.submitted
        return 0.0

    def _pop(self) -> Job[T, R] | None:
        while self._heap:
            prio, _, job = heapq.heappop(self._heap)
            if job.running or job.future.done() or prio != int(job.priority):
                continue  # taken, cancelled, or a stale entry of a promoted job
            waited = time.perf_counter() - job.submitted
            if self.deadline_s is not None and waited > self.deadline_s:
                # Too late to be of use: fail it (its caller tells its own client) instead of
                # spending the cores on it while the jobs behind it go late too.
                self._unqueue(job)
                job.future.set_exception(
                    EngineBusy(f"{self.name} is overloaded: shed after waiting {waited:.1f} s (deadline_ms)")
                )
                if self._on_shed is not None:
                    self._on_shed(self.name)
                continue
            return job
        return None

    def _take_batch(self, first: Job[T, R]) -> list[Job[T, R]]:
        batch = [first]
        if self.max_batch == 1:
            return batch
        lo, hi = first.size / self._similar, first.size * self._similar
        keep = []
        while self._heap and len(batch) < self.max_batch:
            entry = heapq.heappop(self._heap)
            job = entry[2]
            if job.running or job.future.done() or entry[0] != int(job.priority):
                continue
            if job.priority == first.priority and lo <= job.size <= hi:
                batch.append(job)
            else:
                keep.append(entry)
        for entry in keep:
            heapq.heappush(self._heap, entry)
        return batch

    async def _run(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            first = self._pop()
            if first is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_batch > 1 and self.max_wait_s > 0 and self._waiting < self.max_batch:
                # Room in the batch: give alike items a moment to arrive (put the first one back).
                heapq.heappush(self._heap, (int(first.priority), first.seq, first))
                self._full.clear()
                try:
                    async with asyncio.timeout(self.max_wait_s):
                        await self._full.wait()
                except TimeoutError:
                    pass
                first = self._pop()
                if first is None:
                    continue
            batch = self._take_batch(first)
            started = time.perf_counter()
            for job in batch:
                job.running = True
                job._lane = lane
                self._unqueue(job)
                if self._on_wait is not None:
                    self._on_wait(self.name, started - job.submitted)
            lane.running = batch
            self._utilisation.started(id(lane), started)
            try:
                results = await self._compute(loop, batch, lane)
            finally:
                lane.running = []
                ended = time.perf_counter()
                self._utilisation.finished(id(lane), ended, sum(job.size for job in batch))
            elapsed = ended - started
            if self._on_batch is not None:
                self._on_batch(self.name, len(batch), elapsed)
            unwanted = sum(1 for job in batch if job.future.cancelled())
            if unwanted and self._on_discard is not None:
                self._on_discard(self.name, elapsed * unwanted / len(batch))
            for job, res in zip(batch, results, strict=True):
                job.timing = Timing((started - job.submitted) * 1000, elapsed * 1000, len(batch))
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)

    def _call(self, lane: _Lane, items: list[T]) -> Sequence[R]:
        if lane.thread is None and self._nice:
            try:  # this lane's thread alone: Linux gives each thread its own nice value
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self._nice))
            except (OSError, AttributeError) as e:
                log.debug("%s: the lane's priority stays: %s", self.name, e)
        lane.thread = threading.get_ident()
        return self._fn(items)  # type: ignore[return-value]  # the thread path: `fn` is not a coroutine function

    async def _invoke(self, loop: asyncio.AbstractEventLoop, lane: _Lane, items: list[T]) -> Sequence[R]:
        """One call of `fn`: in the lane's thread, or awaited here for a coroutine function."""
        if not self._async:
            return await loop.run_in_executor(lane.executor, self._call, lane, items)
        call = asyncio.ensure_future(self._fn(items))  # type: ignore[arg-type]
        lane.call = call
        try:
            await asyncio.wait([call])  # returns when the call ends, cancelled or not
        except asyncio.CancelledError:  # the queue is closing
            call.cancel()
            raise
        finally:
            lane.call = None
        if call.cancelled():
            raise EngineAborted(f"{self.name}: every caller left")
        return call.result()

    async def _compute(
        self, loop: asyncio.AbstractEventLoop, batch: list[Job[T, R]], lane: _Lane
    ) -> list[R | BaseException]:
        """The batch's results, or per item its exception: a failing batch is retried one by one."""
        items = [j.item for j in batch if not j.future.done()]
        live = [j for j in batch if not j.future.done()]
        out: dict[int, R | BaseException] = {id(j): EngineClosed("cancelled") for j in batch}
        if not live:
            return [out[id(j)] for j in batch]
        try:
            results = await self._invoke(loop, lane, items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
            for j, r in zip(live, results, strict=True):
                out[id(j)] = r
        except Exception as e:
            if len(live) == 1:
                if not live[0].future.cancelled():
                    log.warning("%s: a request failed: %s", self.name, e)
                out[id(live[0])] = e
            else:
                log.warning("%s: a batch of %d failed (%s); retrying its items one by one", self.name, len(live), e)
                for j in live:
                    if j.future.done():
                        continue
                    try:
                        (out[id(j)],) = await self._invoke(loop, lane, [j.item])
                    except Exception as one:
                        out[id(j)] = one
        return [out[id(j)] for j in batch]

    async def close(self) -> None:
        """Stop, fail waiting callers with `EngineClosed`, release the worker thread."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._heap:
            job = heapq.heappop(self._heap)[2]
            if not job.future.done():
                job.future.set_exception(EngineClosed(f"{self.name} closed"))
        for lane in self._lanes:
            lane.executor.shutdown(wait=False, cancel_futures=True)
