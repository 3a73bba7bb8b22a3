"""Prometheus metrics, one registry per server instance (no module-level state).

Where the time of an utterance goes, under load: `asr_queue_wait_seconds` and `asr_stage_seconds`
per engine (wait, then compute), `asr_event_loop_lag_seconds` (how late the loop reads frames),
`asr_discarded_compute_seconds` (engine time spent on results nobody took: discarded speculations).

Under `serve --workers N` (prometheus_client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` is
set by the supervisor) every worker writes its samples to files there and `/metrics` on any
worker renders the whole server: counters and histograms summed, open-session gauges summed
over live workers, and `asr_worker_sessions_open{worker}` / `asr_queue_depth{engine,worker}` per
worker. Process metrics (memory, CPU) are per process and left out in that mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _QueueDepths:
    """Reads batcher queue depths at scrape time instead of tracking them on every submit (one
    process); with workers, `sample` copies them into a gauge the other workers' scrapes read."""

    def __init__(self, gauge: Gauge | None = None, worker: str = "0") -> None:
        self._sources: dict[str, Callable[[], int]] = {}
        self._gauge = gauge
        self._worker = worker

    def add(self, engine: str, depth: Callable[[], int]) -> None:
        self._sources[engine] = depth

    def sample(self) -> None:
        if self._gauge is not None:
            for engine, depth in self._sources.items():
                self._gauge.labels(engine, self._worker).set(depth())

    def collect(self):
        g = GaugeMetricFamily("asr_queue_depth", "Requests waiting in each engine's micro-batcher", labels=["engine"])
        for engine, depth in self._sources.items():
            g.add_metric([engine], depth())
        yield g


class Metrics:
    """Every metric the server exports; adapters and engines record into the same instance."""

    def __init__(self, worker: int = 0) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.worker = str(worker)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if self.multiprocess_dir is None:
            ProcessCollector(registry=r)
        self.sessions = Gauge(
            "asr_sessions_open", "Open sessions by protocol", ["protocol"], registry=r, multiprocess_mode="livesum"
        )
        self.worker_sessions = Gauge(
            "asr_worker_sessions_open",
            "Open sessions by worker process (serve --workers) and protocol",
            ["worker", "protocol"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.input_delay = Histogram(
            "asr_input_delay_seconds",
            "Live device audio: from when it was spoken to when the VAD had seen it (the socket, the read "
            "and the VAD queue; past a few tens of ms the server reads slower than its devices send)",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions_total = Counter("asr_sessions_opened", "Sessions opened by protocol", ["protocol"], registry=r)
        self.utterances = Counter("asr_utterances", "Utterances recognised by protocol", ["protocol"], registry=r)
        self.reply_latency = Histogram(
            "asr_reply_latency_seconds",
            "End of speech to reply (devices: from the last voiced audio; files and requests: from their end)",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.processing = Histogram(
            "asr_reply_processing_seconds",
            "Endpoint decision (vad.min_silence_ms after the end of speech) to reply: the part recognition adds",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "asr_stage_seconds", "Time per call of each pipeline stage", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "asr_batch_size",
            "Items per batched model call",
            ["engine"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.speculations = Counter(
            "asr_speculations",
            "Speculative recognitions by outcome: used (became the final), phrase (speech resumed after a phrase "
            "pause: kept as a finished phrase), dropped (cancelled before it ran: free), discarded (speech resumed "
            "after it ran or while it ran: its compute was wasted)",
            ["outcome"],
            registry=r,
        )
        self.discarded_compute = Counter(
            "asr_discarded_compute_seconds",
            "Engine compute whose result nobody took (discarded speculations, callers gone), by engine",
            ["engine"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "asr_queue_wait_seconds",
            "Time a request waited for its engine before its compute began",
            ["engine"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "asr_event_loop_lag_seconds",
            "How late a callback scheduled on the event loop ran (sampled every 100 ms): time frames wait to be read",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.recogniser_load = Gauge(
            "asr_recogniser_load",
            "Share of the recogniser's lanes the last 5 s of work took, queued work included (over 1: behind), "
            "by worker",
            ["worker"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.errors = Counter("asr_errors", "Errors by kind", ["kind"], registry=r)
        self.decodes = Gauge(
            "asr_decodes_running",
            "Uploaded files a decoder process is decoding now (audio/decode_pool.py)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_sessions = Gauge(
            "asr_upstream_sessions", "Device sessions relayed to the upstream", registry=r, multiprocess_mode="livesum"
        )
        self.upstream_failures = Counter(
            "asr_upstream_failures", "Upstream connections that failed, by reason", ["reason"], registry=r
        )
        self.relayed = Counter("asr_relayed_messages", "Messages relayed, by direction", ["direction"], registry=r)
        self.relayed_bytes = Counter("asr_relayed_bytes", "Bytes relayed, by direction", ["direction"], registry=r)
        self.upstream_first_tts = Histogram(
            "asr_upstream_first_tts_seconds",
            "Our endpoint to the upstream's first `tts` for that turn (what the user waits for)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.shed = Counter(
            "asr_shed",
            "Requests given up for their deadline (unrun; an embedding also when late or its queue full), by engine",
            ["engine"],
            registry=r,
        )
        self.refused = Counter(
            "asr_refused",
            "Connections and requests refused because the server is behind, by port",
            ["port"],
            registry=r,
        )
        self.webhook = Counter(
            "asr_webhook_deliveries", "Webhook deliveries by outcome (ok, failed, dropped)", ["outcome"], registry=r
        )
        self.archived = Counter(
            "asr_archived_utterances", "Utterances kept in the archive, by protocol", ["protocol"], registry=r
        )
        self.archive_bytes = Counter("asr_archived_bytes", "Audio bytes written to the archive", registry=r)
        self.archive_cpu = Counter(
            "asr_archive_cpu_seconds", "CPU the archive's writer spent (encode, write, insert, retention)", registry=r
        )
        self.archive_removed = Counter("asr_archive_removed", "Utterances removed (retention, API)", registry=r)
        self.archive_dropped = Counter(
            "asr_archive_dropped",
            "Utterances not kept, by reason (paused, write_failed, backlog, error)",
            ["reason"],
            registry=r,
        )
        self.archive_paused = Gauge(
            "asr_archive_paused", "1 while the archive is paused by a failed write", registry=r, multiprocess_mode="max"
        )
        if self.multiprocess_dir is None:
            self.queue_depths = _QueueDepths()
            r.register(self.queue_depths)
        else:
            depth = Gauge(
                "asr_queue_depth",
                "Requests waiting in each engine's micro-batcher, by worker",
                ["engine", "worker"],
                registry=r,
                multiprocess_mode="livesum",
            )
            self.queue_depths = _QueueDepths(depth, self.worker)

    def session_opened(self, protocol: str) -> None:
        self.sessions_total.labels(protocol).inc()
        self.sessions.labels(protocol).inc()
        self.worker_sessions.labels(self.worker, protocol).inc()

    def session_closed(self, protocol: str) -> None:
        self.sessions.labels(protocol).dec()
        self.worker_sessions.labels(self.worker, protocol).dec()

    def on_batch(self, engine: str, size: int, seconds: float) -> None:
        """The schedulers' callback: batch size and the batched call's duration."""
        self.batch_size.labels(engine).observe(size)
        self.stage.labels(engine).observe(seconds)

    def on_wait(self, engine: str, seconds: float) -> None:
        """The schedulers' callback: how long a request waited before its compute began."""
        self.queue_wait.labels(engine).observe(seconds)

    def on_discard(self, engine: str, seconds: float) -> None:
        """The schedulers' callback: compute spent on results nobody took."""
        self.discarded_compute.labels(engine).inc(seconds)

    def on_shed(self, engine: str) -> None:
        """The schedulers' callback: a request waited past its deadline and was failed, not run."""
        self.shed.labels(engine).inc()

    def _server_registry(self) -> CollectorRegistry:
        """This process's registry, or with workers one that reads the whole server's files."""
        if self.multiprocess_dir is None:
            return self.registry
        self.queue_depths.sample()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.multiprocess_dir)
        return registry

    def render(self) -> bytes:
        """The exposition text: this process's registry, or with workers the whole server's."""
        return generate_latest(self._server_registry())

    def snapshot(self) -> dict[str, Any]:
        """What the browser console shows, as data: the same samples `/metrics` renders (so the
        whole server's with workers), not its text."""
        return summarise(self._server_registry().collect())


def summarise(families: Iterable[Any]) -> dict[str, Any]:
    """Errors by kind, queue depths (summed, and by worker where there are workers), batch sizes
    by engine (count, mean, how many batches of each size bucket), open sessions and utterances."""
    out: dict[str, Any] = {"errors": {}, "queues": {}, "queues_by_worker": {}, "batches": {}, "sessions": {}}
    out["utterances"] = {}
    batches: dict[str, dict[str, Any]] = {}
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "asr_errors_total":
                if not value:  # a kind that was only named so far
                    continue
                out["errors"][labels["kind"]] = out["errors"].get(labels["kind"], 0) + value
            elif name == "asr_queue_depth":
                engine = labels["engine"]
                out["queues"][engine] = out["queues"].get(engine, 0) + value
                if "worker" in labels:
                    out["queues_by_worker"].setdefault(labels["worker"], {})[engine] = value
            elif name == "asr_sessions_open":
                out["sessions"][labels["protocol"]] = out["sessions"].get(labels["protocol"], 0) + value
            elif name == "asr_utterances_total":
                out["utterances"][labels["protocol"]] = value
            elif name.startswith("asr_batch_size_"):
                b = batches.setdefault(labels["engine"], {"count": 0.0, "sum": 0.0, "cumulative": {}})
                if name == "asr_batch_size_count":
                    b["count"] = value
                elif name == "asr_batch_size_sum":
                    b["sum"] = value
                elif name == "asr_batch_size_bucket":
                    b["cumulative"][labels["le"]] = value
    for engine, b in batches.items():
        buckets, below = {}, 0.0
        for le, total in sorted(b["cumulative"].items(), key=lambda kv: float(kv[0])):
            if total > below:
                buckets[le] = total - below
            below = total
        mean = round(b["sum"] / b["count"], 2) if b["count"] else None
        out["batches"][engine] = {"count": b["count"], "mean": mean, "buckets": buckets}
    return out


async def watch_loop_lag(metrics: Metrics, interval_s: float = 0.1) -> None:
    """Sample how late the event loop runs a callback (run as a task for the server's lifetime)."""
    import asyncio

    loop = asyncio.get_running_loop()
    observe = metrics.loop_lag.observe
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - t0 - interval_s))
        metrics.queue_depths.sample()  # with workers: the depths the other workers' scrapes read
