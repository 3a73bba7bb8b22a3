"""A stand-in chatbot server that speaks the device protocol, for relay tests and the relay load test.

It behaves as xiaozhi-esp32-server does towards a device, minus the LLM: answers `hello` with its
own session id and TTS `audio_params`; answers a `listen` `detect` with text (a turn) with `stt`,
`tts start`, `sentence_start`, Opus frames of silence (bare Opus, protocol version 1) and
`tts stop`; stops sending audio on `abort`. It records what it received, so a test can check that
the turns arrived and no device audio did.

    python -m loadtest.upstream --port 8100 --think-ms 300 --frames 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .clips import silence_packet


@dataclass
class UpstreamOptions:
    think_ms: float = 50.0  # the LLM and TTS before the first audio
    frames: int = 5  # TTS Opus frames per answer
    frame_ms: int = 60
    pace: bool = False  # send the TTS frames at real time (as a TTS stream would), else at once
    refuse: bool = False  # answer the upgrade with 503
    no_hello: bool = False  # accept, then never answer hello
    close_after_hello: bool = False
    close_code: int = 1011  # how it closes after hello (1000: its goodbye, as a clean close)
    session_id: str | None = None  # the one session id it gives every device (a careless upstream); None: one each
    after_hello: tuple[str | bytes, ...] = ()  # sent to the device right after its hello (oversized frames...)
    reads: bool = True  # False: after its hello it reads nothing more (a stuck upstream)


@dataclass
class Received:
    """What one device session sent the upstream."""

    headers: dict[str, str]
    path: str
    text: list[dict[str, Any]] = field(default_factory=list)
    binary: int = 0


class UpstreamStub:
    def __init__(self, options: UpstreamOptions | None = None) -> None:
        self.options = options or UpstreamOptions()
        self.sessions: list[Received] = []
        self._server: Server | None = None
        self._packet = silence_packet(self.options.frame_ms)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/xiaozhi/v1/"

    async def start(self, port: int = 0) -> UpstreamStub:
        self._server = await serve(self._handle, "127.0.0.1", port, process_request=self._check, compression=None)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> UpstreamStub:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _check(self, connection: ServerConnection, request: Any) -> Any:
        if self.options.refuse:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "stub refuses\n")
        return None

    def turns(self) -> list[str]:
        return [m["text"] for s in self.sessions for m in s.text if m.get("type") == "listen" and "text" in m]

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        got = Received(dict(ws.request.headers.raw_items()), ws.request.path)
        self.sessions.append(got)
        session_id = self.options.session_id or uuid.uuid4().hex
        answering: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    got.binary += 1
                    continue
                msg = json.loads(raw)
                got.text.append(msg)
                kind = msg.get("type")
                if kind == "hello":
                    if self.options.no_hello:
                        continue
                    await ws.send(
                        json.dumps(
                            {
                                "type": "hello",
                                "transport": "websocket",
                                "session_id": session_id,
                                "audio_params": {
                                    "format": "opus",
                                    "sample_rate": 16000,
                                    "channels": 1,
                                    "frame_duration": self.options.frame_ms,
                                },
                            }
                        )
                    )
                    for extra in self.options.after_hello:
                        await ws.send(extra)
                    if self.options.close_after_hello:
                        await ws.close(self.options.close_code, "stub closes")
                        return
                    if not self.options.reads:
                        await ws.wait_closed()
                        return
                elif kind == "listen" and msg.get("state") == "detect" and "text" in msg:
                    if answering is not None:
                        answering.cancel()
                    answering = asyncio.ensure_future(self._answer(ws, session_id, msg["text"]))
                elif kind == "abort" and answering is not None:
                    answering.cancel()
                    await ws.send(json.dumps({"type": "tts", "state": "stop", "session_id": session_id}))
        except ConnectionClosed:
            pass
        finally:
            if answering is not None:
                answering.cancel()

    async def _answer(self, ws: ServerConnection, session_id: str, text: str) -> None:
        o = self.options
        try:
            content = json.loads(text)["content"] if text.startswith("{") else text
        except (ValueError, KeyError, TypeError):
            content = text
        await ws.send(json.dumps({"type": "stt", "text": content, "session_id": session_id}))
        await asyncio.sleep(o.think_ms / 1000)
        await ws.send(json.dumps({"type": "tts", "state": "start", "session_id": session_id}))
        await ws.send(
            json.dumps({"type": "tts", "state": "sentence_start", "text": "好的。", "session_id": session_id})
        )
        for _ in range(o.frames):
            await ws.send(self._packet)
            if o.pace:
                await asyncio.sleep(o.frame_ms / 1000)
        await ws.send(json.dumps({"type": "tts", "state": "stop", "session_id": session_id}))


async def _main(args: argparse.Namespace) -> None:
    stub = await UpstreamStub(UpstreamOptions(think_ms=args.think_ms, frames=args.frames, pace=True)).start(args.port)
    print(f"upstream stub on {stub.url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--think-ms", type=float, default=300.0)
    ap.add_argument("--frames", type=int, default=20)
    asyncio.run(_main(ap.parse_args()))
