"""`/xiaozhi/ota/`: where a xiaozhi device learns which WebSocket to open (firmware `main/ota.cc`).

The firmware checks its OTA URL at boot: it POSTs its board JSON (`version`, `mac_address`,
`uuid`, `application{name,version}`, `board{…}`) with `Device-Id` and `Client-Id` headers (a GET
when it has nothing to post) and stores the answer's `websocket{url,token}`. Pointing a fleet's
OTA URL here points its devices at this server, without touching the chatbot server's settings.

- Without `upstream.ota_url` the answer is ours, in xiaozhi-esp32-server's shape
  (`core/api/ota_handler.py`): `server_time{timestamp,timezone_offset}`, `firmware{version,url}`
  (the device's own version and no URL: no update), `websocket{url,token}`.
- With it (relay mode) the device's request, headers and body as they came, goes to the upstream's
  OTA and its answer comes back with only `websocket.url` (and `websocket.token`, when device auth
  is on here and the upstream's differs) changed to ours: activation codes, firmware updates, an
  `mqtt` section for the upstream's gateway and whatever else it says reach the device unchanged.
  An upstream that is down, slower than `upstream.ota_timeout_s` or failing (5xx) gets the device
  our own answer, and one log line (throttled: a fleet checks at once after a power cut).
  Its 4xx answers (a device it refuses) are passed on as they are.

Bad input is a 400 with the reason (`{"detail": ...}`): no `Device-Id`, a body that is not a JSON
object, a body over `MAX_BODY`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from ...errors import ApiError
from ...logs import Throttle
from .console import INFO
from .context import CONFIG

log = logging.getLogger(__name__)

PATH = "/xiaozhi/ota/"
#: The firmware's board JSON is 1-2 KB (partition table, Wi-Fi, chip): 64 KiB leaves room for any
#: board and keeps a client from making the server hold (or forward) megabytes per check.
MAX_BODY = 64 * 1024
#: An upstream answer larger than this is not an OTA answer (they are a few hundred bytes).
_MAX_ANSWER = 1024 * 1024
#: Headers that belong to one hop (RFC 9110 §7.6.1) or that aiohttp sets for the request it makes.
_HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "accept-encoding",
    }
)


class _Upstream:
    """The client for the upstream's OTA (one connection pool for the app) and its log throttle."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=True)
        self.down = Throttle()


UPSTREAM = web.AppKey("ota_upstream", _Upstream)


def add_routes(app: web.Application) -> None:
    app.router.add_route("POST", PATH, ota)
    app.router.add_route("GET", PATH, ota)
    up = app[CONFIG].upstream
    if up.ota_url is not None:
        url, timeout_s = up.ota_url, up.ota_timeout_s

        async def client(app: web.Application) -> AsyncIterator[None]:
            app[UPSTREAM] = _Upstream(url, timeout_s)
            yield
            await app[UPSTREAM].client.close()

        app.cleanup_ctx.append(client)


async def ota(request: web.Request) -> web.Response:
    device_id = request.headers.get("Device-Id")
    if not device_id:
        raise ApiError(400, "missing Device-Id header (the device's MAC address, as the firmware sends it)")
    body = await _read_body(request)
    board = _board(body)
    if UPSTREAM in request.app:
        relayed = await _relay(request, body)
        if isinstance(relayed, web.Response):
            return relayed
        up = request.app[UPSTREAM]
        if up.down.allow():
            log.warning(
                "upstream OTA %s: %s; device %s gets our own answer%s", up.url, relayed, device_id, up.down.note()
            )
    return web.json_response(_own_answer(request, board))


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(400, f"OTA request body of {request.content_length} bytes: at most {MAX_BODY}")
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(400, f"OTA request body over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _board(body: bytes) -> dict[str, Any]:
    """The device's board JSON (empty for a GET without a body); any fields, only the shape is checked."""
    if not body.strip():
        return {}
    try:
        board = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"OTA request body is not JSON: {str(e)[:200]}") from None
    if not isinstance(board, dict):
        raise ApiError(400, f"OTA request body must be a JSON object, got {type(board).__name__}")
    return board


def _own_answer(request: web.Request, board: dict[str, Any]) -> dict[str, Any]:
    app = board.get("application")
    version = app.get("version") if isinstance(app, dict) else None
    offset = datetime.now().astimezone().utcoffset()
    return {
        "server_time": {
            "timestamp": int(time.time() * 1000),
            "timezone_offset": int(offset.total_seconds() // 60) if offset is not None else 0,
        },
        # The device's own version and no URL: the firmware sees nothing newer and updates nothing.
        "firmware": {"version": version if isinstance(version, str) else "", "url": ""},
        "websocket": _websocket(request),
    }


def _websocket(request: web.Request) -> dict[str, str]:
    """Our device endpoint as the device reaches it: `xiaozhi.public_url`, else the host the device
    named in its OTA request (it reached us there) with the device port and path; the token when
    device auth is on (the first of `xiaozhi.auth.tokens`)."""
    cfg = request.app[CONFIG].xiaozhi
    url = cfg.public_url
    if url is None:
        port = request.app[INFO].device_port or cfg.port
        url = str(URL.build(scheme="ws", host=request.url.host or "127.0.0.1", port=port, path=cfg.path))
    out = {"url": url}
    if cfg.auth.enabled and cfg.auth.tokens:
        out["token"] = cfg.auth.tokens[0]
    return out


async def _relay(request: web.Request, body: bytes) -> web.Response | str:
    """The upstream's answer with our WebSocket in it, or why there is none (down, slow, failing)."""
    up = request.app[UPSTREAM]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    try:
        async with up.client.request(
            request.method, up.url, data=body or None, headers=headers, allow_redirects=False
        ) as r:
            answer = await r.content.read(_MAX_ANSWER + 1)
            status, content_type = r.status, r.headers.get("Content-Type", "application/json")
    except TimeoutError:
        return f"no answer within {request.app[CONFIG].upstream.ota_timeout_s:g} s"
    except aiohttp.ClientError as e:
        return f"{type(e).__name__}: {e}"
    if len(answer) > _MAX_ANSWER:
        return f"an answer over {_MAX_ANSWER} bytes"
    if status >= 500:
        return f"HTTP {status}"
    if status >= 300:  # its refusal of this device: the device hears it as the upstream said it
        return web.Response(status=status, body=answer, headers={"Content-Type": content_type})
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        return "an answer that is not a JSON object"
    ours = _websocket(request)
    theirs = parsed.get("websocket")
    websocket = dict(theirs) if isinstance(theirs, dict) else {}
    websocket["url"] = ours["url"]
    if "token" in ours:
        websocket["token"] = ours["token"]
    parsed["websocket"] = websocket
    return web.json_response(parsed, dumps=lambda o: json.dumps(o, ensure_ascii=False))
