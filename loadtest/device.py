"""A simulated xiaozhi device: the firmware's side of the WebSocket protocol, nothing more.

Used by the load test (hundreds per process, so it is cheap: no pings, no compression, one
reader task) and by the end-to-end tests. It connects with the firmware's upgrade headers (or the
query-parameter form browsers use), says hello and waits for the server's hello, sends the JSON
control messages and Opus frames at the device's real-time pace, and queues what the server says.

Every wait has a timeout; every failure is a `DeviceError` subclass.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from asr_server.adapters.xiaozhi.wire import LISTEN_MODES, PROTOCOL_VERSIONS, pack_audio

from .clips import FRAME_MS_CHOICES, silence_packet
from .stats import Histogram

ListenState = Literal["start", "stop", "detect"]


class DeviceError(Exception):
    """Base of everything a simulated device can fail with."""


class ConnectError(DeviceError):
    """The server refused the connection: nothing listening, HTTP status instead of an upgrade,
    or a broken handshake. `status` is the HTTP status when there was one, `retry_after_s` the
    seconds its `Retry-After` asked for (503 while the server is behind)."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` in seconds (the delta-seconds form servers send with 503); None otherwise."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class ConnectTimeout(DeviceError, TimeoutError):
    """The TCP connect or the WebSocket upgrade did not finish in time."""


class HelloTimeout(DeviceError, TimeoutError):
    """The server did not answer `hello` in time (the firmware gives up after 10 s)."""


class HelloRejected(DeviceError):
    """The server answered `hello` with an error, or with a hello the firmware cannot use."""


class ReplyTimeout(DeviceError, TimeoutError):
    """No message of the awaited type arrived in time."""


class DeviceClosed(DeviceError):
    """The connection is closed (by the server, or the device already closed it)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def default_device_id(index: int) -> str:
    """A locally administered MAC address per simulated device."""
    b = index.to_bytes(5, "big", signed=False)
    return "02:" + ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Who the device is and how it talks. `frame_ms` is the duration of each Opus packet."""

    url: str
    token: str | None = None
    protocol_version: int = 1
    device_id: str = "02:00:00:00:00:00"
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    auth_in_query: bool = False
    frame_ms: int = 60
    sample_rate: int = 16000
    open_timeout_s: float = 10.0
    hello_timeout_s: float = 10.0
    close_timeout_s: float = 1.0
    features: dict[str, Any] = field(default_factory=lambda: {"mcp": True})

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("ws", "wss"):
            raise ValueError(f"device URL must start with ws:// or wss://, got {self.url!r}")
        if self.protocol_version not in PROTOCOL_VERSIONS:
            raise ValueError(f"protocol version {self.protocol_version} is not one of {PROTOCOL_VERSIONS}")
        if self.frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"frame duration {self.frame_ms} ms is not one of {FRAME_MS_CHOICES}")

    def authorization(self) -> str | None:
        """The firmware prepends `Bearer ` to a token that has no space."""
        if not self.token:
            return None
        return self.token if " " in self.token else f"Bearer {self.token}"

    def headers(self) -> dict[str, str]:
        h = {"Protocol-Version": str(self.protocol_version), "Device-Id": self.device_id, "Client-Id": self.client_id}
        auth = self.authorization()
        if auth:
            h["Authorization"] = auth
        return h

    def connect_url(self) -> str:
        """The URL with the identity as query parameters when `auth_in_query` is set."""
        if not self.auth_in_query:
            return self.url
        parts = urlsplit(self.url)
        params = {
            "device-id": self.device_id,
            "client-id": self.client_id,
            "protocol-version": str(self.protocol_version),
        }
        auth = self.authorization()
        if auth:
            params["authorization"] = auth
        query = "&".join(q for q in (parts.query, urlencode(params)) if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))

    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "version": self.protocol_version,
            "features": dict(self.features),
            "transport": "websocket",
            "audio_params": {
                "format": "opus",
                "sample_rate": self.sample_rate,
                "channels": 1,
                "frame_duration": self.frame_ms,
            },
        }


@dataclass(frozen=True, slots=True)
class ServerMessage:
    """One JSON message from the server and when it arrived (`time.monotonic()`)."""

    data: dict[str, Any]
    at: float

    @property
    def type(self) -> str | None:
        t = self.data.get("type")
        return t if isinstance(t, str) else None


_CLOSE_MARK = ServerMessage({"type": None}, 0.0)  # queued by the reader when the connection ends


class Device:
    """One simulated device on one connection. Use `async with Device(cfg) as dev:`, or
    `connect()` and `close()`.

    `lateness` counts, for each paced frame, how late it left compared with the device's clock
    (ms); pass one `Histogram` to many devices to pool them. `frames_sent` counts every Opus
    frame. Both survive `close()` for the caller to read.
    """

    def __init__(self, config: DeviceConfig, lateness: Histogram | None = None) -> None:
        self.config = config
        self.session_id: str | None = None
        self.server_hello: dict[str, Any] | None = None
        self.hello_ms: float | None = None
        self.retry_after_s: float | None = None  # what the server's last refusal said to wait
        self.frames_sent = 0
        self.binary_received = 0
        self.binary: deque[tuple[float, bytes]] = deque(maxlen=256)  # (monotonic arrival, frame): TTS audio
        self.lateness = lateness if lateness is not None else Histogram()
        self._ws: ClientConnection | None = None
        self._messages: asyncio.Queue[ServerMessage] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._closed: DeviceClosed | None = None
        self._closing = False
        self._due: float | None = None  # when the next paced frame is due (monotonic)
        self._audio_ms = 0  # the device's audio clock, sent as the v2 timestamp
        self._silence = silence_packet(config.frame_ms)

    async def __aenter__(self) -> Device:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def closed_by_server(self) -> bool:
        return self._closed is not None and not self._closing

    async def connect(self) -> dict[str, Any]:
        """Open the WebSocket, send `hello`, wait for the server's hello; return it."""
        cfg = self.config
        try:
            self._ws = await connect(
                cfg.connect_url(),
                additional_headers=None if cfg.auth_in_query else cfg.headers(),
                compression=None,
                ping_interval=None,
                proxy=None,
                open_timeout=cfg.open_timeout_s,
                close_timeout=cfg.close_timeout_s,
                max_size=1 << 20,
                user_agent_header=None,
            )
        except InvalidStatus as e:
            status = e.response.status_code
            retry = self.retry_after_s = retry_after_seconds(e.response.headers.get("Retry-After"))
            raise ConnectError(f"server refused the upgrade with HTTP {status}", status, retry) from None
        except InvalidURI as e:
            raise ConnectError(f"invalid URL: {e}") from None
        except InvalidHandshake as e:
            raise ConnectError(f"WebSocket handshake failed: {e}") from None
        except TimeoutError:
            raise ConnectTimeout(f"no WebSocket upgrade within {cfg.open_timeout_s} s") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {cfg.url}: {e.strerror or e}") from None
        self._reader = asyncio.get_running_loop().create_task(self._read())
        t0 = time.monotonic()
        await self.send_json(cfg.hello())
        deadline = t0 + cfg.hello_timeout_s
        while True:
            try:
                msg = await self.next_message(timeout=deadline - time.monotonic())
            except ReplyTimeout:
                await self.close()
                raise HelloTimeout(f"no server hello within {cfg.hello_timeout_s} s") from None
            except DeviceClosed as e:
                raise DeviceClosed(f"server closed the connection before its hello: {e}", e.code, e.reason) from None
            if msg.type == "hello":
                break
            if msg.type == "error":
                await self.close()
                raise HelloRejected(f"server answered hello with an error: {msg.data.get('message')!r}")
        if msg.data.get("transport") != "websocket":
            await self.close()
            raise HelloRejected(f"server hello lacks transport 'websocket': {msg.data!r}")
        self.hello_ms = (msg.at - t0) * 1000.0
        self.server_hello = msg.data
        sid = msg.data.get("session_id")
        self.session_id = sid if isinstance(sid, str) else None
        return msg.data

    async def _read(self) -> None:
        assert self._ws is not None
        ws = self._ws
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    self.binary_received += 1
                    self.binary.append((time.monotonic(), raw))
                    continue
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = {"type": None, "raw": raw}
                if not isinstance(data, dict):
                    data = {"type": None, "raw": data}
                self._messages.put_nowait(ServerMessage(data, time.monotonic()))
        except ConnectionClosed:
            pass
        finally:
            code = ws.close_code
            reason = ws.close_reason or ""
            who = "device" if self._closing else "server"
            self._closed = DeviceClosed(
                f"connection closed by the {who} (code {code}, reason {reason!r})", code, reason
            )
            self._messages.put_nowait(_CLOSE_MARK)

    def _require_open(self) -> ClientConnection:
        if self._closed is not None:
            raise self._closed
        if self._ws is None:
            raise DeviceClosed("device is not connected")
        return self._ws

    async def _send(self, data: str | bytes) -> None:
        ws = self._require_open()
        try:
            await ws.send(data)
        except ConnectionClosed as e:
            raise DeviceClosed(f"connection closed while sending (code {e.code})", e.code, e.reason) from None

    async def send_json(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps(message, ensure_ascii=False))

    def _with_session(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.session_id is not None:
            return {"session_id": self.session_id, **message}
        return message

    async def listen(self, state: ListenState, mode: str | None = None, text: str | None = None) -> None:
        """`listen` start (with `mode`), stop, or detect (with the wake word `text`)."""
        msg: dict[str, Any] = {"type": "listen", "state": state}
        if state == "start":
            mode = mode or "auto"
            if mode not in LISTEN_MODES:
                raise ValueError(f"listen mode {mode!r} is not one of {LISTEN_MODES}")
            msg["mode"] = mode
        if state == "detect":
            msg["text"] = text or ""
        await self.send_json(self._with_session(msg))

    async def detect(self, text: str) -> None:
        await self.listen("detect", text=text)

    async def abort(self, reason: str = "wake_word_detected") -> None:
        await self.send_json(self._with_session({"type": "abort", "reason": reason}))

    async def send_opus(self, packets: Iterable[bytes], pace: float | None = 1.0) -> list[float]:
        """Send Opus packets as binary frames; return when each left (`time.monotonic()`).

        With `pace`, frame i is due `i * frame_ms / pace` after the first, as the firmware sends
        them (1.0 is real time); a late frame goes at once and the clock keeps its schedule. A
        call that follows the previous one within a frame continues its clock, so speech
        followed by silence is one stream. With `pace=None` frames go as fast as possible.
        """
        if pace is not None and pace <= 0:
            raise ValueError(f"pace must be positive or None, got {pace}")
        version = self.config.protocol_version
        frame_s = self.config.frame_ms / 1000.0 / (pace or 1.0)
        sent: list[float] = []
        now = time.monotonic()
        due = self._due if (pace is not None and self._due is not None and now - self._due < frame_s) else now
        for packet in packets:
            if pace is not None:
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self._send(pack_audio(packet, version, self._audio_ms))
            t = time.monotonic()
            sent.append(t)
            self.frames_sent += 1
            self._audio_ms += self.config.frame_ms
            if pace is not None:
                self.lateness.add((t - due) * 1000.0)
                due += frame_s
                self._due = due
        return sent

    async def send_silence(self, ms: float, pace: float | None = 1.0) -> list[float]:
        """Send `ms` of encoded silence (rounded up to whole frames)."""
        n = max(0, -(-int(ms) // self.config.frame_ms))
        return await self.send_opus((self._silence for _ in range(n)), pace)

    def pending(self) -> list[ServerMessage]:
        """Take every message already received without waiting."""
        out: list[ServerMessage] = []
        while not self._messages.empty():
            msg = self._messages.get_nowait()
            if msg is _CLOSE_MARK:
                self._messages.put_nowait(msg)  # keep the close marker for the next waiter
                break
            out.append(msg)
        return out

    async def next_message(self, type: str | tuple[str, ...] | None = None, timeout: float = 10.0) -> ServerMessage:
        """The next message (of `type`, if given: others are dropped) within `timeout` seconds.

        Raises `ReplyTimeout`, or `DeviceClosed` once the connection is closed and every message
        received before the close has been taken.
        """
        wanted = (type,) if isinstance(type, str) else type
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if not self._messages.empty():
                msg = self._messages.get_nowait()
            else:
                if self._closed is not None:
                    raise self._closed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReplyTimeout(f"no {'/'.join(wanted) if wanted else 'message'} within {timeout:.1f} s")
                try:
                    msg = await asyncio.wait_for(self._messages.get(), remaining)
                except TimeoutError:
                    continue
            if msg is _CLOSE_MARK:
                if self._messages.empty():
                    self._messages.put_nowait(msg)  # later waiters see the close too
                    if self._closed is not None:
                        raise self._closed
                continue
            if wanted is None or msg.type in wanted:
                return msg

    async def close(self) -> None:
        """Close the connection (bounded by `close_timeout_s`); safe to call twice."""
        self._closing = self._closed is None
        ws = self._ws
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), self.config.close_timeout_s + 1.0)
            except (TimeoutError, ConnectionClosed, OSError):
                ws.transport.abort()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, self.config.close_timeout_s + 1.0)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        if self._closed is None:
            self._closed = DeviceClosed("connection closed by the device")
