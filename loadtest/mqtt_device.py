"""A simulated xiaozhi device on the firmware's second transport, MQTT + UDP, written from the
firmware's `main/protocols/mqtt_protocol.cc` (78/xiaozhi-esp32): for the xiaozhi-mqtt-gateway,
which holds this side and opens one WebSocket per device to the server (docs/mqtt-gateway.md).

What the firmware does, and this does:
- MQTT: connects with the OTA answer's `mqtt` section (`endpoint` host:port, `client_id`,
  `username`, `password`), publishes JSON to `publish_topic`, takes whatever the broker sends it.
- Opening the audio channel: publishes `{"type":"hello","version":3,"transport":"udp",
  "features":{"mcp":true},"audio_params":{…}}` and waits 10 s for the server's hello, which must
  say `transport: udp` and carry `udp{server,port,key,nonce}` (16 bytes each, as hex); both
  sequence counters restart at 0.
- UDP audio out: the 16-byte nonce copied, `payload_len` (u16 at 2), `timestamp` (u32 at 8) and
  `++local_sequence` (u32 at 12) written into it, big-endian; that header is the AES-128-CTR
  counter block of the Opus payload and goes in front of it.
- UDP audio in: type 0x01 only; a sequence below the last one is dropped (one that is not last + 1
  is taken, with a warning); decrypted with its own header as the counter block.
- `goodbye` (from the broker) for its session closes the audio channel.

Run by hand against a gateway (the result is in docs/mqtt-gateway.md):

    python -m loadtest.mqtt_device --endpoint 127.0.0.1:1883 --clip ../shared/audio/<clip>.wav
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .clips import load_clip, silence_packet

log = logging.getLogger(__name__)

#: The firmware's MQTT hello (`MqttProtocol::GetHelloMessage`): 60 ms frames, a play buffer of 40 packets.
HELLO = {
    "type": "hello",
    "version": 3,
    "transport": "udp",
    "features": {"mcp": True},
    "audio_params": {
        "format": "opus",
        "sample_rate": 16000,
        "channels": 1,
        "frame_duration": 60,
        "play_buffer_duration": 2400,
    },
}
_SERVER_HELLO_S = 10.0  # the firmware's wait for the server's hello (SERVER_TIMEOUT after it)
_UDP_AUDIO = 0x01
_HEADER = struct.Struct(">BBHIII")  # type, flags, payload_len, ssrc, timestamp, sequence


class MqttDeviceError(Exception):
    """The gateway refused, did not answer, or answered what the firmware cannot use."""


@dataclass(frozen=True)
class MqttSettings:
    """The OTA answer's `mqtt` section, as the firmware stores it (`Settings("mqtt")`)."""

    endpoint: str  # host:port
    client_id: str  # the gateway's forms: GID_x@@@aa_bb_cc_dd_ee_ff[@@@uuid]
    username: str = ""
    password: str = ""
    publish_topic: str = "device-server"
    keepalive: int = 240


@dataclass
class Channel:
    """The UDP audio channel the server's hello opened."""

    server: str
    port: int
    key: bytes
    nonce: bytes
    session_id: str
    local_sequence: int = 0
    remote_sequence: int = 0
    out_of_order: int = 0  # packets taken with a sequence that is not last + 1
    dropped: int = 0  # packets dropped: old sequence, wrong type, too short


def udp_packet(channel: Channel, opus: bytes, timestamp: int) -> bytes:
    """One encrypted audio packet, as `MqttProtocol::SendAudio` makes it."""
    channel.local_sequence += 1
    nonce = bytearray(channel.nonce)
    struct.pack_into(">H", nonce, 2, len(opus))
    struct.pack_into(">II", nonce, 8, timestamp, channel.local_sequence)
    return bytes(nonce) + _ctr(channel.key, bytes(nonce), opus)


def open_udp_packet(channel: Channel, data: bytes) -> tuple[int, bytes] | None:
    """(timestamp, Opus) of one packet from the server, or None where the firmware drops it."""
    if len(data) < _HEADER.size or data[0] != _UDP_AUDIO:
        channel.dropped += 1
        return None
    _, _, _, _, timestamp, sequence = _HEADER.unpack_from(data)
    if sequence < channel.remote_sequence:
        channel.dropped += 1
        return None
    if sequence != channel.remote_sequence + 1:
        channel.out_of_order += 1
    channel.remote_sequence = sequence
    return timestamp, _ctr(channel.key, data[: _HEADER.size], data[_HEADER.size :])


def _ctr(key: bytes, counter_block: bytes, data: bytes) -> bytes:
    """AES-128-CTR with the packet's 16-byte header as the initial counter block (mbedtls_aes_crypt_ctr)."""
    crypt = Cipher(algorithms.AES(key), modes.CTR(counter_block)).encryptor()
    return crypt.update(data) + crypt.finalize()


@dataclass
class Received:
    json: list[dict[str, Any]] = field(default_factory=list)
    audio: list[tuple[int, bytes]] = field(default_factory=list)


class MqttDevice:
    """One device: `await connect()`, `await open_audio()`, send, read `received`, `close()`."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.received = Received()
        self.channel: Channel | None = None
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        self._client.on_message = lambda _c, _u, msg: self._loop.call_soon_threadsafe(self._on_mqtt, msg.payload)

    async def connect(self) -> None:
        host, _, port = self.settings.endpoint.partition(":")
        connected: asyncio.Future[int] = self._loop.create_future()

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self._loop.call_soon_threadsafe(lambda: connected.done() or connected.set_result(reason.value))

        self._client.on_connect = on_connect
        await asyncio.to_thread(self._client.connect, host, int(port or 8883), self.settings.keepalive)
        self._client.loop_start()
        code = await asyncio.wait_for(connected, _SERVER_HELLO_S)
        if code != 0:
            raise MqttDeviceError(f"the broker refused the connection (CONNACK {code})")

    def _on_mqtt(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("not JSON from the broker: %r", payload[:80])
            return
        if not isinstance(message, dict):
            return
        if message.get("type") == "hello" and self._hello is not None and not self._hello.done():
            self._hello.set_result(message)
            return
        if message.get("type") == "goodbye" and self.channel is not None:
            if message.get("session_id") in (None, self.channel.session_id):
                self._close_channel()
        self.received.json.append(message)
        self._arrived.set()

    def publish(self, message: dict[str, Any]) -> None:
        info = self._client.publish(self.settings.publish_topic, json.dumps(message, ensure_ascii=False), qos=0)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise MqttDeviceError(f"publish failed: {mqtt.error_string(info.rc)}")

    async def open_audio(self) -> dict[str, Any]:
        """The firmware's `OpenAudioChannel`: hello, the server's hello, the UDP socket."""
        self._hello = self._loop.create_future()
        self.publish(HELLO)
        try:
            hello = await asyncio.wait_for(self._hello, _SERVER_HELLO_S)
        except TimeoutError:
            raise MqttDeviceError(f"no server hello within {_SERVER_HELLO_S:g} s") from None
        udp = hello.get("udp")
        if hello.get("transport") != "udp" or not isinstance(udp, dict):
            raise MqttDeviceError(f"a server hello the firmware cannot use: {hello}")
        self.channel = Channel(
            udp["server"], int(udp["port"]), bytes.fromhex(udp["key"]), bytes.fromhex(udp["nonce"]), hello["session_id"]
        )
        self._udp, _ = await self._loop.create_datagram_endpoint(
            lambda: _Datagrams(self), remote_addr=(self.channel.server, self.channel.port)
        )
        return hello

    def _on_udp(self, data: bytes) -> None:
        if self.channel is None:
            return
        opened = open_udp_packet(self.channel, data)
        if opened is not None:
            self.received.audio.append(opened)
            self._arrived.set()

    def send_json(self, message: dict[str, Any]) -> None:
        """A control message of the open session (`listen`, `abort`...), with its session id."""
        assert self.channel is not None
        self.publish({"session_id": self.channel.session_id, **message})

    async def send_opus(self, packets: Iterable[bytes], frame_ms: int = 60, pace: float = 1.0) -> None:
        """Opus packets over UDP at `pace` × real time, timestamps in ms from the first."""
        assert self.channel is not None and self._udp is not None
        start = time.monotonic()
        for i, opus in enumerate(packets):
            self._udp.sendto(udp_packet(self.channel, opus, i * frame_ms))
            await asyncio.sleep(max(0.0, start + (i + 1) * frame_ms / 1000 / pace - time.monotonic()))

    async def next_json(self, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for i, m in enumerate(self.received.json):
                    if m.get("type") == kind:
                        return self.received.json.pop(i)
                self._arrived.clear()
                await self._arrived.wait()

    def _close_channel(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    def close(self) -> None:
        """The firmware's `CloseAudioChannel` (goodbye), then the MQTT connection."""
        if self.channel is not None and self._udp is not None:
            self.publish({"session_id": self.channel.session_id, "type": "goodbye"})
        self._close_channel()
        self._client.loop_stop()
        self._client.disconnect()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, device: MqttDevice) -> None:
        self.device = device

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.device._on_udp(data)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    device = MqttDevice(MqttSettings(args.endpoint, args.client_id, args.username, args.password))
    await device.connect()
    try:
        hello = await device.open_audio()
        device.send_json({"type": "listen", "state": "start", "mode": "auto"})
        clip = load_clip(args.clip)
        await device.send_opus([*clip.packets, *[silence_packet()] * 20], clip.frame_ms, args.pace)
        stt = await device.next_json("stt", args.timeout)
        await asyncio.sleep(args.linger)  # what follows the stt (an upstream's answer and its audio)
        assert device.channel is not None
        return {
            "server_hello": {k: v for k, v in hello.items() if k != "udp"} | {"udp": {**hello["udp"], "key": "…"}},
            "stt": stt,
            "then": [m for m in device.received.json if m.get("type") != "mcp"],
            "udp_audio_packets": len(device.received.audio),
            "udp_audio_bytes": sum(len(a) for _, a in device.received.audio),
            "udp_audio_distinct_payloads": sorted({a.hex() for _, a in device.received.audio}),
            "udp_out_of_order": device.channel.out_of_order,
            "udp_dropped": device.channel.dropped,
        }
    finally:
        device.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m loadtest.mqtt_device")
    p.add_argument("--endpoint", default="127.0.0.1:1883", help="the gateway's MQTT host:port")
    p.add_argument("--client-id", default="GID_test@@@aa_bb_cc_dd_ee_29@@@7b1c0d3e-2f4a-4b5c-9d6e-0f1a2b3c4d5e")
    p.add_argument(
        "--username",
        default=base64.b64encode(b'{"ip": "127.0.0.1"}').decode(),
        help="the OTA's mqtt.username: the gateway's three-part client ids need base64 JSON (what "
        'xiaozhi-esp32-server\'s OTA hands out: {"ip": …})',
    )
    p.add_argument("--password", default="")
    p.add_argument("--clip", required=True, help="a wav/flac file: what the device hears")
    p.add_argument("--pace", type=float, default=1.0, help="× real time")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the stt")
    p.add_argument("--linger", type=float, default=3.0, help="seconds to keep listening after the stt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(asyncio.run(_run(args)), ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
