"""`GET /v1/events`: a WebSocket stream of final transcripts, optionally for some devices only."""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode, WSMsgType, web

from ...core.events import RECENT
from ...errors import ApiError, SubscriptionClosed
from ..auth import Role
from .context import BUS, CONFIG, SOCKETS, authorize
from .streams import StreamSlots, principal

EVENT_SLOTS = web.AppKey("event_slots", StreamSlots)

#: Subscribers send nothing but their close; a larger message is not a subscriber.
_MAX_MESSAGE_BYTES = 4096


async def events(request: web.Request) -> web.StreamResponse:
    """`GET /v1/events` WebSocket: `?device_id=a&device_id=b` (or comma separated) to filter.

    Browsers cannot set headers, so the key may also come as `?token=` or `?key=`. A device token
    (`xiaozhi.auth.tokens`) subscribes to the sessions that authenticated with that token only.
    `?recent=N` first replays up to N (at most `RECENT`) of the latest events it may see.
    """
    grant = authorize(request, "token", "key", role=Role.DEVICE)
    bus = request.app[BUS]
    with request.app[EVENT_SLOTS].hold(principal(request, grant), bus.subscribers):
        return await _subscribe(request, grant.scope)


async def _subscribe(request: web.Request, scope: str | None) -> web.StreamResponse:
    cfg = request.app[CONFIG].events
    bus = request.app[BUS]
    ids = [d.strip() for v in request.query.getall("device_id", []) for d in v.split(",") if d.strip()]
    try:
        recent = min(RECENT, max(0, int(request.query.get("recent", "0"))))
    except ValueError:
        raise ApiError(400, "recent must be a whole number", param="recent") from None
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat_s, max_msg_size=_MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    with bus.subscribe(ids or None, scope) as sub:  # a device token: its own sessions only
        await ws.send_json({"type": "subscribed", "device_ids": ids or None})
        replay = [e for e in bus.recent if sub.matches(e)][-recent:] if recent else []
        for event in replay:
            await ws.send_str(event.to_json())

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
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                    break
                await ws.send_str(event.to_json())
        except ConnectionResetError:
            pass
        finally:
            reader.cancel()
    return ws


async def close_sockets(app: web.Application) -> None:
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
