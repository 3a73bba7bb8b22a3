"""`POST /v1/audio/transcriptions` and `GET /v1/models`: the OpenAI audio API (the `openai` client,
xiaozhi-esp32-server's `openai` ASR provider, Open WebUI...); any common container, long files cut by VAD."""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from ...constants import OPENAI
from ...core.finals import Finals
from ...core.hotwords import parse_hotwords
from ...core.recording import Segment, dominant, join_texts, recognize_recording
from ...errors import ApiError, EngineBusy, HotwordError
from .context import ARCHIVE, BUS, CONFIG, METRICS, PIPELINE, authorize
from .forms import decode, read_form, upload

PROTOCOL = OPENAI
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

# OpenAI takes ISO-639-1 codes; SenseVoice knows these languages (and `auto`).
_LANGUAGES = {
    "auto": "auto",
    "zh": "zh",
    "en": "en",
    "ja": "ja",
    "ko": "ko",
    "yue": "yue",
    "cmn": "zh",
    "chinese": "zh",
    "mandarin": "zh",
    "english": "en",
    "japanese": "ja",
    "korean": "ko",
    "cantonese": "yue",
    "zh-hk": "yue",
    "zh-yue": "yue",
}


def parse_language(value: str | None) -> str | None:
    """An OpenAI `language` value as a SenseVoice language; None for auto-detection."""
    if not value:
        return None
    v = value.strip().lower().replace("_", "-")
    lang = _LANGUAGES.get(v) or (_LANGUAGES.get(v.split("-")[0]) if "-" in v else None)
    if lang is None:
        raise ApiError(
            400,
            f"language {value!r} is not supported; use one of zh, en, yue, ja, ko or auto",
            code="unsupported_language",
            param="language",
        )
    return None if lang == "auto" else lang


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


#: Subtitle cues from word times: at most this many words or seconds, ending early after a sentence mark.
_CUE_WORDS = 8
_CUE_S = 4.0
_SENTENCE_END = tuple(".!?。！？")


def cues(segments: list[Segment]) -> list[tuple[float, float, str]]:
    """Subtitle cues: word groups of a segment where its words are timed, else the whole segment."""
    out: list[tuple[float, float, str]] = []
    for s in segments:
        words = s.words()
        if not words:
            out.append((s.start_s, s.end_s, s.text))
            continue
        group: list = []
        for i, w in enumerate(words):
            group.append(w)
            last = i == len(words) - 1
            if (
                last
                or len(group) >= _CUE_WORDS
                or w.end_s - group[0].start_s >= _CUE_S
                or w.text.endswith(_SENTENCE_END)
            ):
                end = s.end_s if last else words[i + 1].start_s  # until the next cue: spikes end early
                out.append((group[0].start_s, max(end, group[-1].end_s), join_texts([g.text for g in group])))
                group = []
    return out


def render_srt(segments: list[Segment]) -> str:
    return "".join(
        f"{i}\n{_timestamp(a, ',')} --> {_timestamp(b, ',')}\n{text}\n\n"
        for i, (a, b, text) in enumerate(cues(segments), 1)
    )


def render_vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{_timestamp(a, '.')} --> {_timestamp(b, '.')}\n{text}\n\n" for a, b, text in cues(segments)
    )


def verbose_json(
    segments: list[Segment], duration_s: float, text: str, forced: str | None = None, words: bool = False
) -> dict:
    """OpenAI's verbose_json, with SenseVoice's language, emotion, event and the speaker per segment."""
    out = []
    for i, s in enumerate(segments):
        t = s.recognition.transcript
        out.append(
            {
                "id": i,
                "seek": int(s.start_s * 100),
                "start": round(s.start_s, 3),
                "end": round(s.end_s, 3),
                "text": s.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
                "language": t.language or forced,
                "emotion": t.emotion,
                "event": t.event,
                "speaker": s.recognition.speaker.as_dict() if s.recognition.speaker is not None else None,
            }
        )
    language = dominant([(s.recognition.transcript.language, s.end_s - s.start_s) for s in segments])
    return {
        "task": "transcribe",
        "language": language or forced or "",  # the caller's language where the model named none
        "duration": round(duration_s, 3),
        "text": text,
        "segments": out,
        "usage": {"type": "duration", "seconds": round(duration_s, 3)},
    } | (
        {"words": [{"word": w.text, "start": w.start_s, "end": w.end_s} for s in segments for w in s.words()]}
        if words
        else {}
    )


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/audio/transcriptions` (multipart: file, model, language, response_format, ...)."""
    authorize(request)
    app = request.app
    pipeline, metrics = app[PIPELINE], app[METRICS]
    why = pipeline.governor.admit()
    if why is not None:  # before the body is read: the client retries after Retry-After
        metrics.refused.labels("http").inc()
        raise EngineBusy(why)
    form = await read_form(request)
    audio_file = upload(form)
    response_format = (form.get("response_format") or "json").lower()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format!r} is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    if (form.get("stream") or "").lower() in ("true", "1"):
        raise ApiError(400, "streaming transcription is not supported; leave `stream` unset", param="stream")
    language = parse_language(form.get("language"))
    try:  # comma- or newline-separated, each `word` or `word weight`, beside the config's and the device's
        hotwords = parse_hotwords(form.get("hotwords") or "", "form field 'hotwords'")
    except HotwordError as e:
        raise ApiError(400, str(e), param="hotwords") from None
    # `model`, `prompt`, `temperature`, `timestamp_granularities[]` are accepted and ignored.
    decoded = await decode(request, audio_file)
    t0 = time.perf_counter()
    metrics.sessions_total.labels(PROTOCOL).inc()
    metrics.sessions.labels(PROTOCOL).inc()
    try:
        segments = await recognize_recording(
            pipeline, decoded.samples, language, hotwords=hotwords, device_id=request.headers.get("Device-Id")
        )
    finally:
        metrics.sessions.labels(PROTOCOL).dec()
    latency = time.perf_counter() - t0
    metrics.reply_latency.labels(PROTOCOL).observe(latency)
    archive = app[ARCHIVE] if app[CONFIG].archive.http else None
    finals = Finals(PROTOCOL, f"http-{uuid.uuid4().hex[:12]}", metrics, app[BUS].publish, archive)
    finals.add_recording(segments, decoded.samples, latency * 1000)
    text = join_texts([s.text for s in segments])
    if response_format == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if response_format == "srt":
        return web.Response(text=render_srt(segments), content_type="application/x-subrip")
    if response_format == "vtt":
        return web.Response(text=render_vtt(segments), content_type="text/vtt")
    if response_format == "verbose_json":
        granularities = {
            v for name in ("timestamp_granularities[]", "timestamp_granularities") for v in form.values(name)
        }
        return web.json_response(verbose_json(segments, decoded.duration_s, text, language, "word" in granularities))
    return web.json_response({"text": text, "usage": {"type": "duration", "seconds": round(decoded.duration_s, 3)}})


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "asr-server"}


async def models(request: web.Request) -> web.Response:
    authorize(request)
    return web.json_response({"object": "list", "data": [_model(request.app[CONFIG].http.model_name)]})


async def model(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}`: the served model (`http.model_name`); any other id is 404
    `model_not_found`, as OpenAI answers (a transcription request's `model` is still not checked)."""
    authorize(request)
    name, wanted = request.app[CONFIG].http.model_name, request.match_info["model_id"]
    if wanted != name:
        raise ApiError(
            404, f"The model '{wanted}' does not exist; this server serves '{name}'", "model_not_found", "model"
        )
    return web.json_response(_model(name))
