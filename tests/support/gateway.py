"""A stand-in for the WebSocket side of the xiaozhi-mqtt-gateway (xinnan-tech's fork, `app.js`
`WebSocketBridge`, read at commit 93f026a), for tests: CI cannot fetch the gateway (GitHub), so the
automated tests speak to the server exactly as its bridge does, and docs/mqtt-gateway.md records
the run against the real gateway.

What the bridge does, per device session (the device's MQTT `hello` opens it):
- connects to its configured chat server URL (`…/xiaozhi/v1/?from=mqtt_gateway`) with lower-case
  headers `device-id` (the MAC), `protocol-version: 2`, `authorization: Bearer test-token` (an
  HMAC token instead when SERVER_SECRET is set), `client-id` (the device's UUID, when it has one)
  and `x-forwarded-for` (the device's IP);
- sends `{"type":"hello","version":2,"transport":"websocket","audio_params":…,"features":…}`
  with the device's own audio_params and features, and waits for the server's hello (its
  `session_id` goes to the device in the gateway's MQTT hello);
- sends each UDP audio packet, decrypted, as a 16-byte header in a zeroed buffer with only the
  timestamp (offset 8) and the Opus length (offset 12) written, then the Opus packet;
- reads the server's binary messages as timestamp (offset 8), length (offset 12), Opus from 16
  (to UDP), its JSON as it is (to MQTT).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

_HEADER = struct.Struct(">8xII")  # the bridge writes only timestamp and size into a zeroed 16-byte header
_HEADER_SIZE = 16


class GatewayBridge:
    """One device's bridge socket. `json` and `audio` collect what it would send the device over
    MQTT and UDP."""

    def __init__(self, chat_server: str, mac: str, uuid: str | None = None, ip: str = "192.0.2.7") -> None:
        self.chat_server = chat_server
        self.headers = {"device-id": mac, "protocol-version": "2", "authorization": "Bearer test-token"}
        if uuid:
            self.headers["client-id"] = uuid
        self.headers["x-forwarded-for"] = ip
        self.json: list[dict[str, Any]] = []
        self.audio: list[tuple[int, bytes]] = []  # (timestamp, Opus) as it would go out by UDP
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._arrived = asyncio.Event()

    async def connect(self, audio_params: dict[str, Any], features: dict[str, Any] | None = None) -> dict[str, Any]:
        """Open the socket, say the bridge's hello, return the server's hello."""
        self._ws = await connect(self.chat_server, additional_headers=self.headers, open_timeout=5, ping_interval=None)
        self._hello = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        hello: dict[str, Any] = {"type": "hello", "version": 2, "transport": "websocket", "audio_params": audio_params}
        if features is not None:
            hello["features"] = features
        await self._ws.send(json.dumps(hello))
        return await asyncio.wait_for(self._hello, 10)

    async def _read(self) -> None:
        assert self._ws is not None and self._hello is not None
        async for data in self._ws:
            if isinstance(data, bytes):
                timestamp, size = _HEADER.unpack_from(data)
                self.audio.append((timestamp, data[_HEADER_SIZE : _HEADER_SIZE + size]))
            else:
                message = json.loads(data)
                if message.get("type") == "hello" and not self._hello.done():
                    self._hello.set_result(message)
                else:
                    self.json.append(message)
            self._arrived.set()

    async def send_json(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps(message))

    async def send_audio(self, opus: bytes, timestamp: int) -> None:
        assert self._ws is not None
        header = bytearray(_HEADER_SIZE)
        _HEADER.pack_into(header, 0, timestamp, len(opus))
        await self._ws.send(bytes(header) + opus)

    async def next_json(self, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first message of type `kind` it got (taken from `json`), waiting at most `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                for i, m in enumerate(self.json):
                    if m.get("type") == kind:
                        return self.json.pop(i)
                self._arrived.clear()
                await self._arrived.wait()

    @property
    def closed(self) -> bool:
        return self._reader is not None and self._reader.done()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
