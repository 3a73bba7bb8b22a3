"""`serve --workers N`: N front-end processes on the same ports, supervised, that act as one server.

One process's front end (WebSocket, Opus, VAD, plumbing) is Python on one event loop and uses
about one core however many the machine has. Workers multiply it: each is a whole `AsrServer`
with its own sessions and engines, held to its share of the cores (CPU affinity, so its ONNX
Runtime threads never oversubscribe them), listening on the same ports with SO_REUSEPORT, so
the kernel spreads new connections over the workers. An OS without SO_REUSEPORT gets a clear
error for `--workers` above 1 (run one process per port there, behind a load balancer).

The supervisor holds each port from the start (a bound socket with SO_REUSEPORT that never
listens: port 0 resolves once for every worker, and no other program takes the port while a
worker restarts), the shared limits (`sharing`), a run directory for the event sockets and
prometheus_client's multiprocess files, and the workers' lives: a worker that dies is logged and
started again (its devices reconnect and land on the others meanwhile); SIGTERM or SIGINT is
passed to every worker, which drains as a single server does; a worker still running after
`xiaozhi.drain_timeout_s` plus a grace period is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app import Endpoints, check_model_files, serve_forever
from .config import Config
from .errors import AsrServerError, StartupError
from .logs import setup_logging
from .sharing import SHARED_LIMITS, WorkerShare

log = logging.getLogger(__name__)

#: How long a worker may take to load its models and listen before the start fails.
START_TIMEOUT_S = 300.0
#: Beyond the drain timeout, how long a stopping worker gets to close before it is killed.
STOP_GRACE_S = 10.0
#: A worker that dies sooner than this after its start is restarted after a growing delay.
SHORT_LIFE_S = 10.0
MAX_RESTART_DELAY_S = 30.0


def machine_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def worker_count(value: str | int) -> int:
    """`--workers`: a count, or `auto` for one per core."""
    if value == "auto":
        return len(machine_cores())
    n = int(value)
    if n < 1:
        raise StartupError(f"--workers must be at least 1 or auto, got {value}")
    return n


def share_cores(count: int, cores: list[int]) -> list[tuple[int, ...]]:
    """Each worker's cores: contiguous, as even as they divide; more workers than cores share them."""
    if count >= len(cores):
        return [(cores[i % len(cores)],) for i in range(count)]
    return [tuple(cores[i * len(cores) // count : (i + 1) * len(cores) // count]) for i in range(count)]


def _hold_port(host: str, port: int, what: str) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: the port is the server's for its whole life."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise StartupError(f"cannot listen on {what} {host}:{port}: {e}") from None
    return s


@dataclass(slots=True)
class _Worker:
    index: int
    cores: tuple[int, ...]
    process: Any = None
    conn: Any = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    ready: bool = False


def _worker_main(config: Config, share: WorkerShare, cores: tuple[int, ...], conn: Any, parent: int) -> None:
    """One worker process: a whole server on the shared ports, until SIGTERM or its parent's end."""
    setup_logging(config.log_level, f"worker {share.index}")
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)

    def orphaned() -> None:  # the supervisor was killed: drain and go rather than serve unsupervised
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the supervisor (pid %d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="orphan-watch", daemon=True).start()

    def ready(endpoints: Endpoints) -> None:
        conn.send(("ready", endpoints))

    try:
        asyncio.run(serve_forever(config, share, ready))
    except AsrServerError as e:
        conn.send(("failed", str(e)))
        sys.exit(2)
    except KeyboardInterrupt:
        pass


class Supervisor:
    """Starts `count` workers, keeps them running, stops them together."""

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._run_dir: Path | None = None
        self._limits: dict[str, Any] = {}
        self._workers = [_Worker(i, c) for i, c in enumerate(share_cores(count, machine_cores()))]

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status."""
        if not hasattr(socket, "SO_REUSEPORT"):
            raise StartupError(
                "--workers above 1 needs SO_REUSEPORT (Linux, BSD, macOS); on this system run one process "
                "per port behind a load balancer"
            )
        check_model_files(self.config)  # one clear error, not N workers failing alike
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self._prepare()
            self._start_all()
            self._supervise()
        finally:
            self._shutdown()
        return 0

    def _prepare(self) -> None:
        cfg = self.config
        listeners: list[tuple[Any, str]] = [(cfg.xiaozhi, "the device socket")]
        if cfg.http.enabled:
            listeners.append((cfg.http, "the HTTP API"))
        if cfg.funasr.enabled:
            listeners.append((cfg.funasr, "the FunASR socket"))
            from .adapters.funasr.tls import tls_context

            tls_context(cfg.funasr)  # a self-signed certificate is made here once, not by N workers at once
        for section, what in listeners:
            held = _hold_port(section.host, section.port, what)
            self._held.append(held)
            section.port = held.getsockname()[1]
        if cfg.http.enabled and cfg.http.health_port is not None:
            held = _hold_port(cfg.http.host, cfg.http.health_port, "the health port")
            self._held.append(held)
            cfg.http.health_port = held.getsockname()[1]
        self._run_dir = Path(tempfile.mkdtemp(prefix="asr-server-"))
        metrics_dir = self._run_dir / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # the workers inherit it
        self._limits = {key: self._ctx.Array("i", self.count) for key in SHARED_LIMITS}

    def _share(self, index: int) -> WorkerShare:
        assert self._run_dir is not None
        return WorkerShare(index, self.count, self._run_dir, self._limits)

    def _spawn(self, w: _Worker) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        w.process = self._ctx.Process(
            target=_worker_main,
            args=(self.config, self._share(w.index), w.cores, child_conn, os.getpid()),
            name=f"asr-server-worker-{w.index}",
        )
        w.process.start()
        child_conn.close()
        w.conn, w.started, w.ready, w.restart_at = parent_conn, time.monotonic(), False, None

    def _start_all(self) -> None:
        for w in self._workers:
            self._spawn(w)
        deadline = time.monotonic() + START_TIMEOUT_S
        endpoints: Endpoints | None = None
        for w in self._workers:
            while not w.ready:
                if self._stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise StartupError(f"worker {w.index} did not start within {START_TIMEOUT_S:g} s")
                if w.conn.poll(0.2):
                    kind, value = w.conn.recv()
                    if kind == "failed":
                        raise StartupError(f"worker {w.index}: {value}")
                    w.ready, endpoints = True, value
                elif not w.process.is_alive():
                    raise StartupError(f"worker {w.index} exited with code {w.process.exitcode} while starting")
        assert endpoints is not None
        log.info(
            "%d workers ready (pids %s; cores %s): devices %s, HTTP %s, FunASR %s",
            self.count,
            ", ".join(str(w.process.pid) for w in self._workers),
            " | ".join(",".join(map(str, w.cores)) for w in self._workers),
            endpoints.device_url,
            endpoints.http_url or "off",
            endpoints.funasr_url or "off",
        )

    def _supervise(self) -> None:
        while not self._stop.is_set():
            sentinels = [w.process.sentinel for w in self._workers if w.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            now = time.monotonic()
            for w in self._workers:
                if self._stop.is_set():
                    return
                if w.process is not None and not w.ready and w.conn.poll():
                    with contextlib.suppress(EOFError):
                        kind, value = w.conn.recv()
                        w.ready = kind == "ready"
                        if w.ready:
                            log.info("worker %d (pid %d) is serving again", w.index, w.process.pid)
                        else:
                            log.error("worker %d failed to start again: %s", w.index, value)
                if w.process is not None and not w.process.is_alive():
                    self._buried(w, now)
                if w.process is None and w.restart_at is not None and now >= w.restart_at:
                    self._spawn(w)

    def _buried(self, w: _Worker, now: float) -> None:
        """A worker died on its own: clear what it held and plan its restart."""
        pid, code = w.process.pid, w.process.exitcode
        self._forget(w)
        w.failures = w.failures + 1 if now - w.started < SHORT_LIFE_S else 0
        delay = min(MAX_RESTART_DELAY_S, 0.5 * 2**w.failures) if w.failures else 0.0
        w.restart_at = now + delay
        log.warning(
            "worker %d (pid %d) exited with code %s; its devices reconnect to the others; restarting it%s",
            w.index,
            pid,
            code,
            f" in {delay:.1f} s" if delay else "",
        )

    def _forget(self, w: _Worker) -> None:
        """Zero the dead worker's counts and retire its metrics files."""
        from prometheus_client import multiprocess

        for slots in self._limits.values():
            with slots.get_lock():
                slots[w.index] = 0
        multiprocess.mark_process_dead(w.process.pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])
        w.conn.close()
        w.process, w.conn, w.ready = None, None, False

    def _shutdown(self) -> None:
        live = [w for w in self._workers if w.process is not None and w.process.is_alive()]
        if live:
            log.info("stopping %d workers: each answers what is in flight, then closes", len(live))
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.xiaozhi.drain_timeout_s + STOP_GRACE_S
        for w in live:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning("worker %d (pid %d) did not stop in time: killed", w.index, w.process.pid)
                w.process.kill()
                w.process.join()
        for w in self._workers:
            if w.process is not None:
                self._forget(w)
        for held in self._held:
            held.close()
        self._held = []
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
