"""Transcript events: a real webhook receiver on loopback, slow and dead backends, subscribers."""

from __future__ import annotations

import asyncio
import json

import pytest

from asr_server.config import ConfigError, load_config
from asr_server.core.events import EventBus
from asr_server.core.metrics import Metrics
from tests.support.fakes import WebhookReceiver as Receiver
from tests.support.fakes import make_event


def config(**events):
    return load_config(
        None, env={}, overrides={"events": {"webhook_backoff_s": 0.01, "webhook_timeout_s": 1.0, **events}}
    )


def counter(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("asr_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def test_event_json_carries_every_field():
    e = make_event()
    d = json.loads(e.to_json())
    assert d["type"] == "transcript" and len(d["id"]) == 32
    assert d["text"] == "打开客厅的灯" and "\\u" not in e.to_json()
    assert d["speaker"] == {"name": "alice", "score": 0.71}
    for key in (
        "language",
        "emotion",
        "event",
        "device_id",
        "client_id",
        "session_id",
        "protocol",
        "audio_ms",
        "latency_ms",
        "asr_ms",
        "embed_ms",
        "timestamp",
    ):
        assert d[key] == getattr(e, key), key
    assert json.loads(make_event(speaker=None).to_json())["speaker"] is None
    assert make_event().id != e.id


def test_bad_webhook_url_is_a_config_error():
    with pytest.raises(ConfigError, match="webhook_url"):
        EventBus(config(webhook_url="ftp://example.com/x"), Metrics())


async def test_webhook_delivers_json_with_headers():
    metrics = Metrics()
    async with Receiver() as rx:
        bus = EventBus(config(webhook_url=rx.url, webhook_headers={"Authorization": "Bearer hook-key"}), metrics)
        await bus.start()
        try:
            ev = make_event()
            bus.publish(ev)
            await rx.wait_for(1)
        finally:
            await bus.close()
    got = rx.bodies[0]
    assert got["text"] == ev.text and got["id"] == ev.id and got["device_id"] == ev.device_id
    assert rx.headers[0]["Authorization"] == "Bearer hook-key"
    assert rx.headers[0]["X-Event-Id"] == ev.id
    assert rx.headers[0]["Content-Type"] == "application/json"
    assert counter(metrics, "ok") == 1


async def test_webhook_retries_5xx_then_succeeds_and_gives_up_on_4xx():
    metrics = Metrics()
    async with Receiver() as rx:
        rx.statuses = [503, 500, 200, 400]
        bus = EventBus(config(webhook_url=rx.url, webhook_retries=3, webhook_concurrency=1), metrics)
        await bus.start()
        try:
            first, second = make_event("one"), make_event("two")
            bus.publish(first)
            await rx.wait_for(3)
            bus.publish(second)
            await rx.wait_for(4)
        finally:
            await bus.close()
    assert [(b["text"], b["status"]) for b in rx.bodies] == [("one", 503), ("one", 500), ("one", 200), ("two", 400)]
    assert counter(metrics, "retry") == 2 and counter(metrics, "ok") == 1
    assert counter(metrics, "failed") == 1  # a 400 is final: no retry


async def test_dead_backend_bounded_retries_then_failed():
    metrics = Metrics()
    async with Receiver() as rx:
        dead_url = rx.url
    # The receiver is gone: connections are refused.
    bus = EventBus(config(webhook_url=dead_url, webhook_retries=2), metrics)
    await bus.start()
    try:
        bus.publish(make_event())
        for _ in range(200):
            if counter(metrics, "failed"):
                break
            await asyncio.sleep(0.02)
    finally:
        await bus.close()
    assert counter(metrics, "failed") == 1 and counter(metrics, "retry") == 2 and counter(metrics, "ok") == 0


async def test_slow_backend_never_blocks_publish_and_queue_drops_oldest():
    metrics = Metrics()
    async with Receiver() as rx:
        rx.delay_s = 0.3
        bus = EventBus(config(webhook_url=rx.url, queue_size=3, webhook_concurrency=1, webhook_timeout_s=5), metrics)
        await bus.start()
        try:
            bus.publish(make_event("e0"))
            await asyncio.sleep(0.05)  # e0 is now in flight at the slow backend
            for i in range(1, 11):
                bus.publish(make_event(f"e{i}"))  # returns at once; the queue keeps the newest 3
            assert bus.pending == 3
            await rx.wait_for(4)
        finally:
            await bus.close()
    assert [b["text"] for b in rx.bodies] == ["e0", "e8", "e9", "e10"]
    assert counter(metrics, "dropped") == 7


async def test_publish_is_safe_before_start_after_close_and_filters_protocols():
    metrics = Metrics()
    async with Receiver() as rx:
        bus = EventBus(config(webhook_url=rx.url, protocols=["xiaozhi", "funasr"]), metrics)
        bus.publish(make_event("queued before start"))
        bus.publish(make_event("from openai", protocol="openai"))  # not a configured protocol
        await bus.start()
        try:
            await rx.wait_for(1)
        finally:
            await bus.close()
        bus.publish(make_event("after close"))  # ignored, no exception
    assert [b["text"] for b in rx.bodies] == ["queued before start"]


async def test_publish_from_another_thread_is_delivered():
    bus = EventBus(config(), Metrics())
    await bus.start()
    with bus.subscribe() as sub:
        await asyncio.to_thread(bus.publish, make_event("from a worker thread"))
        got = await asyncio.wait_for(sub.get(), 2)
    await bus.close()
    assert got.text == "from a worker thread"


async def test_subscribers_filter_by_device_and_drop_oldest_when_behind():
    metrics = Metrics()
    bus = EventBus(config(subscriber_queue_size=2), metrics)
    await bus.start()
    with bus.subscribe(["dev-a"]) as only_a, bus.subscribe() as everyone:
        bus.publish(make_event("a1", device_id="dev-a"))
        bus.publish(make_event("b1", device_id="dev-b"))
        assert (await only_a.get()).text == "a1"
        assert [(await everyone.get()).text for _ in range(2)] == ["a1", "b1"]
        for i in range(5):
            bus.publish(make_event(f"a{i + 2}", device_id="dev-a"))
        assert [(await only_a.get()).text for _ in range(2)] == ["a5", "a6"]
        assert only_a.dropped == 3
        assert bus.subscribers == 2
    assert bus.subscribers == 0
    assert metrics.registry.get_sample_value("asr_errors_total", {"kind": "events_subscriber_overflow"}) == 6
    await bus.close()


async def test_close_ends_subscriptions():
    bus = EventBus(config(), Metrics())
    await bus.start()
    sub = bus.subscribe()
    received = []

    async def consume():
        async for ev in sub:
            received.append(ev.text)

    task = asyncio.create_task(consume())
    bus.publish(make_event("last"))
    await asyncio.sleep(0.01)
    await bus.close()
    await asyncio.wait_for(task, 2)
    assert received == ["last"]


@pytest.mark.slow
async def test_device_transcript_reaches_webhook_and_subscriber(start_server):
    """End to end: a simulated xiaozhi device speaks; the webhook and a /v1/events subscriber for that
    device each get the transcript with its metadata, and a subscriber for another device gets nothing."""
    import aiohttp

    from loadtest.clips import load_clip
    from loadtest.device import Device, DeviceConfig
    from tests.support.audio import clip

    c = clip("zh_aishell")
    async with Receiver() as rx:
        server = await start_server(events={"webhook_url": rx.url})
        events_url = server.endpoints.http_url.replace("http://", "ws://") + "/v1/events"
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(f"{events_url}?device_id=aa:bb:cc:dd:ee:42") as mine,
            s.ws_connect(f"{events_url}?device_id=other") as other,
        ):
            assert (await mine.receive_json(timeout=5))["type"] == "subscribed"
            assert (await other.receive_json(timeout=5))["type"] == "subscribed"
            cfg = DeviceConfig(url=server.endpoints.device_url, device_id="aa:bb:cc:dd:ee:42", client_id="client-42")
            async with Device(cfg) as dev:
                await dev.listen("start", "auto")
                await dev.send_opus(load_clip(c.path).packets, 3.0)
                await dev.send_silence(900, 3.0)
                stt = (await dev.next_message("stt", 20)).data
                streamed = await mine.receive_json(timeout=10)
                await rx.wait_for(1)
            with pytest.raises(asyncio.TimeoutError):
                await other.receive_json(timeout=0.3)
    hooked = {k: v for k, v in rx.bodies[0].items() if k != "status"}
    assert hooked == streamed
    assert streamed["text"] == stt["text"] and streamed["protocol"] == "xiaozhi"
    assert streamed["device_id"] == "aa:bb:cc:dd:ee:42" and streamed["client_id"] == "client-42"
    assert streamed["session_id"] == dev.session_id and streamed["language"] == "zh"
    assert streamed["audio_ms"] > 3000 and streamed["latency_ms"] >= 0 and streamed["asr_ms"] > 0
