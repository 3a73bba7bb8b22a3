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
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ...config import Config
from ...core.archive import Archive
from ...core.finals import Publish
from ...core.governor import UNHEARD_S
from ...core.live import SessionBoard
from ...core.pipeline import Pipeline
from ...errors import EngineBusy, FramingError, MessageError, ProtocolError, UpstreamError
from ...logs import Throttle
from ...sharing import Tally, WorkerShare
from ...types import ClientInfo
from ..admission import ConnectionSlots, PortAdmission, RateBucket
from ..auth import bearer_token, fingerprint, header_or_query
from ..sending import close_reason, send_within
from .session import PROTOCOL, Session
from .upstream import PASSED, Ended, Upstream
from .wire import Error, Hello, ServerHello, ServerMessage, dumps, parse_message, parse_protocol_version

log = logging.getLogger(__name__)


class XiaozhiServer:
    """Owns the device sessions (`sessions`, keyed by session id) and the WebSocket server."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        publish: Publish | None = None,
        share: WorkerShare | None = None,
        board: SessionBoard | None = None,
        archive: Archive | None = None,
    ) -> None:
        self.config = config
        self.archive = archive  # where final utterances are kept (archive.enabled)
        self.pipeline = pipeline
        self.publish = publish
        self.board = board  # the console's live view of the open sessions
        self.sessions: dict[str, Session] = {}
        self._sockets: dict[str, ServerConnection] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics = pipeline.metrics
        self._path = config.xiaozhi.path.rstrip("/") or "/"
        self._sheds = Throttle()  # its own: thousands of refusals must not hide a round of shedding
        self.slots = ConnectionSlots(
            config.xiaozhi.max_sessions,
            "xiaozhi.max_sessions",
            self._metrics.errors.labels("capacity").inc,
            Tally.of(share, "xiaozhi.max_sessions"),
        )
        self.admission = PortAdmission(pipeline.governor, self.slots, self._metrics.refused.labels(PROTOCOL).inc)
        self._reuse_port = share is not None  # workers listen on one port each (SO_REUSEPORT)

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
            reuse_port=self._reuse_port,
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
            if token is None or not any(
                hmac.compare_digest(token.encode("utf-8", "surrogateescape"), t.encode()) for t in auth.tokens
            ):
                self._metrics.errors.labels("auth").inc()
                log.warning(
                    "device %s refused: %s token",
                    header_or_query(request, "Device-Id"),
                    "missing" if token is None else "unknown",
                )
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token\n")
        return self.admission.admit(connection, f"device {header_or_query(request, 'Device-Id')}")

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
        token = bearer_token(header_or_query(request, "Authorization") or header_or_query(request, "access_token"))
        client = ClientInfo(
            device_id,
            header_or_query(request, "Client-Id"),
            version,
            f"{ws.remote_address[0]}:{ws.remote_address[1]}" if ws.remote_address else "",
            fingerprint(token) if self.config.xiaozhi.auth.enabled and token else None,
        )

        got = await self._await_hello(ws, client)
        if got is None:
            return
        hello, hello_raw = got

        async def send_raw(data: str | bytes) -> None:
            if not await send_within(ws, data, self.config.xiaozhi.send_timeout_s, f"session {session_id}"):
                self._metrics.errors.labels("send_failed").inc()

        async def send(message: ServerMessage) -> None:
            await send_raw(message.to_json())

        upstream = None
        if self.config.upstream.url is not None:
            upstream = Upstream(self.config.upstream, version, send_raw, self._metrics, f"session {session_id}")
            try:
                up_hello = await upstream.open(*self._passed_fields(request), hello_raw)
            except UpstreamError as e:
                await self._refuse(ws, device_id, "upstream", str(e), CloseCode.TRY_AGAIN_LATER)
                return
        # Keyed by our own id when relayed too: an upstream may give many devices one session id.
        meter = hello.features.get("vad_meter") is True and upstream is None
        session = Session(
            session_id, client, self.config, self.pipeline, send, self.publish, upstream, meter, self.archive
        )
        self.sessions[session_id] = session
        self._sockets[session_id] = ws
        self._metrics.session_opened(PROTOCOL)
        if self.board is not None:
            worker = self.board.worker
            self.board.add(session_id, lambda: session.view(worker))
        log.info(
            "session %s open: device %s client %s v%d from %s%s",
            session_id,
            client.device_id,
            client.client_id,
            version,
            client.remote,
            "" if upstream is None else f", relayed as upstream session {upstream.session_id}",
        )
        reason = "closed"
        relay: asyncio.Task[Ended] | None = None
        try:
            if upstream is not None:
                await ws.send(dumps(up_hello))  # its session id and TTS audio_params: the device plays what it sends
                relay = upstream.start()
                relay.add_done_callback(lambda t: self._upstream_ended(ws, session, t))
            else:
                await ws.send(ServerHello(session_id, self._audio_params(hello)).to_json())
            reason = await self._serve_session(ws, session)
        except ConnectionClosed as e:
            reason = self._describe_close(e, session)
        except Exception:
            self._metrics.errors.labels("internal").inc()
            log.exception("session %s: internal error", session_id)
            reason = "internal error"
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            reason = (upstream.end_reason() if upstream is not None else None) or reason
            self.sessions.pop(session_id, None)
            self._sockets.pop(session_id, None)
            self._metrics.session_closed(PROTOCOL)
            if self.board is not None:
                self.board.remove(session_id)
            await session.close()
            if upstream is not None:
                await upstream.close()  # a device that leaves closes its upstream socket
            log.info(
                "session %s closed (%s): %d frames, %d utterances",
                session_id,
                reason,
                session.frames,
                session.finals.count,
            )

    async def _await_hello(self, ws: ServerConnection, client: ClientInfo) -> tuple[Hello, str] | None:
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
                f"unsupported audio format {ascii(fmt)[:40]}: only opus",
                CloseCode.PROTOCOL_ERROR,
            )
            return None
        return msg, first

    @staticmethod
    def _passed_fields(request: Request) -> tuple[dict[str, str], bool]:
        """The device's own identity for the upstream, and whether it came in the query string."""
        fields = {name: v for name in PASSED if (v := header_or_query(request, name)) is not None}
        in_query = not any(request.headers.get(name) for name in PASSED) and bool(fields)
        return fields, in_query

    def _upstream_ended(self, ws: ServerConnection, session: Session, task: asyncio.Task[Ended]) -> None:
        """The upstream's side ended: a clean close (its goodbye, its own idle timeout) closes the
        device the same way, as if it were connected to the upstream; anything else is an error
        the device is told once, with 1013."""
        if task.cancelled() or ws.close_code is not None:
            return
        error = task.exception()
        ended = task.result() if error is None else Ended(f"relay failed: {error}", None)
        if ended.clean:
            assert ended.code is not None
            log.info("session %s: %s; closing the device alike", session.session_id, ended.reason)
            closing = _close(ws, session, ended.code, ended.reason)
        else:
            self._metrics.upstream_failures.labels(ended.kind if error is None else "vanished").inc()
            log.warning("session %s: %s; closing the device", session.session_id, ended.reason)
            closing = _close(ws, session, CloseCode.TRY_AGAIN_LATER, ended.reason, error=ended.reason)
        asyncio.get_running_loop().create_task(closing)

    @staticmethod
    def _audio_params(hello: Hello) -> dict:
        params: dict[str, Any] = {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}
        # Echo only what the device said of these keys, and only as numbers: anything else a client
        # sends (nested objects, lone surrogates) stays out of the reply.
        for k, v in hello.audio_params.items():
            if k in params and k != "format" and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**6:
                params[k] = v
        return params

    async def _sweep_idle(self) -> None:
        """Close sessions that sent nothing for `idle_timeout_s`: one task for the whole server
        instead of a timer per received frame, checked a few times per timeout. Each sweep tells
        the governor how late the streaming devices' audio reaches the VAD, and sheds the newest
        sessions when it says so (`Governor.shed`)."""
        cfg = self.config.xiaozhi
        loop = asyncio.get_running_loop()
        governor = self.pipeline.governor
        tick = min(1.0, cfg.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = time.perf_counter()
            governor.note_reading({k: d for k, s in self.sessions.items() if (d := s.input_delay(now)) is not None})
            governor.note_unheard(sum(1 for s in self.sessions.values() if s.unheard(UNHEARD_S)))
            self._metrics.recogniser_load.labels(self._metrics.worker).set(self.pipeline.recogniser_load())
            if (shed := governor.shed(len(self.sessions))) is not None:
                self._shed_newest(shed.why, shed.count)
            now = loop.time()
            cutoff = now - cfg.idle_timeout_s
            for sid, session in list(self.sessions.items()):
                ws = self._sockets.get(sid)
                if ws is not None and session.last_active < cutoff and not session.idle_closed:
                    session.idle_closed = True
                    loop.create_task(ws.close(CloseCode.NORMAL_CLOSURE, f"idle for {cfg.idle_timeout_s:g} s"))

    async def drain(self, timeout_s: float) -> None:
        """Answer what is in flight, then close every device with 1001: the listener has stopped
        accepting already. Bounded by `timeout_s` for all sessions together."""
        sessions = list(self.sessions.items())
        if not sessions:
            return
        t0 = time.perf_counter()
        pending = await asyncio.gather(*(s.drain(timeout_s) for _, s in sessions))
        log.info(
            "drained %d sessions in %.1f s (%d replies were pending)",
            len(sessions),
            time.perf_counter() - t0,
            sum(pending),
        )
        await asyncio.gather(
            *(
                ws.close(CloseCode.GOING_AWAY, "server shutting down")
                for sid in self.sessions
                if (ws := self._sockets.get(sid))
            ),
            return_exceptions=True,
        )

    def _shed_newest(self, why: str, count: int) -> None:
        """The governor says the server stays behind although new devices are refused: more devices
        talk than it answers in budget. Close the `count` that came last with 1013 (try again later),
        so the others keep their latency; a device with a turn in flight (`Session.turn_in_flight`) is
        passed over: its user is talking or waiting and its work is queued (in a group wake of 150,
        cutting them mid-turn answered fewer within budget). Admission at the upgrade cannot do this alone:
        devices let in together show their load only when they talk."""
        shed = 0
        for sid in reversed(list(self.sessions)):  # dicts keep insertion order: the newest last
            ws = self._sockets.get(sid)
            session = self.sessions[sid]
            if ws is None or session.idle_closed or session.shed or session.turn_in_flight:
                continue
            session.shed = True
            self._metrics.refused.labels("xiaozhi_shed").inc()
            reason = "server overloaded, try again later"
            closing = _close(ws, session, CloseCode.TRY_AGAIN_LATER, reason, error=f"{reason}: {why}")
            asyncio.get_running_loop().create_task(closing)
            shed += 1
            if shed >= count:
                break
        if shed and self._sheds.allow():
            log.warning("shed %d sessions (of %d): %s%s", shed, len(self.sessions), why, self._sheds.note())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _serve_session(self, ws: ServerConnection, session: Session) -> str:
        """Read messages until the client leaves; returns why the session ended."""
        cfg = self.config.xiaozhi
        frames = RateBucket(cfg.max_frames_per_s, cfg.max_frames_per_s)
        # Seconds of audio per second: a frame count alone let 120 ms frames in at 24× real time.
        audio = RateBucket(cfg.max_audio_rate, cfg.max_audio_burst_s)
        bad_frames_logged = busy_logged = False
        warnings = Throttle()
        clock = asyncio.get_running_loop().time
        session.last_active = clock()
        async for message in ws:
            session.last_active = clock()
            try:
                if isinstance(message, bytes):
                    if not frames.take():
                        return await self._flood(ws, session, f"more than {cfg.max_frames_per_s} frames per second")
                    seconds = await session.on_binary(message)
                    if not audio.take(seconds):
                        return await self._flood(
                            ws, session, f"audio faster than {cfg.max_audio_rate:g}× real time (xiaozhi.max_audio_rate)"
                        )
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
                if warnings.allow():
                    log.warning("session %s: %s%s", session.session_id, e, warnings.note())
                await session.send_error(str(e))
        return _closed_by_server(session) or "closed"

    async def _flood(self, ws: ServerConnection, session: Session, why: str) -> str:
        self._metrics.errors.labels("flood").inc()
        log.warning("session %s: %s, closing", session.session_id, why)
        await _close(ws, session, CloseCode.POLICY_VIOLATION, "frame flood", error=f"frame flood: {why}")
        return "frame flood"

    async def _refuse(self, ws: ServerConnection, device_id: str | None, kind: str, message: str, code: int) -> None:
        self._metrics.errors.labels(kind).inc()
        log.warning("device %s refused: %s", device_id, message)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(Error(message).to_json())
            await ws.close(code, close_reason(message))

    def _describe_close(self, e: ConnectionClosed, session: Session) -> str:
        if e.sent is not None and e.sent.code == CloseCode.MESSAGE_TOO_BIG:
            self._metrics.errors.labels("oversize").inc()
            limit = self.config.xiaozhi.max_message_bytes
            log.warning("session %s: message over xiaozhi.max_message_bytes (%d)", session.session_id, limit)
            return "message too big"
        if e.sent is not None and not e.rcvd_then_sent:  # our close came first; the client's answer is no reason
            return _closed_by_server(session) or f"closed by the server ({e.sent.code}: {e.sent.reason})"
        if e.rcvd is None:
            return "client vanished"
        return f"client closed ({e.rcvd.code})"


def _closed_by_server(session: Session) -> str | None:
    """Why the server closed `session` itself, if it did for one of these."""
    return "idle timeout" if session.idle_closed else "shed by the server (overloaded)" if session.shed else None


async def _close(ws: ServerConnection, session: Session, code: int, reason: str, error: str | None = None) -> None:
    """Close a device's session with `code` and `reason`, telling it `error` first when there is one."""
    if error is not None:
        await session.send_error(error)
    await ws.close(code, close_reason(reason))
