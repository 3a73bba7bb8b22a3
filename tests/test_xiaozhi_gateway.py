"""MQTT+UDP devices through the xiaozhi-mqtt-gateway: its `?from=mqtt_gateway` sockets, as its
bridge opens them (`tests/support/gateway.py`, a stand-in written from its `app.js`; the run
against the real gateway is in docs/mqtt-gateway.md), in direct and relay mode."""

from __future__ import annotations

import asyncio
import logging

import pytest

from loadtest.clips import load_clip, silence_packet
from loadtest.upstream import UpstreamOptions, UpstreamStub
from tests.support.audio import cer, clip, needs_audio
from tests.support.gateway import GatewayBridge
from tests.support.servers import wait_sessions_empty

pytestmark = pytest.mark.slow

MAC = "aa:bb:cc:dd:ee:29"
UUID = "7b1c0d3e-2f4a-4b5c-9d6e-0f1a2b3c4d5e"
#: The firmware's MQTT hello audio_params (mqtt_protocol.cc), which the gateway passes on.
AUDIO_PARAMS = {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}


def bridge(server) -> GatewayBridge:
    return GatewayBridge(server.endpoints.device_url + "?from=mqtt_gateway", MAC, UUID)


async def speak(gw: GatewayBridge, name: str) -> str:
    """A clip as the gateway forwards the device's UDP packets: real time, its timestamps."""
    c = clip(name)
    packets = list(load_clip(c.path).packets) + [silence_packet()] * 15
    for i, opus in enumerate(packets):
        await gw.send_audio(opus, i * 60)
        await asyncio.sleep(0.02)  # 3× real time
    return c.transcript


@needs_audio
async def test_a_gateway_device_gets_its_stt(start_server):
    srv = await start_server()
    gw = bridge(srv)
    hello = await gw.connect(AUDIO_PARAMS, {"mcp": True})
    try:
        # the session id the gateway hands the device in its MQTT hello, and what the device may play
        assert hello["session_id"] and hello["transport"] == "websocket"
        assert hello["audio_params"]["sample_rate"] == 16000
        session = next(iter(srv.xiaozhi.sessions.values()))
        assert (
            session.client.device_id == MAC
            and session.client.client_id == UUID
            and session.client.protocol_version == 2
        )
        await gw.send_json({"session_id": hello["session_id"], "type": "listen", "state": "start", "mode": "auto"})
        transcript = await speak(gw, "zh_aishell")
        stt = await gw.next_json("stt", 20)
        assert cer(transcript, stt["text"]) <= 0.2
        assert not [m for m in gw.json if m.get("type") == "error"]  # no frame refused
    finally:
        await gw.close()


@needs_audio
async def test_relay_a_gateway_device_gets_the_upstreams_answer_as_its_udp_audio(start_server):
    async with UpstreamStub(UpstreamOptions(frames=4)) as stub:
        srv = await start_server(upstream={"url": stub.url, "hello_timeout_s": 1.0})
        gw = bridge(srv)
        hello = await gw.connect(AUDIO_PARAMS)
        try:
            up = stub.sessions[0]
            assert hello["session_id"] and hello["session_id"] not in srv.xiaozhi.sessions  # the upstream's id
            # the gateway's identity and token go up as the device's
            assert up.headers["Device-Id"] == MAC and up.headers["Authorization"] == "Bearer test-token"
            await gw.send_json({"session_id": hello["session_id"], "type": "listen", "state": "start", "mode": "auto"})
            transcript = await speak(gw, "zh_aishell")
            stt = await gw.next_json("stt", 20)
            assert cer(transcript, stt["text"]) <= 0.2
            assert (await gw.next_json("tts", 5))["state"] == "start"
            assert (await gw.next_json("tts", 5))["state"] == "sentence_start"
            assert (await gw.next_json("tts", 5))["state"] == "stop"
            # the TTS frames in the header the gateway reads (length at 12), each the stub's Opus packet
            assert [opus for _, opus in gw.audio] == [silence_packet(60)] * 4
        finally:
            await gw.close()
        assert up.binary == 0


async def test_the_start_up_log_names_the_ota_url_to_give_devices(start_server, caplog):
    caplog.set_level(logging.INFO, logger="asr_server")
    srv = await start_server()
    line = f"device OTA URL (the firmware's OTA setting): {srv.endpoints.http_url}/xiaozhi/ota/"
    assert line in [r.getMessage() for r in caplog.records]


async def test_a_gateway_session_that_vanishes_leaves_like_a_devices(start_server, caplog):
    """The gateway's socket dropped without a close (its process killed): the session is gone from
    the server, logged as a device's would be."""
    caplog.set_level(logging.INFO, logger="asr_server")
    srv = await start_server()
    gw = bridge(srv)
    await gw.connect(AUDIO_PARAMS)
    assert len(srv.xiaozhi.sessions) == 1 and gw._ws is not None
    gw._ws.transport.abort()
    await wait_sessions_empty(srv)
    assert any("client vanished" in r.getMessage() for r in caplog.records)
    await gw.close()
