"""Slots for the long-lived HTTP streams (`/v1/events`, the console's `/v1/live`), per principal.

A stream holds its slot for as long as its client likes, so a limit counted only in all let one
client hold every slot: one address with one device token held all 100 `/v1/events` slots
(`events.max_subscribers` equals `http.max_connections_per_ip`), and the chatbot server's admin key
got 503. So each device token, and with the API open each client address, holds a few streams at
most, and those clients together stop short of the limit: API keys (read or admin, the chatbot
server and the operator) keep their own room. Counted per worker process; the limit itself is
the stream's own (the whole server's for `/v1/events`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

from ...errors import ApiError
from ..auth import Grant, Role
from .context import client_address
from .guard import give_back

#: Streams one device token, or one client address of an open API, holds at once: a household's
#: phone app and a browser tab or two; more is a leak or an attack.
STREAMS_PER_CLIENT = 4
#: The share of a stream's slots that only API keys (and loopback admins) may take: device tokens
#: and keyless clients together stop short of it, so the chatbot server's key always gets in.
KEY_ROOM = 0.25


def principal(request: web.Request, grant: Grant) -> str | None:
    """Whom a stream counts against: a device token, or an open API's client address; None for an
    API key or an admin, who are limited by the stream's limit alone."""
    if grant.scope is not None:
        return f"device token {grant.scope}"
    if grant.keyed or grant.role >= Role.ADMIN:
        return None
    return f"client {client_address(request)}"


@dataclass
class StreamSlots:
    """One kind of stream's slots: `limit` in all (`key` names it, `what` the streams, in refusals)."""

    limit: int
    key: str
    what: str
    held: Counter[str] = field(default_factory=Counter)

    @contextlib.contextmanager
    def hold(self, who: str | None, taken: int) -> Iterator[None]:
        """A slot for `who` (see `principal`) while `taken` are held; 429 or 503 naming the limit."""
        if who is not None:
            if self.held[who] >= STREAMS_PER_CLIENT:
                raise ApiError(
                    429,
                    f"too many streams for this {who.split(' ', 1)[0].replace('client', 'address')}: "
                    f"{self.held[who]} open, at most {STREAMS_PER_CLIENT} each",
                    code="too_many_streams",
                )
            room = self.limit - int(self.limit * KEY_ROOM)
            if taken >= room and taken < self.limit:
                raise ApiError(
                    503,
                    f"too many {self.what}: {taken} open ({self.key} = {self.limit}; "
                    f"the last {self.limit - room} are kept for API keys)",
                    code="server_busy",
                )
        if taken >= self.limit:
            raise ApiError(503, f"too many {self.what}: {taken} open ({self.key} = {self.limit})", code="server_busy")
        if who is not None:
            self.held[who] += 1
        try:
            yield
        finally:
            if who is not None:
                give_back(self.held, who)
