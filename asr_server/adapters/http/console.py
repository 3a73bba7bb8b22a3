"""The browser console (`/`) and the endpoints it reads beyond the public API it shares with backends.

- `GET /`, `/console/<file>`: the page itself, static files shipped in the package (`static/`),
  plain ES modules with no build step; off with `http.console: false` (404).
- `GET /v1/status`: models, queue depths, batch sizes, latency percentiles of the last minutes,
  error counts by kind, as JSON (the same samples `/metrics` renders, and the whole server's under
  `serve --workers`).
- `GET /v1/sessions`: the sessions open now, on every worker.
- `GET /v1/live` WebSocket: the sessions list, then each `open`/`update`/`close` as it happens
  and a `status` every `STATUS_EVERY_S`; the key may come as `?key=` (browsers set no headers).

All three need a read key (or an open API); a device token gets 403: it sees its own devices'
transcripts on `/v1/events`, not the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ...core.live import SessionBoard
from ..auth import Role
from .context import BUS, CONFIG, METRICS, PIPELINE, READY, SOCKETS, authorize
from .streams import StreamSlots, principal

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
#: The page talks to this server only (the device WebSocket is on another port: any ws: origin).
_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; media-src 'self' blob:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)
STATUS_EVERY_S = 2.0
#: Live-view sockets one worker holds at once (each gets a status every STATUS_EVERY_S).
MAX_WATCHERS = 32
_MAX_MESSAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ConsoleInfo:
    """What the page needs to know of the server that the HTTP app does not: where devices connect."""

    device_port: int | None
    workers: int = 1
    worker: int = 0
    started_at: float = 0.0


BOARD = web.AppKey("board", SessionBoard)
INFO = web.AppKey("console_info", ConsoleInfo)
WATCHERS = web.AppKey("console_watchers", set)
LIVE_SLOTS = web.AppKey("live_slots", StreamSlots)


def add_routes(app: web.Application) -> None:
    r = app.router
    if app[CONFIG].http.console:
        r.add_get("/", index)
        r.add_get("/console/{name}", static_file)
    r.add_get("/v1/status", status_endpoint)
    r.add_get("/v1/sessions", sessions_endpoint)
    r.add_get("/v1/live", live)


def _file(path: Path) -> web.FileResponse:
    response = web.FileResponse(path, headers={"Content-Type": _TYPES[path.suffix]})
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def index(request: web.Request) -> web.StreamResponse:
    return _file(STATIC / "index.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise web.HTTPNotFound()
    return _file(path)


def status(app: web.Application) -> dict[str, Any]:
    """The health-at-a-glance figures, as `GET /v1/status` and the live stream send them."""
    cfg, info, pipeline = app[CONFIG], app[INFO], app[PIPELINE]
    models = [
        {
            "name": m.name,
            "file": str(m.path),
            "backend": m.backend,
            "provider": m.provider,
            "device": m.device,
            "precision": m.precision,
        }
        for m in pipeline.models
    ]
    return {
        "type": "status",
        "time": time.time(),
        "ready": app[READY](),
        "server": {"workers": info.workers, "worker": info.worker, "started_at": info.started_at},
        "device": {"port": info.device_port, "path": cfg.xiaozhi.path, "auth": cfg.xiaozhi.auth.enabled},
        "speaker": {"enabled": pipeline.speaker is not None, "threshold": cfg.speaker.threshold},
        "models": models,
        "sessions_open": len(app[BOARD].sessions()),
        "latency": app[BUS].latency.summary(),
        **app[METRICS].snapshot(),
    }


async def status_endpoint(request: web.Request) -> web.Response:
    authorize(request, "key", role=Role.READ)
    return web.json_response(status(request.app))


async def sessions_endpoint(request: web.Request) -> web.Response:
    authorize(request, "key", role=Role.READ)
    return web.json_response({"sessions": [v.to_dict() for v in request.app[BOARD].sessions()]})


async def live(request: web.Request) -> web.StreamResponse:
    """The live view's WebSocket: the sessions now, then their changes, and the status now and then."""
    grant = authorize(request, "key", role=Role.READ)
    with request.app[LIVE_SLOTS].hold(principal(request, grant), len(request.app[WATCHERS])):
        return await _watch(request)


async def _watch(request: web.Request) -> web.StreamResponse:
    watchers = request.app[WATCHERS]
    board = request.app[BOARD]
    ws = web.WebSocketResponse(heartbeat=request.app[CONFIG].events.heartbeat_s, max_msg_size=_MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    watchers.add(ws)

    async def read_until_closed() -> None:
        async for msg in ws:  # the page says nothing; this notices its close
            if msg.type == WSMsgType.ERROR:
                break

    reader = asyncio.create_task(read_until_closed())
    try:
        with board.subscribe() as feed:
            await ws.send_json({"type": "sessions", "sessions": [v.to_dict() for v in board.sessions()]})
            await ws.send_json(status(request.app))
            next_status = time.monotonic() + STATUS_EVERY_S
            while not reader.done():
                getter = asyncio.ensure_future(feed.get())
                timeout = max(0.0, next_status - time.monotonic())
                done, _ = await asyncio.wait({getter, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    message = getter.result()
                    if message is None:  # the board closed: the server is stopping
                        break
                    await ws.send_json(message)
                else:
                    getter.cancel()
                if time.monotonic() >= next_status:
                    await ws.send_json(status(request.app))
                    next_status = time.monotonic() + STATUS_EVERY_S
    except ConnectionResetError:
        pass
    finally:
        watchers.discard(ws)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return ws
