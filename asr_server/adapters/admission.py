"""Who gets in: a cap on the connections a listener holds, counted from the upgrade on.

A session that has not said `hello` yet is a connection all the same: a mass reconnect after a
Wi-Fi outage opens hundreds at once, and counting only finished sessions would admit them all.
A slot is taken when a request passes the handshake checks and given back when that connection
closes, however it closes (a failed handshake included). With worker processes the count is the
whole server's (`sharing.Tally`), so `max_sessions` holds for the server, not for each worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

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


class LoadCap:
    """How many devices the recogniser can answer in budget, learned from the load (AIMD, as TCP
    finds a link's rate): while it stays behind, the cap drops to `1 - decrease` of the sessions
    open (and those above it are shed); while it keeps up, the cap grows by `increase_per_s`
    sessions a second until it no longer binds. Admission by queue wait alone lets a mass
    reconnect in before its talking shows, and lets shed devices back in at every dip."""

    def __init__(self, limit: int, decrease: float, increase_per_s: float) -> None:
        self.limit = limit
        self.decrease = decrease
        self.increase_per_s = increase_per_s
        self.value: float | None = None  # None: not learned, the configured limit applies

    def behind(self, sessions: int) -> int:
        """The recogniser fell behind with `sessions` open: lower the cap; how many to shed."""
        current = sessions if self.value is None else min(self.value, sessions)
        self.value = max(1.0, current * (1 - self.decrease))
        return max(1, sessions - math.floor(self.value))

    def keeping_up(self, seconds: float, sessions: int) -> None:
        """Grow while it binds (`sessions` at the cap): a cap that admitted no one more has shown
        nothing about more load, as TCP's window does not grow while the sender is idle."""
        if self.value is not None and sessions + 1 >= self.value:
            self.value += self.increase_per_s * seconds
            if self.value >= self.limit:
                self.value = None

    def full(self, connections: int) -> bool:
        return self.value is not None and connections >= self.value


class SlowStart:
    """Open sessions at most double every `period_s` (at least `floor` new ones per period); while
    the recogniser is not clearly within budget a period adds only the floor (TCP's slow start ends
    at the first sign of congestion too). A ceiling on the open sessions, not a count of admissions,
    so connections that fail their handshake or close at once give their place back.

    Before the recogniser has ever fallen behind the cap is unlearned, so a mass reconnect after an
    outage came in at once and the box answered its first seconds late (p95 1.0 s for the 10 s
    after 30 devices joined 60 on 4 cores, 5.9 s for 150 cold ones) until shedding caught up. In
    waves, the lateness signal sees each wave's load (an utterance or two: seconds) before the next
    is let in; a refused device retries after `Retry-After`, and 1,000 devices are all back within
    7 periods where the box holds them.
    """

    def __init__(self, period_s: float, floor: int = 16) -> None:
        self.period_s = period_s
        self.floor = floor
        self._since = -math.inf
        self._ceiling = 0

    def admit(
        self,
        sessions: int,
        now: float,
        keeping_up: bool = True,
        shown: bool = True,
        room: Callable[[int], float] | None = None,
    ) -> bool:
        """Whether one more connection may open now, with `sessions` open; a period that begins
        while not `keeping_up`, or before the last wave's load has `shown` (its talking devices not
        yet answered: a continuous talker's first reply comes seconds after it joins, so within
        budget at the period's end may say nothing of its load), raises the ceiling by the floor only.
        `room(sessions)`: how many more the recogniser's load leaves room for; a period adds no
        more than that (a doubling past it is the overshoot that only shedding undoes)."""
        if not self.period_s:
            return True
        if now - self._since >= self.period_s:
            self._since = now
            grow: float = max(self.floor, sessions) if keeping_up and shown else self.floor
            if room is not None:
                grow = min(grow, room(sessions))  # the floor keeps it finite
            self._ceiling = sessions + math.floor(grow)
        return sessions < self._ceiling


def reading_behind(delays: list[float], max_ms: float, share: float, min_sessions: int = 10) -> str | None:
    """Why the server counts as behind on reading, else None: more than `share` of the streaming
    devices' live audio (`delays`, seconds from spoken to seen by the VAD) reached the VAD more
    than `max_ms` late. The replies' lateness shows a saturated front end only after utterances
    end and a window of them fills (seconds); the input delay shows it on the next frame. Fewer
    than `min_sessions` streaming devices never saturate a loop: their delay is noise (a GC pause);
    nor does one device alone (its own network), however small `share` is."""
    if not max_ms or len(delays) < min_sessions:
        return None
    late = sum(1 for d in delays if d * 1000 > max_ms)
    if late < 2 or late <= share * len(delays):
        return None
    return (
        f"the audio of {late} of {len(delays)} streaming devices reached the VAD more than "
        f"{max_ms:g} ms after it was spoken (xiaozhi.max_input_delay_ms)"
    )
