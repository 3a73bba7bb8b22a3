"""The load test's wake shape: the schedule it computes, the verdict rules, and whole runs against
the fake recogniser and fake servers that refuse or shed (no retry, a failed conversation)."""

from __future__ import annotations

import pytest

from loadtest.__main__ import parser
from loadtest.report import UtteranceSample, format_table, render_markdown
from loadtest.run import LoadOptions, OptionsError, run_load
from loadtest.wake import GROUP_SPREAD_S, WakeSample, judge_turns, run_wake, wake_stats, wake_times
from tests.support.loadtest import assert_consistent
from tests.test_loadtest import FakeServer, clips, opts  # noqa: F401 (clips: a fixture)


def wake_opts(url: str, **kw) -> LoadOptions:
    base = dict(shape="wake", group_wake="all", wake_every_s=0.0, turns=(2, 2), reply_ms=(100.0, 100.0))
    base.update(kw)
    return opts(url, **base)


def test_a_group_wake_lands_within_one_second_and_wake_gaps_are_exponential():
    o = LoadOptions(clients=(200,), duration_s=3600.0, shape="wake", group_wake=50, wake_every_s=20.0, seed=3)
    fleet = [wake_times(o, 200, i) for i in range(200)]
    firsts = [t[0] for t in fleet[:50]]
    assert max(firsts) - min(firsts) < GROUP_SPREAD_S and min(firsts) >= 0.0  # the 50 wake within one second
    gaps = [b - a for t in fleet[50:] for a, b in zip(t, t[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(20.0, rel=0.05)  # mean gap as asked (~27,000 gaps)
    assert sum(g > 40.0 for g in gaps) / len(gaps) == pytest.approx(0.135, abs=0.01)  # exp(-2): exponential
    assert all(t == tuple(sorted(t)) and t[-1] < 3600.0 for t in fleet)
    assert fleet == [wake_times(o, 200, i) for i in range(200)]  # the seed replays the schedule
    only = LoadOptions(clients=(30,), duration_s=60.0, shape="wake", group_wake="all", wake_every_s=0.0)
    assert all(len(t) == 1 and t[0] < GROUP_SPREAD_S for t in (wake_times(only, 30, i) for i in range(30)))


def test_wake_options_are_validated():
    with pytest.raises(OptionsError, match="group wake"):
        LoadOptions(clients=(10,), shape="wake", group_wake=11)
    with pytest.raises(OptionsError, match="give --group-wake"):
        LoadOptions(shape="wake", wake_every_s=0.0)
    with pytest.raises(OptionsError, match="sink"):
        LoadOptions(shape="wake", expect_replies=False)
    with pytest.raises(OptionsError, match="turns"):
        LoadOptions(shape="wake", turns=(2, 1))
    with pytest.raises(OptionsError, match="run_wake"):
        import asyncio

        asyncio.run(run_load(LoadOptions(shape="wake"), ()))
    args = parser().parse_args(["--shape", "wake", "--group-wake", "all", "--turns", "1,4", "--wake-every-s", "20"])
    assert (args.group_wake, args.turns, args.wake_every_s, args.idle_close_s) == ("all", (1, 4), 20.0, 120.0)


def turn(eos_s: float, latency_ms: float | None, outcome: str = "ok", error: str | None = None) -> UtteranceSample:
    return UtteranceSample(0, "c", outcome, eos_s, latency_ms, latency_ms, 1000.0, error=error)  # type: ignore[arg-type]


def test_a_conversation_is_served_late_or_failed_from_its_turns():
    assert judge_turns([turn(1, 500), turn(9, 700)], 800.0) == ("served", None, None)
    assert judge_turns([turn(1, 500), turn(9, 900)], 800.0) == ("late", None, None)
    shed = turn(9, None, "error", "shed: connection closed with 1013 (overloaded)")
    assert judge_turns([turn(1, 500), shed, turn(20, 500)], 800.0) == (
        "failed",
        "turn 2: shed: connection closed with 1013 (overloaded)",
        2,
    )
    assert judge_turns([turn(1, None, "missing")], 800.0) == ("failed", "turn 1: missing", 1)


def test_the_verdict_wants_99_percent_served_and_no_refusal_while_the_recogniser_had_room():
    def wakes(served: int, late: int = 0, refused_at: tuple[float, ...] = ()) -> list[WakeSample]:
        out = [WakeSample(i, float(i), False, "served", 1, 1) for i in range(served)]
        out += [WakeSample(i, 0.0, False, "late", 1, 1) for i in range(late)]
        return out + [WakeSample(i, t, False, "refused", 1, 0) for i, t in enumerate(refused_at)]

    on_time = [turn(float(i), 500.0) for i in range(100)]
    assert wake_stats(300, wakes(99, late=1), on_time, 800.0, 0).holds  # 99 %
    assert not wake_stats(300, wakes(98, late=2), on_time, 800.0, 0).holds  # 98 %
    assert not wake_stats(300, [], [], 800.0, 0).holds  # nobody woke: nothing shown
    # one refusal in 200 wake-ups is within 99 %, but the turns around it were all on time: the box
    # turned away a device it could have served
    s = wake_stats(300, wakes(199, refused_at=(50.0,)), on_time, 800.0, 0)
    assert (s.refused, s.refused_with_room, s.holds) == (1, 1, False)
    # the same refusal while a turn nearby was late (the recogniser was behind) is no fault
    behind = [*on_time, turn(55.0, 1500.0)]
    s = wake_stats(300, wakes(199, refused_at=(50.0,)), behind, 800.0, 0)
    assert (s.refused_with_room, s.holds) == (0, True)
    s = wake_stats(300, wakes(199, refused_at=(200.0,)), behind, 800.0, 0)  # nobody talking near it: room
    assert (s.refused_with_room, s.holds) == (1, False)
    shedding = [*on_time, turn(45.0, None, "error", "shed: connection closed with 1013 (overloaded)")]
    assert wake_stats(300, wakes(199, refused_at=(50.0,)), shedding, 800.0, 0).refused_with_room == 0
    unheard = [*on_time, turn(45.0, None, "missing")]  # no reply at all is no sign of a full recogniser
    assert wake_stats(300, wakes(199, refused_at=(50.0,)), unheard, 800.0, 0).refused_with_room == 1


@pytest.mark.slow
async def test_a_refused_wake_up_is_not_retried(clips):  # noqa: F811
    async with FakeServer("busy") as srv:
        report = await run_wake(wake_opts(srv.url, clients=(3,), duration_s=2.0), clips)
    step = report.steps[0]
    assert srv.refusals == 3  # one connect per woken device, though the step went on
    assert [w.outcome for w in step.records] == ["refused"] * 3
    assert all("503" in (w.reason or "") for w in step.records)
    assert step.extra["wake"]["refused_with_room"] == 3 and report.capacity is None
    assert "devices per box: none of the steps" in format_table(report)


@pytest.mark.slow
async def test_woken_devices_converse_and_are_served(clips):  # noqa: F811
    async with FakeServer(delay_ms=30.0, silence_ms=200.0) as srv:
        report = await run_wake(wake_opts(srv.url, clients=(2,), duration_s=4.0, idle_close_s=0.3), clips)
    assert_consistent(report)
    step = report.steps[0]
    assert len(srv.paths) == 2  # each device connected once
    assert [(w.outcome, w.turns, w.spoken, w.group) for w in step.records] == [("served", 2, 2, True)] * 2
    assert step.stats.answered == step.stats.utterances == 4 and report.capacity == 2
    table = format_table(report)
    assert "devices per box: 2" in table and "wake-ups (served:" in table
    assert "wake (each device wakes only in the group wake, all of them within the first second" in render_markdown(
        report
    )


@pytest.mark.slow
async def test_a_1013_close_fails_the_conversation_from_that_turn_without_reconnecting(clips):  # noqa: F811
    async with FakeServer("close_after", close_after=4, close_code=1013) as srv:
        report = await run_wake(wake_opts(srv.url, clients=(2,), duration_s=2.5), clips)
    assert_consistent(report)
    step = report.steps[0]
    assert len(srv.paths) == 2  # no reconnect after the close
    for w in step.records:
        assert (w.outcome, w.failed_turn, w.spoken) == ("failed", 1, 1)
        assert (w.reason or "").startswith("turn 1: shed: connection closed with 1013")
    assert step.stats.shed == 2 and report.capacity is None


@pytest.mark.slow
async def test_after_its_last_turn_the_device_listens_idle_close_s_then_closes(clips):  # noqa: F811
    """One turn, the answer 0.1 s, then 0.3 s of listening: the device stops sending long before
    the 5 s step ends (at 16.7 frames a second, the rest of the step would be ~50 frames)."""
    async with FakeServer(delay_ms=30.0, silence_ms=200.0) as srv:
        o = wake_opts(srv.url, clients=(1,), duration_s=5.0, turns=(1, 1), idle_close_s=0.3)
        report = await run_wake(o, clips)
    (wake,) = report.steps[0].records
    assert (wake.outcome, wake.spoken) == ("served", 1)
    (reply,) = srv.reply_times
    after = [t for t in srv.frame_times if t > reply]
    assert 0 < len(after) <= 12, len(after)  # (0.1 + 0.3) s of frames and a little slack


@pytest.mark.slow
async def test_wake_devices_run_in_generator_processes(clips):  # noqa: F811
    async with FakeServer() as srv:
        report = await run_wake(wake_opts(srv.url, clients=(4,), duration_s=4.0, idle_close_s=0.3, procs=2), clips)
    step = report.steps[0]
    assert sorted((w.device, w.outcome) for w in step.records) == [(i, "served") for i in range(4)]
    assert len(srv.paths) == 4 and report.capacity == 4
