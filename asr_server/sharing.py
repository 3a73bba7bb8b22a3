"""What the worker processes of one server share, so that N of them still behave as one server.

`serve --workers N` runs N processes that each hold their own connections (`workers` starts
them). Two things must be counted or seen across them, and this module is both:

- the connection limits (`max_sessions` and the others): a `Tally` per limit keeps one slot per
  worker in shared memory and admits under a lock over the sum, so the limit holds for the
  whole server, and a worker that dies is cleared by zeroing its own slot;
- the transcript events: `EventPeers` sends each event a worker makes to the other workers over
  Unix datagram sockets in the server's run directory, so a `/v1/events` subscriber on any
  worker sees every transcript, while the webhook is fed only by the worker that made it (once);
- the open sessions, for the browser console: a second `EventPeers` channel ("sessions") carries
  each worker's session list to the others (`core.live`).

Metrics use prometheus_client's multiprocess mode (set up by the supervisor); voiceprints need
nothing here: the SQLite file in WAL mode is shared, and each worker's store reloads its matrix
when `PRAGMA data_version` says another connection wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .logs import Throttle

log = logging.getLogger(__name__)

#: The limits counted for the whole server, by their config key.
SHARED_LIMITS = ("xiaozhi.max_sessions", "funasr.max_sessions", "http.max_connections", "events.max_subscribers")

#: The largest event a worker passes on (a 30 s utterance's text is a few hundred bytes).
MAX_EVENT_BYTES = 60_000


@dataclass(frozen=True)
class WorkerShare:
    """One worker's handle on what its server shares; picklable, so it crosses the process spawn.

    `limits` maps a key of `SHARED_LIMITS` to a `multiprocessing.Array('i', count)` (with its lock).
    """

    index: int
    count: int
    run_dir: Path
    limits: Mapping[str, Any] = field(default_factory=dict)

    def event_socket(self, index: int, channel: str = "events") -> Path:
        return self.run_dir / f"{channel}-{index}.sock"


class Tally:
    """A count held for the whole server: this process's part, and (with shared slots) the sum of
    every worker's. Without slots (one process) it is a plain counter."""

    def __init__(self, slots: Any | None = None, index: int = 0) -> None:
        self._slots = slots
        self._index = index
        self.own = 0

    @classmethod
    def of(cls, share: WorkerShare | None, key: str) -> Tally:
        """The tally behind the limit `key`: shared when this process is one of several workers."""
        if share is None or key not in share.limits:
            return cls()
        return cls(share.limits[key], share.index)

    @property
    def total(self) -> int:
        if self._slots is None:
            return self.own
        return int(sum(self._slots[:]))

    def take(self, limit: int) -> bool:
        """Count one more unless the whole server is at `limit`; False when it is."""
        if self._slots is None:
            if self.own >= limit:
                return False
        else:
            with self._slots.get_lock():
                if sum(self._slots[:]) >= limit:
                    return False
                self._slots[self._index] += 1
        self.own += 1
        return True

    def add(self) -> None:
        """Count one more, whatever the total (the caller checked its limit before)."""
        if self._slots is not None:
            with self._slots.get_lock():
                self._slots[self._index] += 1
        self.own += 1

    def give(self) -> None:
        self.own -= 1
        if self._slots is not None:
            with self._slots.get_lock():
                self._slots[self._index] -= 1


class EventPeers:
    """This worker's datagram socket on one `channel`: `send` to every other worker, `listen` for theirs.

    Sending never blocks: a worker that is gone (restarting) or whose socket buffer is full misses
    that event, counted in `missed` and logged, and the sender goes on.
    """

    def __init__(self, share: WorkerShare, channel: str = "events") -> None:
        self.share = share
        self.channel = channel
        self.missed = 0
        path = share.event_socket(share.index, channel)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this worker's previous life
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warnings = Throttle()
        self._reached: set[int] = set()  # peers a message has reached: before that, a peer is still starting

    def send(self, payload: bytes) -> None:
        if len(payload) > MAX_EVENT_BYTES:
            self.missed += 1
            log.warning("a %s message of %d bytes is too large for the other workers", self.channel, len(payload))
            return
        for i in range(self.share.count):
            if i == self.share.index:
                continue
            try:
                self._sock.sendto(payload, str(self.share.event_socket(i, self.channel)))
                self._reached.add(i)
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as e:
                self.missed += 1
                if i not in self._reached and isinstance(e, FileNotFoundError):
                    # not bound yet: it is still loading its models at start-up, not a lost worker
                    log.debug("worker %d is not listening yet for %s messages", i, self.channel)
                elif self._warnings.allow():  # a restarting worker misses every event until it is back
                    log.warning(
                        "worker %d missed a %s message: %s%s", i, self.channel, type(e).__name__, self._warnings.note()
                    )

    def listen(self, on_message: Callable[[bytes], None]) -> None:
        """Call `on_message` (on the running loop) with each event another worker sends."""
        self._loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    data = self._sock.recv(MAX_EVENT_BYTES + 1)
                except BlockingIOError:
                    return
                on_message(data)

        self._loop.add_reader(self._sock.fileno(), readable)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.share.event_socket(self.share.index, self.channel).unlink()
