"""`/voiceprint/*`: the API of xinnan-tech/voiceprint-api (what xiaozhi-esp32-server calls), backed by
the server's own voiceprint store and speaker engine, plus list."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from aiohttp import web

from ...constants import SAMPLE_RATE
from ...core.recording import split_timed
from ...errors import ApiError, VoiceprintError
from ..auth import Role
from .context import CONFIG, PIPELINE, authorize
from .forms import Upload, decode, read_form, upload

log = logging.getLogger(__name__)


def _voiceprints(request: web.Request):
    pipeline = request.app[PIPELINE]
    if pipeline.voiceprints is None or pipeline.speaker is None:
        raise ApiError(503, "speaker identification is disabled (speaker.enabled: false)")
    return pipeline, pipeline.voiceprints


class _NoSpeech(Exception):
    """Nothing to identify in the upload (too short, or silence)."""


async def _speech_embeddings(request: web.Request, upload: Upload, identify: bool = False) -> list[np.ndarray]:
    """Embeddings of the speech in an upload: the whole clip, or each VAD piece of a long one.
    For identification, audio too short or without speech raises `_NoSpeech` (voiceprint-api
    answers that with an empty speaker, and its clients rely on it); for enrolment it is a 400."""
    pipeline = request.app[PIPELINE]
    config = request.app[CONFIG]
    decoded = await decode(request, upload)
    min_ms = config.speaker.min_audio_ms
    if identify and (decoded.duration_s * 1000 < min_ms or not await split_timed(pipeline, decoded.samples)):
        raise _NoSpeech()
    if decoded.duration_s * 1000 < min_ms:
        raise ApiError(
            400,
            f"audio too short for a voiceprint: {decoded.duration_s * 1000:.0f} ms, "
            f"need at least {min_ms} ms (speaker.min_audio_ms)",
            param="file",
        )
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
    authorize(request, role=Role.ADMIN)
    _, store = _voiceprints(request)
    form = await read_form(request)
    speaker_id = form.get("speaker_id") or ""
    if not speaker_id:
        raise ApiError(400, "missing form field 'speaker_id'")
    embeddings = await _speech_embeddings(request, upload(form))
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
    authorize(request)
    pipeline, store = _voiceprints(request)
    form = await read_form(request)
    candidates = [s.strip() for s in (form.get("speaker_ids") or "").split(",") if s.strip()]
    if not candidates:
        raise ApiError(400, "form field 'speaker_ids' must list at least one speaker id (comma separated)")
    try:
        embeddings = await _speech_embeddings(request, upload(form), identify=True)
    except _NoSpeech:
        return web.json_response({"speaker_id": "", "score": 0.0, "message": "no speech to identify"})
    embedding = np.mean(np.stack(embeddings), axis=0)
    try:  # off the event loop: thousands of voiceprints and candidates are milliseconds of numpy
        scores = await asyncio.to_thread(store.scores, embedding, candidates)
    except VoiceprintError as e:
        raise ApiError(400, f"no voiceprint can be computed from this audio: {e}", param="file") from None
    if not scores:
        return web.json_response({"speaker_id": "", "score": 0.0})
    best, score = max(scores.items(), key=lambda kv: kv[1])
    threshold = pipeline.config.speaker.threshold
    return web.json_response({"speaker_id": best if score >= threshold else "", "score": round(score, 6)})


async def voiceprint_health(request: web.Request) -> web.Response:
    """`GET /voiceprint/health?key=...` → `{"status": "healthy", "total_voiceprints": n}`."""
    authorize(request, "key")
    _, store = _voiceprints(request)
    return web.json_response({"status": "healthy", "total_voiceprints": len(store.list())})


async def voiceprint_list(request: web.Request) -> web.Response:
    authorize(request, role=Role.ADMIN)
    _, store = _voiceprints(request)
    speakers = [
        {
            "speaker_id": v.name,
            "samples": v.samples,
            "model": v.model,
            "dim": v.dim,
            "created_at": v.created_at,
            "updated_at": v.updated_at,
        }
        for v in store.list()
    ]
    return web.json_response({"speakers": speakers, "total": len(speakers)})


async def voiceprint_delete(request: web.Request) -> web.Response:
    """`DELETE /voiceprint/{speaker_id}` → `{"success": true, ...}`, or 404 for an unknown id."""
    authorize(request, role=Role.ADMIN)
    _, store = _voiceprints(request)
    speaker_id = request.match_info["speaker_id"].strip()
    if not await asyncio.to_thread(store.remove, speaker_id):
        raise ApiError(404, f"no voiceprint for speaker {speaker_id!r}")
    return web.json_response({"success": True, "msg": f"deleted: {speaker_id}"})
