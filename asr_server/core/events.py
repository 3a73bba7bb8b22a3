"""Final transcripts to the chatbot backend: an HTTP webhook and WebSocket subscribers.

`EventBus.publish` is called on the device's reply path, so it only appends to bounded queues
and returns: it never awaits, never raises, and a backend that is slow or gone costs the device
nothing. The webhook queue drops its oldest event when full (counted in
`asr_webhook_deliveries{outcome="dropped"}`); deliveries run in their own tasks with a timeout
and a bounded number of retries with exponential backoff. Each `/v1/events` subscriber has its
own bounded queue with the same drop-oldest rule, so one stalled subscriber never holds up the
webhook or the other subscribers. With worker processes, each worker passes its events to the
others (`sharing.EventPeers`) for their subscribers; the webhook gets each event once, from the
worker that made it. The bus also remembers the last `RECENT` events (`recent`, replayed to a new
subscriber that asks) and their latencies (`latency`), for the browser console: each worker sees
every worker's events, so both are the whole server's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohttp

from ..config import Config
from ..errors import ConfigError, SubscriptionClosed
from ..sharing import EventPeers, Tally, WorkerShare
from ..types import TranscriptEvent
from .latency import LatencyWindow
from .metrics import Metrics

log = logging.getLogger(__name__)

_DRAIN_ON_CLOSE_S = 2.0
#: Events a new subscriber may ask to be replayed (`/v1/events?recent=N`).
RECENT = 50


class Subscription:
    """A bounded feed of events for one subscriber, optionally only some devices' events.

    Use as an async iterator inside `with bus.subscribe(...) as sub:`; leaving the block
    unsubscribes. When the subscriber falls `maxsize` events behind, the oldest are dropped and
    counted in `dropped`.
    """

    def __init__(
        self, bus: EventBus, device_ids: frozenset[str] | None, maxsize: int, scope: str | None = None
    ) -> None:
        self._bus = bus
        self.device_ids = device_ids
        self.scope = scope  # a device token's fingerprint: only that token's sessions' events
        self._queue: deque[TranscriptEvent] = deque(maxlen=maxsize)
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def matches(self, event: TranscriptEvent) -> bool:
        if self.scope is not None and event.scope != self.scope:
            return False
        return self.device_ids is None or event.device_id in self.device_ids

    def _offer(self, event: TranscriptEvent) -> bool:
        """Queue `event`; False when that pushed the oldest one out."""
        full = len(self._queue) == self._queue.maxlen
        self._queue.append(event)
        self._ready.set()
        if full:
            self.dropped += 1
        return not full

    def close(self) -> None:
        self._closed = True
        self._ready.set()
        self._bus._unsubscribe(self)

    async def get(self) -> TranscriptEvent:
        while not self._queue:
            if self._closed:
                raise SubscriptionClosed("event stream closed")
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> TranscriptEvent:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"invalid configuration: events.webhook_url must be an http(s) URL, got {url!r}")
    return url


class EventBus:
    """Fans final transcripts out to the webhook and the WebSocket subscribers."""

    def __init__(self, config: Config, metrics: Metrics, share: WorkerShare | None = None) -> None:
        self.config = config.events
        self._share = share
        self._peers: EventPeers | None = None
        self._seats = Tally.of(share, "events.max_subscribers")
        self.metrics = metrics
        self.webhook_url = _check_url(self.config.webhook_url) if self.config.webhook_url else None
        self._protocols = frozenset(self.config.protocols)
        self._pending: deque[TranscriptEvent] = deque(maxlen=self.config.queue_size)
        self._wakeup: asyncio.Event | None = None
        self._subscribers: set[Subscription] = set()
        self.recent: deque[TranscriptEvent] = deque(maxlen=RECENT)
        self.latency = LatencyWindow()
        self._workers: list[asyncio.Task] = []
        self._inflight = 0
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Webhook events waiting for delivery."""
        return len(self._pending)

    @property
    def subscribers(self) -> int:
        """Subscribers of the whole server (every worker's)."""
        return self._seats.total

    async def start(self) -> None:
        """Bind to the running loop and start the webhook workers (none without a webhook URL)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wakeup = asyncio.Event()
        self.metrics.queue_depths.add("webhook", lambda: len(self._pending))
        if self._share is not None and self._share.count > 1:
            self._peers = EventPeers(self._share)
            self._peers.listen(self._from_peer)
        if self.webhook_url is None:
            return
        c = self.config
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=c.webhook_timeout_s),
            connector=aiohttp.TCPConnector(limit=c.webhook_concurrency),
            headers={"User-Agent": "asr-server", **c.webhook_headers},
        )
        self._workers = [asyncio.create_task(self._worker(), name=f"webhook-{i}") for i in range(c.webhook_concurrency)]
        if self._pending:
            self._wakeup.set()
        log.info(
            "webhook: %s (queue %d, %d retries, timeout %.1f s)",
            self.webhook_url,
            c.queue_size,
            c.webhook_retries,
            c.webhook_timeout_s,
        )

    def publish(self, event: TranscriptEvent) -> None:
        """Hand `event` to every backend. Never blocks, never raises; safe from any thread."""
        try:
            if self._closed or event.protocol not in self._protocols:
                return
            if self._loop is not None and threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(self.publish, event)
                return
            if self.webhook_url is not None:
                if len(self._pending) == self._pending.maxlen:
                    self.metrics.webhook.labels("dropped").inc()
                    log.warning("webhook queue full (%d): dropped the oldest event", self._pending.maxlen)
                self._pending.append(event)
                if self._wakeup is not None:
                    self._wakeup.set()
            self._to_subscribers(event)
            if self._peers is not None:
                self._peers.send(event.to_peer_bytes())
        except Exception:  # the reply path must not fail because of an event
            log.exception("publishing a transcript event failed")

    def _to_subscribers(self, event: TranscriptEvent) -> None:
        """This worker's subscribers, and what the bus remembers (this worker's events and the others')."""
        self.recent.append(event)
        if event.latency_ms is not None:
            self.latency.add(event.latency_ms, event.timestamp)
        for sub in list(self._subscribers):
            if sub.matches(event) and not sub._offer(event):
                self.metrics.errors.labels("events_subscriber_overflow").inc()

    def _from_peer(self, data: bytes) -> None:
        """Another worker's event: for this worker's subscribers (its webhook went from there)."""
        try:
            event = TranscriptEvent.from_peer_bytes(data)
        except (ValueError, TypeError, KeyError):
            log.warning("dropped a malformed event from another worker (%d bytes)", len(data))
            return
        if not self._closed:
            self._to_subscribers(event)

    def subscribe(self, device_ids: Iterable[str] | None = None, scope: str | None = None) -> Subscription:
        """A new subscription to every event, or only to those of `device_ids` (and of `scope`)."""
        ids = frozenset(device_ids) if device_ids is not None else None
        sub = Subscription(self, ids or None, self.config.subscriber_queue_size, scope)
        if self._closed:
            sub._closed = True
        else:
            self._subscribers.add(sub)
            self._seats.add()  # the route checked events.max_subscribers against `subscribers`
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            self._seats.give()

    # --- webhook -------------------------------------------------------------------------

    async def _worker(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            event = self._pending.popleft()
            self._inflight += 1
            try:
                await self._deliver(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery crashed")
                self.metrics.webhook.labels("failed").inc()
            finally:
                self._inflight -= 1

    async def _deliver(self, event: TranscriptEvent) -> None:
        assert self._session is not None and self.webhook_url is not None
        c = self.config
        body = event.to_json().encode()
        headers = {"Content-Type": "application/json", "X-Event-Id": event.id}
        for attempt in range(c.webhook_retries + 1):
            t0 = time.perf_counter()
            retry_after: float | None = None
            try:
                async with self._session.post(self.webhook_url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self.metrics.webhook.labels("ok").inc()
                        self.metrics.stage.labels("webhook").observe(time.perf_counter() - t0)
                        return
                    reason = f"HTTP {resp.status}"
                    if resp.status < 500 and resp.status not in (408, 429):
                        log.warning("webhook refused event %s: %s; not retrying", event.id, reason)
                        self.metrics.webhook.labels("failed").inc()
                        return
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except (TimeoutError, aiohttp.ClientError) as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt == c.webhook_retries:
                log.warning("webhook gave up on event %s after %d attempts: %s", event.id, attempt + 1, reason)
                self.metrics.webhook.labels("failed").inc()
                return
            self.metrics.webhook.labels("retry").inc()
            delay = min(c.webhook_backoff_s * (2**attempt), c.webhook_backoff_max_s)
            if retry_after is not None:
                delay = min(max(delay, retry_after), c.webhook_backoff_max_s)
            log.info(
                "webhook attempt %d for event %s failed (%s); retrying in %.2f s", attempt + 1, event.id, reason, delay
            )
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop taking events, give the webhook a moment to drain, end every subscription."""
        if self._closed:
            return
        self._closed = True
        if self._peers is not None:
            self._peers.close()
            self._peers = None
        for sub in list(self._subscribers):
            sub.close()
        if self._workers:
            deadline = time.monotonic() + _DRAIN_ON_CLOSE_S
            while (self._pending or self._inflight) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
        if self._pending:
            self.metrics.webhook.labels("dropped").inc(len(self._pending))
            log.warning("webhook: %d undelivered events dropped at shutdown", len(self._pending))
            self._pending.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
