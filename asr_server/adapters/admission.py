"""Who gets in: a cap on the connections a listener holds, counted from the upgrade on.

A session that has not said `hello` yet is a connection all the same: a mass reconnect after a
Wi-Fi outage opens hundreds at once, and counting only finished sessions would admit them all.
A slot is taken when a request passes the handshake checks and given back when that connection
closes, however it closes (a failed handshake included).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)


class ConnectionSlots:
    """At most `limit` connections at a time; `admit` from `process_request`, release is automatic."""

    def __init__(self, limit: int, key: str, on_refuse: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.key = key
        self._on_refuse = on_refuse
        self.taken = 0
        self._watchers: set[asyncio.Task[None]] = set()

    def acquire(self, connection: Any) -> bool:
        """Take a slot for `connection` (a websockets `ServerConnection`); False when none is free."""
        if self.taken >= self.limit:
            return False
        self.taken += 1
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
            self.taken -= 1
