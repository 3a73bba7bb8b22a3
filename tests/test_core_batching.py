import asyncio
import threading

import pytest

from asr_server.core.batching import MicroBatcher
from asr_server.errors import EngineBusy, EngineClosed


async def test_batches_concurrent_callers_and_keeps_results_matched():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        return [i * 10 for i in items]

    b = MicroBatcher("t", fn, max_batch=4, max_wait_ms=50)
    results = await asyncio.gather(*(b.submit(i) for i in range(10)))
    await b.close()
    assert results == [i * 10 for i in range(10)]
    assert max(sizes) == 4 and sum(sizes) == 10
    assert b.stats.items == 10 and b.stats.batches == len(sizes)


async def test_runs_off_the_event_loop_thread():
    seen = []
    b = MicroBatcher("t", lambda items: [seen.append(threading.current_thread().name) or 0 for _ in items])
    await b.submit(1)
    await b.close()
    assert seen and seen[0] != threading.current_thread().name


async def test_failure_reaches_that_batch_only():
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    b = MicroBatcher("t", fn, max_batch=1, max_wait_ms=0)
    with pytest.raises(ValueError, match="boom"):
        await b.submit("bad")
    assert await b.submit("good") == "good"
    await b.close()


async def test_cancelled_caller_is_skipped():
    calls = []
    gate = threading.Event()

    def fn(items):
        calls.append(list(items))
        gate.wait(2)
        return items

    b = MicroBatcher("t", fn, max_batch=1, max_wait_ms=0)
    first = asyncio.create_task(b.submit("a"))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(b.submit("b"))
    await asyncio.sleep(0.01)
    second.cancel()
    gate.set()
    assert await first == "a"
    await asyncio.sleep(0.05)
    await b.close()
    assert calls == [["a"]]


async def test_close_fails_waiters():
    gate = threading.Event()
    b = MicroBatcher("t", lambda items: gate.wait(1) and items, max_batch=1, max_wait_ms=0)
    t1 = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.02)
    t2 = asyncio.create_task(b.submit(2))
    await asyncio.sleep(0.02)
    await b.close()
    gate.set()
    with pytest.raises((EngineClosed, asyncio.CancelledError)):
        await t2
    t1.cancel()


async def test_a_full_batch_does_not_wait_out_max_wait():
    sizes = []
    b = MicroBatcher("t", lambda items: sizes.append(len(items)) or list(items), max_batch=4, max_wait_ms=60_000)
    # with a minute of max_wait, only the full-batch wake-up lets this finish inside the guard
    results = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(4))), timeout=10)
    await b.close()
    assert results == [0, 1, 2, 3] and sizes == [4]


async def test_a_full_queue_refuses_at_once_naming_the_limit():
    release = threading.Event()

    def slow(items):
        release.wait(5)
        return items

    b = MicroBatcher("asr", slow, max_batch=1, max_wait_ms=0, max_queue=2, limit_key="asr.max_queue")
    first = asyncio.ensure_future(b.submit(0))  # taken by the worker
    await asyncio.sleep(0.05)
    waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(EngineBusy, match=r"asr is busy: 2 requests waiting \(asr.max_queue = 2\)"):
        await b.submit(3)
    release.set()
    assert await first == 0 and await asyncio.gather(*waiting) == [1, 2]
    await b.close()
