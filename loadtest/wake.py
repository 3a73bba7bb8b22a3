"""The wake shape: devices that connect when someone wakes them, as the xiaozhi firmware does.

A device sleeps; at each wake-up (exponential gaps of mean `wake_every_s`: a Poisson stream per
device, computed in advance from the seed) it opens its WebSocket, holds a conversation of
`turns` turns (speak a clip in real time, wait for the `stt`, stay quiet while the answer plays,
`listen start`, think, next turn), listens to silence for `idle_close_s` after its last turn and
closes. A refused or failed connect is a failed wake-up and is not retried: the firmware shows
"无法连接服务，请稍后再试" and goes idle until the next wake (`main/protocols/websocket_protocol.cc`,
`main/application.cc`). A close by the server mid-conversation (1013: shed) fails the conversation
from that turn; the device does not reconnect. A wake-up that falls while the device is still in
its conversation is dropped (woken while listening, the firmware restarts listening on the same
connection) and counted as such. `group_wake` devices wake within the step's first second (one
voice heard by every device of a room, or a room of speakers after a power cut).

Per step: wake-ups, served (every turn answered within the budget), late (every turn answered,
one over budget), refused (HTTP 503), failed (any other connect failure, a turn unanswered or
shed), the turns' end of speech -> stt percentiles, and the verdict: a step holds its devices when
at least 99 % of its wake-ups were served and none was refused while the recogniser had room (no
turn shed or answered late within `ROOM_WINDOW_S` of the refusal). Devices per box is the largest
such device count. The turns are ordinary utterances of the step, so the step table and the
over-time table read as for the other shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .clips import Clip
from .device import ConnectError, Device, DeviceClosed
from .report import WAKE_SERVED_SHARE, LoadReport, Section, StepReport, UtteranceSample, count_shed
from .run import (
    LoadOptions,
    ProgressCallback,
    _connect,
    _device_config,
    _Plan,
    _ShardState,
    _sleep_until,
    _start_listening,
    _utterance,
    run_load,
)
from .stats import Percentiles, summarize

WakeOutcome = Literal["served", "late", "refused", "failed"]
GROUP_SPREAD_S = 1.0  # a group wake's devices wake within this of each other: one voice, one second
ROOM_WINDOW_S = 10.0
"""A refusal is judged on the turns whose speech ended this close to it (`had_room`): long enough to
hold a few turns at tens of devices, short enough to be the moment of the refusal."""


def group_size(opts: LoadOptions, clients: int) -> int:
    """How many of a step's `clients` (its first ones) wake together in its first second."""
    return clients if opts.group_wake == "all" else opts.group_wake or 0


def wake_times(opts: LoadOptions, clients: int, index: int) -> tuple[float, ...]:
    """When device `index` of a step of `clients` wakes, in seconds after the step start: a
    Poisson stream of mean gap `wake_every_s` within `duration_s` (none when it is 0), and first,
    for the `group_wake` first devices, a moment in the step's first second."""
    rng = random.Random(f"wake:{opts.seed}:{index}")
    times: list[float] = []
    if index < group_size(opts, clients):
        times.append(rng.uniform(0.0, GROUP_SPREAD_S))
    if opts.wake_every_s > 0:
        t = rng.expovariate(1.0 / opts.wake_every_s)
        while t < opts.duration_s:
            times.append(t)
            t += rng.expovariate(1.0 / opts.wake_every_s)
    return tuple(sorted(times))


@dataclass(frozen=True, slots=True)
class WakeSample:
    """One wake-up of one device and how it went.

    `turns`: turns the conversation was to have; `spoken`: turns spoken (fewer when the step
    ended, or the conversation failed on one); `failed_turn`: the turn (from 1) it failed on.
    """

    device: int
    at_s: float  # when the device woke, seconds after the step start
    group: bool  # one of the step's group wake
    outcome: WakeOutcome
    turns: int
    spoken: int
    reason: str | None = None  # what failed: the connect error, or the turn's outcome
    failed_turn: int | None = None


def judge_turns(turns: Sequence[UtteranceSample], budget_ms: float) -> tuple[WakeOutcome, str | None, int | None]:
    """A connected conversation's outcome from its turns: failed on the first unanswered one (its
    outcome and error the reason), late when all were answered but one over budget, else served."""
    for k, t in enumerate(turns, 1):
        if t.outcome != "ok":
            return "failed", f"turn {k}: {t.error or t.outcome}", k
    if any(t.latency_ms is None or t.latency_ms >= budget_ms for t in turns):
        return "late", None, None
    return "served", None, None


async def wake_device(plan: _Plan, state: _ShardState, index: int) -> None:
    """One device for the step: sleep, wake, converse, close; again at its next wake-up."""
    opts = plan.options
    rng = random.Random(f"{opts.seed}:{index}")
    shortest = min(c.duration_ms for c in plan.clips) / 1000.0 / opts.pace
    group = index < group_size(opts, plan.total_clients)
    for k, at in enumerate(wake_times(opts, plan.total_clients, index)):
        if time.monotonic() > plan.t0 + at:
            state.counters.wakes_while_awake += 1  # woken again while still in its conversation
            continue
        if plan.t0 + at + shortest > plan.speech_end:
            return
        await _sleep_until(plan.t0 + at)
        woke = WakeSample(index, at, group and k == 0, "failed", rng.randint(*opts.turns), 0)
        state.records.append(await _conversation(plan, state, rng, woke))


async def _conversation(plan: _Plan, state: _ShardState, rng: random.Random, woke: WakeSample) -> WakeSample:
    """Connect once (no retry), talk the turns, listen to silence, close; what came of the wake-up."""
    opts = plan.options
    c = state.counters
    dev = Device(_device_config(opts, woke.device), state.lateness)
    spoken: list[UtteranceSample] = []
    closed: DeviceClosed | None = None
    try:
        error = await _connect(plan, state, dev)
        if error is not None:
            refused = isinstance(error, ConnectError) and error.status == 503
            return dataclasses.replace(woke, outcome="refused" if refused else "failed", reason=str(error))
        try:
            if opts.mode != "manual":
                await _start_listening(dev, opts)
            for k in range(woke.turns):
                clip: Clip = rng.choice(plan.clips)
                think_s = rng.uniform(*opts.think_ms) / 1000.0
                reply_s = rng.uniform(*opts.reply_ms) / 1000.0
                if time.monotonic() + clip.duration_ms / 1000.0 / opts.pace > plan.speech_end:
                    break
                pause = opts.idle_close_s if k == woke.turns - 1 else think_s
                await _utterance(plan, state, dev, clip, pause, reply_s, woke.device, spoken)
        except DeviceClosed as e:
            closed = e  # the turn that met the close is recorded unanswered; the device does not reconnect
            c.disconnects += 1
        finally:
            c.connected -= 1
    finally:
        await dev.close()
        c.frames_sent += dev.frames_sent
    outcome, reason, failed = judge_turns(spoken, opts.budget_ms)
    if not spoken:
        outcome, reason = "failed", str(closed) if closed is not None else "no turn fitted in the step"
    return dataclasses.replace(woke, outcome=outcome, spoken=len(spoken), reason=reason, failed_turn=failed)


@dataclass(frozen=True, slots=True)
class WakeStats:
    """One step's wake-ups and its verdict (`holds`)."""

    devices: int
    wakeups: int
    served: int
    late: int
    refused: int
    failed: int
    refused_with_room: int  # refusals while every turn near them was answered within budget
    group: int  # wake-ups of the step's group wake
    while_awake: int  # wake-ups dropped: the device was still in its conversation
    turns: Percentiles  # end of speech -> stt of the answered turns
    holds: bool

    @property
    def served_share(self) -> float | None:
        return self.served / self.wakeups if self.wakeups else None


def had_room(at_s: float, samples: Sequence[UtteranceSample], budget_ms: float) -> bool:
    """Whether the recogniser had room at `at_s`: of the turns whose speech ended within
    `ROOM_WINDOW_S` of it, none was shed and every answered one came within budget (vacuously,
    when nobody was talking). A late answer or a shed turn is what a full recogniser looks like
    from the device; a turn that got no reply at all (an utterance the model heard as no speech)
    says nothing either way."""
    near = [s for s in samples if s.eos_s is not None and abs(s.eos_s - at_s) <= ROOM_WINDOW_S]
    return not count_shed(near) and all(
        s.latency_ms is not None and s.latency_ms < budget_ms for s in near if s.outcome == "ok"
    )


def wake_stats(
    devices: int, wakes: Sequence[WakeSample], samples: Sequence[UtteranceSample], budget_ms: float, while_awake: int
) -> WakeStats:
    by = {o: sum(1 for w in wakes if w.outcome == o) for o in ("served", "late", "refused", "failed")}
    with_room = sum(1 for w in wakes if w.outcome == "refused" and had_room(w.at_s, samples, budget_ms))
    latencies = [s.latency_ms for s in samples if s.outcome == "ok" and s.latency_ms is not None]
    holds = bool(wakes) and by["served"] >= WAKE_SERVED_SHARE * len(wakes) and with_room == 0
    return WakeStats(
        devices,
        len(wakes),
        by["served"],
        by["late"],
        by["refused"],
        by["failed"],
        with_room,
        sum(1 for w in wakes if w.group),
        while_awake,
        summarize(latencies),
        holds,
    )


def judge_step(step: StepReport, budget_ms: float) -> StepReport:
    """The step with its wake figures (in `extra`, for samples.json) and the wake verdict as its
    `within_budget`, so the ramp and the report's capacity read devices per box."""
    wakes = sorted(step.records, key=lambda w: (w.at_s, w.device))
    ws = wake_stats(step.stats.clients, wakes, step.samples, budget_ms, step.stats.counters.wakes_while_awake)
    step.stats = dataclasses.replace(step.stats, within_budget=ws.holds)
    step.extra = {"wake": dataclasses.asdict(ws), "wakes": [dataclasses.asdict(w) for w in wakes]}
    step.records = wakes
    return step


_COLUMNS = (
    "devices",
    "wake-ups",
    "group",
    "served",
    "late",
    "refused",
    "failed",
    "served %",
    "refused w/ room",
    "while awake",
    "turns",
    "turn p50",
    "turn p95",
    "turn p99",
    "gen late p99",
    "holds",
)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def section(report: LoadReport, budget_ms: float) -> Section:
    rows = []
    for step in report.steps:
        w = wake_stats(step.stats.clients, step.records, step.samples, budget_ms, step.stats.counters.wakes_while_awake)
        share = w.served_share
        rows.append(
            [
                str(w.devices),
                str(w.wakeups),
                str(w.group),
                str(w.served),
                str(w.late),
                str(w.refused),
                str(w.failed),
                "-" if share is None else f"{100 * share:.1f}",
                str(w.refused_with_room),
                str(w.while_awake),
                str(w.turns.count),
                _ms(w.turns.p50),
                _ms(w.turns.p95),
                _ms(w.turns.p99),
                "-" if step.stats.lateness.p99 is None else f"{step.stats.lateness.p99:.1f}",
                "yes" if w.holds else "no",
            ]
        )
    title = (
        "wake-ups (served: every turn's stt within budget; late: all answered, one over; refused: HTTP 503;"
        " failed: another connect failure, or a turn unanswered or shed; turn ms: end of speech -> stt)"
    )
    return Section(title, _COLUMNS, rows)


async def run_wake(
    options: LoadOptions, clips: tuple[Clip, ...] | None = None, on_progress: ProgressCallback | None = None
) -> LoadReport:
    """Run the wake shape for every step of `options.clients`; the report's capacity is the
    devices per box, and its sections hold the wake-up table."""
    report = await run_load(
        options, clips, on_progress, client=wake_device, judge=lambda s: judge_step(s, options.budget_ms)
    )
    report.sections.append(section(report, options.budget_ms))
    return report


def _turns(text: str) -> tuple[int, int]:
    """`--turns MIN[,MAX]`: whole numbers."""
    lo, _, hi = text.partition(",")
    if not lo.strip().isdigit() or not (hi or lo).strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected MIN[,MAX] whole numbers, got {text!r}")
    return int(lo), int(hi or lo)


def group_wake(text: str) -> int | Literal["all"]:
    """`--group-wake`: a device count, or `all` (every device of the step)."""
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a device count or 'all', got {text!r}") from None


def add_wake_arguments(ap: argparse.ArgumentParser) -> None:
    """The wake shape's options (shared with `benchmarks.capacity`)."""
    ap.add_argument(
        "--wake-every-s",
        type=float,
        default=60.0,
        help="wake shape: mean gap between a device's wake-ups (exponential; 0: only the group wake)",
    )
    ap.add_argument(
        "--idle-close-s",
        type=float,
        default=120.0,
        help="wake shape: after its last turn the device listens to silence this long, then closes",
    )
    ap.add_argument(
        "--group-wake",
        type=group_wake,
        default=None,
        metavar="K|all",
        help="wake shape: K devices (all: every device of the step) wake within the step's first second",
    )
    ap.add_argument(
        "--turns", type=_turns, default=(1, 3), metavar="MIN[,MAX]", help="wake shape: turns per conversation"
    )
