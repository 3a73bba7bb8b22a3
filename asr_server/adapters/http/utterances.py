"""`/v1/utterances`: the archive of what was said (core/archive.py), searched, played, corrected,
erased and exported.

- `GET /v1/utterances` (read key; with no key configured, loopback only): newest first; filters `device_id`, `speaker`, `q` (text or
  correction contains it), `since`, `until` (Unix seconds or ISO 8601), `limit` (at most
  `MAX_PAGE`), `cursor` (the `next` of the page before) → `{"data": [...], "next": ...}`.
- `GET /v1/utterances/{id}`, `GET /v1/utterances/{id}/audio` (read key): one utterance, its audio
  (`audio/ogg` for a device's Opus, `audio/flac` for uploads).
- `PATCH /v1/utterances/{id}` `{"corrected_text": ...}` (admin key): the operator's correction.
- `DELETE /v1/utterances/{id}`, `DELETE /v1/utterances?device_id=...` (admin key): erase one, or
  everything kept of a device.
- `GET /v1/utterances/export` (admin key, the same filters): a tar of the audio and a
  `metadata.jsonl` manifest (Hugging Face `audiofolder`, NeMo).

The archive's database is read in worker threads: a search never holds the event loop.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import datetime

from aiohttp import web

from ...core.archive import MAX_PAGE, MAX_QUERY_CHARS, Archive, ArchivedUtterance, Query
from ...errors import ApiError
from ..auth import Role
from .context import ARCHIVE, KEYS, authorize

#: Utterances one export holds at most (`limit` may ask for fewer): bounds the temporary file.
EXPORT_MAX = 10000
#: Longest `device_id` or `speaker` filter taken (ids are short; longer is a client's mistake).
_MAX_FILTER_CHARS = 256
_CHUNK = 256 * 1024


def _read(request: web.Request) -> None:
    """A read key; with none configured, loopback clients only: the archive holds people's speech,
    which an API left open on a LAN must not hand to whoever reaches the port."""
    grant = authorize(request)
    keys = request.app[KEYS]
    if not (keys.admin or keys.read) and grant.role < Role.ADMIN:
        raise ApiError(
            403,
            "with no API key configured only loopback clients may read the archive; set http.read_keys",
            code="insufficient_permissions",
        )


def _archive(request: web.Request) -> Archive:
    archive = request.app[ARCHIVE]
    if archive is None:
        raise ApiError(503, "the archive is off (archive.enabled: false)", code="archive_disabled")
    return archive


def _text(request: web.Request, name: str, most: int) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > most or "\x00" in value:
        raise ApiError(400, f"{name} must be at most {most} characters, without NUL", param=name)
    return value


def _time(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ApiError(
            400, f"{name} must be Unix seconds or an ISO 8601 time, got {value[:40]!r}", param=name
        ) from None


def _int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    value = request.query.get(name)
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if not low <= n <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}", param=name)
    return n


def _query(request: web.Request, limit_default: int, limit_max: int) -> Query:
    limit = _int(request, "limit", limit_default, 1, limit_max)
    assert limit is not None
    return Query(
        device_id=_text(request, "device_id", _MAX_FILTER_CHARS),
        speaker=_text(request, "speaker", _MAX_FILTER_CHARS),
        q=_text(request, "q", MAX_QUERY_CHARS),
        since=_time(request, "since"),
        until=_time(request, "until"),
        limit=limit,
        cursor=_int(request, "cursor", None, 1, 2**62),
    )


async def _row(request: web.Request) -> tuple[Archive, ArchivedUtterance]:
    archive = _archive(request)
    uid = request.match_info["id"]
    row = await asyncio.to_thread(archive.get, uid)
    if row is None:
        raise ApiError(404, f"no utterance {uid[:64]!r}", code="utterance_not_found", param="id")
    return archive, row


async def list_utterances(request: web.Request) -> web.Response:
    _read(request)
    archive = _archive(request)
    rows, cursor = await asyncio.to_thread(archive.search, _query(request, 50, MAX_PAGE))
    return web.json_response({"data": [r.to_dict() for r in rows], "next": None if cursor is None else str(cursor)})


async def get_utterance(request: web.Request) -> web.Response:
    _read(request)
    _, row = await _row(request)
    return web.json_response(row.to_dict())


async def get_audio(request: web.Request) -> web.StreamResponse:
    _read(request)
    archive, row = await _row(request)
    path, content_type = archive.audio(row)
    if not path.is_file():
        raise ApiError(404, f"the audio of utterance {row.id} is gone", code="audio_not_found")
    return web.FileResponse(path, headers={"Content-Type": content_type})


async def patch_utterance(request: web.Request) -> web.Response:
    authorize(request, role=Role.ADMIN)
    archive, row = await _row(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, 'the body must be JSON: {"corrected_text": "..."}') from None
    if not isinstance(body, dict) or "corrected_text" not in body:
        raise ApiError(400, "the body must hold corrected_text (a string, or null to clear it)", param="corrected_text")
    text = body["corrected_text"]
    if text is not None and (not isinstance(text, str) or len(text) > 10000):
        raise ApiError(
            400, "corrected_text must be a string of at most 10000 characters, or null", param="corrected_text"
        )
    updated = await asyncio.to_thread(archive.correct, row.id, text)
    if updated is None:  # deleted meanwhile
        raise ApiError(404, f"no utterance {row.id!r}", code="utterance_not_found", param="id")
    return web.json_response(updated.to_dict())


async def delete_utterance(request: web.Request) -> web.Response:
    authorize(request, role=Role.ADMIN)
    archive, row = await _row(request)
    await asyncio.to_thread(archive.delete, row.id)
    return web.json_response({"deleted": 1})


async def delete_device(request: web.Request) -> web.Response:
    """`DELETE /v1/utterances?device_id=...`: erase a device's utterances, audio included."""
    authorize(request, role=Role.ADMIN)
    archive = _archive(request)
    device_id = _text(request, "device_id", _MAX_FILTER_CHARS)
    if device_id is None:
        raise ApiError(400, "name the device to erase: DELETE /v1/utterances?device_id=...", param="device_id")
    return web.json_response({"deleted": await asyncio.to_thread(archive.delete_device, device_id)})


async def export(request: web.Request) -> web.StreamResponse:
    """A tar (`audio/<id>.ogg|flac` and `metadata.jsonl`), written to a temporary file in a
    thread, then streamed."""
    authorize(request, role=Role.ADMIN)
    archive = _archive(request)
    query = _query(request, EXPORT_MAX, EXPORT_MAX)
    out = tempfile.TemporaryFile()
    try:
        await asyncio.to_thread(archive.export, query, out, query.limit)
        size = out.tell()
        out.seek(0)
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-tar",
                "Content-Disposition": 'attachment; filename="utterances.tar"',
                "Content-Length": str(size),
            }
        )
        await response.prepare(request)
        while chunk := await asyncio.to_thread(out.read, _CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        out.close()


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/utterances", list_utterances)
    r.add_delete("/v1/utterances", delete_device)
    r.add_get("/v1/utterances/export", export)
    r.add_get("/v1/utterances/{id}", get_utterance)
    r.add_patch("/v1/utterances/{id}", patch_utterance)
    r.add_delete("/v1/utterances/{id}", delete_utterance)
    r.add_get("/v1/utterances/{id}/audio", get_audio)
