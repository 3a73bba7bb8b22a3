"""The sessions open now, for the browser console: this worker's own, and every other worker's.

Adapters register each session with a callable that describes it (`SessionView`); the board
reads them once a tick (`TICK_S`) rather than being told of every frame, and tells its
subscribers what changed: `open`, `update` and `close` messages. Under `serve --workers N` each
worker sends its own list to the others every tick (and at once when a session opens or closes)
over a `sharing.EventPeers` channel, so a subscriber on any worker sees the whole server; a
worker whose list has not come for `STALE_TICKS` ticks (it died) is dropped from the view.
Like `EventBus.publish`, nothing here awaits on a session's path, and a slow subscriber only
loses its own oldest messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..sharing import MAX_EVENT_BYTES, EventPeers, WorkerShare

log = logging.getLogger(__name__)

TICK_S = 1.0
STALE_TICKS = 4
_CHANNEL = "sessions"


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the console shows of one open session."""

    session_id: str
    protocol: str
    device_id: str | None
    client_id: str | None
    version: int
    """The protocol version the client speaks."""
    mode: str
    """Listen mode (auto, manual, realtime)."""
    state: str
    """idle (not listening), listening, or speech (the VAD hears speech now)."""
    frames: int
    utterances: int
    last_text: str | None
    speaker: str | None
    opened_at: float
    """Unix seconds."""
    remote: str = ""
    worker: int = 0
    upstream_session_id: str | None = None
    """Relay mode: the session the upstream gave the device (it may give many devices the same)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Source = Callable[[], SessionView]


class BoardFeed:
    """One subscriber's bounded queue of board messages (oldest dropped when it falls behind)."""

    def __init__(self, board: SessionBoard, maxsize: int) -> None:
        self._board = board
        self._queue: deque[dict[str, Any]] = deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def offer(self, message: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(message)
        self._ready.set()

    async def get(self) -> dict[str, Any] | None:
        """The next message; None once the board closed."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._board._feeds.discard(self)

    def __enter__(self) -> BoardFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionBoard:
    """The whole server's open sessions, told to subscribers as they change."""

    def __init__(self, share: WorkerShare | None = None, feed_size: int = 1000) -> None:
        self._share = share
        self.worker = share.index if share is not None else 0
        self._sources: dict[str, Source] = {}
        self._peer_views: dict[int, dict[str, SessionView]] = {}
        self._peer_seen: dict[int, float] = {}
        self._assembling: dict[int, tuple[int, dict[str, SessionView]]] = {}  # a list arriving in parts
        self._shown: dict[str, SessionView] = {}
        self._feeds: set[BoardFeed] = set()
        self._feed_size = feed_size
        self._peers: EventPeers | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._clock = time.monotonic

    async def start(self) -> None:
        if self._share is not None and self._share.count > 1:
            self._peers = EventPeers(self._share, _CHANNEL)
            self._peers.listen(self._from_peer)
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever(), name="session-board")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._peers is not None:
            self._peers.close()
            self._peers = None
        for feed in list(self._feeds):
            feed.close()

    # --- what adapters call ---------------------------------------------------------------

    def add(self, session_id: str, source: Source) -> None:
        self._sources[session_id] = source
        self._changed()

    def remove(self, session_id: str) -> None:
        if self._sources.pop(session_id, None) is not None:
            self._changed()

    # --- what the console reads -----------------------------------------------------------

    def sessions(self) -> list[SessionView]:
        """Every open session of the server, the oldest first."""
        return sorted(self._current().values(), key=lambda v: (v.opened_at, v.session_id))

    def subscribe(self) -> BoardFeed:
        """A feed of `open`/`update`/`close` messages from now on (read `sessions()` for the rest)."""
        feed = BoardFeed(self, self._feed_size)
        self._feeds.add(feed)
        return feed

    # --- inside ---------------------------------------------------------------------------

    def _own(self) -> dict[str, SessionView]:
        views = {}
        for sid, source in list(self._sources.items()):
            try:
                views[sid] = source()
            except Exception:  # a description must never take the board down
                log.exception("describing session %s failed", sid)
        return views

    def _current(self) -> dict[str, SessionView]:
        now = self._clock()
        for index, seen in list(self._peer_seen.items()):
            if now - seen > STALE_TICKS * TICK_S:  # that worker is gone (or restarting)
                self._peer_seen.pop(index, None)
                self._peer_views.pop(index, None)
        out: dict[str, SessionView] = {}
        for views in self._peer_views.values():
            out.update(views)
        out.update(self._own())
        return out

    def _diff(self) -> None:
        """Tell the feeds what changed since they were last told."""
        current = self._current()
        messages: list[dict[str, Any]] = []
        for sid, view in current.items():
            old = self._shown.get(sid)
            if old != view:
                messages.append(
                    {"type": "session", "op": "open" if old is None else "update", "session": view.to_dict()}
                )
        for sid, old in self._shown.items():
            if sid not in current:
                messages.append({"type": "session", "op": "close", "session": old.to_dict()})
        self._shown = current
        for feed in list(self._feeds):
            for message in messages:
                feed.offer(message)

    def _changed(self) -> None:
        """A session opened or closed: tell the others now, not at the next tick."""
        self._send_own()
        self._diff()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._send_own()
                self._diff()
            except Exception:
                log.exception("the session board's tick failed")

    def _send_own(self) -> None:
        """This worker's whole list to the other workers, in datagrams that fit."""
        if self._peers is None:
            return
        views = [json.dumps(v.to_dict()) for v in self._own().values()]
        parts: list[list[str]] = [[]]
        size = 0
        for v in views:
            if parts[-1] and size + len(v) > MAX_EVENT_BYTES - 200:
                parts.append([])
                size = 0
            parts[-1].append(v)
            size += len(v) + 1
        stamp = time.time_ns()
        for i, part in enumerate(parts):
            head = f'{{"worker":{self.worker},"stamp":{stamp},"part":{i},"parts":{len(parts)},"sessions":['
            self._peers.send((head + ",".join(part) + "]}").encode())

    def _from_peer(self, data: bytes) -> None:
        """Another worker's list (or one part of it): replaces what this worker knew of it."""
        try:
            msg = json.loads(data)
            index, stamp, part, parts = int(msg["worker"]), int(msg["stamp"]), int(msg["part"]), int(msg["parts"])
            views = [SessionView(**v) for v in msg["sessions"]]
        except (ValueError, TypeError, KeyError):
            log.warning("dropped a malformed session list from another worker (%d bytes)", len(data))
            return
        pending = self._assembling.setdefault(index, (stamp, {}))
        if pending[0] != stamp:
            pending = self._assembling[index] = (stamp, {})
        pending[1].update({v.session_id: v for v in views})
        self._peer_seen[index] = self._clock()
        if part == parts - 1:  # datagrams between two processes on one host arrive in order
            self._peer_views[index] = pending[1]
            del self._assembling[index]
            self._diff()
