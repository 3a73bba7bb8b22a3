"""`/xiaozhi/ota/` as the firmware (`main/ota.cc`) calls it: our own answer, and relay mode through a
stub of the upstream's OTA (xiaozhi-esp32-server's answer shape) that is up, down, slow or failing."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web

from asr_server.config import ConfigError, load_config
from tests.support.servers import start_api, stop_api

MAC = "aa:bb:cc:dd:ee:29"
#: What the firmware sends (`Ota::CheckVersion`: its headers, `Board::GetSystemInfoJson`'s body, cut down).
HEADERS = {
    "Device-Id": MAC,
    "Client-Id": "7b1c0d3e-2f4a-4b5c-9d6e-0f1a2b3c4d5e",
    "Activation-Version": "2",
    "User-Agent": "bread-compact-wifi/1.6.2",
    "Accept-Language": "zh-CN",
    "Content-Type": "application/json",
}
BOARD = {
    "version": 2,
    "language": "zh-CN",
    "flash_size": 16777216,
    "mac_address": MAC,
    "uuid": HEADERS["Client-Id"],
    "chip_model_name": "esp32s3",
    "application": {"name": "xiaozhi", "version": "1.6.2", "idf_version": "v5.4"},
    "board": {"type": "bread-compact-wifi", "ssid": "home", "rssi": -50, "channel": 6, "ip": "192.168.1.9"},
    "unknown_future_field": {"kept": [1, 2]},
}
#: An upstream's answer as xiaozhi-esp32-server's manager hands it out, with everything the
#: device must get untouched: activation, an update, the MQTT section for its gateway.
UPSTREAM_ANSWER = {
    "server_time": {"timestamp": 1765000000000, "timezone_offset": 480},
    "activation": {"code": "123456", "message": "xiaozhi.me\n123456", "challenge": "c-1"},
    "firmware": {"version": "1.7.0", "url": "http://chat:8002/firmware/1.7.0.bin"},
    "mqtt": {
        "endpoint": "chat:1883",
        "client_id": "GID_test@@@aa_bb_cc_dd_ee_29@@@x",
        "publish_topic": "device-server",
    },
    "websocket": {"url": "ws://chat:8000/xiaozhi/v1/", "token": "their-token", "version": 3},
}


@pytest.fixture
async def start(tmp_path):
    started = []

    async def go(**sections):
        runner, pipeline, bus, _ = await start_api(tmp_path, speaker=False, **sections)
        started.append((runner, pipeline, bus))
        return f"http://127.0.0.1:{runner.addresses[0][1]}/xiaozhi/ota/"

    yield go
    for s in started:
        await stop_api(*s)


async def post(url: str, body: bytes | None = None, headers: dict | None = None, method: str = "POST"):
    data = json.dumps(BOARD).encode() if body is None else body
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, data=data or None, headers=HEADERS if headers is None else headers) as r:
            return r.status, await r.json(content_type=None)


class UpstreamOta:
    """xiaozhi-esp32-server's OTA as a stub: records each request, answers `answer` (or fails)."""

    def __init__(self, answer: dict | None = None, status: int = 200, delay_s: float = 0.0) -> None:
        self.answer, self.status, self.delay_s = answer or UPSTREAM_ANSWER, status, delay_s
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, dict(request.headers), await request.read()))
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status, text=json.dumps(self.answer), content_type="application/json")

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/xiaozhi/ota/", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/xiaozhi/ota/"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def is_our_answer(answer: dict, device_ws: str) -> bool:
    return (
        answer["websocket"] == {"url": device_ws}
        and answer["firmware"] == {"version": "1.6.2", "url": ""}
        and isinstance(answer["server_time"]["timestamp"], int)
        and isinstance(answer["server_time"]["timezone_offset"], int)
    )


async def test_the_firmwares_check_gets_our_websocket_in_xiaozhi_servers_shape(start):
    url = await start(xiaozhi={"port": 8123})
    status, answer = await post(url)
    assert status == 200
    assert set(answer) == {"server_time", "firmware", "websocket"}
    # the host the device reached us at, the device port and path; no update (its own version, no URL)
    assert is_our_answer(answer, "ws://127.0.0.1:8123/xiaozhi/v1/")
    # a GET without a body (the firmware's check when it has nothing to post) gets the same websocket
    status, answer = await post(url, b"", method="GET")
    assert status == 200 and answer["websocket"] == {"url": "ws://127.0.0.1:8123/xiaozhi/v1/"}
    assert answer["firmware"] == {"version": "", "url": ""}


async def test_the_public_url_and_the_device_token_are_handed_out(start):
    url = await start(
        xiaozhi={"public_url": "wss://asr.example.net/xiaozhi/v1/", "auth": {"enabled": True, "tokens": ["t1", "t2"]}}
    )
    _, answer = await post(url)
    assert answer["websocket"] == {"url": "wss://asr.example.net/xiaozhi/v1/", "token": "t1"}


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"{not json", None, "not JSON"),
        (b"[1, 2]", None, "must be a JSON object, got list"),
        (json.dumps(BOARD).encode(), {"Content-Type": "application/json"}, "missing Device-Id"),
        (b"{" + b" " * (70 * 1024) + b"}", None, "at most 65536"),
    ],
)
async def test_bad_checks_get_400_with_the_reason(start, body, headers, reason):
    url = await start()
    status, answer = await post(url, body, headers)
    assert status == 400 and reason in answer["detail"]


async def test_a_huge_chunked_body_gets_400_not_500(start):
    url = await start()

    async def chunks():
        for _ in range(100):
            yield b" " * 1024

    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=chunks(), headers=HEADERS) as r:
            assert r.status == 400 and "over 65536 bytes" in (await r.json())["detail"]


async def test_relay_passes_the_check_up_and_changes_only_the_websocket(start):
    stub = UpstreamOta()
    async with stub as upstream_url:
        url = await start(upstream={"ota_url": upstream_url}, xiaozhi={"port": 8124})
        body = json.dumps(BOARD, ensure_ascii=False).encode()
        status, answer = await post(url, body)
    assert status == 200
    method, headers, sent = stub.requests[0]
    assert method == "POST" and sent == body  # the device's body, byte for byte
    for name in ("Device-Id", "Client-Id", "Activation-Version", "User-Agent", "Accept-Language"):
        assert headers[name] == HEADERS[name]
    expected = json.loads(json.dumps(UPSTREAM_ANSWER))
    expected["websocket"]["url"] = "ws://127.0.0.1:8124/xiaozhi/v1/"  # its token stays: our auth is off
    assert answer == expected


async def test_relay_puts_our_token_in_when_device_auth_is_on(start):
    async with UpstreamOta() as upstream_url:
        url = await start(upstream={"ota_url": upstream_url}, xiaozhi={"auth": {"enabled": True, "tokens": ["ours"]}})
        _, answer = await post(url)
    assert answer["websocket"]["token"] == "ours" and answer["websocket"]["version"] == 3
    assert answer["activation"] == UPSTREAM_ANSWER["activation"]


async def test_relay_passes_the_upstreams_refusal_on(start):
    async with UpstreamOta({"error": "device not bound"}, status=403) as upstream_url:
        url = await start(upstream={"ota_url": upstream_url})
        status, answer = await post(url)
    assert status == 403 and answer == {"error": "device not bound"}


@pytest.mark.parametrize("how", ["down", "slow", "failing"])
async def test_an_upstream_ota_that_is_down_slow_or_failing_gets_the_device_our_answer(start, caplog, how):
    stub = UpstreamOta(status=502 if how == "failing" else 200, delay_s=5.0 if how == "slow" else 0.0)
    async with stub as upstream_url:
        if how == "down":
            await stub.runner.cleanup()  # nothing listens there any more
        url = await start(upstream={"ota_url": upstream_url, "ota_timeout_s": 0.3}, xiaozhi={"port": 8125})
        with caplog.at_level(logging.WARNING, logger="asr_server.adapters.http.ota"):
            status, answer = await post(url)
    assert status == 200 and is_our_answer(answer, "ws://127.0.0.1:8125/xiaozhi/v1/")
    lines = [r.getMessage() for r in caplog.records if r.name == "asr_server.adapters.http.ota"]
    assert len(lines) == 1 and "gets our own answer" in lines[0] and MAC in lines[0]
    why = {"down": "ClientConnectorError", "slow": "no answer within 0.3 s", "failing": "HTTP 502"}[how]
    assert why in lines[0]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("upstream", "ota_url", "ws://chat:8003/xiaozhi/ota/", "http:// or https://"),
        ("xiaozhi", "public_url", "http://asr:8000/xiaozhi/v1/", "ws:// or wss://"),
        ("xiaozhi", "public_url", "/xiaozhi/v1/", "ws:// or wss://"),
    ],
)
def test_url_keys_name_the_scheme_they_need(section, key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, env={}, overrides={section: {key: value}})
    assert key in str(e.value) and expected in str(e.value)
