"""The browser console's server side: the page at `/` (and its switch), `/v1/status`,
`/v1/sessions`, the `/v1/live` stream and its key, the session board across workers, the latency
window and `/v1/events?recent=`. The page itself in a real browser: test_console_browser.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from asr_server.adapters.http.console import BOARD
from asr_server.adapters.http.context import METRICS
from asr_server.core.latency import LatencyWindow
from asr_server.core.live import SessionBoard, SessionView
from asr_server.core.metrics import Metrics
from asr_server.sharing import WorkerShare
from tests.support.fakes import make_event
from tests.support.servers import KEY, start_api, stop_api

AUTH = {"Authorization": f"Bearer {KEY}"}


def view(sid: str, frames: int = 0, worker: int = 0) -> SessionView:
    return SessionView(
        sid, "xiaozhi", f"dev-{sid}", None, 1, "auto", "listening", frames, 0, None, None, 1.0, "", worker
    )


@pytest.fixture
async def api(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, xiaozhi={"auth": {"enabled": True, "tokens": ["dev-tok"]}})
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield base, runner.app, bus
    await stop_api(runner, pipeline, bus)


async def test_the_page_and_its_files_are_served_without_a_key(api):
    base, _, _ = api
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert '<script type="module" src="/console/main.js">' in await r.text()
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        for name, kind in (("main.js", "text/javascript"), ("console.css", "text/css")):
            async with s.get(f"{base}/console/{name}") as r:
                assert r.status == 200 and r.content_type == kind
        for bad in ("nothing.js", "..%2Fconsole.py", "console.py", ".hidden.js"):
            async with s.get(f"{base}/console/{bad}") as r:
                assert r.status == 404, bad


async def test_console_false_gives_404_at_the_root(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, http={"console": False})
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as s:
            for path in ("/", "/console/main.js"):
                async with s.get(base + path) as r:
                    assert r.status == 404, path
            async with s.get(f"{base}/v1/status", headers=AUTH) as r:  # the API stays
                assert r.status == 200
    finally:
        await stop_api(runner, pipeline, bus)


async def test_status_needs_a_read_key_and_says_what_is_wrong(api):
    base, _, _ = api
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/status") as r:
            assert r.status == 401 and (await r.json())["error"]["message"] == "missing API key"
        async with s.get(f"{base}/v1/status", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401 and (await r.json())["error"]["message"] == "invalid API key"
        async with s.get(f"{base}/v1/status", headers={"Authorization": "Bearer dev-tok"}) as r:
            assert r.status == 403  # a device token reads its own transcripts, not the server
        async with s.get(f"{base}/v1/status", params={"key": KEY}) as r:
            assert r.status == 200
            status = await r.json()
    assert status["type"] == "status" and status["ready"] is True
    assert status["device"]["auth"] is True and status["device"]["path"] == "/xiaozhi/v1/"
    assert "silero-vad" in {m["name"] for m in status["models"]}
    assert all({"file", "provider", "device", "precision"} <= set(m) for m in status["models"])
    assert {"errors", "queues", "batches", "latency", "sessions_open"} <= set(status)
    assert status["latency"]["count"] == 0 and status["latency"]["p50"] is None


async def test_status_reports_latency_errors_and_batches(api):
    base, app, bus = api
    for ms in (100.0, 200.0, 300.0, 400.0):
        bus.publish(make_event("hi", latency_ms=ms, timestamp=time.time()))
    metrics = app[METRICS]
    metrics.errors.labels("opus").inc(3)
    metrics.on_batch("asr", 1, 0.01)
    metrics.on_batch("asr", 3, 0.02)
    async with aiohttp.ClientSession() as s, s.get(f"{base}/v1/status", headers=AUTH) as r:
        status = await r.json()
    assert status["latency"]["count"] == 4 and status["latency"]["p50"] == 250.0
    assert status["latency"]["series"][-1]["count"] == 4
    assert status["errors"]["opus"] == 3
    asr = status["batches"]["asr"]
    assert asr["count"] == 2 and asr["mean"] == 2.0 and asr["buckets"] == {"1.0": 1, "4.0": 1}


async def test_sessions_and_the_live_stream(api):
    base, app, _ = api
    board = app[BOARD]
    frames = {"n": 0}
    board.add("s1", lambda: view("s1", frames["n"]))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/sessions", headers=AUTH) as r:
            assert [v["session_id"] for v in (await r.json())["sessions"]] == ["s1"]
        ws_url = base.replace("http://", "ws://") + "/v1/live"
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": "Bearer dev-tok"}, 403),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(ws_url, headers=headers)
            assert e.value.status == status
        async with s.ws_connect(f"{ws_url}?key={KEY}") as ws:
            first = await ws.receive_json(timeout=5)
            assert first["type"] == "sessions" and first["sessions"][0]["device_id"] == "dev-s1"
            assert (await ws.receive_json(timeout=5))["type"] == "status"
            board.add("s2", lambda: view("s2"))
            got = await ws.receive_json(timeout=5)
            assert (got["op"], got["session"]["session_id"]) == ("open", "s2")
            frames["n"] = 7
            board._diff()  # what the board's tick does every second
            got = await ws.receive_json(timeout=5)
            assert (got["op"], got["session"]["frames"]) == ("update", 7)
            board.remove("s1")
            got = await ws.receive_json(timeout=5)
            assert (got["op"], got["session"]["session_id"]) == ("close", "s1")


async def test_events_replay_the_recent_ones_on_request(api):
    base, _, bus = api
    for i in range(3):
        bus.publish(make_event(f"t{i}", device_id="dev-a" if i != 1 else "dev-b"))
    ws_url = base.replace("http://", "ws://") + "/v1/events"
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{ws_url}?recent=5&device_id=dev-a", headers=AUTH) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
            assert [(await ws.receive_json(timeout=5))["text"] for _ in range(2)] == ["t0", "t2"]
        async with s.ws_connect(f"{ws_url}?recent=1", headers=AUTH) as ws:
            await ws.receive_json(timeout=5)
            assert (await ws.receive_json(timeout=5))["text"] == "t2"
        async with s.get(f"{base}/v1/events?recent=x", headers=AUTH) as r:
            assert r.status == 400


async def test_boards_of_two_workers_see_each_others_sessions(tmp_path: Path):
    """Each worker's board sends its list to the other over the sessions channel; a worker that
    stops sending is dropped from the view after STALE_TICKS ticks."""
    boards = [SessionBoard(WorkerShare(i, 2, tmp_path)) for i in range(2)]
    for b in boards:
        await b.start()
    try:
        feed = boards[1].subscribe()
        boards[0].add("a", lambda: view("a", worker=0))
        boards[1].add("b", lambda: view("b", worker=1))
        for _ in range(100):
            if {v.session_id for v in boards[1].sessions()} == {"a", "b"}:
                break
            await asyncio.sleep(0.02)
        assert {v.session_id for v in boards[1].sessions()} == {"a", "b"}
        assert {v.session_id for v in boards[0].sessions()} == {"a", "b"}
        ops = []
        while (msg := await asyncio.wait_for(feed.get(), 2)) is not None:
            ops.append((msg["op"], msg["session"]["session_id"]))
            if len(ops) == 2:
                break
        assert sorted(ops) == [("open", "a"), ("open", "b")]
        boards[0].remove("a")
        for _ in range(100):
            if [v.session_id for v in boards[1].sessions()] == ["b"]:
                break
            await asyncio.sleep(0.02)
        assert [v.session_id for v in boards[1].sessions()] == ["b"]
        boards[0].add("c", lambda: view("c"))
        await asyncio.sleep(0.1)
        await boards[0].close()  # worker 0 goes: its sessions leave worker 1's view once stale
        boards[1]._clock = lambda: float("inf")
        assert [v.session_id for v in boards[1].sessions()] == ["b"]
    finally:
        for b in boards:
            await b.close()


async def test_a_large_session_list_crosses_in_parts(tmp_path: Path):
    boards = [SessionBoard(WorkerShare(i, 2, tmp_path)) for i in range(2)]
    for b in boards:
        await b.start()
    try:
        for i in range(600):  # ~200 bytes each: more than one datagram
            boards[0]._sources[f"s{i:04d}"] = lambda i=i: view(f"s{i:04d}")
        boards[0]._send_own()
        for _ in range(100):
            if len(boards[1].sessions()) == 600:
                break
            await asyncio.sleep(0.02)
        assert len(boards[1].sessions()) == 600
    finally:
        for b in boards:
            await b.close()


def test_latency_window_percentiles_by_minute():
    w = LatencyWindow(bin_s=60, bins=3)
    for v in range(1, 101):
        w.add(float(v), at=1000.0)  # bin 960
    w.add(500.0, at=1010.0)  # the same bin
    w.add(50.0, at=1100.0)  # the next
    s = w.summary(now=1110.0)
    assert [b["start"] for b in s["series"]] == [960.0, 1080.0]
    assert s["series"][0]["count"] == 101 and s["series"][1] == {
        "start": 1080.0,
        "count": 1,
        "p50": 50.0,
        "p90": 50.0,
        "p99": 50.0,
    }
    assert s["count"] == 102 and s["p50"] == 50.5
    assert w.summary(now=1000.0 + 4 * 60)["count"] == 1  # the first bin left the window
    small = LatencyWindow(per_bin=10)
    for v in range(1000):
        small.add(float(v), at=5.0)
    assert small.summary(now=6.0)["count"] == 1000 and len(small._bins[0].values) == 10


def test_metrics_snapshot_is_what_metrics_renders():
    m = Metrics()
    m.errors.labels("flood")  # named, never counted: not an error
    m.errors.labels("opus").inc()
    m.session_opened("xiaozhi")
    m.queue_depths.add("asr", lambda: 3)
    snap = m.snapshot()
    assert snap["errors"] == {"opus": 1.0}
    assert snap["sessions"] == {"xiaozhi": 1.0} and snap["queues"] == {"asr": 3}
    assert json.dumps(snap)


@pytest.mark.parametrize("mode", ["auto", "manual"])
async def test_vad_messages_only_for_a_session_whose_hello_asks(server, mode):
    """The console's VAD meter: `features.vad_meter` in the hello gives a `vad` message per frame;
    a device that does not ask (every real one) gets none."""
    from loadtest.device import Device, DeviceConfig, ReplyTimeout

    url = server.endpoints.device_url
    async with Device(DeviceConfig(url=url, features={"vad_meter": True})) as dev:
        await dev.listen("start", mode)
        await dev.send_silence(300, None)
        msg = (await dev.next_message("vad", 5)).data
        assert 0.0 <= msg["prob"] < 0.5 and msg["speech"] is False
    async with Device(DeviceConfig(url=url)) as dev:
        await dev.listen("start", mode)
        await dev.send_silence(300, None)
        with pytest.raises(ReplyTimeout):
            await dev.next_message("vad", 1.0)
