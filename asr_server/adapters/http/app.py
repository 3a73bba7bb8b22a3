"""The HTTP API for backends and operators, on one aiohttp port next to the device WebSocket.

- `POST /v1/audio/transcriptions`: OpenAI-compatible (the `openai` client, xiaozhi-esp32-server's
  `openai` ASR provider, Open WebUI...); any common container, long files cut by VAD.
- `/voiceprint/*`: the API of xinnan-tech/voiceprint-api (what xiaozhi-esp32-server calls),
  backed by the server's own voiceprint store and speaker engine, plus list.
- `GET /v1/events`: WebSocket stream of final transcripts, optionally for some devices only.
- `GET /healthz`, `/readyz`, `/metrics`.

Errors under `/v1/` use OpenAI's shape (`{"error": {"message", "type", "code", "param"}}`), the
others voiceprint-api's (`{"detail": "..."}`), each with the HTTP status that says what went
wrong: 400 bad input, 401 key, 404 unknown speaker, 413 too large, 503 not ready or disabled.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web

from ...config import Config
from ...core.events import EventBus
from ...core.metrics import Metrics
from ...core.pipeline import Pipeline
from ...errors import ApiError, EngineBusy
from ..auth import ApiKeys
from . import events, health, transcriptions, voiceprints
from .context import BUS, CONFIG, KEYS, METRICS, PIPELINE, READY, SOCKETS, error_response, too_large_message

log = logging.getLogger(__name__)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    metrics = request.app[METRICS]
    try:
        return await handler(request)
    except ApiError as e:
        metrics.errors.labels(f"http_{e.status}").inc()
        return error_response(request, e)
    except EngineBusy as e:  # refused, not queued: the client may retry shortly
        metrics.errors.labels("http_503").inc()
        response = error_response(request, ApiError(503, str(e), code="server_busy"))
        response.headers["Retry-After"] = "1"
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
        return error_response(request, ApiError(e.status, message))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        metrics.errors.labels("http_500").inc()
        return error_response(
            request, ApiError(500, "internal error; the server log has the details", code="internal_error")
        )


def build_app(
    config: Config, pipeline: Pipeline, bus: EventBus, metrics: Metrics, ready: Callable[[], bool]
) -> web.Application:
    """The aiohttp application; `ready` answers /readyz (models loaded, listeners up)."""
    app = web.Application(client_max_size=int(config.http.max_upload_mb * 1024 * 1024), middlewares=[_errors])
    app[CONFIG] = config
    app[PIPELINE] = pipeline
    app[BUS] = bus
    app[METRICS] = metrics
    app[READY] = ready
    app[KEYS] = ApiKeys.from_config(config)
    app[SOCKETS] = weakref.WeakSet()
    app[health.PROBE] = health.EngineProbe()
    app.on_shutdown.append(events.close_sockets)
    r = app.router
    r.add_post("/v1/audio/transcriptions", transcriptions.transcriptions)
    r.add_get("/v1/models", transcriptions.models)
    r.add_get("/v1/events", events.events)
    r.add_post("/voiceprint/register", voiceprints.voiceprint_register)
    r.add_post("/voiceprint/identify", voiceprints.voiceprint_identify)
    r.add_get("/voiceprint/health", voiceprints.voiceprint_health)
    r.add_get("/voiceprint/list", voiceprints.voiceprint_list)
    r.add_delete("/voiceprint/{speaker_id}", voiceprints.voiceprint_delete)
    r.add_get("/healthz", health.healthz)
    r.add_get("/readyz", health.readyz)
    r.add_get("/metrics", health.metrics_endpoint)
    return app


async def start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port (0 picks a free port; `runner.addresses` tells which)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
