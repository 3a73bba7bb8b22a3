"""The load run: many simulated devices talking to one server, step after step.

Each client is a `Device` that connects (staggered), then repeats: pick a clip (by seed), send it
at real-time pace, then either keep streaming silence until the server endpoints and answers
(auto/realtime: a listening device never stops its microphone) or send `listen stop` (manual),
wait for the `stt`, pause to think. Two traffic shapes: `continuous` talkers stream silence
through the think pause (the microphone is always on), `conversation` devices behave as the
firmware does in a conversation: after the `stt` they stop sending while the answer plays (the
firmware mutes its microphone between `tts start` and `tts stop`, `reply_ms`), then send
`listen start` again and stream silence through the think pause before the next utterance. The
third shape, `wake` (devices that connect when woken and never retry), is `loadtest.wake`: it
runs its own device coroutine (`client`) through this module's steps, turns and processes.
Clients of a step share one asyncio loop per process
(`procs` processes take every procs-th client). Nothing a server does can crash or hang the run:
refusals, closes, silence and errors are counted, and every wait ends by the step's hard
deadline, `duration_s + reply_timeout_s + 1` s after the step starts (plus a few seconds to
close).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import multiprocessing
import os
import queue
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .clips import DEFAULT_AUDIO_DIR, FRAME_MS_CHOICES, Clip, load_clips
from .device import (
    ConnectError,
    Device,
    DeviceClosed,
    DeviceConfig,
    DeviceError,
    HelloRejected,
    HelloTimeout,
    ReplyTimeout,
    ServerMessage,
    default_device_id,
)
from .probe import ProbeError, ResourceUsage, ServerProbe, ServerStages, fetch_series
from .report import Counters, LoadReport, Outcome, Progress, StepReport, UtteranceSample, build_step_stats
from .stats import Histogram, summarize

Mode = Literal["auto", "manual", "realtime"]
Shape = Literal["continuous", "conversation", "wake"]
CLOSE_SLACK_S = 3.0  # after the hard deadline: time for clients to close before they are cancelled
SPAWN_MARGIN_S = 3.0  # procs > 1: the step starts this long after the processes are launched
OVERLOADED = 1013  # the close code ("try again later") a server sheds a device with
_CLIENT_NS = uuid.UUID("7f1c5e2a-8a55-4d3e-9a8e-2b6f0c1d9e41")


class OptionsError(ValueError):
    """Load options that cannot make a run; the message says which and why."""


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Everything a run needs. `clients` holds one client count per step (a ramp)."""

    url: str = "ws://127.0.0.1:8000/xiaozhi/v1/"
    clients: tuple[int, ...] = (10,)  # an int is taken as one step
    duration_s: float = 60.0
    mode: Mode = "auto"
    protocol_version: int = 1
    token: str | None = None
    auth_in_query: bool = False
    audio_dir: Path = DEFAULT_AUDIO_DIR
    seed: int = 0
    procs: int = 1
    frame_ms: int = 60
    pace: float = 1.0  # 1.0 = real time
    think_ms: tuple[float, float] = (1000.0, 3000.0)
    shape: Shape = "continuous"
    relay: bool = False  # the server relays to an upstream: time end of speech -> first TTS audio too
    reply_ms: tuple[float, float] = (4000.0, 10000.0)  # conversation, wake: how long the answer plays
    wake_every_s: float = 60.0  # wake: mean gap between a device's wake-ups (exponential); 0: the group wake only
    idle_close_s: float = 120.0  # wake: the device closes after this long listening to silence after its last turn
    group_wake: int | Literal["all"] | None = None  # wake: this many devices (all: the step's) wake in its first second
    turns: tuple[int, int] = (1, 3)  # wake: turns per conversation, uniform in [min, max]
    stagger_s: float | None = None  # None: see `stagger_for`
    reply_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    hello_timeout_s: float = 10.0
    retry_s: float = 1.0  # after a refusal or disconnect, before the client tries again
    honor_retry_after: bool = False  # after a 503 with Retry-After, wait what it says instead of retry_s
    server_silence_ms: float = 400.0  # the server's end-of-speech silence (our vad.min_silence_ms)
    budget_ms: float = 800.0
    lateness_budget_ms: float = 20.0
    expect_replies: bool = True  # False against a sink: measure only the generator
    wake_word: str | None = None  # send `listen detect` with this text before listening
    server_pid: int | None = None
    metrics_url: str | None = None
    step_pause_s: float = 2.0
    stop_on_fail: bool = True  # a ramp stops after the first step over budget

    def __post_init__(self) -> None:
        # Friendly forms for programmatic use: clients=10, audio_dir="clips/", think_ms=[a, b].
        if isinstance(self.clients, int):
            object.__setattr__(self, "clients", (self.clients,))
        elif not isinstance(self.clients, tuple):
            object.__setattr__(self, "clients", tuple(self.clients))
        object.__setattr__(self, "audio_dir", Path(self.audio_dir))
        object.__setattr__(self, "think_ms", tuple(float(x) for x in self.think_ms))
        object.__setattr__(self, "reply_ms", tuple(float(x) for x in self.reply_ms))
        object.__setattr__(self, "turns", tuple(int(x) for x in self.turns))
        problems = []
        if not self.url.startswith(("ws://", "wss://")):
            problems.append(f"url must start with ws:// or wss://, got {self.url!r}")
        if not self.clients or any(n < 1 for n in self.clients):
            problems.append(f"client counts must be positive, got {self.clients}")
        if self.duration_s <= 0:
            problems.append(f"duration must be positive, got {self.duration_s}")
        if self.mode not in ("auto", "manual", "realtime"):
            problems.append(f"mode must be auto, manual or realtime, got {self.mode!r}")
        if self.protocol_version not in (1, 2, 3):
            problems.append(f"protocol version must be 1, 2 or 3, got {self.protocol_version}")
        if self.procs < 1:
            problems.append(f"procs must be at least 1, got {self.procs}")
        if self.frame_ms not in FRAME_MS_CHOICES:
            problems.append(f"frame duration must be one of {FRAME_MS_CHOICES} ms, got {self.frame_ms}")
        if self.pace <= 0:
            problems.append(f"pace must be positive, got {self.pace}")
        lo, hi = self.think_ms
        if lo < 0 or hi < lo:
            problems.append(f"think pause range must be 0 <= min <= max, got {self.think_ms}")
        if self.shape not in ("continuous", "conversation", "wake"):
            problems.append(f"shape must be continuous, conversation or wake, got {self.shape!r}")
        if self.wake_every_s < 0 or self.idle_close_s < 0:
            problems.append(
                f"wake gap and idle close must not be negative, got {self.wake_every_s}, {self.idle_close_s}"
            )
        if (
            self.group_wake is not None
            and self.group_wake != "all"
            and (not isinstance(self.group_wake, int) or not 1 <= self.group_wake <= min(self.clients))
        ):
            problems.append(f"group wake must be 'all' or 1 to the smallest client count, got {self.group_wake!r}")
        if self.shape == "wake" and not self.expect_replies:
            problems.append("the wake shape judges replies: measure the generator (sink) with another shape")
        if self.shape == "wake" and self.wake_every_s == 0 and self.group_wake is None:
            problems.append("a wake gap of 0 means no wake-ups but a group wake's: give --group-wake")
        if len(self.turns) != 2 or self.turns[0] < 1 or self.turns[1] < self.turns[0]:
            problems.append(f"turns must be 1 <= min <= max, got {self.turns}")
        lo, hi = self.reply_ms
        if lo < 0 or hi < lo:
            problems.append(f"reply time range must be 0 <= min <= max, got {self.reply_ms}")
        for name in ("reply_timeout_s", "connect_timeout_s", "hello_timeout_s", "budget_ms", "lateness_budget_ms"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("retry_s", "server_silence_ms", "step_pause_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.stagger_s is not None and self.stagger_s < 0:
            problems.append(f"stagger must not be negative, got {self.stagger_s}")
        if problems:
            raise OptionsError("; ".join(problems))

    def stagger_for(self, clients: int) -> float:
        """Seconds over which `clients` start: `stagger_s`, or by default 5 s, and at most 200
        connections a second (a connection costs the generator ~0.7 ms of CPU), but no more than
        a quarter of the step."""
        if self.stagger_s is not None:
            return self.stagger_s
        return min(max(5.0, clients / 200.0), self.duration_s / 4.0)

    @property
    def reply_window_s(self) -> float:
        """How long after the end of speech a client waits: the reply timeout, or in sink mode
        the server's end-of-speech silence and one frame."""
        if self.expect_replies:
            return self.reply_timeout_s
        return self.server_silence_ms / 1000.0 + self.frame_ms / 1000.0

    @property
    def step_bound_s(self) -> float:
        """No step lasts longer than this (from its start to its last client closed)."""
        return self.duration_s + self.reply_window_s + 1.0 + CLOSE_SLACK_S + 2.0


ClientFn = Callable[["_Plan", "_ShardState", int], Awaitable[None]]
"""One simulated device for a whole step (a module-level function, so `procs > 1` can pickle it)."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one process runs in one step (picklable for `procs > 1`)."""

    options: LoadOptions
    clips: tuple[Clip, ...]
    indices: tuple[int, ...]
    total_clients: int
    t0: float  # time.monotonic() of the step start; CLOCK_MONOTONIC is shared by processes
    client: ClientFn | None = None  # None: `_client`, the continuous and conversation devices

    @property
    def speech_end(self) -> float:
        return self.t0 + self.options.duration_s

    @property
    def hard_end(self) -> float:
        return self.speech_end + self.options.reply_window_s + 1.0


@dataclass(slots=True)
class _ShardState:
    counters: Counters = field(default_factory=Counters)
    samples: list[UtteranceSample] = field(default_factory=list)
    hello_ms: list[float] = field(default_factory=list)
    lateness: Histogram = field(default_factory=Histogram)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    client_error_messages: list[str] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)  # what a shape's own client keeps (the wake-ups)

    def snapshot(self) -> _Snapshot:
        """What the progress line needs, small enough to send between processes each second."""
        missing = sum(1 for s in self.samples if s.outcome == "missing")
        errors = sum(1 for s in self.samples if s.outcome == "error")
        lat = [s.latency_ms for s in self.samples if s.outcome == "ok" and s.latency_ms is not None]
        return _Snapshot(
            dataclasses.replace(self.counters),
            len(self.samples),
            missing,
            errors,
            lat,
            Histogram(dict(self.lateness.counts)),
        )


@dataclass(slots=True)
class _Snapshot:
    counters: Counters = field(default_factory=Counters)
    utterances: int = 0
    missing: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    lateness: Histogram = field(default_factory=Histogram)


def _add_counters(into: Counters, other: Counters) -> None:
    for f in dataclasses.fields(Counters):
        setattr(into, f.name, getattr(into, f.name) + getattr(other, f.name))


def _merge_snapshots(snaps: list[_Snapshot]) -> _Snapshot:
    out = _Snapshot()
    for s in snaps:
        _add_counters(out.counters, s.counters)
        out.utterances += s.utterances
        out.missing += s.missing
        out.errors += s.errors
        out.latencies += s.latencies
        out.lateness.merge(s.lateness)
    return out


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


async def _await_reply(dev: Device, t_eos: float, deadline: float) -> tuple[ServerMessage | None, int]:
    """The first `stt` or `error` that arrived after the end of speech, and how many came
    before it (the server cut the clip into several utterances)."""
    early = 0
    while True:
        try:
            msg = await dev.next_message(("stt", "error"), timeout=deadline - time.monotonic())
        except ReplyTimeout:
            return None, early
        if msg.at < t_eos:
            early += 1
            continue
        return msg, early


async def _first_audio(dev: Device, t_eos: float, deadline: float) -> float | None:
    """When the first binary frame (the upstream's TTS audio) after the end of speech arrived."""
    while time.monotonic() < deadline:
        for at, _ in dev.binary:
            if at >= t_eos:
                return at
        if dev.closed:
            return None
        await asyncio.sleep(0.005)
    return None


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


async def _start_listening(dev: Device, opts: LoadOptions) -> None:
    if opts.wake_word:
        await dev.detect(opts.wake_word)
    await dev.listen("start", opts.mode)


async def _utterance(
    plan: _Plan,
    state: _ShardState,
    dev: Device,
    clip: Clip,
    think_s: float,
    reply_s: float,
    index: int,
    turns: list[UtteranceSample] | None = None,
) -> None:
    """Send one clip and wait for its reply; always records one sample (in `turns` too, if given)."""
    opts = plan.options
    streaming = opts.mode != "manual"
    conversation = opts.shape != "continuous"
    t_eos: float | None = None
    t_stop: float | None = None
    tts_at: float | None = None
    reply: ServerMessage | None = None
    early = 0
    closed: DeviceClosed | None = None
    streamer: asyncio.Task[list[float]] | None = None
    state.counters.utterances += 1
    try:
        if not streaming:
            await _start_listening(dev, opts)
        times = await dev.send_opus(clip.packets, opts.pace)
        t_eos = times[clip.last_speech_frame]
        if streaming:
            # Keep the microphone open: silence until the reply (and, talking on, through the think pause).
            silence_ms = (opts.reply_window_s + (0.0 if conversation else think_s)) * 1000.0 + 2 * opts.frame_ms
            streamer = asyncio.get_running_loop().create_task(dev.send_silence(silence_ms, opts.pace))
        else:
            await dev.listen("stop")
            t_stop = time.monotonic()
        deadline = min(t_eos + opts.reply_window_s, plan.hard_end)
        if opts.expect_replies:
            reply, early = await _await_reply(dev, t_eos, deadline)
            if opts.relay and reply is not None and reply.type == "stt":
                tts_at = await _first_audio(dev, t_eos, deadline)
        else:
            await _sleep_until(deadline)
        if conversation:
            # The answer plays: the firmware sends nothing until `tts stop`, then listens again.
            if streamer is not None:
                streamer.cancel()
                await asyncio.gather(streamer, return_exceptions=True)
                streamer = None
            await _sleep_until(min(time.monotonic() + reply_s, plan.speech_end))
            if streaming and time.monotonic() < plan.speech_end:
                await _start_listening(dev, opts)
                streamer = asyncio.get_running_loop().create_task(dev.send_silence(think_s * 1000.0, opts.pace))
        await _sleep_until(min(time.monotonic() + think_s, plan.speech_end))
    except DeviceClosed as e:
        closed = e
        raise
    finally:
        if streamer is not None:
            streamer.cancel()
            await asyncio.gather(streamer, return_exceptions=True)
        sample = _sample(plan, clip, index, t_eos, t_stop, reply, early, closed)
        if tts_at is not None and t_eos is not None:
            sample = dataclasses.replace(sample, tts_ms=(tts_at - t_eos) * 1000.0)
        state.samples.append(sample)
        if turns is not None:
            turns.append(sample)
        if reply is not None and reply.type == "stt":
            state.counters.answered += 1


def _sample(
    plan: _Plan,
    clip: Clip,
    index: int,
    t_eos: float | None,
    t_stop: float | None,
    reply: ServerMessage | None,
    early: int,
    closed: DeviceClosed | None,
) -> UtteranceSample:
    opts = plan.options
    eos_s = None if t_eos is None else t_eos - plan.t0
    if reply is None and closed is not None and closed.code == OVERLOADED:
        # The server shed this device (1013) mid-utterance: the surplus being shed, said as such.
        error = f"shed: connection closed with {OVERLOADED} ({closed.reason or 'no reason'})"
        return UtteranceSample(index, clip.name, "error", eos_s, None, None, clip.speech_end_ms, error=error)
    if reply is None or t_eos is None:
        outcome: Outcome = (
            "sent"
            if (not opts.expect_replies and t_eos is not None)
            else ("disconnected" if closed is not None else "missing")
        )
        return UtteranceSample(index, clip.name, outcome, eos_s, None, None, clip.speech_end_ms, early_replies=early)
    latency = (reply.at - t_eos) * 1000.0
    if reply.type == "error":
        msg = reply.data.get("message")
        return UtteranceSample(
            index,
            clip.name,
            "error",
            eos_s,
            latency,
            None,
            clip.speech_end_ms,
            error=str(msg) if msg is not None else None,
            early_replies=early,
        )
    server = (reply.at - t_stop) * 1000.0 if t_stop is not None else latency - opts.server_silence_ms
    text = reply.data.get("text")
    return UtteranceSample(
        index,
        clip.name,
        "ok",
        eos_s,
        latency,
        server,
        clip.speech_end_ms,
        text=text if isinstance(text, str) else None,
        reported_latency_ms=_number(reply.data.get("latency_ms")),
        early_replies=early,
        timings=timings if isinstance(timings := reply.data.get("timings"), dict) else None,
    )


async def _converse(plan: _Plan, state: _ShardState, dev: Device, rng: random.Random, index: int) -> None:
    opts = plan.options
    if opts.mode != "manual":
        await _start_listening(dev, opts)
    while True:
        clip = rng.choice(plan.clips)
        think_s = rng.uniform(*opts.think_ms) / 1000.0
        reply_s = rng.uniform(*opts.reply_ms) / 1000.0 if opts.shape != "continuous" else 0.0
        if time.monotonic() + clip.duration_ms / 1000.0 / opts.pace > plan.speech_end:
            return
        stale = dev.pending()
        state.counters.late_replies += sum(1 for m in stale if m.type in ("stt", "error"))
        await _utterance(plan, state, dev, clip, think_s, reply_s, index)


def _device_config(opts: LoadOptions, index: int) -> DeviceConfig:
    """Client `index`'s identity (a MAC and a client id from the seed) and connection settings."""
    return DeviceConfig(
        url=opts.url,
        token=opts.token,
        protocol_version=opts.protocol_version,
        device_id=default_device_id(index),
        client_id=str(uuid.uuid5(_CLIENT_NS, f"{opts.seed}:{index}")),
        auth_in_query=opts.auth_in_query,
        frame_ms=opts.frame_ms,
        open_timeout_s=opts.connect_timeout_s,
        hello_timeout_s=opts.hello_timeout_s,
    )


async def _client(plan: _Plan, state: _ShardState, index: int) -> None:
    """One simulated device for the whole step, reconnecting after refusals and drops."""
    opts = plan.options
    c = state.counters
    rng = random.Random(f"{opts.seed}:{index}")
    cfg = _device_config(opts, index)
    await _sleep_until(plan.t0 + opts.stagger_for(plan.total_clients) * index / plan.total_clients)
    while time.monotonic() < plan.speech_end:
        dev = Device(cfg, lateness=state.lateness)
        try:
            if await _session(plan, state, dev, rng, index):
                return
        finally:
            await dev.close()
            c.frames_sent += dev.frames_sent
        wait = dev.retry_after_s if opts.honor_retry_after and dev.retry_after_s is not None else opts.retry_s
        await _sleep_until(min(time.monotonic() + wait, plan.speech_end))


async def _connect(plan: _Plan, state: _ShardState, dev: Device) -> DeviceError | TimeoutError | None:
    """Connect and say hello by the step's hard deadline, counting the outcome; the error, or None
    when the device is in (and counted in `connected`: the caller takes it out when it leaves)."""
    c = state.counters
    try:
        async with asyncio.timeout_at(plan.hard_end):
            await dev.connect()
    except HelloTimeout as e:
        c.hello_timeouts += 1
        return e
    except TimeoutError as e:  # ConnectTimeout, or the hard deadline
        c.connect_timeouts += 1
        return e
    except ConnectError as e:
        c.refused += 1
        return e
    except HelloRejected as e:
        c.hello_rejected += 1
        return e
    except DeviceClosed as e:
        c.disconnects += 1
        return e
    if dev.hello_ms is not None:
        state.hello_ms.append(dev.hello_ms)
    c.connects += 1
    c.connected += 1
    return None


async def _session(plan: _Plan, state: _ShardState, dev: Device, rng: random.Random, index: int) -> bool:
    """One connection: True when the client is done, False when it should connect again."""
    c = state.counters
    if await _connect(plan, state, dev) is not None:
        return False
    try:
        await _converse(plan, state, dev, rng, index)
        return True
    except DeviceClosed:
        c.disconnects += 1
        return False
    finally:
        c.connected -= 1


async def _guarded_client(plan: _Plan, state: _ShardState, index: int) -> None:
    try:
        await (plan.client or _client)(plan, state, index)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a harness bug must not take the run down; it is counted and shown
        state.counters.client_errors += 1
        if len(state.client_error_messages) < 20:
            state.client_error_messages.append(f"client {index}: {type(e).__name__}: {e}")


async def _freeze_gc_at(when: float) -> None:
    """Once every client has connected, move the long-lived objects (connections, clips) out of
    the collector's reach: a full collection over 1,000 connections stalls the loop ~100 ms, which
    alone would make more than 1 % of the frames late."""
    await _sleep_until(when)
    gc.freeze()


async def _run_shard(plan: _Plan, state: _ShardState) -> _ShardState:
    cpu0 = time.process_time()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_guarded_client(plan, state, i)) for i in plan.indices]
    freezer = loop.create_task(_freeze_gc_at(plan.t0 + plan.options.stagger_for(plan.total_clients) + 1.0))
    try:
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, plan.hard_end + CLOSE_SLACK_S - time.monotonic()))
            for t in pending:
                t.cancel()
            state.counters.cancelled += len(pending)
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_SLACK_S)
    finally:
        freezer.cancel()
        gc.unfreeze()
    state.cpu_s = time.process_time() - cpu0
    state.wall_s = time.monotonic() - plan.t0
    return state


def _shard_process(plan: _Plan, shard: int, out: multiprocessing.Queue[tuple[str, int, object]]) -> None:
    """Entry point of a generator process: run the shard, report progress each second."""
    state = _ShardState()

    async def main() -> None:
        async def report() -> None:
            while True:
                await asyncio.sleep(1.0)
                out.put(("progress", shard, state.snapshot()))

        reporter = asyncio.get_running_loop().create_task(report())
        try:
            await _run_shard(plan, state)
        finally:
            reporter.cancel()

    try:
        asyncio.run(main())
    finally:
        out.put(("result", shard, state))


def _merge(states: list[_ShardState]) -> _ShardState:
    merged = _ShardState()
    for s in states:
        _add_counters(merged.counters, s.counters)
        merged.samples += s.samples
        merged.hello_ms += s.hello_ms
        merged.lateness.merge(s.lateness)
        merged.cpu_s += s.cpu_s
        merged.wall_s = max(merged.wall_s, s.wall_s)
        merged.client_error_messages += s.client_error_messages
        merged.records += s.records
    return merged


def _progress(step: int, steps: int, clients: int, opts: LoadOptions, t0: float, snap: _Snapshot) -> Progress:
    lat = summarize(snap.latencies)
    c = snap.counters
    return Progress(
        step,
        steps,
        clients,
        max(0.0, time.monotonic() - t0),
        opts.duration_s,
        c.connected,
        snap.utterances,
        c.answered,
        snap.missing,
        snap.errors,
        c.disconnects,
        c.refused + c.connect_timeouts + c.hello_timeouts + c.hello_rejected,
        lat.p50,
        lat.p95,
        snap.lateness.summary().p99,
    )


ProgressCallback = Callable[[Progress], None]


async def _run_step_inprocess(plan: _Plan, on_tick: Callable[[_Snapshot], None]) -> _ShardState:
    state = _ShardState()

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            on_tick(state.snapshot())

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        return await _run_shard(plan, state)
    finally:
        ticker.cancel()


async def _run_step_processes(
    opts: LoadOptions,
    clips: tuple[Clip, ...],
    clients: int,
    t0: float,
    on_tick: Callable[[_Snapshot], None],
    client: ClientFn | None,
) -> _ShardState:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[str, int, object]] = ctx.Queue()
    nproc = min(opts.procs, clients)
    procs = []
    for k in range(nproc):
        plan = _Plan(opts, clips, tuple(range(k, clients, nproc)), clients, t0, client)
        p = ctx.Process(target=_shard_process, args=(plan, k, out), name=f"loadtest-shard-{k}", daemon=True)
        p.start()
        procs.append(p)
    latest: dict[int, _Snapshot] = {}
    results: dict[int, _ShardState] = {}
    give_up = t0 + opts.step_bound_s + 5.0
    try:
        while len(results) < nproc and time.monotonic() < give_up:
            try:
                kind, shard, payload = await asyncio.to_thread(out.get, True, 0.5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            if kind == "result" and isinstance(payload, _ShardState):
                results[shard] = payload
            elif kind == "progress" and isinstance(payload, _Snapshot):
                latest[shard] = payload
                if shard == 0:
                    on_tick(
                        _merge_snapshots(
                            [
                                results[k].snapshot() if k in results else latest.get(k, _Snapshot())
                                for k in range(nproc)
                            ]
                        )
                    )
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
    merged = _merge(list(results.values()))
    lost = nproc - len(results)
    if lost:
        merged.counters.client_errors += lost
        merged.client_error_messages.append(f"{lost} generator process(es) returned no result")
    return merged


async def run_step(
    opts: LoadOptions,
    clips: tuple[Clip, ...],
    clients: int,
    index: int = 0,
    steps: int = 1,
    on_progress: ProgressCallback | None = None,
    client: ClientFn | None = None,
) -> StepReport:
    """Run one step with `clients` devices for `opts.duration_s`; bounded by `opts.step_bound_s`
    (and a few seconds to start the processes when `opts.procs > 1`). `client` is the device
    coroutine of a shape that brings its own (`loadtest.wake`)."""
    if not clips:
        raise OptionsError("no clips to send")
    probe = ServerProbe(opts.server_pid, opts.metrics_url) if (opts.server_pid or opts.metrics_url) else None
    if probe is not None:
        await probe.start()
    series_before = await _series(opts.metrics_url)
    multi = opts.procs > 1 and clients > 1
    t0 = time.monotonic() + (SPAWN_MARGIN_S if multi else 0.05)

    def on_tick(snap: _Snapshot) -> None:
        if on_progress is not None:
            on_progress(_progress(index + 1, steps, clients, opts, t0, snap))

    if multi:
        state = await _run_step_processes(opts, clips, clients, t0, on_tick, client)
    else:
        state = await _run_step_inprocess(_Plan(opts, clips, tuple(range(clients)), clients, t0, client), on_tick)
    usage: ResourceUsage | None = await probe.stop() if probe is not None else None
    series_after = await _series(opts.metrics_url)
    on_tick(state.snapshot())
    gen_cpu = state.cpu_s / state.wall_s * 100.0 if state.wall_s > 0 else None
    stats = build_step_stats(
        clients,
        state.wall_s,
        state.samples,
        state.counters,
        state.hello_ms,
        state.lateness,
        budget_ms=opts.budget_ms,
        lateness_budget_ms=opts.lateness_budget_ms,
        expect_replies=opts.expect_replies,
        generator_cpu_percent=gen_cpu,
        client_error_messages=state.client_error_messages,
    )
    if usage is not None:
        stats = dataclasses.replace(
            stats,
            server_cpu_percent=usage.cpu_percent,
            server_rss_peak_mb=usage.rss_peak_mb,
            server_rss_end_mb=usage.rss_end_mb,
            probe_error=usage.error,
        )
    if series_before is not None and series_after is not None:
        stats = dataclasses.replace(stats, server_stages=ServerStages.between(series_before, series_after))
    samples = sorted(state.samples, key=lambda s: (s.eos_s if s.eos_s is not None else float("inf"), s.client))
    return StepReport(index, stats, samples, state.hello_ms, state.lateness, records=state.records)


async def _series(url: str | None) -> dict[str, float] | None:
    """The server's metrics now, for the step's stage figures; None without a URL or when unreadable."""
    if url is None:
        return None
    try:
        return await asyncio.to_thread(fetch_series, url)
    except ProbeError:
        return None


def options_dict(opts: LoadOptions) -> dict[str, object]:
    d = dataclasses.asdict(opts)
    d["audio_dir"] = str(opts.audio_dir)
    if d.get("token"):
        d["token"] = "***"
    return d


async def run_load(
    options: LoadOptions,
    clips: tuple[Clip, ...] | None = None,
    on_progress: ProgressCallback | None = None,
    *,
    client: ClientFn | None = None,
    judge: Callable[[StepReport], StepReport] | None = None,
) -> LoadReport:
    """Run every step of `options.clients` and return the report.

    `clips` default to the files of `options.audio_dir`, encoded once with the run's frame
    duration. A ramp stops after the first step over budget when `stop_on_fail` is set. A shape
    with its own devices (`loadtest.wake.run_wake`) passes their coroutine as `client` and its
    verdict as `judge`, which rewrites each step before the ramp looks at it.
    """
    if options.shape == "wake" and client is None:
        raise OptionsError("the wake shape runs through loadtest.wake.run_wake")
    if clips is None:
        clips = await asyncio.to_thread(load_clips, options.audio_dir, options.frame_ms)
    if not clips:
        raise OptionsError("no clips to send")
    bad = [c.name for c in clips if c.frame_ms != options.frame_ms]
    if bad:
        raise OptionsError(f"clips {bad} are encoded with another frame duration than {options.frame_ms} ms")
    shortest = min(c.duration_ms for c in clips) / 1000.0 / options.pace
    if shortest > options.duration_s:
        raise OptionsError(
            f"every clip is longer than the {options.duration_s:g} s step (shortest {shortest:.1f} s):"
            " raise the duration"
        )
    report = LoadReport(
        options_dict(options), datetime.now(UTC).isoformat(timespec="seconds"), sink_mode=not options.expect_replies
    )
    steps = len(options.clients)
    for i, n in enumerate(options.clients):
        if i:
            await asyncio.sleep(options.step_pause_s)
        step = await run_step(options, clips, n, i, steps, on_progress, client)
        if judge is not None:
            step = judge(step)
        report.steps.append(step)
        if options.stop_on_fail and not step.stats.within_budget and i + 1 < steps:
            break
    return report


def default_out_dir(base: Path = Path("loadtest-results")) -> Path:
    return base / datetime.now().strftime("%Y%m%d-%H%M%S")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
