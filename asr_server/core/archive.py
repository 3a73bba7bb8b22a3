"""What was said: final utterances kept as audio files plus one SQLite row each (`archive.*`).

Adapters hand `keep` one `UtteranceRecord` per final utterance (through `core.finals`); `keep`
only queues it. One writer thread encodes the audio (a device's own Opus packets muxed into Ogg
Opus, uploads as FLAC), writes the file, inserts the row and applies retention (`max_days`, then
`max_gb`, oldest first), so the event loop never waits for a disk. A write that fails (a full
disk, a directory gone read-only) pauses the archive: one log line, `asr_archive_paused` 1,
utterances counted in `asr_archive_dropped{reason="paused"}` while it lasts, another try after
`RETRY_AFTER_S`; recognition is untouched. The HTTP API (`/v1/utterances`) reads and edits
through the same object, off the loop too (its callers use `asyncio.to_thread`).

Several worker processes share one directory: SQLite in WAL mode serialises their writes, and
retention counts every worker's files (it sums the table, not what this process wrote).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..audio.io import encode_flac
from ..audio.ogg_opus import OpusPacket, mux_ogg_opus
from ..config import ArchiveConfig
from ..constants import SAMPLE_RATE
from ..errors import StartupError
from ..types import Recognition
from .metrics import Metrics
from .recording import Segment

log = logging.getLogger(__name__)

#: After a failed write, the archive stays paused this long before it tries again: a full disk
#: rarely frees itself within seconds, and each failed try would cost a log line and an encode.
RETRY_AFTER_S = 60.0
#: Audio waiting for the writer at most; beyond, an utterance is dropped (counted), never waited
#: for: a disk this far behind must not hold memory or delay replies. 64 MB is half an hour of
#: uploads' PCM, or days of a device's Opus.
MAX_PENDING_BYTES = 64 * 2**20
#: The total size is summed from the table again after this many writes (other workers write too).
RESUM_EVERY = 64
#: Rows one page of `search` returns at most, whatever `limit` asks.
MAX_PAGE = 200
#: Longest `q` search string taken (a LIKE over longer strings only burns CPU).
MAX_QUERY_CHARS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS utterances (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    device_id TEXT,
    session_id TEXT NOT NULL,
    protocol TEXT NOT NULL,
    text TEXT NOT NULL,
    raw_text TEXT NOT NULL,
    language TEXT,
    emotion TEXT,
    event TEXT,
    speaker TEXT,
    speaker_score REAL,
    audio_ms INTEGER NOT NULL,
    latency_ms REAL,
    hotwords TEXT,
    corrected_text TEXT,
    audio_file TEXT NOT NULL,
    audio_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS utterances_time ON utterances (time);
CREATE INDEX IF NOT EXISTS utterances_device ON utterances (device_id, seq);
"""
_COLUMNS = (
    "id, time, device_id, session_id, protocol, text, raw_text, language, emotion, event, speaker, "
    "speaker_score, audio_ms, latency_ms, hotwords, corrected_text, audio_file, audio_bytes, seq"
)
_CONTENT_TYPES = {".ogg": "audio/ogg", ".flac": "audio/flac"}


@dataclass(frozen=True, slots=True, kw_only=True)
class UtteranceRecord:
    """One final utterance to keep, as an adapter hands it over: its recognition and its audio
    (a device's Opus packets as they came, or 16 kHz samples)."""

    protocol: str
    session_id: str
    device_id: str | None
    recognition: Recognition
    latency_ms: float | None
    opus: list[OpusPacket] | None = None
    pcm: np.ndarray | None = None
    time: float = field(default_factory=time.time)

    @property
    def audio_bytes(self) -> int:
        """The audio it holds in memory until written."""
        if self.opus is not None:
            return sum(len(p.data) for p in self.opus)
        return 0 if self.pcm is None else self.pcm.nbytes


@dataclass(frozen=True, slots=True)
class ArchivedUtterance:
    """One row of the archive, as the API answers it."""

    id: str
    time: float
    device_id: str | None
    session_id: str
    protocol: str
    text: str
    raw_text: str
    language: str | None
    emotion: str | None
    event: str | None
    speaker: str | None
    speaker_score: float | None
    audio_ms: int
    latency_ms: float | None
    hotwords: str | None
    corrected_text: str | None
    audio_file: str
    audio_bytes: int
    seq: int

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__ if name not in ("audio_file", "seq")}
        d["audio_format"] = _CONTENT_TYPES.get(Path(self.audio_file).suffix, "application/octet-stream")
        return d


@dataclass(frozen=True, slots=True)
class Query:
    """Filters of a search; `cursor` is the `next` of the page before."""

    device_id: str | None = None
    speaker: str | None = None
    q: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    cursor: int | None = None


def segment_audio(audio: np.ndarray, segment: Segment) -> np.ndarray:
    """The samples of one segment of a recording (what an upload's utterance keeps)."""
    return audio[int(segment.start_s * SAMPLE_RATE) : int(segment.end_s * SAMPLE_RATE)]


def _like(text: str) -> str:
    """`text` as a LIKE pattern that matches it literally anywhere (`%`, `_`, `\\` escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Archive:
    """The archive directory: audio files by day, `archive.sqlite`, one writer thread."""

    def __init__(self, config: ArchiveConfig, metrics: Metrics) -> None:
        self.config = config
        self.dir = Path(config.dir)
        self._metrics = metrics
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            self._db = sqlite3.connect(str(self.dir / "archive.sqlite"), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StartupError(f"archive.dir {str(config.dir)!r} cannot be written: {e}") from None
        self._lock = threading.Lock()  # one connection, used by the writer and the API's threads
        self._pending_lock = threading.Lock()  # never `_lock`: the loop must not wait for a query
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="archive")
        self._pending = 0  # bytes of audio queued for the writer
        self._paused_until: float | None = None
        self._bytes = self._sum_bytes()
        self._writes = 0

    # --- writing (the writer thread) ----------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused_until is not None

    def keep(self, record: UtteranceRecord) -> None:
        """Queue one utterance for the writer; never blocks (dropped, and counted, when paused or behind)."""
        if self._paused_until is not None and time.monotonic() < self._paused_until:
            self._metrics.archive_dropped.labels("paused").inc()
            return
        size = record.audio_bytes
        if self._pending + size > MAX_PENDING_BYTES:
            self._metrics.archive_dropped.labels("backlog").inc()
            return
        with self._pending_lock:
            self._pending += size
        self._writer.submit(self._write, record)

    def _write(self, record: UtteranceRecord) -> None:
        path: Path | None = None
        cpu = time.thread_time()
        try:
            uid = uuid.uuid4().hex
            data, suffix = (
                (mux_ogg_opus(record.opus), ".ogg")
                if record.opus is not None
                else (encode_flac(record.pcm if record.pcm is not None else np.zeros(0, np.float32)), ".flac")
            )
            day = time.strftime("%Y-%m-%d", time.gmtime(record.time))
            relative = f"{day}/{uid}{suffix}"
            path = self.dir / relative
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            self._insert(uid, record, relative, len(data))
            path = None
            self._metrics.archived.labels(record.protocol).inc()
            self._metrics.archive_bytes.inc(len(data))
            if self._paused_until is not None:
                self._paused_until = None
                self._metrics.archive_paused.set(0)
                log.warning("archive resumed: writing to %s again", self.dir)
            self._retain()
        except (OSError, sqlite3.Error) as e:
            if path is not None:
                with contextlib.suppress(OSError):  # (a half-written file; the folder may be what failed)
                    path.unlink(missing_ok=True)
            self._metrics.archive_dropped.labels("write_failed").inc()
            if self._paused_until is None:
                log.error("archive paused: cannot write to %s (%s); recognition goes on, next try in %g s",
                          self.dir, e, RETRY_AFTER_S)  # fmt: skip
                self._metrics.archive_paused.set(1)
            self._paused_until = time.monotonic() + RETRY_AFTER_S
        except Exception:
            self._metrics.archive_dropped.labels("error").inc()
            log.exception("archive: utterance of session %s not kept", record.session_id)
        finally:
            with self._pending_lock:
                self._pending -= record.audio_bytes
            self._metrics.archive_cpu.inc(time.thread_time() - cpu)

    def _insert(self, uid: str, r: UtteranceRecord, relative: str, nbytes: int) -> None:
        t, speaker = r.recognition.transcript, r.recognition.speaker
        row = (
            uid,
            r.time,
            r.device_id,
            r.session_id,
            r.protocol,
            t.text.strip(),
            t.raw,
            t.language,
            t.emotion,
            t.event,
            speaker.name if speaker is not None else None,
            round(speaker.score, 4) if speaker is not None else None,
            r.recognition.audio_ms,
            None if r.latency_ms is None else round(r.latency_ms, 1),
            ", ".join(t.hotwords) or None,  # the hotwords the biased decoding put in the text
            None,
            relative,
            nbytes,
        )
        with self._lock:
            self._db.execute(
                f"INSERT INTO utterances ({_COLUMNS.removesuffix(', seq')}) VALUES ({', '.join('?' * 18)})", row
            )
        self._bytes += nbytes

    def _sum_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(audio_bytes), 0) FROM utterances").fetchone()[0])

    def _retain(self) -> None:
        """Remove what is past `max_days`, then the oldest until the audio fits `max_gb` (the
        newest utterance always stays: one file over the limit must not erase itself)."""
        self._writes += 1
        if self._writes % RESUM_EVERY == 0:
            self._bytes = self._sum_bytes()
        cutoff = time.time() - self.config.max_days * 86400
        with self._lock:
            old = self._db.execute(
                "SELECT audio_file, audio_bytes FROM utterances WHERE time < ?", (cutoff,)
            ).fetchall()
            self._db.execute("DELETE FROM utterances WHERE time < ?", (cutoff,))
        self._unlink(old)
        limit = int(self.config.max_gb * 2**30)
        while self._bytes > limit:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, audio_file, audio_bytes FROM utterances WHERE seq < (SELECT MAX(seq) FROM utterances) "
                    "ORDER BY seq LIMIT 64"
                ).fetchall()
                over, chosen = self._bytes - limit, []
                for seq, name, nbytes in rows:
                    chosen.append((seq, name, nbytes))
                    over -= nbytes
                    if over <= 0:
                        break
                self._db.executemany("DELETE FROM utterances WHERE seq = ?", [(c[0],) for c in chosen])
            self._unlink([(name, nbytes) for _, name, nbytes in chosen])
            if not rows:
                break

    def _unlink(self, files: list[tuple[str, int]]) -> None:
        for name, nbytes in files:
            (self.dir / name).unlink(missing_ok=True)
            self._bytes -= nbytes
            self._metrics.archive_removed.inc()

    def flush(self) -> None:
        """Wait until every queued utterance is written (tests; shutdown)."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()

    # --- reading and editing (the API, in worker threads) -------------------------------

    def _rows(self, where: str, args: tuple, tail: str = "") -> list[ArchivedUtterance]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM utterances WHERE {where} {tail}", args).fetchall()
        return [ArchivedUtterance(*row) for row in rows]

    def search(self, query: Query) -> tuple[list[ArchivedUtterance], int | None]:
        """A page of utterances, newest first, and the cursor of the next page (None: no more)."""
        clauses: list[str] = ["1"]
        args: list[object] = []
        for column, value in (("device_id", query.device_id), ("speaker", query.speaker)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if query.q is not None and "\x00" in query.q:
            return [], None  # no text holds a NUL (and SQLite's LIKE would stop at it)
        if query.q:
            clauses.append("(text LIKE ? ESCAPE '\\' OR corrected_text LIKE ? ESCAPE '\\')")
            args += [_like(query.q[:MAX_QUERY_CHARS])] * 2
        if query.since is not None:
            clauses.append("time >= ?")
            args.append(query.since)
        if query.until is not None:
            clauses.append("time < ?")
            args.append(query.until)
        if query.cursor is not None:
            clauses.append("seq < ?")
            args.append(query.cursor)
        limit = max(1, min(query.limit, MAX_PAGE))
        rows = self._rows(" AND ".join(clauses), tuple(args), f"ORDER BY seq DESC LIMIT {limit + 1}")
        return rows[:limit], rows[limit - 1].seq if len(rows) > limit else None

    def get(self, uid: str) -> ArchivedUtterance | None:
        rows = self._rows("id = ?", (uid,))
        return rows[0] if rows else None

    def audio(self, row: ArchivedUtterance) -> tuple[Path, str]:
        """Where an utterance's audio is, and its content type."""
        path = self.dir / row.audio_file
        return path, _CONTENT_TYPES.get(path.suffix, "application/octet-stream")

    def correct(self, uid: str, text: str | None) -> ArchivedUtterance | None:
        """Set (None: clear) the operator's correction of one utterance; None if there is no such id."""
        with self._lock:
            changed = self._db.execute("UPDATE utterances SET corrected_text = ? WHERE id = ?", (text, uid)).rowcount
        return self.get(uid) if changed else None

    def delete(self, uid: str) -> bool:
        return self._delete("id = ?", (uid,)) > 0

    def delete_device(self, device_id: str) -> int:
        """Erase everything kept of one device; how many utterances that was."""
        return self._delete("device_id = ?", (device_id,))

    def _delete(self, where: str, args: tuple) -> int:
        with self._lock:
            rows = self._db.execute(f"SELECT audio_file, audio_bytes FROM utterances WHERE {where}", args).fetchall()
            self._db.execute(f"DELETE FROM utterances WHERE {where}", args)
        self._unlink(rows)
        return len(rows)

    def export(self, query: Query, out: IO[bytes], max_rows: int) -> int:
        """A tar of the matching utterances' audio (`audio/<id>.<ext>`) and `metadata.jsonl`, one
        line each: `file_name` (Hugging Face `audiofolder`), `audio_filepath` and `duration`
        (NeMo manifests), `text` (the correction where there is one, else what was recognised),
        `recognized_text`, `corrected_text`, `language`, `speaker`. Returns how many it holds."""
        lines, n = [], 0
        with tarfile.open(fileobj=out, mode="w|") as tar:
            cursor = query.cursor
            while n < max_rows:
                page, cursor = self.search(
                    Query(query.device_id, query.speaker, query.q, query.since, query.until, MAX_PAGE, cursor)
                )
                for row in page[: max_rows - n]:
                    path, _ = self.audio(row)
                    name = f"audio/{row.id}{path.suffix}"
                    try:
                        tar.add(path, arcname=name)
                    except OSError:
                        continue  # removed by retention meanwhile
                    n += 1
                    lines.append(
                        {
                            "file_name": name,
                            "audio_filepath": name,
                            "duration": row.audio_ms / 1000,
                            "text": row.corrected_text if row.corrected_text is not None else row.text,
                            "recognized_text": row.text,
                            "corrected_text": row.corrected_text,
                            "language": row.language,
                            "speaker": row.speaker,
                            "device_id": row.device_id,
                            "id": row.id,
                        }
                    )
                if cursor is None:
                    break
            manifest = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
            info = tarfile.TarInfo("metadata.jsonl")
            info.size, info.mtime = len(manifest), int(time.time())
            tar.addfile(info, io.BytesIO(manifest))
        return n
