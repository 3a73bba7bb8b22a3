"""Voiceprints in an embedded SQLite file, and identification by cosine against all of them.

The enrolled embeddings are held as one normalised matrix so identifying an utterance is one
matrix-vector product. SQLite's `data_version` tells when another connection (the CLI enrolling
while the server runs) changed the file, so the matrix is reloaded only then.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, VoiceprintError
from ..types import SpeakerMatch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voiceprints (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    dim INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    samples INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Voiceprint:
    name: str
    model: str
    dim: int
    samples: int
    created_at: float
    updated_at: float


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n == 0.0:
        raise VoiceprintError("embedding is zero or not finite")
    return v / n


def open_speaker_db(path: Path, schema: str) -> sqlite3.Connection:
    """`speaker.db` (voiceprints and devices' hotwords, each a table of its own), its folder made and
    `schema` applied; a file that cannot be opened is a config error, not a crash: one line, exit 2."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(schema)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"invalid configuration: speaker.db = {path} cannot be opened: {e}") from None
    return db


class VoiceprintStore:
    """Enrolled speakers for one speaker model (`model` names it; embeddings of other models are refused)."""

    def __init__(self, path: Path, model: str, dim: int) -> None:
        self.path = Path(path)
        self.model = model
        self.dim = dim
        self._lock = threading.Lock()
        self._db = open_speaker_db(self.path, _SCHEMA)
        self._version = -1
        self._names: builtins.list[str] = []
        self._matrix = np.zeros((0, dim), dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _refresh(self) -> None:
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return
        rows = self._db.execute(
            "SELECT name, embedding FROM voiceprints WHERE model = ? AND dim = ? ORDER BY name", (self.model, self.dim)
        ).fetchall()
        self._names = [r[0] for r in rows]
        self._matrix = (
            np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            if rows
            else np.zeros((0, self.dim), dtype=np.float32)
        )
        self._version = version

    def enroll(self, name: str, embeddings: np.ndarray) -> Voiceprint:
        """Store the mean of the (normalised) embeddings under `name`, replacing an earlier voiceprint."""
        name = name.strip()
        if not name or len(name) > 128:
            raise VoiceprintError("speaker name must be 1 to 128 characters")
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if emb.shape[1] != self.dim:
            raise VoiceprintError(f"embedding has {emb.shape[1]} dimensions, the speaker model gives {self.dim}")
        mean = _normalise(np.mean([_normalise(e) for e in emb], axis=0))
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO voiceprints (name, model, dim, embedding, samples, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET model=excluded.model, "
                "dim=excluded.dim, embedding=excluded.embedding, samples=excluded.samples, updated_at=excluded.updated_at",
                (name, self.model, self.dim, mean.tobytes(), len(emb), now, now),
            )
            self._version = -1
        return self.get(name)

    def get(self, name: str) -> Voiceprint:
        with self._lock:
            row = self._db.execute(
                "SELECT name, model, dim, samples, created_at, updated_at FROM voiceprints WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise VoiceprintError(f"no voiceprint named {name!r}")
        return Voiceprint(*row)

    def list(self) -> builtins.list[Voiceprint]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, model, dim, samples, created_at, updated_at FROM voiceprints ORDER BY name"
            ).fetchall()
        return [Voiceprint(*r) for r in rows]

    def remove(self, name: str) -> bool:
        name = name.strip()  # as `enroll` stores it
        with self._lock:
            cur = self._db.execute("DELETE FROM voiceprints WHERE name = ?", (name,))
            self._version = -1
        return cur.rowcount > 0

    def count(self) -> int:
        """Voiceprints of this store's model (cheap: the matrix is reloaded only when the file changed)."""
        with self._lock:
            self._refresh()
            return len(self._names)

    def scores(self, embedding: np.ndarray, names: builtins.list[str] | None = None) -> dict[str, float]:
        """Cosine of `embedding` against each enrolled voiceprint (or only those in `names`)."""
        e = _normalise(embedding)
        with self._lock:
            self._refresh()
            sims = self._matrix @ e if len(self._names) else np.zeros(0, np.float32)
            out = {n: float(s) for n, s in zip(self._names, sims, strict=True)}
        if names is not None:
            wanted = set(names)  # a set: a list here made a request with 5,000 candidates cost 355 ms
            out = {n: s for n, s in out.items() if n in wanted}
        return out

    def identify(
        self, embedding: np.ndarray, threshold: float, names: builtins.list[str] | None = None
    ) -> SpeakerMatch | None:
        """The best-scoring voiceprint if its cosine reaches `threshold`, else None (unknown speaker)."""
        scores = self.scores(embedding, names)
        if not scores:
            return None
        name, score = max(scores.items(), key=lambda kv: kv[1])
        return SpeakerMatch(name, score) if score >= threshold else None
