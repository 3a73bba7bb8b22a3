"""The inference scheduler: order (finals first, oldest first), batches of alike items, limits,
cancellation before and during a run, and failures that reach only their own caller."""

import asyncio
import os
import threading

import pytest

from asr_server.core.scheduler import InferenceQueue, Priority
from asr_server.errors import EngineBusy, EngineClosed


def gated(calls, gate=None):
    """A model that records each call's items and, if given a gate, waits for it."""

    def fn(items):
        calls.append(list(items))
        if gate is not None:
            gate.wait(5)
        return [f"r-{i}" for i in items]

    return fn


async def test_batches_alike_callers_and_keeps_results_matched():
    calls = []
    q = InferenceQueue("t", gated(calls), max_batch=4, max_wait_ms=50)
    results = await asyncio.gather(*(q.run(i, size=100) for i in range(10)))
    await q.close()
    assert [r for r, _ in results] == [f"r-{i}" for i in range(10)]
    assert max(len(c) for c in calls) == 4 and sum(len(c) for c in calls) == 10
    assert all(t.batch == len(next(c for c in calls if i in c)) for i, (_, t) in enumerate(results))


async def test_only_similar_sizes_share_a_batch():
    calls = []
    q = InferenceQueue("t", gated(calls), max_batch=8, max_wait_ms=50)
    sizes = {"a": 100, "b": 110, "long": 1000, "c": 95}
    await asyncio.gather(*(q.run(k, size=v) for k, v in sizes.items()))
    await q.close()
    assert sorted(map(sorted, calls)) == [["a", "b", "c"], ["long"]]


async def test_finals_run_before_speculations_and_oldest_first():
    calls = []
    gate = threading.Event()
    q = InferenceQueue("t", gated(calls, gate))
    first = q.submit("busy")  # occupies the worker while the others queue
    await asyncio.sleep(0.05)
    jobs = [
        q.submit("spec-1", Priority.SPECULATION),
        q.submit("final-long", Priority.FINAL, size=1000),
        q.submit("partial", Priority.PARTIAL),
        q.submit("final-short", Priority.FINAL, size=10),
    ]
    gate.set()
    await asyncio.gather(first.future, *(j.future for j in jobs))
    await q.close()
    assert [c[0] for c in calls] == ["busy", "final-long", "final-short", "partial", "spec-1"]


async def test_a_promoted_speculation_runs_as_a_final():
    calls = []
    gate = threading.Event()
    q = InferenceQueue("t", gated(calls, gate))
    first = q.submit("busy")
    await asyncio.sleep(0.05)
    spec = q.submit("spec", Priority.SPECULATION)
    other = q.submit("other-spec", Priority.SPECULATION)
    late = q.submit("final", Priority.FINAL)
    spec.promote(Priority.FINAL)  # the endpoint confirmed it: now before the later final
    gate.set()
    await asyncio.gather(first.future, spec.future, other.future, late.future)
    await q.close()
    assert [c[0] for c in calls] == ["busy", "spec", "final", "other-spec"]


async def test_runs_off_the_event_loop_thread():
    seen = []
    q = InferenceQueue("t", lambda items: [seen.append(threading.current_thread().name) or 0 for _ in items])
    await q.run(1)
    await q.close()
    assert seen and seen[0] != threading.current_thread().name


async def test_failure_reaches_that_request_only():
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    q = InferenceQueue("t", fn)
    with pytest.raises(ValueError, match="boom"):
        await q.run("bad")
    assert (await q.run("good"))[0] == "good"
    await q.close()


async def test_a_failing_batch_is_retried_item_by_item():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "nan" in items:
            raise ValueError("non-finite input")
        return [f"ok-{i}" for i in items]

    q = InferenceQueue("t", fn, max_batch=4, max_wait_ms=50)
    outcomes = await asyncio.gather(*(q.run(i) for i in ("a", "nan", "b")), return_exceptions=True)
    await q.close()
    assert outcomes[0][0] == "ok-a" and outcomes[2][0] == "ok-b"
    assert isinstance(outcomes[1], ValueError)
    assert calls[0] == ["a", "nan", "b"] and sorted(map(tuple, calls[1:])) == [("a",), ("b",), ("nan",)]


async def test_a_cancelled_waiting_job_never_runs_and_frees_its_place():
    calls = []
    gate = threading.Event()
    q = InferenceQueue("t", gated(calls, gate), max_queue=1)
    first = q.submit("a")
    await asyncio.sleep(0.05)
    spec = q.submit("b", Priority.SPECULATION)
    spec.future.cancel()
    await asyncio.sleep(0)
    assert q.queue_depth == 0
    c = q.submit("c")  # the cancelled job no longer counts against max_queue
    gate.set()
    assert await first.future == "r-a" and await c.future == "r-c"
    await q.close()
    assert calls == [["a"], ["c"]]


async def test_cancelling_the_running_job_aborts_it_and_counts_the_waste():
    started, aborted = threading.Event(), threading.Event()
    discarded = []

    def fn(items):
        if items == ["spec"]:
            started.set()
            if aborted.wait(5):
                raise RuntimeError("terminated")
        return items

    q = InferenceQueue(
        "t", fn, abort=lambda thread: aborted.set(), on_discard=lambda name, s: discarded.append((name, s))
    )
    job = q.submit("spec", Priority.SPECULATION)
    await asyncio.to_thread(started.wait, 5)
    job.future.cancel()
    nxt = q.submit("next")
    assert await asyncio.wait_for(nxt.future, 5) == "next"  # the worker was freed by the abort
    await q.close()
    assert aborted.is_set()
    assert len(discarded) == 1 and discarded[0][0] == "t" and discarded[0][1] >= 0


async def test_timing_reports_wait_and_compute():
    gate = threading.Event()
    q = InferenceQueue("t", gated([], gate))
    first = q.submit("a")
    await asyncio.sleep(0.05)
    second = q.submit("b")
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first.future, second.future)
    await q.close()
    assert first.timing is not None and second.timing is not None
    assert second.timing.queue_ms >= 40  # it waited for the first one's compute
    assert first.timing.compute_ms >= 40 and first.timing.batch == 1


async def test_a_full_batch_does_not_wait_out_max_wait():
    calls = []
    q = InferenceQueue("t", gated(calls), max_batch=4, max_wait_ms=60_000)
    # with a minute of max_wait, only the full-batch wake-up lets this finish inside the guard
    results = await asyncio.wait_for(asyncio.gather(*(q.run(i) for i in range(4))), timeout=10)
    await q.close()
    assert [r for r, _ in results] == ["r-0", "r-1", "r-2", "r-3"] and calls == [[0, 1, 2, 3]]


async def test_a_full_queue_refuses_at_once_naming_the_limit():
    gate = threading.Event()
    q = InferenceQueue("asr", gated([], gate), max_queue=2, limit_key="asr.max_queue")
    first = q.submit(0)  # taken by the worker
    await asyncio.sleep(0.05)
    waiting = [q.submit(i) for i in (1, 2)]
    with pytest.raises(EngineBusy, match=r"asr is busy: 2 requests waiting \(asr.max_queue = 2\)"):
        q.submit(3)
    gate.set()
    assert await first.future == "r-0" and [await j.future for j in waiting] == ["r-1", "r-2"]
    await q.close()


async def test_close_fails_waiters():
    gate = threading.Event()
    q = InferenceQueue("t", gated([], gate))
    q.submit(1)
    await asyncio.sleep(0.02)
    waiting = q.submit(2)
    await asyncio.sleep(0.02)
    await q.close()
    gate.set()
    with pytest.raises(EngineClosed):
        await waiting.future
    with pytest.raises(EngineClosed):
        q.submit(3)


async def test_parallel_lanes_run_at_once_and_an_abort_reaches_only_its_lane():
    started = {"a": threading.Event(), "b": threading.Event()}
    release = threading.Event()
    threads, aborted = {}, []

    def fn(items):
        (item,) = items
        threads[item] = threading.get_ident()
        started[item].set()
        release.wait(5)
        return [item]

    q = InferenceQueue("t", fn, parallel=2, abort=aborted.append)
    a, b = q.submit("a"), q.submit("b")
    assert await asyncio.to_thread(started["a"].wait, 5) and await asyncio.to_thread(started["b"].wait, 5)
    assert threads["a"] != threads["b"] and q.queue_depth == 0  # both running, each in its own lane
    b.future.cancel()
    await asyncio.sleep(0.01)
    assert aborted == [threads["b"]]  # only b's lane is told to stop
    release.set()
    assert await a.future == "a"
    await q.close()


async def test_a_coroutine_engine_runs_parallel_calls_on_the_loop_in_priority_order():
    """A remote engine (Ray Serve): `parallel` calls in flight at once, awaited on the event loop,
    the rest queued in priority order behind them."""
    loop_thread = threading.get_ident()
    gate = asyncio.Event()
    calls, threads = [], []

    async def fn(items):
        calls.append(list(items))
        threads.append(threading.get_ident())
        await gate.wait()
        return [f"r-{i}" for i in items]

    q = InferenceQueue("remote", fn, parallel=2)
    first = [asyncio.ensure_future(q.run(i)) for i in ("a", "b")]
    await asyncio.sleep(0.05)
    later = asyncio.ensure_future(q.run("spec", Priority.SPECULATION))
    final = asyncio.ensure_future(q.run("final"))
    await asyncio.sleep(0.05)
    assert calls == [["a"], ["b"]] and q.queue_depth == 2  # two in flight, two waiting
    gate.set()
    results = await asyncio.gather(*first, final, later)
    await q.close()
    assert [r for r, _ in results] == ["r-a", "r-b", "r-final", "r-spec"]
    assert calls[2:] == [["final"], ["spec"]]  # the final went before the older speculation
    assert set(threads) == {loop_thread}


async def test_cancelling_every_caller_cancels_a_coroutine_engines_call():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def fn(items):
        if items == ["x"]:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()  # where a remote request is cancelled in Ray
                raise
        return [f"r-{i}" for i in items]

    q = InferenceQueue("remote", fn)
    job = q.submit("x")
    await started.wait()
    job.future.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert (await asyncio.wait_for(q.run("y"), 5))[0] == "r-y"  # the lane is free for the next one
    await q.close()


async def test_the_queues_eta_counts_the_work_ahead_and_knows_nothing_without_a_recent_call():
    gate = threading.Event()

    def work(items):
        gate.wait(5)
        return items

    q: InferenceQueue[str, str] = InferenceQueue("embedding", work)
    first = q.submit("a", size=1.0)
    second = q.submit("b", size=1.0)
    await asyncio.sleep(0.05)
    assert q.eta(second) is None  # no call measured yet: no estimate
    gate.set()
    await asyncio.gather(first.future, second.future)
    assert q.eta(first) is None  # done
    gate.clear()
    jobs = [q.submit(x, size=1.0) for x in "cde"]
    await asyncio.sleep(0.05)  # "c" runs, "d" and "e" wait
    assert q.eta(jobs[0]) is None  # running: only a deadline ends its wait
    etas = [q.eta(j) for j in jobs[1:]]
    assert all(e is not None for e in etas) and etas[0] < etas[1]
    big = q.submit("f", size=10.0)
    assert q.eta(big) > etas[1]  # behind the others, and ten times the work
    gate.set()
    await asyncio.gather(*(j.future for j in [*jobs, big]))
    alone = q.submit("g", size=1.0)
    assert q.eta(alone) is None  # next, with the lane free: it runs now
    await alone.future
    await q.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a POSIX thing")
async def test_a_lane_runs_at_its_queues_nice_value_and_the_caller_keeps_its_own():
    """The embedder's lane yields the cores to the recogniser's where both want them."""

    def own_nice(items):
        return [os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) for _ in items]

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    q: InferenceQueue[int, int] = InferenceQueue("embedding", own_nice, nice=10)
    plain: InferenceQueue[int, int] = InferenceQueue("asr", own_nice)
    (niced, _), (normal, _) = await q.run(0), await plain.run(0)
    assert niced == min(19, before + 10) and normal == before
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    await q.close()
    await plain.close()
