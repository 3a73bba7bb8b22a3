"""Servers and raw clients the protocol tests share: the HTTP API around a fake pipeline, raw
device sockets and what to expect from them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from asr_server.adapters.http.app import build_app, start_http
from asr_server.config import load_config
from asr_server.core.events import EventBus
from tests.support.fakes import fake_pipeline

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = '{"type":"hello","version":1,"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}'


async def start_api(tmp_path: Path, speaker: bool = True, **sections):
    base = {
        "http": {"host": "127.0.0.1", "port": 0, "api_keys": [KEY]},
        "speaker": {"db": str(tmp_path / "vp.sqlite"), "threshold": 0.9},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    cfg = load_config(None, env={}, overrides=base)
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite", speaker=speaker)
    bus = EventBus(cfg, pipeline.metrics)
    await bus.start()
    state = {"ready": True}
    runner = await start_http(build_app(cfg, pipeline, bus, pipeline.metrics, lambda: state["ready"]), "127.0.0.1", 0)
    return runner, pipeline, bus, state


async def stop_api(runner, pipeline, bus) -> None:
    """Undo `start_api`: the HTTP app, then the event bus, then the pipeline."""
    await runner.cleanup()
    await bus.close()
    await pipeline.close()


async def wait_sessions_empty(server, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if not server.xiaozhi.sessions:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"sessions left in the server: {list(server.xiaozhi.sessions)}")


async def raw_connect(server, headers=None, path=None):
    from websockets.asyncio.client import connect

    url = server.endpoints.device_url if path is None else server.endpoints.device_url.rsplit("/xiaozhi", 1)[0] + path
    return await connect(url, additional_headers=headers or {}, open_timeout=5, close_timeout=2, ping_interval=None)


async def send_until_closed(ws, data: bytes, times: int) -> None:
    """Send `data` `times` times, or until the server closes the connection."""
    from websockets.exceptions import ConnectionClosed

    try:
        for _ in range(times):
            await ws.send(data)
    except ConnectionClosed:
        pass


async def expect_close(ws, code: int, reason_part: str):

    from websockets.exceptions import ConnectionClosed

    messages = []
    try:
        while True:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    except ConnectionClosed:
        pass
    assert ws.close_code == code, (ws.close_code, ws.close_reason)
    assert reason_part in ws.close_reason
    return messages
