"""The device WebSocket server: accepts xiaozhi connections, runs one `Session` each.

Handshake checks (path, token, session limit) answer with plain HTTP errors; after the upgrade,
every failure is a JSON `error` message and/or a close code with a reason, logged once, and
the session leaves the server's dict whatever way the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ...config import Config
from ...core.pipeline import Pipeline
from ...errors import EngineBusy, FramingError, MessageError, ProtocolError
from ...types import ClientInfo
from ..admission import ConnectionSlots
from ..auth import bearer_token, header_or_query
from .session import PROTOCOL, Publish, Session
from .wire import Hello, dumps, error_message, parse_message, parse_protocol_version, server_hello

log = logging.getLogger(__name__)


class _FrameRate:
    """Token bucket on binary frames: a second's worth of burst, refilled at the allowed rate."""

    def __init__(self, per_second: int) -> None:
        self.rate = float(per_second)
        self.tokens = float(per_second)
        self.last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class XiaozhiServer:
    """Owns the device sessions (`sessions`, keyed by session id) and the WebSocket server."""

    def __init__(self, config: Config, pipeline: Pipeline, publish: Publish | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.publish = publish
        self.sessions: dict[str, Session] = {}
        self._sockets: dict[str, ServerConnection] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics = pipeline.metrics
        self._path = config.xiaozhi.path.rstrip("/") or "/"
        self.slots = ConnectionSlots(
            config.xiaozhi.max_sessions, "xiaozhi.max_sessions", self._metrics.errors.labels("capacity").inc
        )

    async def serve(self, host: str | None = None, port: int | None = None) -> Server:
        cfg = self.config.xiaozhi
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle(), name="xiaozhi-idle-sweep")
        return await serve(
            self._handle,
            host if host is not None else cfg.host,
            cfg.port if port is None else port,
            process_request=self._check_request,
            max_size=cfg.max_message_bytes,
            ping_interval=cfg.ping_interval_s,
            compression=None,
            server_header="asr-server",
            # A client closed for flooding has frames queued ahead of its close reply: don't wait long for it.
            close_timeout=cfg.close_timeout_s,
        )

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0].rstrip("/") or "/"
        if path != self._path:
            return connection.respond(
                HTTPStatus.NOT_FOUND, f"no WebSocket endpoint at {path}; use {self.config.xiaozhi.path}\n"
            )
        auth = self.config.xiaozhi.auth
        if auth.enabled:
            token = bearer_token(header_or_query(request, "Authorization") or header_or_query(request, "access_token"))
            if token is None or not any(hmac.compare_digest(token.encode(), t.encode()) for t in auth.tokens):
                self._metrics.errors.labels("auth").inc()
                log.warning(
                    "device %s refused: %s token",
                    header_or_query(request, "Device-Id"),
                    "missing" if token is None else "unknown",
                )
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token\n")
        return self.slots.admit(connection)

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        device_id = header_or_query(request, "Device-Id")
        session_id = str(uuid.uuid4())
        try:
            version = parse_protocol_version(header_or_query(request, "Protocol-Version"))
        except ProtocolError as e:
            await self._refuse(ws, device_id, "protocol_version", str(e), CloseCode.PROTOCOL_ERROR)
            return
        client = ClientInfo(
            device_id,
            header_or_query(request, "Client-Id"),
            version,
            f"{ws.remote_address[0]}:{ws.remote_address[1]}" if ws.remote_address else "",
        )

        hello = await self._await_hello(ws, client)
        if hello is None:
            return

        async def send(message: dict) -> None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(dumps(message))

        session = Session(session_id, client, self.config, self.pipeline, send, self.publish)
        self.sessions[session_id] = session
        self._sockets[session_id] = ws
        self._metrics.sessions.labels(PROTOCOL).inc()
        self._metrics.sessions_total.labels(PROTOCOL).inc()
        log.info(
            "session %s open: device %s client %s v%d from %s",
            session_id,
            client.device_id,
            client.client_id,
            version,
            client.remote,
        )
        reason = "closed"
        try:
            await ws.send(dumps(server_hello(session_id, self._audio_params(hello))))
            reason = await self._serve_session(ws, session)
        except ConnectionClosed as e:
            reason = self._describe_close(e)
        except Exception:
            self._metrics.errors.labels("internal").inc()
            log.exception("session %s: internal error", session_id)
            reason = "internal error"
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.sessions.pop(session_id, None)
            self._sockets.pop(session_id, None)
            self._metrics.sessions.labels(PROTOCOL).dec()
            await session.close()
            log.info(
                "session %s closed (%s): %d frames, %d utterances",
                session_id,
                reason,
                session.frames,
                session.utterances,
            )

    async def _await_hello(self, ws: ServerConnection, client: ClientInfo) -> Hello | None:
        """The first message must be `hello`, within `hello_timeout_s`; anything else closes the socket."""
        try:
            first = await asyncio.wait_for(ws.recv(), self.config.xiaozhi.hello_timeout_s)
        except TimeoutError:
            await self._refuse(
                ws,
                client.device_id,
                "hello_timeout",
                f"no hello within {self.config.xiaozhi.hello_timeout_s:g} s",
                CloseCode.POLICY_VIOLATION,
            )
            return None
        except ConnectionClosed:
            log.info("device %s left before hello", client.device_id)
            return None
        if isinstance(first, bytes):
            await self._refuse(
                ws, client.device_id, "before_hello", "binary frame before hello", CloseCode.PROTOCOL_ERROR
            )
            return None
        try:
            msg = parse_message(first)
        except MessageError as e:
            await self._refuse(ws, client.device_id, "bad_message", f"{e} (expected hello)", CloseCode.PROTOCOL_ERROR)
            return None
        if not isinstance(msg, Hello):
            await self._refuse(
                ws, client.device_id, "before_hello", "the first message must be hello", CloseCode.PROTOCOL_ERROR
            )
            return None
        fmt = msg.audio_params.get("format", "opus")
        if fmt != "opus":
            await self._refuse(
                ws,
                client.device_id,
                "audio_format",
                f"unsupported audio format {fmt!r}: only opus",
                CloseCode.PROTOCOL_ERROR,
            )
            return None
        return msg

    @staticmethod
    def _audio_params(hello: Hello) -> dict:
        params = {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}
        params.update({k: v for k, v in hello.audio_params.items() if k in params})
        return params

    async def _sweep_idle(self) -> None:
        """Close sessions that sent nothing for `idle_timeout_s`: one task for the whole server
        instead of a timer per received frame, checked a few times per timeout."""
        cfg = self.config.xiaozhi
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, cfg.idle_timeout_s / 4))
            cutoff = loop.time() - cfg.idle_timeout_s
            for sid, session in list(self.sessions.items()):
                ws = self._sockets.get(sid)
                if ws is not None and session.last_active < cutoff and not session.idle_closed:
                    session.idle_closed = True
                    loop.create_task(ws.close(CloseCode.NORMAL_CLOSURE, f"idle for {cfg.idle_timeout_s:g} s"))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _serve_session(self, ws: ServerConnection, session: Session) -> str:
        """Read messages until the client leaves; returns why the session ended."""
        cfg = self.config.xiaozhi
        rate = _FrameRate(cfg.max_frames_per_s)
        bad_frames_logged = busy_logged = False
        clock = asyncio.get_running_loop().time
        session.last_active = clock()
        async for message in ws:
            session.last_active = clock()
            try:
                if isinstance(message, bytes):
                    if not rate.allow():
                        self._metrics.errors.labels("flood").inc()
                        log.warning(
                            "session %s: more than %d frames/s, closing", session.session_id, cfg.max_frames_per_s
                        )
                        await session.send_error(f"frame flood: more than {cfg.max_frames_per_s} frames per second")
                        await ws.close(CloseCode.POLICY_VIOLATION, "frame flood")
                        return "frame flood"
                    await session.on_binary(message)
                else:
                    await session.on_text(message)
            except EngineBusy as e:
                self._metrics.errors.labels("busy").inc()
                if not busy_logged:
                    busy_logged = True
                    log.warning("session %s: %s (audio dropped; further ones are not logged)", session.session_id, e)
                await session.send_error(f"audio dropped: {e}")
            except FramingError as e:
                self._metrics.errors.labels("framing").inc()
                if not bad_frames_logged:
                    bad_frames_logged = True
                    log.warning("session %s: %s (frame dropped; further ones are not logged)", session.session_id, e)
                await session.send_error(str(e))
            except ProtocolError as e:
                self._metrics.errors.labels("bad_message").inc()
                log.warning("session %s: %s", session.session_id, e)
                await session.send_error(str(e))
        return "idle timeout" if session.idle_closed else "closed"

    async def _refuse(self, ws: ServerConnection, device_id: str | None, kind: str, message: str, code: int) -> None:
        self._metrics.errors.labels(kind).inc()
        log.warning("device %s refused: %s", device_id, message)
        try:
            await ws.send(dumps(error_message(message)))
            await ws.close(code, message[:120])
        except ConnectionClosed:
            pass

    def _describe_close(self, e: ConnectionClosed) -> str:
        if e.sent is not None and e.sent.code == CloseCode.MESSAGE_TOO_BIG:
            self._metrics.errors.labels("oversize").inc()
            log.warning("closing: message over xiaozhi.max_message_bytes (%d)", self.config.xiaozhi.max_message_bytes)
            return "message too big"
        if e.rcvd is None:
            return "client vanished"
        return f"client closed ({e.rcvd.code})"
