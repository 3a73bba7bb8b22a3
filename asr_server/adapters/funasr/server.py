"""The FunASR-runtime-compatible WebSocket server: handshake checks, TLS and plain on one port
(`tls`), one `FunAsrSession` per client."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ...audio.decode_pool import DecodePool
from ...config import Config
from ...constants import FUNASR
from ...core.archive import Archive
from ...core.events import EventBus
from ...core.live import SessionBoard, SessionView
from ...core.metrics import Metrics
from ...core.pipeline import Pipeline
from ...sharing import Tally, WorkerShare
from ..admission import ConnectionSlots, PortAdmission
from ..auth import ApiKeys, bearer_token
from .context import BufferBudget, FunAsrContext
from .session import PROTOCOL, FunAsrSession
from .tls import PendingHandshakes, sniffing, tls_context, transport_of

log = logging.getLogger(__name__)


def session_view(session: FunAsrSession, worker: int = 0) -> SessionView:
    """What the console's live view shows of a FunASR session: the protocol has no version (0), the
    mode is the request's (offline, online, 2pass) and the client is its `wav_name`."""
    req, remote = session.request, session.ws.remote_address
    return SessionView(
        session_id=session.session_id,
        protocol=PROTOCOL,
        device_id=None,
        client_id=req.wav_name if req is not None else None,
        version=0,
        mode=req.mode if req is not None else "-",
        state="idle" if req is None else "speech" if session.in_speech else "listening",
        frames=session.frames,
        utterances=session.finals.count,
        last_text=session.finals.last_text,
        speaker=session.finals.last_speaker,
        opened_at=session.opened_at,
        remote=f"{remote[0]}:{remote[1]}" if remote else "",
        worker=worker,
    )


class FunAsrServer:
    """Handshake checks and one `FunAsrSession` per client."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        metrics: Metrics,
        bus: EventBus | None = None,
        share: WorkerShare | None = None,
        board: SessionBoard | None = None,
        decoder: DecodePool | None = None,
        archive: Archive | None = None,
    ) -> None:
        self.config = config
        # offline files (wav_format other than pcm) are decoded in the server's decoder processes
        self.decoder = decoder if decoder is not None else DecodePool(config.http.max_decodes, metrics.decodes.set)
        self.board = board  # the console's live view of the open sessions
        self.pipeline = pipeline
        self.metrics = metrics
        self.bus = bus
        self.keys = (
            ApiKeys.from_config(config) if config.funasr.auth else ApiKeys(frozenset(), frozenset(), frozenset())
        )
        budget = BufferBudget(int(config.funasr.max_buffered_mb * 2**20))  # offline audio all sessions hold
        self.context = FunAsrContext(
            config.funasr, pipeline, metrics, bus, budget, self.decoder, archive if config.archive.funasr else None
        )
        self.slots = ConnectionSlots(
            config.funasr.max_sessions,
            "funasr.max_sessions",
            metrics.errors.labels("capacity").inc,
            Tally.of(share, "funasr.max_sessions"),
        )
        self.admission = PortAdmission(pipeline.governor, self.slots, metrics.refused.labels(FUNASR).inc)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = self.config.funasr.path
        if path != "/" and request.path.split("?", 1)[0].rstrip("/") != path.rstrip("/"):
            return connection.respond(HTTPStatus.NOT_FOUND, f"no FunASR endpoint at {request.path}; use {path}\n")
        if not self.keys.allows(bearer_token(request.headers.get("Authorization"))):
            self.metrics.errors.labels("auth").inc()
            return connection.respond(
                HTTPStatus.UNAUTHORIZED, "missing or invalid key (send `Authorization: Bearer <key>`)\n"
            )
        return self.admission.admit(connection, "FunASR client")

    @staticmethod
    def select_subprotocol(connection: ServerConnection, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        """FunASR clients offer `binary`; take it when offered, and clients that offer nothing too."""
        return Subprotocol("binary") if "binary" in subprotocols else None

    async def handle(self, ws: ServerConnection) -> None:
        log.debug("funasr: %s connection from %s", transport_of(ws), ws.remote_address)
        self.metrics.session_opened(PROTOCOL)
        session = FunAsrSession(self.context, ws)
        board = self.board
        if board is not None:
            worker = board.worker
            board.add(session.session_id, lambda: session_view(session, worker))
        try:
            await session.run()
        finally:
            self.metrics.session_closed(PROTOCOL)
            if board is not None:
                board.remove(session.session_id)


async def serve_funasr(
    config: Config,
    pipeline: Pipeline,
    metrics: Metrics,
    bus: EventBus | None = None,
    share: WorkerShare | None = None,
    board: SessionBoard | None = None,
    decoder: DecodePool | None = None,
    archive: Archive | None = None,
) -> Server:
    """Listen on `funasr.host:funasr.port` (0 picks a free port; `server.sockets` tells which);
    as one of several workers, on a port they share (SO_REUSEPORT)."""
    cfg = config.funasr
    handler = FunAsrServer(config, pipeline, metrics, bus, share, board, decoder, archive)
    ctx = tls_context(cfg)
    tls: dict[str, Any] = {}
    if ctx is not None and cfg.tls == "both":
        evicted = metrics.errors.labels("funasr_tls_evicted").inc
        tls["create_connection"] = sniffing(
            ctx, cfg.open_timeout_s, PendingHandshakes(on_evict=evicted)
        )  # wss:// and ws://
    elif ctx is not None:
        tls["ssl"] = ctx
    return await serve(
        handler.handle,
        cfg.host,
        cfg.port,
        process_request=handler.process_request,
        select_subprotocol=handler.select_subprotocol,
        max_size=cfg.max_message_bytes,
        ping_interval=cfg.ping_interval_s,
        close_timeout=cfg.close_timeout_s,
        open_timeout=cfg.open_timeout_s,
        compression=None,
        reuse_port=share is not None,
        **tls,
    )
