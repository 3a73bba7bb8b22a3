"""`/v1/devices/{device_id}/hotwords`: each device's hotwords (admin key), what the console's Hotwords panel edits.

A device's list biases every utterance of that device (`Device-Id`, as its hello sends it) from
its next one on, beside the config's `asr.hotwords`; it lives in the voiceprints' SQLite file.
`PUT` takes `{"hotwords": [{"word": "张三", "weight": 2.0}, "小米台灯", ...]}` or the text forms of
`core.hotwords` (`{"hotwords": "张三 2\\n小米台灯"}`) and replaces the list; an empty one deletes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from ...core.hotwords import HotwordStore, hotword_list, parse_hotwords
from ...errors import ApiError, HotwordError
from ...types import Hotword
from ..auth import Role
from .context import PIPELINE, authorize

log = logging.getLogger(__name__)

#: Longest accepted `Device-Id` (xiaozhi devices send a MAC address or a UUID).
MAX_DEVICE_ID = 128


def _store(request: web.Request) -> HotwordStore:
    authorize(request, role=Role.ADMIN)
    store = request.app[PIPELINE].hotwords.store
    if store is None:
        raise ApiError(503, "this server keeps no per-device hotwords (no store)")
    return store


def _device(request: web.Request) -> str:
    device_id = request.match_info["device_id"].strip()
    if not device_id or len(device_id) > MAX_DEVICE_ID:
        raise ApiError(400, f"device id must be 1 to {MAX_DEVICE_ID} characters", param="device_id")
    return device_id


def _body(hotwords: tuple[Hotword, ...], device_id: str) -> dict[str, Any]:
    return {"device_id": device_id, "hotwords": [{"word": h.text, "weight": h.weight} for h in hotwords]}


async def list_devices(request: web.Request) -> web.Response:
    """`GET /v1/hotwords` → `{"devices": {"<device id>": <words>, ...}}`."""
    store = _store(request)
    return web.json_response({"devices": await asyncio.to_thread(store.devices)})


async def get_hotwords(request: web.Request) -> web.Response:
    store, device_id = _store(request), _device(request)
    return web.json_response(_body(await asyncio.to_thread(store.get, device_id), device_id))


async def set_hotwords(request: web.Request) -> web.Response:
    store, device_id = _store(request), _device(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, 'the body is not JSON; send {"hotwords": [...]}') from None
    given = body.get("hotwords") if isinstance(body, dict) else None
    source = f"hotwords of {device_id}"
    try:
        if isinstance(given, str):
            hotwords = parse_hotwords(given, source)
        elif isinstance(given, list):
            hotwords = hotword_list((_entry(e, source) for e in given), source)
        else:
            raise HotwordError('send {"hotwords": [{"word": ..., "weight": ...}, ...]} or {"hotwords": "w1, w2"}')
    except HotwordError as e:
        raise ApiError(400, str(e), param="hotwords") from None
    await asyncio.to_thread(store.set, device_id, hotwords)
    log.info("hotwords of device %s set: %d words", device_id, len(hotwords))
    return web.json_response(_body(hotwords, device_id))


def _entry(entry: object, source: str) -> tuple[object, object]:
    if isinstance(entry, dict):
        return entry.get("word"), entry.get("weight")
    if isinstance(entry, str):
        return entry, None
    raise HotwordError(f"{source}: {ascii(entry)[:40]} is neither a word nor {{word, weight}}")


async def delete_hotwords(request: web.Request) -> web.Response:
    store, device_id = _store(request), _device(request)
    if not await asyncio.to_thread(store.delete, device_id):
        raise ApiError(404, f"device {device_id!r} has no hotwords")
    log.info("hotwords of device %s deleted", device_id)
    return web.json_response({"device_id": device_id, "deleted": True})
