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

import asyncio
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from asr_server.audio.io import AudioDecodeError, AudioTooLongError, DecodedAudio, EmptyAudioError, decode_audio
from asr_server.audio.vad import SAMPLE_RATE
from asr_server.auth import ApiKeys, bearer_token
from asr_server.config import Config
from asr_server.events import EventBus, SubscriptionClosed, TranscriptEvent
from asr_server.metrics import Metrics
from asr_server.pipeline import Pipeline
from asr_server.recording import Segment, dominant, join_texts, recognize_recording, split_timed
from asr_server.voiceprints import VoiceprintError

log = logging.getLogger(__name__)

PROTOCOL = "openai"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_MAX_FIELD_BYTES = 64 * 1024
_READ_CHUNK = 1 << 16

# OpenAI takes ISO-639-1 codes; SenseVoice knows these languages (and `auto`).
_LANGUAGES = {
    "auto": "auto", "zh": "zh", "en": "en", "ja": "ja", "ko": "ko", "yue": "yue",
    "cmn": "zh", "chinese": "zh", "mandarin": "zh", "english": "en", "japanese": "ja", "korean": "ko",
    "cantonese": "yue", "zh-hk": "yue", "zh-yue": "yue",
}

CONFIG = web.AppKey("config", Config)
PIPELINE = web.AppKey("pipeline", Pipeline)
BUS = web.AppKey("bus", EventBus)
METRICS = web.AppKey("metrics", Metrics)
READY = web.AppKey("ready", Callable[[], bool])
KEYS = web.AppKey("keys", ApiKeys)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)


class ApiError(Exception):
    """A request the API refuses; the middleware renders it in the endpoint family's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _error_response(request: web.Request, err: ApiError) -> web.Response:
    if request.path.startswith("/v1/"):
        kind = ("authentication_error" if err.status == 401 else
                "invalid_request_error" if err.status < 500 else "server_error")
        body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    else:
        body = {"detail": err.message}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return web.json_response(body, status=err.status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    metrics = request.app[METRICS]
    try:
        return await handler(request)
    except ApiError as e:
        metrics.errors.labels(f"http_{e.status}").inc()
        return _error_response(request, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        metrics.errors.labels(f"http_{e.status}").inc()
        message = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        if e.status == 413:
            message = _too_large_message(request.app[CONFIG])
        return _error_response(request, ApiError(e.status, message))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        metrics.errors.labels("http_500").inc()
        return _error_response(request, ApiError(500, "internal error; the server log has the details",
                                                 code="internal_error"))


def _too_large_message(config: Config) -> str:
    return f"upload larger than the {config.http.max_upload_mb:g} MB limit (http.max_upload_mb)"


# --- request helpers ---------------------------------------------------------------------------

def _authorize(request: web.Request, *query_names: str) -> None:
    keys = request.app[KEYS]
    token = bearer_token(request.headers.get("Authorization"))
    for name in query_names:
        token = token or request.query.get(name)
    if not keys.allows(token):
        raise ApiError(401, "missing API key" if not token else "invalid API key", code="invalid_api_key")


@dataclass(slots=True)
class _Upload:
    filename: str | None
    data: bytes


@dataclass(slots=True)
class _Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, _Upload] = field(default_factory=dict)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.fields.get(name, default)


async def _read_form(request: web.Request) -> _Form:
    """Stream a multipart form in, refusing it (413) as soon as it passes `http.max_upload_mb`."""
    config = request.app[CONFIG]
    limit = int(config.http.max_upload_mb * 1024 * 1024)
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, _too_large_message(config), code="file_too_large", param="file")
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, f"expected a multipart/form-data body, got {request.content_type or 'no content type'}",
                       code="invalid_content_type")
    form = _Form()
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not hasattr(part, "read_chunk"):  # a nested multipart: not part of any of these APIs
                raise ApiError(400, "nested multipart bodies are not supported")
            name = part.name or ""
            is_file = part.filename is not None or name == "file"
            chunks: list[bytes] = []
            while chunk := await part.read_chunk(_READ_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, _too_large_message(config), code="file_too_large", param="file")
                chunks.append(chunk)
                if not is_file and sum(map(len, chunks)) > _MAX_FIELD_BYTES:
                    raise ApiError(400, f"form field {name!r} is longer than {_MAX_FIELD_BYTES} bytes", param=name)
            data = b"".join(chunks)
            if is_file:
                form.files[name] = _Upload(part.filename, data)
            else:
                form.fields[name] = data.decode("utf-8", errors="replace").strip()
    except ApiError:
        raise
    except (ValueError, HttpProcessingError) as e:  # malformed multipart framing or part headers
        detail = e.message if isinstance(e, HttpProcessingError) else str(e)
        raise ApiError(400, f"malformed multipart body: {detail}".strip(), code="invalid_multipart") from None
    return form


def _upload(form: _Form, name: str = "file") -> _Upload:
    upload = form.files.get(name)
    if upload is None:
        if name in form.fields:
            raise ApiError(400, f"form field {name!r} must be a file upload", param=name)
        raise ApiError(400, f"missing form field {name!r} (the audio file)", param=name, code="missing_file")
    return upload


async def _decode(request: web.Request, upload: _Upload) -> DecodedAudio:
    config, metrics = request.app[CONFIG], request.app[METRICS]
    t0 = time.perf_counter()
    try:
        decoded = await asyncio.to_thread(decode_audio, upload.data, config.http.max_audio_s)
    except EmptyAudioError as e:
        raise ApiError(400, f"empty audio: {e}", code="empty_file", param="file") from None
    except AudioTooLongError as e:
        raise ApiError(413, f"{e} (http.max_audio_s)", code="audio_too_long", param="file") from None
    except AudioDecodeError as e:
        raise ApiError(400, f"{upload.filename or 'the upload'} is not a supported audio file: {e}",
                       code="invalid_audio", param="file") from None
    metrics.stage.labels("file_decode").observe(time.perf_counter() - t0)
    return decoded


def parse_language(value: str | None) -> str | None:
    """An OpenAI `language` value as a SenseVoice language; None for auto-detection."""
    if not value:
        return None
    v = value.strip().lower().replace("_", "-")
    lang = _LANGUAGES.get(v) or (_LANGUAGES.get(v.split("-")[0]) if "-" in v else None)
    if lang is None:
        raise ApiError(400, f"language {value!r} is not supported; use one of zh, en, yue, ja, ko or auto",
                       code="unsupported_language", param="language")
    return None if lang == "auto" else lang


# --- OpenAI transcriptions ---------------------------------------------------------------------

def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render_srt(segments: list[Segment]) -> str:
    return "".join(f"{i}\n{_timestamp(s.start_s, ',')} --> {_timestamp(s.end_s, ',')}\n{s.text}\n\n"
                   for i, s in enumerate(segments, 1))


def render_vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_timestamp(s.start_s, '.')} --> {_timestamp(s.end_s, '.')}\n{s.text}\n\n"
                                  for s in segments)


def verbose_json(segments: list[Segment], duration_s: float, text: str) -> dict:
    """OpenAI's verbose_json, with SenseVoice's language, emotion, event and the speaker per segment."""
    out = []
    for i, s in enumerate(segments):
        t = s.recognition.transcript
        out.append({
            "id": i, "seek": int(s.start_s * 100), "start": round(s.start_s, 3), "end": round(s.end_s, 3),
            "text": s.text, "tokens": [], "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0,
            "no_speech_prob": 0.0, "language": t.language, "emotion": t.emotion, "event": t.event,
            "speaker": s.recognition.speaker.as_dict() if s.recognition.speaker is not None else None,
        })
    language = dominant([(s.recognition.transcript.language, s.end_s - s.start_s) for s in segments])
    return {"task": "transcribe", "language": language or "", "duration": round(duration_s, 3), "text": text,
            "segments": out, "usage": {"type": "duration", "seconds": round(duration_s, 3)}}


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/audio/transcriptions` (multipart: file, model, language, response_format, ...)."""
    _authorize(request)
    app = request.app
    pipeline, metrics = app[PIPELINE], app[METRICS]
    form = await _read_form(request)
    upload = _upload(form)
    response_format = (form.get("response_format") or "json").lower()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format {response_format!r} is not supported; use one of "
                            f"{', '.join(RESPONSE_FORMATS)}", param="response_format")
    if (form.get("stream") or "").lower() in ("true", "1"):
        raise ApiError(400, "streaming transcription is not supported; leave `stream` unset", param="stream")
    language = parse_language(form.get("language"))
    # `model`, `prompt`, `temperature`, `timestamp_granularities[]` are accepted and ignored.
    decoded = await _decode(request, upload)
    t0 = time.perf_counter()
    metrics.sessions_total.labels(PROTOCOL).inc()
    metrics.sessions.labels(PROTOCOL).inc()
    try:
        segments = await recognize_recording(pipeline, decoded.samples, language)
    finally:
        metrics.sessions.labels(PROTOCOL).dec()
    metrics.utterances.labels(PROTOCOL).inc(len(segments))
    latency = time.perf_counter() - t0
    metrics.reply_latency.labels(PROTOCOL).observe(latency)
    _publish(app[BUS], segments, session_id=f"http-{uuid.uuid4().hex[:12]}", latency_ms=latency * 1000)
    text = join_texts([s.text for s in segments])
    if response_format == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if response_format == "srt":
        return web.Response(text=render_srt(segments), content_type="application/x-subrip")
    if response_format == "vtt":
        return web.Response(text=render_vtt(segments), content_type="text/vtt")
    if response_format == "verbose_json":
        return web.json_response(verbose_json(segments, decoded.duration_s, text))
    return web.json_response({"text": text, "usage": {"type": "duration", "seconds": round(decoded.duration_s, 3)}})


def _publish(bus: EventBus, segments: list[Segment], session_id: str, latency_ms: float) -> None:
    now = time.time()
    for s in segments:
        rec, t = s.recognition, s.recognition.transcript
        bus.publish(TranscriptEvent(
            text=s.text, language=t.language, emotion=t.emotion, event=t.event, speaker=rec.speaker,
            device_id=None, client_id=None, session_id=session_id, protocol=PROTOCOL, audio_ms=rec.audio_ms,
            latency_ms=round(latency_ms, 1), asr_ms=round(rec.asr_ms, 1),
            embed_ms=round(rec.embed_ms, 1) if rec.embed_ms is not None else None, timestamp=now))


async def models(request: web.Request) -> web.Response:
    _authorize(request)
    name = request.app[CONFIG].http.model_name
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "asr-server"}]})


# --- voiceprints (xinnan-tech/voiceprint-api compatible) ---------------------------------------

def _voiceprints(request: web.Request):
    pipeline = request.app[PIPELINE]
    if pipeline.voiceprints is None or pipeline.speaker is None:
        raise ApiError(503, "speaker identification is disabled (speaker.enabled: false)")
    return pipeline, pipeline.voiceprints


async def _speech_embeddings(request: web.Request, upload: _Upload) -> list[np.ndarray]:
    """Embeddings of the speech in an upload: the whole clip, or each VAD piece of a long one."""
    pipeline = request.app[PIPELINE]
    config = request.app[CONFIG]
    decoded = await _decode(request, upload)
    min_ms = config.speaker.min_audio_ms
    if decoded.duration_s * 1000 < min_ms:
        raise ApiError(400, f"audio too short for a voiceprint: {decoded.duration_s * 1000:.0f} ms, "
                            f"need at least {min_ms} ms (speaker.min_audio_ms)", param="file")
    audio = decoded.samples
    if len(audio) <= config.vad.max_utterance_s * SAMPLE_RATE:
        pieces = [audio]
    else:
        pieces = [p for _, p in await split_timed(pipeline, audio) if len(p) * 1000 >= min_ms * SAMPLE_RATE]
        if not pieces:
            raise ApiError(400, "no speech found in the audio", param="file")
    return list(await asyncio.gather(*(pipeline.embed(p) for p in pieces)))


async def voiceprint_register(request: web.Request) -> web.Response:
    """`POST /voiceprint/register` (form: speaker_id, file) → `{"success": true, "msg": ...}`."""
    _authorize(request)
    _, store = _voiceprints(request)
    form = await _read_form(request)
    speaker_id = form.get("speaker_id") or ""
    if not speaker_id:
        raise ApiError(400, "missing form field 'speaker_id'")
    embeddings = await _speech_embeddings(request, _upload(form))
    try:
        vp = await asyncio.to_thread(store.enroll, speaker_id, np.stack(embeddings))
    except VoiceprintError as e:
        raise ApiError(400, str(e)) from None
    log.info("voiceprint registered: %s (%d pieces)", vp.name, vp.samples)
    return web.json_response({"success": True, "msg": f"registered: {vp.name}"})


async def voiceprint_identify(request: web.Request) -> web.Response:
    """`POST /voiceprint/identify` (form: speaker_ids "a,b,c", file) → `{"speaker_id", "score"}`.

    `speaker_id` is "" when no candidate reaches `speaker.threshold`; `score` is the best cosine.
    """
    _authorize(request)
    pipeline, store = _voiceprints(request)
    form = await _read_form(request)
    candidates = [s.strip() for s in (form.get("speaker_ids") or "").split(",") if s.strip()]
    if not candidates:
        raise ApiError(400, "form field 'speaker_ids' must list at least one speaker id (comma separated)")
    embeddings = await _speech_embeddings(request, _upload(form))
    embedding = np.mean(np.stack(embeddings), axis=0)
    scores = store.scores(embedding, candidates)
    if not scores:
        return web.json_response({"speaker_id": "", "score": 0.0})
    best, score = max(scores.items(), key=lambda kv: kv[1])
    threshold = pipeline.config.speaker.threshold
    return web.json_response({"speaker_id": best if score >= threshold else "", "score": round(score, 6)})


async def voiceprint_health(request: web.Request) -> web.Response:
    """`GET /voiceprint/health?key=...` → `{"status": "healthy", "total_voiceprints": n}`."""
    _authorize(request, "key")
    _, store = _voiceprints(request)
    return web.json_response({"status": "healthy", "total_voiceprints": len(store.list())})


async def voiceprint_list(request: web.Request) -> web.Response:
    _authorize(request)
    _, store = _voiceprints(request)
    speakers = [{"speaker_id": v.name, "samples": v.samples, "model": v.model, "dim": v.dim,
                 "created_at": v.created_at, "updated_at": v.updated_at} for v in store.list()]
    return web.json_response({"speakers": speakers, "total": len(speakers)})


async def voiceprint_delete(request: web.Request) -> web.Response:
    """`DELETE /voiceprint/{speaker_id}` → `{"success": true, ...}`, or 404 for an unknown id."""
    _authorize(request)
    _, store = _voiceprints(request)
    speaker_id = request.match_info["speaker_id"]
    if not await asyncio.to_thread(store.remove, speaker_id):
        raise ApiError(404, f"no voiceprint for speaker {speaker_id!r}")
    return web.json_response({"success": True, "msg": f"deleted: {speaker_id}"})


# --- events stream -----------------------------------------------------------------------------

async def events(request: web.Request) -> web.StreamResponse:
    """`GET /v1/events` WebSocket: `?device_id=a&device_id=b` (or comma separated) to filter.

    Browsers cannot set headers, so the key may also come as `?token=` or `?key=`.
    """
    _authorize(request, "token", "key")
    ids = [d.strip() for v in request.query.getall("device_id", []) for d in v.split(",") if d.strip()]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    bus = request.app[BUS]
    with bus.subscribe(ids or None) as sub:
        await ws.send_json({"type": "subscribed", "device_ids": ids or None})

        async def read_until_closed() -> None:
            async for msg in ws:  # subscribers have nothing to say; this notices their close
                if msg.type == WSMsgType.ERROR:
                    break

        reader = asyncio.create_task(read_until_closed())
        try:
            while not reader.done():
                getter = asyncio.ensure_future(sub.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                try:
                    event = getter.result()
                except SubscriptionClosed:
                    await ws.close(code=1001, message=b"server shutting down")
                    break
                await ws.send_str(event.to_json())
        except ConnectionResetError:
            pass
        finally:
            reader.cancel()
    return ws


# --- operations --------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@dataclass(slots=True)
class _EngineProbe:
    """Readiness asks the engines for an answer, at most every `PROBE_EVERY_S`, so probes stay cheap."""

    last_ok: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


PROBE = web.AppKey("probe", _EngineProbe)
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
        except asyncio.TimeoutError:
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
    models = [{"name": m.name, "backend": m.backend, "device": m.device, "provider": m.provider,
               "precision": m.precision} for m in pipeline.models]
    return web.json_response({"status": "ready", "models": models})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=1001, message=b"server shutting down")


def build_app(config: Config, pipeline: Pipeline, bus: EventBus, metrics: Metrics,
              ready: Callable[[], bool]) -> web.Application:
    """The aiohttp application; `ready` answers /readyz (models loaded, listeners up)."""
    app = web.Application(client_max_size=int(config.http.max_upload_mb * 1024 * 1024), middlewares=[_errors])
    app[CONFIG] = config
    app[PIPELINE] = pipeline
    app[BUS] = bus
    app[METRICS] = metrics
    app[READY] = ready
    app[KEYS] = ApiKeys.from_config(config)
    app[SOCKETS] = weakref.WeakSet()
    app[PROBE] = _EngineProbe()
    app.on_shutdown.append(_close_sockets)
    r = app.router
    r.add_post("/v1/audio/transcriptions", transcriptions)
    r.add_get("/v1/models", models)
    r.add_get("/v1/events", events)
    r.add_post("/voiceprint/register", voiceprint_register)
    r.add_post("/voiceprint/identify", voiceprint_identify)
    r.add_get("/voiceprint/health", voiceprint_health)
    r.add_get("/voiceprint/list", voiceprint_list)
    r.add_delete("/voiceprint/{speaker_id}", voiceprint_delete)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_endpoint)
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
