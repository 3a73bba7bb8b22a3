"""The load-test harness against servers on loopback: a sink, a fake recogniser, and servers that
refuse, stall, close or never answer. Runs last a few seconds each; every run is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from http import HTTPStatus
from pathlib import Path

import numpy as np
import opuslib
import pytest
import soundfile
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from asr_server.adapters.xiaozhi.wire import Listen, parse_message, parse_protocol_version, server_hello, unpack_audio
from loadtest.__main__ import main as cli_main
from loadtest.clips import DEFAULT_AUDIO_DIR, ClipError, load_clip, load_clips, make_clip, speech_end_sample
from loadtest.device import ConnectError, Device, DeviceClosed, DeviceConfig, HelloRejected, HelloTimeout, ReplyTimeout
from loadtest.probe import ProbeError, parse_metrics, read_proc
from loadtest.report import (
    Counters,
    LoadReport,
    StepReport,
    UtteranceSample,
    build_step_stats,
    format_table,
    p95_counting_unanswered,
    render_markdown,
    windows,
    write_outputs,
)
from loadtest.run import LoadOptions, OptionsError, run_load
from loadtest.sink import Sink
from loadtest.stats import Histogram, percentile, summarize
from tests.support.loadtest import assert_consistent

SR = 16000


def tone_burst(speech_s: float, silence_s: float, lead_s: float = 0.1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(speech_s * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.concatenate([np.zeros(int(lead_s * SR)), tone, np.zeros(int(silence_s * SR))]).astype(np.float32)


@pytest.fixture(scope="module")
def clips():
    """Two short synthetic utterances: tone bursts with trailing silence (60 ms frames)."""
    return (make_clip("a", tone_burst(0.5, 0.3)), make_clip("b", tone_burst(0.7, 0.2, freq=660.0)))


class FakeServer:
    """A xiaozhi server with an energy endpointer: decodes Opus, replies `stt` `delay_ms` after
    `silence_ms` of silence follows speech (auto), or after `listen stop` (manual).

    `behaviour`: normal, no_hello (never answers hello), close_after (closes with `close_code` after
    `close_after` frames), silent (never replies to utterances), error (answers each utterance with an error),
    busy (refuses every upgrade with 503 and `Retry-After: 5`, counting them in `refusals`).
    """

    def __init__(
        self,
        behaviour: str = "normal",
        delay_ms: float = 30.0,
        silence_ms: float = 200.0,
        close_after: int = 10,
        close_code: int = 1011,
    ) -> None:
        self.behaviour = behaviour
        self.delay = delay_ms / 1000.0
        self.silence_ms = silence_ms
        self.close_after = close_after
        self.close_code = close_code
        self.headers: list = []  # websockets Headers: case-insensitive
        self.paths: list[str] = []
        self.frames: list[bytes] = []
        self.frame_times: list[float] = []
        self.reply_times: list[float] = []
        self.messages: list[object] = []
        self.listen_start_times: list[float] = []
        self.replies = 0
        self.refusals = 0
        self._server = None
        self.url = ""

    def _busy(self, connection: ServerConnection, request: object):
        if self.behaviour != "busy":
            return None
        self.refusals += 1
        response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server busy\n")
        response.headers["Retry-After"] = "5"
        return response

    async def __aenter__(self) -> FakeServer:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, compression=None, ping_interval=None, process_request=self._busy
        )
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/xiaozhi/v1/"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _reply(self, ws: ServerConnection, sid: str, n: int) -> None:
        await asyncio.sleep(self.delay)
        msg = (
            {"type": "error", "message": "cannot recognise"}
            if self.behaviour == "error"
            else {
                "type": "stt",
                "text": f"utterance {n}",
                "session_id": sid,
                "latency_ms": self.delay * 1000,
                "timings": {
                    "asr_queue_ms": 5.0 * n,
                    "asr_ms": 20.0,
                    "embed_queue_ms": None,
                    "embed_ms": None,
                    "speculated": n % 2 == 0,
                },
            }
        )
        try:
            await ws.send(json.dumps(msg))
            self.reply_times.append(time.monotonic())
            self.replies += 1
        except ConnectionClosed:
            pass

    async def _handle(self, ws: ServerConnection) -> None:
        req = ws.request
        self.headers.append(req.headers)
        self.paths.append(req.path)
        version = parse_protocol_version(req.headers.get("Protocol-Version"))
        sid = uuid.uuid4().hex
        dec = opuslib.Decoder(SR, 1)
        in_speech, quiet_ms, n, frames, mode = False, 0.0, 0, 0, "auto"
        pending: set[asyncio.Task] = set()

        def endpoint() -> None:
            nonlocal n
            n += 1
            if self.behaviour != "silent":
                t = asyncio.get_running_loop().create_task(self._reply(ws, sid, n))
                pending.add(t)
                t.add_done_callback(pending.discard)

        try:
            async for raw in ws:
                if isinstance(raw, str):
                    msg = parse_message(raw)
                    self.messages.append(msg)
                    if type(msg).__name__ == "Hello":
                        if self.behaviour != "no_hello":
                            await ws.send(json.dumps(server_hello(sid, {"format": "opus"})))
                    elif isinstance(msg, Listen) and msg.state == "start":
                        mode = msg.mode or "auto"
                        self.listen_start_times.append(time.monotonic())
                    elif isinstance(msg, Listen) and msg.state == "stop" and mode == "manual":
                        endpoint()
                    continue
                frame = unpack_audio(raw, version)
                self.frames.append(frame.payload)
                self.frame_times.append(time.monotonic())
                frames += 1
                if self.behaviour == "close_after" and frames >= self.close_after:
                    if frames == self.close_after:  # close while still reading, so the handshake ends
                        t = asyncio.get_running_loop().create_task(ws.close(self.close_code, "test closes"))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                    continue
                pcm = np.frombuffer(dec.decode(frame.payload, 960), dtype="<i2").astype(np.float32) / 32768
                loud = float(np.sqrt(np.mean(pcm * pcm))) > 0.01
                dur = len(pcm) * 1000.0 / SR
                if loud:
                    in_speech, quiet_ms = True, 0.0
                elif in_speech and mode != "manual":
                    quiet_ms += dur
                    if quiet_ms >= self.silence_ms:
                        in_speech = False
                        endpoint()
        except ConnectionClosed:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opts(url: str, **kw) -> LoadOptions:
    base = dict(
        url=url,
        clients=(3,),
        duration_s=2.5,
        think_ms=(50.0, 150.0),
        stagger_s=0.2,
        reply_timeout_s=1.5,
        connect_timeout_s=1.0,
        hello_timeout_s=1.0,
        retry_s=0.3,
        server_silence_ms=200.0,
        step_pause_s=0.2,
    )
    base.update(kw)
    return LoadOptions(**base)


async def run_bounded(o: LoadOptions, clips) -> LoadReport:
    """The run must end by itself: its bound per step, plus spawn time, plus slack."""
    bound = len(o.clients) * (o.step_bound_s + o.step_pause_s + 5.0) + 5.0
    return await asyncio.wait_for(run_load(o, clips), bound)


# --- clips ---------------------------------------------------------------------------------------


def test_clip_resampled_encoded_and_speech_end_found(tmp_path: Path):
    x = tone_burst(0.6, 0.5, lead_s=0.2)  # speech from 200 to 800 ms, clip 1300 ms
    stereo = np.stack([x, x], axis=1)
    path = tmp_path / "burst.flac"
    soundfile.write(path, soxr_up(stereo), 44100)
    c = load_clip(path)
    assert c.name == "burst.flac" and c.frame_ms == 60
    assert len(c.packets) == -(-1300 // 60)
    assert 780 <= c.speech_end_ms <= 830
    assert c.last_speech_frame * 60 < c.speech_end_ms <= (c.last_speech_frame + 1) * 60
    dec = opuslib.Decoder(SR, 1)
    assert all(len(dec.decode(p, 960)) == 960 * 2 for p in c.packets)
    c20 = load_clip(path, frame_ms=20)
    assert len(c20.packets) == 65 and c20.last_speech_frame == pytest.approx(c.speech_end_ms / 20, abs=1.5)


def soxr_up(x: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(x, SR, 44100)


def test_speech_end_boundaries_and_bad_input(tmp_path: Path):
    assert speech_end_sample(np.zeros(8000, np.float32)) == 0
    c = make_clip("exact", np.concatenate([0.3 * np.ones(1920, np.float32), np.zeros(1920, np.float32)]))
    assert c.speech_end_ms == 120.0 and c.last_speech_frame == 1  # the sample at 119.9 ms is in frame 1
    with pytest.raises(ClipError, match="no speech"):
        make_clip("quiet", np.zeros(16000, np.float32))
    with pytest.raises(ClipError, match="no .wav or .flac"):
        load_clips(tmp_path)
    with pytest.raises(ClipError, match="not found"):
        load_clips(tmp_path / "absent")
    (tmp_path / "broken.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(ClipError, match="cannot read"):
        load_clips(tmp_path)
    with pytest.raises(ClipError, match="frame size"):
        make_clip("x", tone_burst(0.2, 0.1), frame_ms=30)


@pytest.mark.skipif(not DEFAULT_AUDIO_DIR.is_dir(), reason="../shared/audio absent")
@pytest.mark.slow
def test_shared_clips_load_with_speech_inside():
    loaded = load_clips(DEFAULT_AUDIO_DIR)
    assert len(loaded) >= 1
    for c in loaded:
        assert 0 < c.speech_end_ms <= c.duration_ms
        assert c.duration_ms - c.speech_end_ms < 1500  # none of them ends in long silence


# --- stats and probe -----------------------------------------------------------------------------


def test_percentiles_nearest_rank_and_histogram():
    vals = list(range(1, 101))
    assert percentile(vals, 50) == 50 and percentile(vals, 95) == 95 and percentile(vals, 100) == 100
    s = summarize([5.0, 1.0, 3.0])
    assert (s.count, s.p50, s.max) == (3, 3.0, 5.0) and s.ordered()
    assert summarize([]).ordered() and summarize([]).p95 is None
    h = Histogram()
    for v in (0.05, 1.0, 1.04, 2.5, 30.0, -3.0):
        h.add(v)
    hs = h.summary()
    assert hs.count == 6 and hs.ordered() and hs.max == 30.0
    assert h.quantile(50) == pytest.approx(1.1)
    merged = Histogram(h.counts)
    merged.merge(h)
    assert merged.total == 12
    assert p95_counting_unanswered([100.0] * 19, 1) == 100.0
    assert p95_counting_unanswered([100.0] * 18, 2) is None
    assert p95_counting_unanswered([], 0) is None


def test_a_wave_over_budget_shows_in_its_window_while_the_step_p95_hides_it():
    def sample(eos_s: float, latency_ms: float | None, error: str | None = None) -> UtteranceSample:
        outcome = "ok" if latency_ms is not None else "error" if error else "missing"
        return UtteranceSample(0, "c", outcome, eos_s, latency_ms, latency_ms, 1000.0, error=error)

    wave = [sample(1.0 + i / 10, 2500.0) for i in range(10)] + [sample(3.0, None, "utterance shed: server behind")]
    steady = [sample(15.0 + i / 2, 400.0) for i in range(100)]
    assert p95_counting_unanswered([400.0] * 100 + [2500.0] * 10, 1) == 2500.0  # the step's: over, but not why
    first, second, *rest = windows(150, [*wave, *steady, sample(70.0, None)])
    assert (first.start_s, first.end_s, first.utterances, first.answered, first.shed) == (0.0, 15.0, 11, 10, 1)
    assert first.p95_all_ms is None and first.latency.p50 == 2500.0  # the shed one counts as late
    assert first.p95_admitted_ms == 2500.0  # ... but not among what the server kept
    assert (second.utterances, second.latency.p95, second.p95_all_ms) == (30, 400.0, 400.0)
    assert [w.utterances for w in rest] == [30, 30, 11] and rest[-1].p95_all_ms is None  # 70 s: missing
    assert windows(1, [sample(5.0, 100.0)], window_s=1.0)[-1].start_s == 5.0
    assert windows(1, []) == []


def test_overload_is_judged_on_what_the_server_kept_and_capacity_on_every_utterance():
    def step(outcomes: list[tuple[str, float | None, str | None]], refused: int = 0) -> StepReport:
        samples = [
            UtteranceSample(i, "c", outcome, 1.0 + i / 10, ms, ms, 1000.0, error=error)  # type: ignore[arg-type]
            for i, (outcome, ms, error) in enumerate(outcomes)
        ]
        stats = build_step_stats(
            150, 10.0, samples, Counters(refused=refused), [], Histogram(), budget_ms=800.0,
            lateness_budget_ms=20.0, expect_replies=True, generator_cpu_percent=None,
        )  # fmt: skip
        return StepReport(0, stats, samples, [], Histogram())

    answered = [("ok", 500.0, None)] * 90
    shed = [("error", None, "shed: connection closed with 1013 (server overloaded)")] * 10
    kept = step(answered + shed, refused=400).stats
    assert not kept.within_budget and kept.p95_all_ms is None  # capacity: 10 % went unanswered
    assert kept.admitted_within_budget and kept.p95_admitted_ms == 500.0  # overload: what it kept, in budget
    lost = step(answered + shed + [("missing", None, None)] * 6).stats  # 6 of 96 kept ones never answered
    assert not lost.admitted_within_budget and lost.p95_admitted_ms is None
    failed = step(answered + [("error", None, "recognition failed: EngineFailed")] * 10).stats
    assert failed.shed == 0 and not failed.admitted_within_budget  # a failure is not shedding
    slow = step([("ok", 900.0, None)] * 10 + answered + shed).stats
    assert slow.p95_admitted_ms == 900.0 and not slow.admitted_within_budget
    assert not step([]).stats.admitted_within_budget
    report = LoadReport({"budget_ms": 800.0, "lateness_budget_ms": 20.0, "think_ms": (1000, 3000)}, "now")
    report.steps.append(step(answered + shed, refused=400))
    table = format_table(report)
    assert "over capacity, the admitted devices (p95 of what was not shed < 800 ms): 150 yes (500 ms;" in table
    assert "400 refused, 10 shed, 50 clients never got in)" in table
    everyone = [("ok", 500.0, None)] * 150
    assert step(everyone).stats.within_budget  # all 150 clients served in budget: capacity
    kept_away = step(everyone[:100], refused=900).stats  # 50 of the 150 refused all along
    assert kept_away.kept_out == 50 and not kept_away.within_budget and kept_away.admitted_within_budget


def test_probe_reads_proc_and_metrics_text():
    s = read_proc(os.getpid())
    assert s.cpu_s > 0 and s.rss_bytes > 1 << 20
    with pytest.raises(ProbeError):
        read_proc(2**22 + 12345)
    text = (
        "# HELP process_cpu_seconds_total x\nprocess_cpu_seconds_total 12.5\n"
        'process_resident_memory_bytes 1.048576e+08\nother{a="b"} 3\n'
    )
    assert parse_metrics(text) == (12.5, 104857600)
    with pytest.raises(ProbeError, match="process_resident_memory_bytes"):
        parse_metrics("process_cpu_seconds_total 1\n")


def test_options_are_validated():
    with pytest.raises(OptionsError, match="client counts"):
        LoadOptions(clients=(0,))
    with pytest.raises(OptionsError, match="ws://"):
        LoadOptions(url="http://127.0.0.1:1/")
    with pytest.raises(OptionsError, match="think"):
        LoadOptions(think_ms=(500.0, 100.0))
    assert cli_main(["--clients", "0", "--quiet"]) == 2
    o = LoadOptions(clients=5, audio_dir="somewhere", think_ms=[1, 2])
    assert o.clients == (5,) and o.audio_dir == Path("somewhere") and o.think_ms == (1.0, 2.0)


async def test_clips_longer_than_the_step_are_refused(clips):
    with pytest.raises(OptionsError, match="longer than"):
        await run_load(LoadOptions(url="ws://127.0.0.1:9/", duration_s=0.5), clips)
    with pytest.raises(OptionsError, match="no clips"):
        await run_load(LoadOptions(url="ws://127.0.0.1:9/"), ())


# --- the device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
async def test_device_headers_framing_and_messages(clips, version):
    async with FakeServer() as srv:
        cfg = DeviceConfig(
            url=srv.url, token="tok", protocol_version=version, device_id="02:00:00:00:00:07", client_id="cid-1"
        )
        async with Device(cfg) as dev:
            assert dev.session_id and dev.hello_ms is not None and dev.hello_ms >= 0
            await dev.listen("start", "manual")
            sent = await dev.send_opus(clips[0].packets, None)
            await dev.listen("stop")
            msg = await dev.next_message("stt", timeout=5.0)
            assert msg.data["session_id"] == dev.session_id and msg.at >= sent[-1]
            with pytest.raises(ReplyTimeout):
                await dev.next_message("stt", timeout=0.1)
            await dev.abort()
        h = srv.headers[0]
        assert h["Authorization"] == "Bearer tok" and h["Protocol-Version"] == str(version)
        assert h["Device-Id"] == "02:00:00:00:00:07" and h["Client-Id"] == "cid-1"
        assert srv.frames == list(clips[0].packets)
        kinds = [type(m).__name__ for m in srv.messages]
        assert kinds == ["Hello", "Listen", "Listen", "Abort"]
        assert dev.frames_sent == len(clips[0].packets) and dev.closed


async def test_device_query_auth_and_paced_clock(clips):
    async with FakeServer() as srv:
        cfg = DeviceConfig(url=srv.url, token="Token abc", auth_in_query=True, device_id="02:00:00:00:00:09")
        async with Device(cfg) as dev:
            times = await dev.send_opus(clips[0].packets[:5], pace=4.0)
            more = await dev.send_silence(60 * 3, pace=4.0)  # continues the same clock
        assert "device-id=02%3A00%3A00%3A00%3A00%3A09" in srv.paths[0]
        assert "authorization=Token+abc" in srv.paths[0] and "Authorization" not in srv.headers[0]
        steps = np.diff(times + more)
        assert len(steps) == 7 and all(s > 0 for s in steps)
        assert dev.lateness.total == 8


async def test_device_failures_are_named():
    with pytest.raises(ConnectError):
        await Device(DeviceConfig(url=f"ws://127.0.0.1:{free_port()}/", open_timeout_s=2.0)).connect()

    def forbid(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "no\n")

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=forbid) as s403:
        url = f"ws://127.0.0.1:{s403.sockets[0].getsockname()[1]}/"
        with pytest.raises(ConnectError) as e:
            await Device(DeviceConfig(url=url)).connect()
        assert e.value.status == 403
    async with FakeServer("no_hello") as srv:
        with pytest.raises(HelloTimeout):
            await Device(DeviceConfig(url=srv.url, hello_timeout_s=0.3)).connect()

    async def bad_hello(ws):
        await ws.recv()
        await ws.send(json.dumps({"type": "hello", "session_id": "x"}))  # no transport
        await ws.wait_closed()

    async with serve(bad_hello, "127.0.0.1", 0) as sb:
        with pytest.raises(HelloRejected, match="transport"):
            await Device(DeviceConfig(url=f"ws://127.0.0.1:{sb.sockets[0].getsockname()[1]}/")).connect()
    async with FakeServer("close_after", close_after=2) as srv:
        async with Device(DeviceConfig(url=srv.url)) as dev:
            with pytest.raises(DeviceClosed) as closed:
                await dev.send_silence(2000, None)
                await dev.next_message("stt", timeout=3.0)
            assert dev.closed_by_server
        assert closed.value.code in (1011, None)
    with pytest.raises(ValueError, match="protocol version"):
        DeviceConfig(url="ws://127.0.0.1:1/", protocol_version=4)


# --- whole runs ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_run_against_fake_recogniser_auto(clips):
    async with FakeServer(delay_ms=30.0, silence_ms=200.0) as srv:
        report = await run_bounded(opts(srv.url), clips)
    assert_consistent(report)
    s = report.steps[0].stats
    assert s.clients == 3 and s.counters.connects == 3 and s.utterances >= 3
    assert s.answered == s.utterances and s.missing == 0
    samples = report.steps[0].samples
    for x in samples:
        assert x.text and x.text.startswith("utterance ") and x.reported_latency_ms == 30.0
        assert x.latency_ms >= 30.0  # the server's reply delay is a floor
        assert x.server_ms == pytest.approx(x.latency_ms - 200.0)
    assert {x.client for x in samples} == {0, 1, 2}
    assert report.capacity == 3 and s.within_budget
    assert srv.replies == s.utterances + s.counters.late_replies


@pytest.mark.slow
async def test_conversation_shape_mutes_the_microphone_while_the_answer_plays(clips):
    async with FakeServer(delay_ms=30.0, silence_ms=200.0) as srv:
        report = await run_bounded(
            opts(srv.url, clients=(1,), duration_s=4.0, shape="conversation", reply_ms=(600.0, 600.0)), clips
        )
    assert_consistent(report)
    s = report.steps[0].stats
    assert s.answered == s.utterances >= 2
    # after each answer: no frame for the reply time, then `listen start` again, then audio
    for t_reply in srv.reply_times[:-1]:
        after = [t for t in srv.frame_times if t > t_reply + 0.1]
        restart = min(t for t in srv.listen_start_times if t > t_reply)
        assert restart - t_reply >= 0.55 and after and min(after) >= restart
        assert not [t for t in srv.frame_times if t_reply + 0.1 < t < restart]
    stages = s.stages
    assert stages is not None and stages.asr.count == s.answered and stages.asr.p50 == 20.0
    assert stages.speculated_percent is not None
    assert "conversation" in render_markdown(report) and "Where the time went" in render_markdown(report)


@pytest.mark.slow
async def test_run_manual_mode_protocol_v3_and_outputs(clips, tmp_path: Path):
    async with FakeServer(delay_ms=40.0) as srv:
        report = await run_bounded(
            opts(srv.url, mode="manual", protocol_version=3, wake_word="你好小智", clients=(2,)), clips
        )
    assert_consistent(report)
    s = report.steps[0].stats
    assert s.answered == s.utterances >= 2
    for x in report.steps[0].samples:
        assert x.server_ms >= 40.0 and x.latency_ms >= x.server_ms
    listens = [m for m in srv.messages if isinstance(m, Listen)]
    assert {m.state for m in listens} == {"detect", "start", "stop"}
    files, skipped = write_outputs(report, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(data["steps"][0]["samples"]) == s.utterances and data["capacity"] == 2
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| clients |" in md and "capacity: 2" in md
    if skipped is None:
        assert (tmp_path / "out" / "plot.png").stat().st_size > 1000


@pytest.mark.slow
async def test_seed_picks_the_same_utterances(clips):
    async with FakeServer() as srv:
        a = await run_bounded(opts(srv.url, clients=(2,), seed=7, duration_s=1.8), clips)
        b = await run_bounded(opts(srv.url, clients=(2,), seed=7, duration_s=1.8), clips)

    def picks(r: LoadReport, client: int) -> list[str]:
        return [x.clip for x in sorted(r.steps[0].samples, key=lambda x: x.eos_s) if x.client == client]

    for client in (0, 1):
        pa, pb = picks(a, client), picks(b, client)
        n = min(len(pa), len(pb))
        assert n >= 1 and pa[:n] == pb[:n]


@pytest.mark.slow
async def test_unanswered_utterances_are_counted_missing_or_error(clips):
    async with FakeServer("silent") as srv:
        silent = await run_bounded(opts(srv.url, clients=(2,), reply_timeout_s=0.4), clips)
    async with FakeServer("error") as srv:
        errs = await run_bounded(opts(srv.url, clients=(2,), reply_timeout_s=1.0, mode="manual"), clips)
    assert_consistent(silent)
    assert_consistent(errs)
    s = silent.steps[0].stats
    assert s.utterances >= 2 and s.missing == s.utterances and s.latency.count == 0
    assert not s.within_budget and silent.capacity is None and s.p95_all_ms is None
    e = errs.steps[0].stats
    assert e.utterances >= 2 and e.errors == e.utterances
    assert all(x.error == "cannot recognise" for x in errs.steps[0].samples)


@pytest.mark.slow
async def test_refusing_stalling_and_closing_servers_are_counted(clips):
    refused = await run_bounded(opts(f"ws://127.0.0.1:{free_port()}/xiaozhi/v1/", clients=(2,), duration_s=1.5), clips)
    s = refused.steps[0].stats
    assert s.counters.refused >= 2 and s.counters.connects == 0 and s.utterances == 0
    assert refused.capacity is None
    async with FakeServer("no_hello") as srv:
        stalled = await run_bounded(opts(srv.url, clients=(2,), duration_s=1.5, hello_timeout_s=0.4), clips)
    assert stalled.steps[0].stats.counters.hello_timeouts >= 2
    async with FakeServer("close_after", close_after=4) as srv:
        closed = await run_bounded(opts(srv.url, clients=(2,), duration_s=2.0), clips)
    assert_consistent(closed)
    c = closed.steps[0].stats
    assert c.counters.disconnects >= 2 and c.disconnected >= 2 and c.answered == 0 and c.shed == 0
    async with FakeServer("close_after", close_after=4, close_code=1013) as srv:  # the server sheds the device
        shed = await run_bounded(opts(srv.url, clients=(2,), duration_s=2.0), clips)
    assert_consistent(shed)
    c = shed.steps[0].stats
    assert c.counters.disconnects >= 2 and c.disconnected == 0 and c.errors >= 2 and c.shed == c.errors
    assert all(x.error == "shed: connection closed with 1013 (test closes)" for x in shed.steps[0].samples)
    for r in (refused, stalled):
        assert r.steps[0].stats.counters.client_errors == 0 and r.steps[0].stats.consistent()


async def test_retry_after_is_honoured_only_when_asked(clips):
    """A 503's `Retry-After` (5 s) holds each client back for the rest of a 1.5 s step when the run
    honours it; without, clients come back every `retry_s` (0.3 s) as before."""
    for honour in (False, True):
        async with FakeServer("busy") as srv:
            report = await run_bounded(opts(srv.url, clients=(2,), duration_s=1.5, honor_retry_after=honour), clips)
        assert report.steps[0].stats.counters.refused == srv.refusals
        if honour:
            assert srv.refusals == 2, srv.refusals
        else:
            assert srv.refusals >= 4, srv.refusals


def test_retry_after_seconds_reads_delta_seconds_only():
    from loadtest.device import retry_after_seconds

    assert [retry_after_seconds(v) for v in ("5", " 12 ", None, "", "soon", "Wed, 21 Oct 2026 07:28:00 GMT")] == [
        5.0, 12.0, None, None, None, None
    ]  # fmt: skip


@pytest.mark.slow
async def test_ramp_reports_capacity_and_stops_after_a_failed_step(clips):
    async with FakeServer(delay_ms=20.0) as srv:
        ok = await run_bounded(opts(srv.url, clients=(1, 2), duration_s=1.5), clips)
        tight = await run_bounded(opts(srv.url, clients=(1, 2), duration_s=1.5, budget_ms=1.0), clips)
    assert [s.stats.clients for s in ok.steps] == [1, 2] and ok.capacity == 2
    assert len(tight.steps) == 1 and tight.capacity is None  # 1 ms is below the server's own delay
    assert_consistent(ok)
    assert "capacity: none of the steps" in render_markdown(tight)


@pytest.mark.slow
async def test_sink_measures_the_generator(clips):
    async with Sink() as sink:
        report = await run_bounded(opts(sink.url, clients=(4,), expect_replies=False), clips)
        await asyncio.sleep(0.2)
    assert_consistent(report)
    step = report.steps[0]
    s = step.stats
    assert s.sent == s.utterances >= 4 and s.answered == 0
    assert sink.stats.connections == 4 and sink.stats.frames == s.counters.frames_sent
    assert step.lateness.total == s.counters.frames_sent  # every frame is paced
    assert s.lateness.p99 is not None and report.sink_mode
    assert s.within_budget == (s.lateness.p99 < 20.0)


@pytest.mark.slow
async def test_generator_processes_share_the_clients(clips):
    async with Sink() as sink:
        report = await run_bounded(opts(sink.url, clients=(4,), duration_s=2.0, procs=2, expect_replies=False), clips)
        await asyncio.sleep(0.2)
    assert_consistent(report)
    s = report.steps[0].stats
    assert s.counters.connects == 4 and sink.stats.connections == 4
    assert {x.client for x in report.steps[0].samples} == {0, 1, 2, 3}
    assert sink.stats.frames == s.counters.frames_sent


async def test_server_probe_from_proc_and_metrics_endpoint():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from loadtest.probe import ServerProbe

    probe = ServerProbe(pid=os.getpid(), interval_s=0.05)
    await probe.start()
    deadline = asyncio.get_running_loop().time() + 0.3
    while asyncio.get_running_loop().time() < deadline:  # burn a little CPU between samples
        sum(i * i for i in range(20000))
        await asyncio.sleep(0)
    usage = await probe.stop()
    assert usage.error is None and usage.cpu_percent > 0 and usage.rss_peak_mb >= usage.rss_end_mb > 1

    cpu = iter([10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5] + [14.0] * 100)

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (f"process_cpu_seconds_total {next(cpu)}\nprocess_resident_memory_bytes 2097152\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        probe = ServerProbe(metrics_url=f"http://127.0.0.1:{httpd.server_address[1]}/metrics", interval_s=0.05)
        await probe.start()
        await asyncio.sleep(0.2)
        usage = await probe.stop()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert usage.error is None and usage.cpu_percent > 0 and usage.rss_peak_mb == 2.0
    dead = ServerProbe(metrics_url=f"http://127.0.0.1:{free_port()}/metrics", interval_s=0.05)
    await dead.start()
    usage = await dead.stop()
    assert usage.cpu_percent is None and "cannot read metrics" in usage.error


def test_server_stages_from_two_metric_readings():
    from loadtest.probe import ServerStages, parse_series

    def text(lag_counts, used, discarded_s):
        buckets = "".join(f'asr_event_loop_lag_seconds_bucket{{le="{le}"}} {n}\n' for le, n in lag_counts)
        return (
            f"# HELP x\n{buckets}asr_event_loop_lag_seconds_count {lag_counts[-1][1]}\n"
            f'asr_speculations_total{{outcome="used"}} {used}\n'
            f'asr_discarded_compute_seconds_total{{engine="asr"}} {discarded_s}\n'
            'asr_errors_total{kind="busy"} 1.0\n'
        )

    before = parse_series(text([("0.001", 10), ("0.01", 10), ("0.1", 10), ("+Inf", 10)], 3, 0.5))
    after = parse_series(text([("0.001", 60), ("0.01", 105), ("0.1", 110), ("+Inf", 110)], 10, 2.0))
    st = ServerStages.between(before, after)
    assert st.loop_lag_p95_ms == 10.0  # 95 of the 100 new samples were at or under 10 ms
    assert st.loop_lag_max_bucket_ms == 100.0
    assert st.speculations == {"used": 7.0} and st.discarded_compute_s == {"asr": 1.5} and st.busy_errors == 0


@pytest.mark.slow
def test_cli_sink_mode_writes_every_output(tmp_path: Path):
    audio = tmp_path / "audio"
    audio.mkdir()
    soundfile.write(audio / "burst.wav", tone_burst(0.4, 0.2), SR)
    out = tmp_path / "out"
    rc = cli_main(
        [
            "--sink",
            "--clients",
            "2",
            "--duration",
            "1.5",
            "--audio",
            str(audio),
            "--out",
            str(out),
            "--quiet",
            "--think-ms",
            "50,100",
            "--stagger",
            "0.1",
        ]
    )
    assert rc == 0
    data = json.loads((out / "samples.json").read_text())
    step = data["steps"][0]
    assert data["sink_mode"] and step["stats"]["counters"]["connects"] == 2 and step["stats"]["sent"] >= 2
    assert step["stats"]["server_rss_peak_mb"] > 1  # the sink's own pid is probed
    assert "generator ceiling" in (out / "summary.md").read_text()


def test_server_cpus_in_taskset_notation_must_leave_the_generator_some(monkeypatch):
    from benchmarks.capacity import cpu_list

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_list("0-3") == {0, 1, 2, 3} and cpu_list("0-1,5") == {0, 1, 5} and cpu_list("6") == {6}
    for bad in ("0-7", "8", "2-9"):
        with pytest.raises(SystemExit, match="some but not all"):
            cpu_list(bad)
