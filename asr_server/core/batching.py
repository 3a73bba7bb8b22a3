"""An async micro-batcher: many callers, one batched model call off the event loop.

Callers `await batcher.submit(item)`; a collector task gathers up to `max_batch` items or waits
at most `max_wait_ms` after the first, runs `fn(items)` in the batcher's own single worker thread
and resolves each caller's future. One thread per model keeps calls to a session serial (ONNX
Runtime parallelises inside a call), and the event loop never runs model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import EngineBusy, EngineClosed

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    items: int = 0
    busy_s: float = 0.0
    last_batch_size: int = 0


class MicroBatcher(Generic[T, R]):
    """Collects requests into batches for `fn`, which maps a list of items to a list of results."""

    def __init__(
        self,
        name: str,
        fn: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        on_batch: Callable[[str, int, float], None] | None = None,
        max_queue: int | None = None,
        limit_key: str = "max_queue",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.name = name
        self.max_queue = max_queue
        self._limit_key = limit_key
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def depth(self) -> int:
        """`queue_depth` as a callable, for the metrics to read at scrape time."""
        return self.queue_depth

    def _ensure_started(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")
        return self._queue

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result; exceptions of `fn` reach every caller of that batch.

        With `max_queue` items already waiting the item is refused at once with `EngineBusy`: a
        queue that only grows answers nobody in time.
        """
        queue = self._ensure_started()
        if self.max_queue is not None and queue.qsize() >= self.max_queue:
            raise EngineBusy(
                f"{self.name} is busy: {queue.qsize()} requests waiting ({self._limit_key} = {self.max_queue})"
            )
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue.put_nowait((item, fut))
        wake = self._wake
        if wake is not None and not wake.done() and queue.qsize() + 1 >= self.max_batch:
            wake.set_result(None)  # the batch is full: no reason to wait out max_wait
        return await fut

    async def _collect(self, queue: asyncio.Queue) -> list[tuple[T, asyncio.Future[R]]]:
        """The first waiting item, then whatever arrives within `max_wait_s`, up to `max_batch`.

        One timer per batch (not one per item): this runs for every VAD window of every session.
        """
        batch = [await queue.get()]
        if self.max_wait_s > 0 and queue.qsize() + 1 < self.max_batch:
            loop = asyncio.get_running_loop()
            self._wake = wake = loop.create_future()

            def wake_up() -> None:
                if not wake.done():
                    wake.set_result(None)

            timer = loop.call_later(self.max_wait_s, wake_up)
            try:
                await wake
            finally:
                timer.cancel()
                self._wake = None
        while len(batch) < self.max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        return batch

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(queue)
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            items = [item for item, _ in live]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
                if len(results) != len(items):
                    raise RuntimeError(
                        f"{self.name}: batch function returned {len(results)} results for {len(items)} items"
                    )
            except Exception as e:  # one bad batch fails its callers, never the batcher
                log.exception("%s batch of %d failed", self.name, len(items))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            elapsed = time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.items += len(items)
            self.stats.busy_s += elapsed
            self.stats.last_batch_size = len(items)
            if self._on_batch is not None:
                self._on_batch(self.name, len(items), elapsed)
            for (_, fut), res in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    async def close(self) -> None:
        """Stop collecting, fail waiting callers with `EngineClosed`, release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(EngineClosed(f"{self.name} batcher closed"))
            self._queue = None
        self._executor.shutdown(wait=False, cancel_futures=True)
