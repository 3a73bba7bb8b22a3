"""Multipart forms in, decoded audio out: the request bodies of the transcription and voiceprint APIs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ...audio.io import DecodedAudio
from ...errors import ApiError, AudioDecodeError, AudioTooLongError, ClientGone, DecoderCrashed, EmptyAudioError
from .context import CONFIG, DECODER, METRICS, too_large_message

_MAX_FIELD_BYTES = 64 * 1024
#: Parts a form may have: every API here takes a file and a few fields. aiohttp's multipart reader
#: copies the unread rest of the body for each part, so thousands of tiny fields cost ~1,600× their
#: size in memory; a cap on the count bounds that before it is paid.
MAX_PARTS = 32
_READ_CHUNK = 1 << 16


@dataclass(slots=True)
class Upload:
    filename: str | None
    data: bytes


@dataclass(slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Upload] = field(default_factory=dict)
    repeated: dict[str, list[str]] = field(default_factory=dict)  # every value of a field sent more than once

    def values(self, name: str) -> list[str]:
        return self.repeated.get(name) or ([self.fields[name]] if name in self.fields else [])

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.fields.get(name, default)


async def read_form(request: web.Request) -> Form:
    """Stream a multipart form in, refusing it (413) as soon as it passes `http.max_upload_mb`."""
    config = request.app[CONFIG]
    limit = int(config.http.max_upload_mb * 1024 * 1024)
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, too_large_message(config), code="file_too_large", param="file")
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            400,
            f"expected a multipart/form-data body, got {request.content_type or 'no content type'}",
            code="invalid_content_type",
        )
    try:
        async with asyncio.timeout(config.http.body_timeout_s):
            return await _read_parts(request, limit)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {config.http.body_timeout_s:g} s (http.body_timeout_s)"
        ) from None


async def _read_parts(request: web.Request, limit: int) -> Form:
    config = request.app[CONFIG]
    form = Form()
    total = 0
    try:
        reader = await request.multipart()
        parts = 0
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > MAX_PARTS:
                raise ApiError(400, f"a form of more than {MAX_PARTS} parts", code="too_many_parts")
            if not isinstance(part, BodyPartReader):  # a nested multipart: not part of any of these APIs
                raise ApiError(400, "nested multipart bodies are not supported")
            name = part.name or ""
            is_file = part.filename is not None or name == "file"
            chunks: list[bytes] = []
            while chunk := await part.read_chunk(_READ_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, too_large_message(config), code="file_too_large", param="file")
                chunks.append(chunk)
                if not is_file and sum(map(len, chunks)) > _MAX_FIELD_BYTES:
                    raise ApiError(400, f"form field {name!r} is longer than {_MAX_FIELD_BYTES} bytes", param=name)
            data = b"".join(chunks)
            if is_file:
                form.files[name] = Upload(part.filename, data)
            else:
                value = data.decode("utf-8", errors="replace").strip()
                if name in form.fields:
                    form.repeated.setdefault(name, [form.fields[name]]).append(value)
                form.fields[name] = value
    except ApiError:
        raise
    except (ValueError, HttpProcessingError) as e:  # malformed multipart framing or part headers
        detail = e.message if isinstance(e, HttpProcessingError) else str(e)
        raise ApiError(400, f"malformed multipart body: {detail}".strip(), code="invalid_multipart") from None
    except ConnectionError:  # aiohttp's ClientConnectionResetError included
        raise ClientGone(f"the client left during its {request.method} {request.path} body") from None
    return form


def upload(form: Form, name: str = "file") -> Upload:
    upload = form.files.get(name)
    if upload is None:
        if name in form.fields:
            raise ApiError(400, f"form field {name!r} must be a file upload", param=name)
        raise ApiError(400, f"missing form field {name!r} (the audio file)", param=name, code="missing_file")
    return upload


async def decode(request: web.Request, upload: Upload) -> DecodedAudio:
    config, metrics = request.app[CONFIG], request.app[METRICS]
    t0 = time.perf_counter()
    try:  # in a decoder process: a crash there costs this request only
        decoded = await request.app[DECODER].decode(upload.data, config.http.max_audio_s)
    except DecoderCrashed as e:
        metrics.errors.labels("decoder_crashed").inc()
        raise ApiError(
            400, f"{upload.filename or 'the upload'} could not be decoded: {e}", code="decoder_crashed", param="file"
        ) from None
    except EmptyAudioError as e:
        raise ApiError(400, f"empty audio: {e}", code="empty_file", param="file") from None
    except AudioTooLongError as e:
        raise ApiError(413, f"{e} (http.max_audio_s)", code="audio_too_long", param="file") from None
    except AudioDecodeError as e:
        raise ApiError(
            400,
            f"{upload.filename or 'the upload'} is not a supported audio file: {e}",
            code="invalid_audio",
            param="file",
        ) from None
    metrics.stage.labels("file_decode").observe(time.perf_counter() - t0)
    return decoded
