"""`/healthz` (the process answers), `/readyz` (the engines answer), `/metrics` (Prometheus)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ...constants import SAMPLE_RATE
from .context import METRICS, PIPELINE, READY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@dataclass(slots=True)
class EngineProbe:
    """Readiness asks the engines for an answer, at most every `PROBE_EVERY_S`, so probes stay cheap."""

    last_ok: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


PROBE = web.AppKey("probe", EngineProbe)
PROBE_EVERY_S = 10.0
PROBE_TIMEOUT_S = 5.0


async def _engines_answer(app: web.Application) -> str | None:
    """None when the ASR (and speaker) engines answered half a second of silence; else why not."""
    probe, pipeline = app[PROBE], app[PIPELINE]
    async with probe.lock:
        if time.monotonic() - probe.last_ok < PROBE_EVERY_S:
            return None
        silence = np.zeros(SAMPLE_RATE // 2, np.float32)
        calls = [pipeline.transcribe(silence)] + ([pipeline.embed(silence)] if pipeline.speaker is not None else [])
        try:
            await asyncio.wait_for(asyncio.gather(*calls), PROBE_TIMEOUT_S)
        except TimeoutError:
            return f"the engines did not answer within {PROBE_TIMEOUT_S:g} s"
        except Exception as e:
            return f"an engine failed: {type(e).__name__}: {e}"
        probe.last_ok = time.monotonic()
        return None


async def readyz(request: web.Request) -> web.Response:
    """200 once the server says it is ready and the engines answer; 503 with the reason otherwise."""
    pipeline = request.app[PIPELINE]
    if not request.app[READY]():
        return web.json_response({"status": "not ready", "detail": "starting or shutting down"}, status=503)
    problem = await _engines_answer(request.app)
    if problem is not None:
        request.app[METRICS].errors.labels("readiness").inc()
        return web.json_response({"status": "not ready", "detail": problem}, status=503)
    models = [
        {"name": m.name, "backend": m.backend, "device": m.device, "provider": m.provider, "precision": m.precision}
        for m in pipeline.models
    ]
    return web.json_response({"status": "ready", "models": models})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
