"""`serve --workers 2` end to end on the tiny models, as a real subprocess: one server to its users.

Devices spread over both workers; `max_sessions` and `/metrics` are the whole server's; a voiceprint
enrolled through either worker identifies on both; one `/v1/events` subscriber sees the
transcripts of devices on both; killing a worker loses only its connections (and it comes back);
SIGTERM during an utterance still delivers its `stt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import httpx
import pytest
import websockets

from loadtest.clips import load_clip
from loadtest.device import ConnectError, Device, DeviceConfig
from tests.support.audio import clip, needs_audio
from tests.support.cluster import Cluster, start_cluster

pytestmark = pytest.mark.slow

PACE = 3.0
MAX_SESSIONS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    c = start_cluster(tmp_path_factory.mktemp("workers"), models_dir, xiaozhi={"max_sessions": MAX_SESSIONS})
    yield c
    c.stop()


def _device(c: Cluster, name: str) -> Device:
    return Device(DeviceConfig(url=c.device_url, device_id=name))


async def _on_workers(c: Cluster, stack: contextlib.AsyncExitStack, want: int = 2) -> dict[str, Device]:
    """Connect devices one at a time until there is one on each of `want` workers (by /metrics)."""
    found: dict[str, Device] = {}
    for i in range(MAX_SESSIONS):
        before = await asyncio.to_thread(c.worker_sessions)
        dev = await stack.enter_async_context(_device(c, f"02:00:00:00:01:{i:02x}"))
        after = await asyncio.to_thread(c.worker_sessions)
        worker = next(w for w, n in after.items() if n > before.get(w, 0))
        found.setdefault(worker, dev)
        if len(found) == want:
            return found
    raise AssertionError(f"{MAX_SESSIONS} devices all landed on workers {sorted(found)}")


async def _say(dev: Device, path) -> dict:
    await dev.listen("start", "manual")
    await dev.send_opus(load_clip(path).packets, PACE)
    await dev.listen("stop")
    return (await dev.next_message("stt", 30)).data


async def test_devices_spread_and_limits_and_metrics_are_the_whole_servers(cluster):
    async with contextlib.AsyncExitStack() as stack:
        for i in range(MAX_SESSIONS):
            await stack.enter_async_context(_device(cluster, f"02:00:00:00:00:{i:02x}"))
        per_worker = await asyncio.to_thread(cluster.worker_sessions)
        assert sorted(per_worker) == ["0", "1"] and all(n > 0 for n in per_worker.values()), per_worker
        assert sum(per_worker.values()) == MAX_SESSIONS
        metrics = await asyncio.to_thread(cluster.metrics)
        assert metrics['asr_sessions_open{protocol="xiaozhi"}'] == MAX_SESSIONS
        assert metrics['asr_sessions_opened_total{protocol="xiaozhi"}'] >= MAX_SESSIONS
        with pytest.raises(ConnectError, match="503"):  # one more than the server's limit, whichever worker
            async with _device(cluster, "02:00:00:00:00:ff"):
                pass
    deadline = time.monotonic() + 10
    while sum((await asyncio.to_thread(cluster.worker_sessions)).values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert sum((await asyncio.to_thread(cluster.worker_sessions)).values()) == 0


async def test_the_consoles_sessions_and_live_view_are_the_whole_servers(cluster):
    """Whichever worker answers `/v1/sessions` (a new connection each time) lists the devices of
    both; a `/v1/live` subscriber sees a device on the other worker leave."""
    async with contextlib.AsyncExitStack() as stack:
        devices = await _on_workers(cluster, stack)
        ids = {d.config.device_id for d in devices.values()}
        async with websockets.connect(cluster.http_url.replace("http", "ws", 1) + "/v1/live") as live:
            first = json.loads(await asyncio.wait_for(live.recv(), 10))
            assert first["type"] == "sessions"
            for _ in range(6):  # the kernel spreads these connections over both workers
                deadline = time.monotonic() + 5
                while True:
                    r = await asyncio.to_thread(httpx.get, f"{cluster.http_url}/v1/sessions", timeout=10)
                    views = [v for v in r.json()["sessions"] if v["device_id"] in ids]
                    if len(views) == len(ids) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert {v["device_id"] for v in views} == ids and {v["worker"] for v in views} == {0, 1}, views
            status = (await asyncio.to_thread(httpx.get, f"{cluster.http_url}/v1/status", timeout=10)).json()
            assert status["server"]["workers"] == 2 and status["sessions_open"] >= 2
            leaving = devices["0"]
            await leaving.close()
            deadline = time.monotonic() + 10
            while True:
                msg = json.loads(await asyncio.wait_for(live.recv(), max(0.1, deadline - time.monotonic())))
                if msg.get("op") == "close" and msg["session"]["device_id"] == leaving.config.device_id:
                    break


@needs_audio
async def test_a_voiceprint_and_the_event_stream_span_both_workers(cluster):
    jfk = clip("en_jfk")
    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.post(
            f"{cluster.http_url}/voiceprint/register",
            data={"speaker_id": "jfk"},
            files={"file": (jfk.path.name, jfk.path.read_bytes())},
        )
        assert r.status_code == 200, r.text
    try:
        async with (
            websockets.connect(cluster.http_url.replace("http", "ws", 1) + "/v1/events") as events,
            contextlib.AsyncExitStack() as stack,
        ):
            assert json.loads(await events.recv())["type"] == "subscribed"
            devices = await _on_workers(cluster, stack)
            for dev in devices.values():
                msg = await _say(dev, jfk.path)
                assert msg["speaker"] is not None and msg["speaker"]["name"] == "jfk", msg
            seen: list[str] = []
            while len(seen) < len(devices):
                seen.append(json.loads(await asyncio.wait_for(events.recv(), 10))["device_id"])
            assert sorted(seen) == sorted(d.config.device_id for d in devices.values())
            with pytest.raises(TimeoutError):  # each transcript once
                await asyncio.wait_for(events.recv(), 1.0)
    finally:
        async with httpx.AsyncClient(timeout=30) as h:
            await h.delete(f"{cluster.http_url}/voiceprint/jfk")


@needs_audio
async def test_killing_one_worker_loses_only_its_connections(cluster):
    c = clip("en_tts_living")
    async with contextlib.AsyncExitStack() as stack:
        devices = await _on_workers(cluster, stack)
        victim = cluster.pids[int(min(devices))]
        os.kill(victim, signal.SIGKILL)
        lost, kept = devices[min(devices)], devices[max(devices)]
        deadline = time.monotonic() + 10
        while not lost.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert lost.closed
        assert (await _say(kept, c.path))["text"]  # the other worker's device goes on
    cluster.wait_log(rf"worker {min(devices)} \(pid {victim}\) exited with code -9.*restarting")
    cluster.wait_log(rf"worker {min(devices)} \(pid \d+\) is serving again")
    async with contextlib.AsyncExitStack() as stack:  # and the restarted worker serves devices again
        devices = await _on_workers(cluster, stack)
        assert all([(await _say(d, c.path))["text"] for d in devices.values()])


@needs_audio
async def test_sigterm_during_an_utterance_still_delivers_its_stt(tmp_path, models_dir):
    c = clip("en_tts_living")
    cluster = await asyncio.to_thread(start_cluster, tmp_path, models_dir)
    try:
        async with _device(cluster, "02:00:00:00:02:00") as dev:
            await dev.listen("start", "manual")
            await dev.send_opus(load_clip(c.path).packets, PACE)
            await dev.listen("stop")
            cluster.process.send_signal(signal.SIGTERM)  # the utterance has ended; its answer is owed
            assert (await dev.next_message("stt", 30)).data["text"]
            deadline = time.monotonic() + 15
            while not dev.closed and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert dev.closed_by_server and dev._closed is not None and dev._closed.code == 1001
        assert await asyncio.to_thread(cluster.process.wait, 30) == 0
        cluster.wait_log("stopping 2 workers")
    finally:
        cluster.stop()


def test_a_worker_still_starting_is_not_reported_as_missing_events_but_a_lost_one_is(tmp_path, caplog):
    """At start-up the workers bind their sockets as their models finish loading, so the first
    messages find some peers not listening yet: that is debug, not a warning per worker (8 CUDA
    workers logged dozens); a peer that was reached and then vanished is still warned about."""
    from asr_server.sharing import EventPeers, WorkerShare

    first = EventPeers(WorkerShare(index=0, count=2, run_dir=tmp_path), "sessions")
    with caplog.at_level("DEBUG", logger="asr_server.sharing"):
        first.send(b"x")
        assert first.missed == 1
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        second = EventPeers(WorkerShare(index=1, count=2, run_dir=tmp_path), "sessions")
        first.send(b"y")
        assert first.missed == 1
        second.close()
        first.send(b"z")
    first.close()
    assert first.missed == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and "worker 1 missed a sessions message: FileNotFoundError" in warnings[0]
