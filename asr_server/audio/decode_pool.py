"""Uploaded files are decoded in worker processes, so a crash in a decoder costs one request.

FFmpeg and libsndfile are C code fed bytes from anyone. A native crash (a codec's SIGSEGV) in
the server's own process would end every session; in a worker it ends one decode: its caller
gets `DecoderCrashed`, one line is logged, and a fresh worker takes the slot. A worker that grew
past `RECYCLE_GROWTH_MB` is replaced after its decode too, so the memory a decode bomb took goes
back to the OS with the process (glibc keeps what a process freed in its arenas).

Workers are forked from a fork server that imported only the decoders (numpy, soxr, soundfile,
PyAV), never the models, and the pool starts them all at start-up (`warm`): a request never waits
for an interpreter to start, and a replacement costs a fork. Each worker decodes one file at a
time; callers beyond the pool's size wait their turn. Raw PCM and device Opus never come here:
they are decoded in process (no container to parse).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np

from ..errors import AudioDecodeError, DecoderCrashed
from .io import DecodedAudio, decode_audio

log = logging.getLogger(__name__)

#: A worker whose memory grew this much past its start after a decode is replaced (a fork, a few
#: ms): decoding a few minutes of audio stays under it, a decode bomb (an hour is 230 MB of
#: output) does not, and what the allocator would have kept of it goes back to the OS.
RECYCLE_GROWTH_MB = 64.0
#: A decode still running after this is taken to loop on a crafted file and its worker is killed:
#: FFmpeg decodes an hour of MP3 in well under a minute on one core.
DECODE_TIMEOUT_S = 120.0
#: A worker must say it is ready within this (a fork and no imports; a loaded box is slow).
START_TIMEOUT_S = 30.0
#: What the fork server imports once, so that every worker starts with the decoders loaded. The
#: CLI too: multiprocessing runs a script's main module again in each new process (the
#: `asr-server` script's is two lines that import the CLI: 0.4 s, no models, unless the fork
#: server already holds it; `python -m asr_server` is exempt).
_PRELOAD = ["asr_server.audio.decode_pool", "asr_server.cli", "av", "soundfile"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _serve(conn: Connection) -> None:
    """A worker's loop: max_duration_s, then the file's bytes in; a result out (the samples as bytes
    after it), for ever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server closes us
    import av  # noqa: F401  (loaded before "ready", so the first decode pays no import)
    import soundfile  # noqa: F401

    conn.send(("ready", _rss_mb()))
    while True:
        try:
            max_duration_s = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the server closed the pool or died: nothing more to do
            return
        try:
            d = decode_audio(data, max_duration_s)
        except AudioDecodeError as e:
            conn.send(("error", e, _rss_mb()))
            continue
        except Exception as e:  # a decoder binding's own bug: a named error, and the worker lives on
            conn.send(("error", AudioDecodeError(f"the decoder failed ({type(e).__name__}: {e})"), _rss_mb()))
            continue
        del data
        conn.send(("ok", (d.source_rate, d.source_channels, d.decoder, d.format, len(d.samples)), _rss_mb()))
        conn.send_bytes(np.ascontiguousarray(d.samples, np.float32).data)


@dataclass(slots=True, eq=False)  # compared and hashed by identity: one per process
class _Worker:
    process: BaseProcess
    conn: Connection
    start_rss_mb: float

    def stop(self) -> None:
        self.conn.close()  # the worker reads EOF and returns
        self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1.0)

    def death(self) -> str:
        """How the worker ended, for the log and the client."""
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


class DecodePool:
    """`workers` decoder processes; `decode` runs `decode_audio` in one of them. `running` hears
    how many files the workers hold now (sent and not yet answered), for a metric."""

    def __init__(self, workers: int, running: Callable[[int], None] | None = None) -> None:
        self.size = workers
        self._running = 0
        self._on_running = running
        self._lock = threading.Lock()
        self._ctx = multiprocessing.get_context("forkserver")
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()  # None: a slot not started yet
        for _ in range(workers):
            self._idle.put(None)
        self._slots: asyncio.Semaphore | None = None
        self._all: set[_Worker] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids."""
        return [w.process.pid for w in list(self._all) if w.process.pid is not None and w.process.is_alive()]

    def warm(self) -> None:
        """Start every worker not running now (blocking, a fork each), so no request waits for one."""
        taken: list[_Worker | None] = [self._idle.get() for _ in range(self.size)]
        try:
            for i, w in enumerate(taken):
                taken[i] = self._live(w)
        finally:
            for w in taken:
                self._idle.put(w)

    async def decode(self, data: bytes, max_duration_s: float | None) -> DecodedAudio:
        """`decode_audio(data, max_duration_s)` in a worker; `DecoderCrashed` if the worker died on it."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:  # callers wait here, not in threads
            return await asyncio.to_thread(self._decode, data, max_duration_s)

    def close(self) -> None:
        """Stop every worker (at shutdown: a decode still running fails with `DecoderCrashed`)."""
        self._closed = True
        for w in list(self._all):
            w.stop()
        self._all.clear()

    # --- in a thread ---------------------------------------------------------------------------

    def _start(self) -> _Worker:
        self._ctx.set_forkserver_preload(_PRELOAD)  # read when the fork server starts (the first worker)
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(theirs,), name="asr-decoder", daemon=True)
        try:
            process.start()
        except OSError as e:  # no memory or no process slots left to fork
            raise DecoderCrashed(f"a decoder process could not start: {e}") from e
        finally:
            theirs.close()
        w = _Worker(process, ours, 0.0)
        try:
            if not ours.poll(START_TIMEOUT_S):
                process.kill()
                raise DecoderCrashed(f"a decoder process did not start within {START_TIMEOUT_S:g} s")
            _, w.start_rss_mb = ours.recv()
        except (EOFError, OSError):
            w.stop()
            raise DecoderCrashed(f"a decoder process died at start ({w.death()})") from None
        except DecoderCrashed:
            w.stop()
            raise
        self._all.add(w)
        return w

    def _count(self, delta: int) -> None:
        with self._lock:
            self._running += delta
            if self._on_running is not None:
                self._on_running(self._running)

    def _retire(self, w: _Worker) -> None:
        self._all.discard(w)
        w.stop()

    def _retire_dead(self, w: _Worker) -> str:
        """Retire a worker that died (or was killed); how it ended."""
        how = w.death()
        self._retire(w)
        return how

    def _decode(self, data: bytes, max_duration_s: float | None) -> DecodedAudio:
        w = self._idle.get()  # waits only behind the decode of a caller that left
        try:
            w = self._live(w)
            if not self._hand(w, data, max_duration_s):  # it died before reading the file: not the file's doing
                w = self._live(w)
                if not self._hand(w, data, max_duration_s):
                    raise DecoderCrashed("a new decoder process died before it read the file")
            decoded, rss = self._answer(w, len(data))
            if rss > w.start_rss_mb + RECYCLE_GROWTH_MB:  # give the memory back: a new process
                self._retire(w)
            if isinstance(decoded, Exception):
                raise decoded
            return decoded
        finally:
            self._idle.put(self._refill(w))

    def _live(self, w: _Worker | None) -> _Worker:
        """`w` if it lives, else a new worker in its place (it died while idle: logged)."""
        if w is not None and w in self._all and w.process.is_alive():
            return w
        if w is not None and w in self._all:
            log.warning("decoder process %s died while idle (%s); starting another", w.process.pid, w.death())
            self._retire(w)
        return self._start()

    def _hand(self, w: _Worker, data: bytes, max_duration_s: float | None) -> bool:
        """Send `w` a file; False if it was dead (the send fails before it can read any of it)."""
        try:
            w.conn.send(max_duration_s)
            w.conn.send_bytes(data)
        except OSError:
            how = self._retire_dead(w)
            log.warning("decoder process %s had died (%s); starting another for the file", w.process.pid, how)
            return False
        return True

    def _refill(self, w: _Worker | None) -> _Worker | None:
        """The slot's worker after a decode: the same one, or a new one where it was retired or died
        (started now, so the pool stays warm; None if even that fails: the next decode tries again)."""
        if self._closed:
            if w is not None:
                self._retire(w)
            return None
        if w is not None and w in self._all and w.process.is_alive():
            return w
        try:
            return self._start()
        except DecoderCrashed as e:
            log.warning("could not replace a decoder process: %s", e)
            return None

    def _answer(self, w: _Worker, size: int) -> tuple[DecodedAudio | AudioDecodeError, float]:
        """`w`'s answer to the file it was handed; its death or hang from here is the file's
        (retired, logged, `DecoderCrashed`)."""
        self._count(+1)
        try:
            try:
                answered = w.conn.poll(DECODE_TIMEOUT_S)
            finally:
                self._count(-1)
            if not answered:
                w.process.kill()
                raise DecoderCrashed(f"decoding took longer than {DECODE_TIMEOUT_S:g} s; it was stopped")
            reply = w.conn.recv()
            if reply[0] == "error":
                return reply[1], reply[2]
            (rate, channels, decoder, fmt, n), rss = reply[1], reply[2]
            buf = bytearray(n * 4)
            w.conn.recv_bytes_into(buf)
        except (EOFError, OSError) as e:
            how = self._retire_dead(w)
            log.warning("decoder process %s died on a %d-byte upload (%s)", w.process.pid, size, how)
            raise DecoderCrashed(f"the decoder process died on this file ({how}); nothing was decoded") from e
        except DecoderCrashed:
            how = self._retire_dead(w)
            log.warning("decoder process %s stopped on a %d-byte upload (%s)", w.process.pid, size, how)
            raise
        return DecodedAudio(np.frombuffer(buf, np.float32), rate, channels, decoder, fmt), rss
