"""The HTTP API for backends and operators, on one aiohttp port next to the device WebSocket.

- `POST /v1/audio/transcriptions`: OpenAI-compatible (the `openai` client, xiaozhi-esp32-server's
  `openai` ASR provider, Open WebUI...); any common container, long files cut by VAD.
- `/voiceprint/*`: the API of xinnan-tech/voiceprint-api (what xiaozhi-esp32-server calls),
  backed by the server's own voiceprint store and speaker engine, plus list.
- `/v1/devices/{device_id}/hotwords`, `/v1/hotwords`: each device's hotwords (admin key; `hotwords`).
- `GET /v1/events`: WebSocket stream of final transcripts, optionally for some devices only.
- `GET /healthz`, `/readyz`, `/metrics`.
- `/v1/utterances`: the archive of what was said (`archive.enabled`): search, audio, correct,
  erase, export.
- `POST|GET /xiaozhi/ota/`: the firmware's OTA check, answered with our device WebSocket (`ota`).
- `GET /` (the browser console), `/v1/status`, `/v1/sessions`, `GET /v1/live` (`console`).

Errors under `/v1/` use OpenAI's shape (`{"error": {"message", "type", "code", "param"}}`), the
others voiceprint-api's (`{"detail": "..."}`), each with the HTTP status that says what went
wrong: 400 bad input, 401 key, 404 unknown speaker, 413 too large, 503 not ready or disabled.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ...audio.decode_pool import DecodePool
from ...config import Config
from ...core.archive import Archive
from ...core.events import EventBus
from ...core.live import SessionBoard
from ...core.metrics import Metrics
from ...core.pipeline import Pipeline
from ...errors import ApiError, ClientGone, EngineBusy, EngineFailed
from ...sharing import Tally, WorkerShare
from ..admission import RETRY_AFTER_S
from ..auth import ApiKeys
from . import console, events, health, hotwords, ota, transcriptions, utterances, voiceprints
from .context import (
    ARCHIVE,
    BUS,
    CONFIG,
    DECODER,
    GUARD,
    KEYS,
    METRICS,
    PIPELINE,
    READY,
    SOCKETS,
    client_address,
    error_response,
    too_large_message,
)
from .guard import ConnectionGuard, GuardedSite, Refused
from .streams import StreamSlots

log = logging.getLogger(__name__)


#: An error answered before the body was read: up to this many times `http.max_upload_mb` of the
#: rest is read and dropped, within `_DISCARD_S`, so that a client still sending its (too large)
#: upload gets to read the answer, as nginx's lingering close does; beyond, the connection is closed.
_DISCARD_UPLOADS = 4
_DISCARD_S = 10.0


async def _discard_rest(request: web.Request) -> bool:
    """Read and drop the unread rest of the body; False when it is too large, too slow or broken
    (then the connection closes: aiohttp's own lingering close, which reads without a byte limit, is off)."""
    content = request.content
    if content.at_eof():
        return True
    budget = _DISCARD_UPLOADS * request.app[CONFIG].http.max_upload_mb * 2**20
    if request.content_length is not None and request.content_length > budget:
        return False
    dropped = 0
    try:
        async with asyncio.timeout(_DISCARD_S):
            while not content.at_eof() and dropped <= budget:
                chunk = await content.readany()
                if not chunk:
                    break
                dropped += len(chunk)
    except (TimeoutError, ConnectionError, HttpProcessingError):
        return False
    return content.at_eof()


_CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, X-Requested-With"


@web.middleware
async def _cors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Browsers on `http.cors_origins` may call the API: preflights are answered here, and every
    answer to such an origin names it. Other origins get no CORS headers (the browser refuses)."""
    allowed = request.app[CONFIG].http.cors_origins
    origin = request.headers.get("Origin")
    ok = origin is not None and ("*" in allowed or origin in allowed)
    if request.method == "OPTIONS" and ok and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", _CORS_HEADERS
        )
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        response = await handler(request)
    if ok and origin is not None and not response.prepared:  # a WebSocket is prepared already: browsers skip CORS there
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response


@web.middleware
async def _guarded(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """The request's headers are in: its connection's header deadline no longer applies."""
    guard = request.app[GUARD]
    guard.request_started(request.transport)
    try:
        client = client_address(request)
        if client == request.remote:
            return await handler(request)
        try:
            with guard.forwarded_client(client):  # behind a proxy: the per-address cap is the client's
                return await handler(request)
        except Refused as e:
            response = web.Response(status=503, text=f"{e}, try again later\n")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
    finally:
        guard.request_done(request.transport)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except ApiError as e:
        metrics.errors.labels(f"http_{e.status}").inc()
        response = error_response(request, e)
        if not await _discard_rest(request):
            response.force_close()
        return response
    except ClientGone as e:
        metrics.errors.labels("client_gone").inc()
        log.info("%s", e)
        response = web.Response(status=400, text="request body incomplete\n")
        response.force_close()
        return response
    except (EngineBusy, EngineFailed) as e:  # refused, or its remote replica died: the client may retry
        metrics.errors.labels("http_503").inc()
        code = "server_busy" if isinstance(e, EngineBusy) else "engine_failed"
        response = error_response(request, ApiError(503, str(e), code=code))
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    except web.HTTPException as e:
        if e.status < 400:
            raise
        metrics.errors.labels(f"http_{e.status}").inc()
        message = {
            404: f"no such endpoint: {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
        }.get(e.status, e.reason)
        if e.status == 413:
            message = too_large_message(request.app[CONFIG])
        response = error_response(request, ApiError(e.status, message))
        if not await _discard_rest(request):
            response.force_close()
        return response
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        metrics.errors.labels("http_500").inc()
        return error_response(
            request, ApiError(500, "internal error; the server log has the details", code="internal_error")
        )
    return response


class _BadRequests(logging.Filter):
    """aiohttp logs a malformed request (a header over 8 KB, a broken request line) at ERROR with a
    traceback, after answering it 400: a client's doing, so one line at INFO instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "bad HTTP request answered %s: %s", (exc.code, exc.message.splitlines()[0])
        return True


_AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")


def build_app(
    config: Config,
    pipeline: Pipeline,
    bus: EventBus,
    metrics: Metrics,
    ready: Callable[[], bool],
    share: WorkerShare | None = None,
    board: SessionBoard | None = None,
    info: console.ConsoleInfo | None = None,
    decoder: DecodePool | None = None,
    archive: Archive | None = None,
) -> web.Application:
    """The aiohttp application; `ready` answers /readyz (models loaded, listeners up). As one of
    several workers (`share`), its connection cap counts the whole server's connections. `board`
    and `info` feed the console (the open sessions; where devices connect). `decoder` decodes the
    uploads (the server's pool, shared with the FunASR port; without one the app starts its own).
    `archive` keeps what was said and answers `/v1/utterances` (None: the archive is off)."""
    if not any(isinstance(f, _BadRequests) for f in _AIOHTTP_SERVER_LOG.filters):
        _AIOHTTP_SERVER_LOG.addFilter(_BadRequests())
    app = web.Application(
        client_max_size=int(config.http.max_upload_mb * 1024 * 1024), middlewares=[_guarded, _cors, _errors]
    )
    app[CONFIG] = config
    app[PIPELINE] = pipeline
    app[BUS] = bus
    app[METRICS] = metrics
    app[READY] = ready
    app[KEYS] = ApiKeys.from_config(config)
    app[SOCKETS] = weakref.WeakSet()
    app[ARCHIVE] = archive
    if decoder is None:  # an app of its own (tests): its own decoder processes, started on first use
        own = decoder = DecodePool(config.http.max_decodes, metrics.decodes.set)
        app.on_cleanup.append(lambda _: asyncio.to_thread(own.close))
    app[DECODER] = decoder
    app[GUARD] = ConnectionGuard(
        config.http.max_connections,
        config.http.header_timeout_s,
        "http.max_connections",
        lambda kind: metrics.errors.labels(kind).inc(),
        Tally.of(share, "http.max_connections"),
        config.http.max_connections_per_ip,
        config.http.trusted_addresses,
        config.http.trusted_proxies,
    )
    app[health.PROBE] = health.EngineProbe()
    app[console.BOARD] = board if board is not None else SessionBoard(share)
    app[console.INFO] = info if info is not None else console.ConsoleInfo(None, share.count if share else 1)
    app[console.WATCHERS] = set()
    app[console.LIVE_SLOTS] = StreamSlots(console.MAX_WATCHERS, "live-view sockets per worker", "live-view sockets")
    app[events.EVENT_SLOTS] = StreamSlots(config.events.max_subscribers, "events.max_subscribers", "event subscribers")
    app.on_shutdown.append(events.close_sockets)
    r = app.router
    r.add_post("/v1/audio/transcriptions", transcriptions.transcriptions)
    r.add_get("/v1/models", transcriptions.models)
    r.add_get("/v1/models/{model_id}", transcriptions.model)
    r.add_get("/v1/events", events.events)
    r.add_post("/voiceprint/register", voiceprints.voiceprint_register)
    r.add_post("/voiceprint/identify", voiceprints.voiceprint_identify)
    r.add_get("/voiceprint/health", voiceprints.voiceprint_health)
    r.add_get("/voiceprint/list", voiceprints.voiceprint_list)
    r.add_delete("/voiceprint/{speaker_id}", voiceprints.voiceprint_delete)
    r.add_get("/v1/hotwords", hotwords.list_devices)
    r.add_get("/v1/devices/{device_id}/hotwords", hotwords.get_hotwords)
    r.add_put("/v1/devices/{device_id}/hotwords", hotwords.set_hotwords)
    r.add_delete("/v1/devices/{device_id}/hotwords", hotwords.delete_hotwords)
    r.add_get("/healthz", health.healthz)
    r.add_get("/readyz", health.readyz)
    r.add_get("/metrics", health.metrics_endpoint)
    utterances.add_routes(app)
    console.add_routes(app)
    ota.add_routes(app)
    return app


#: Connections the health listener holds at once: a container's health check and a scraper or two.
HEALTH_MAX_CONNECTIONS = 16


def build_health_app(app: web.Application) -> web.Application:
    """`/healthz`, `/readyz` and `/metrics` of `app` alone, for `http.health_port`.

    A listener of their own, not a slot reserved on the API port: slow sockets that fill the API
    port (1,000 from 30 addresses held every `http.max_connections` slot, and a Docker health check
    got 503 and restarted a server that was fine) would take a reserved slot too, since they come
    through the same accept queue and cannot be told apart before their request line. Clients of
    the API never reach this port; its own small cap and the header deadline hold it against the
    ones that do."""
    config = app[CONFIG]
    metrics = app[METRICS]
    probes = web.Application(middlewares=[_guarded])
    probes[CONFIG] = config
    probes[PIPELINE] = app[PIPELINE]
    probes[METRICS] = metrics
    probes[READY] = app[READY]
    probes[health.PROBE] = app[health.PROBE]
    probes[GUARD] = ConnectionGuard(
        HEALTH_MAX_CONNECTIONS,
        config.http.header_timeout_s,
        "the health port's connections",
        lambda kind: metrics.errors.labels(f"health_{kind}").inc(),
    )
    probes.router.add_get("/healthz", health.healthz)
    probes.router.add_get("/readyz", health.readyz)
    probes.router.add_get("/metrics", health.metrics_endpoint)
    return probes


async def start_http(app: web.Application, host: str, port: int, reuse_port: bool = False) -> web.AppRunner:
    """Serve `app` on host:port (0 picks a free port; `runner.addresses` tells which; `reuse_port`:
    one of several workers' sockets on one port), behind the app's connection guard. No lingering
    close: a body left unread (after a 413, say) is not read to its end for keep-alive's sake, the
    connection is closed."""
    config = app[CONFIG]
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=5.0,
        keepalive_timeout=config.http.keepalive_timeout_s,
        lingering_time=0,
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, app[GUARD], reuse_port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
