"""Who gets in on a WebSocket port: the overload governor's answer (`core.governor`: would their
answers miss the budget?), then a cap on the connections the port holds, counted from the upgrade on.

A session that has not said `hello` yet is a connection all the same: a mass reconnect after a
Wi-Fi outage opens hundreds at once, and counting only finished sessions would admit them all.
A slot is taken when a request passes the handshake checks and given back when that connection
closes, however it closes (a failed handshake included). With worker processes the count is the
whole server's (`sharing.Tally`), so `max_sessions` holds for the server, not for each worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from ..core.governor import Governor
from ..logs import Throttle
from ..sharing import Tally

log = logging.getLogger(__name__)


class ConnectionSlots:
    """At most `limit` connections at a time; `admit` from `process_request`, release is automatic."""

    def __init__(
        self, limit: int, key: str, on_refuse: Callable[[], None] | None = None, tally: Tally | None = None
    ) -> None:
        self.limit = limit
        self.key = key
        self._on_refuse = on_refuse
        self.tally = tally if tally is not None else Tally()
        self._watchers: set[asyncio.Task[None]] = set()

    @property
    def taken(self) -> int:
        """Connections open on the whole server (every worker's)."""
        return self.tally.total

    @property
    def own(self) -> int:
        """Connections open in this process."""
        return self.tally.own

    def acquire(self, connection: Any) -> bool:
        """Take a slot for `connection` (a websockets `ServerConnection`); False when none is free."""
        if not self.tally.take(self.limit):
            return False
        task = asyncio.get_running_loop().create_task(self._release_when_closed(connection))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return True

    def admit(self, connection: Any) -> Any | None:
        """None when `connection` got a slot; else the 503 response to send, naming the limit."""
        if self.acquire(connection):
            return None
        if self._on_refuse is not None:
            self._on_refuse()
        log.warning("refusing a connection: %d open (%s)", self.taken, self.key)
        return connection.respond(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"server full: {self.taken} connections open ({self.key} = {self.limit}), try again later\n",
        )

    async def _release_when_closed(self, connection: Any) -> None:
        try:
            await connection.wait_closed()
        finally:
            self.tally.give()


#: What a refused client is told to wait before it retries (seconds): about one utterance's worth.
RETRY_AFTER_S = 5


def refuse_busy(connection: Any, why: str) -> Any:
    """The 503 for a WebSocket upgrade while the recogniser is behind, with `Retry-After`, as
    sherpa-onnx's server does: the device retries later instead of adding to the backlog now."""
    response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"server busy: {why}; try again later\n")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


class PortAdmission:
    """`admit(connection)` for one WebSocket port (`process_request`): the 503 with Retry-After
    while the governor says answers would be late, the 503 naming `max_sessions` while the port
    is full, else None (the connection has its slot)."""

    def __init__(self, governor: Governor, slots: ConnectionSlots, on_busy: Callable[[], None]) -> None:
        self.governor = governor
        self.slots = slots
        self._on_busy = on_busy
        self._refusals = Throttle()

    def admit(self, connection: Any, who: str | None = None) -> Any | None:
        why = self.governor.admit()
        if why is None:
            return self.slots.admit(connection)
        self._on_busy()
        if self._refusals.allow():
            log.warning("%s refused: %s%s", who or "connection", why, self._refusals.note())
        return refuse_busy(connection, why)


class RateBucket:
    """A token bucket: `burst` units at once, refilled at `rate` per second. `take(n)` is False when
    the client is over the rate (frames per second, or seconds of audio per second)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True
