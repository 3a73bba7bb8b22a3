"""Hotwords: where they come from, how each source's text is read, and the per-device store.

Four sources, merged per utterance (`merge`, later sources win for a word they share): the
config's `asr.hotwords`, the device's list (set over the HTTP API, kept in the voiceprints'
SQLite file), and the request's own (the FunASR socket's `hotwords` field, the `hotwords` form
field of `/v1/audio/transcriptions`). Texts come in FunASR's two forms: a JSON object of
`{"word": weight}` (what `funasr_wss_client.py --hotword FILE` sends), or words separated by
commas or new lines, each optionally followed by a space and its weight (`阿里巴巴 20`).

Strict readers (config, HTTP) refuse a bad list with a `HotwordError` naming the problem; the
FunASR socket's reader is lenient: its clients send weights on another model's scale and cannot
be told, so each problem is one log line and the word skipped (or its weight capped).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import HotwordError
from ..types import Hotword
from .voiceprints import open_speaker_db

log = logging.getLogger(__name__)

#: Hotwords one source may give: 1,000 cost ~13 ms more per 5 s utterance than 10 (BENCHMARKS.md);
#: a product catalogue bigger than that is no longer a list of names to favour.
MAX_HOTWORDS = 1000
#: Characters in one hotword: a name, a product, a short phrase.
MAX_HOTWORD_CHARS = 64
#: The largest bonus per piece (log-probability). On the stand-in, 5 left every shared clip's text
#: alone but the hotword's own; 10 put "客厅" four times into "打开客厅的灯" and twice into an
#: unrelated sentence (FunASR's client sends 20, its example weight for another model's scale).
MAX_HOTWORD_WEIGHT = 5.0

_SEPARATORS = re.compile(r"[,，\n\r]+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hotwords (
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    word TEXT NOT NULL,
    weight REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (device_id, position)
)
"""


def parse_hotwords(text: str, source: str, strict: bool = True) -> tuple[Hotword, ...]:
    """A source's hotword text read: a JSON object of `{"word": weight}`, or words separated by
    commas or new lines with an optional trailing ` weight` each. Empty text is no hotwords."""
    text = text.strip()
    if not text:
        return ()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            _problem(strict, f"{source}: not a JSON object of {{word: weight}} ({e})")
            return ()
        if not isinstance(data, dict):
            _problem(strict, f"{source}: not a JSON object of {{word: weight}}")
            return ()
        return hotword_list(data.items(), source, strict)
    entries: list[tuple[str, object]] = []
    for item in _SEPARATORS.split(text):
        word, _, last = item.strip().rpartition(" ")
        entries.append((word, last) if word and _number(last) is not None else (item, None))
    return hotword_list(entries, source, strict)


def hotword_list(entries: Iterable[tuple[object, object]], source: str, strict: bool = True) -> tuple[Hotword, ...]:
    """(word, weight or None) pairs checked against the limits; blank words are dropped, a word
    given twice keeps its last weight."""
    words: dict[str, Hotword] = {}
    for raw, weight in entries:
        if not isinstance(raw, str):
            _problem(strict, f"{source}: hotword {ascii(raw)[:40]} is not a string")
            continue
        word = " ".join(raw.split())
        if not word:
            continue
        if len(word) > MAX_HOTWORD_CHARS:
            _problem(strict, f"{source}: hotword {word[:20]!r}… is longer than {MAX_HOTWORD_CHARS} characters")
            continue
        w = None if weight is None else _number(weight)
        if weight is not None and w is None:
            _problem(strict, f"{source}: the weight of {word!r} is {ascii(weight)[:20]}, not a number")
            continue
        if w is not None and not 0 < w <= MAX_HOTWORD_WEIGHT:
            if strict or w <= 0:
                _problem(strict, f"{source}: the weight of {word!r} is {w:g}; use 0 < weight <= {MAX_HOTWORD_WEIGHT:g}")
                continue
            log.info("%s: the weight of %r is %g; capped at %g", source, word, w, MAX_HOTWORD_WEIGHT)
            w = MAX_HOTWORD_WEIGHT
        if word not in words and len(words) >= MAX_HOTWORDS:
            _problem(strict, f"{source}: more than {MAX_HOTWORDS} hotwords; the rest are ignored")
            break
        words[word] = Hotword(word, w)
    return tuple(words.values())


def merge(*lists: Iterable[Hotword]) -> tuple[Hotword, ...]:
    """The lists as one, in order; a word in a later list takes that list's weight."""
    out: dict[str, Hotword] = {}
    for hotwords in lists:
        for hw in hotwords:
            out.pop(hw.text, None)
            out[hw.text] = hw
    return tuple(out.values())


def with_weight(hotwords: Iterable[Hotword], weight: float) -> tuple[Hotword, ...]:
    """Each hotword with a weight: its own, or `weight` (`asr.hotword_weight`)."""
    return tuple(hw if hw.weight is not None else Hotword(hw.text, weight) for hw in hotwords)


class HotwordSources:
    """The config's `asr.hotwords` (read at start: a bad list stops it) and the device store:
    what an utterance's hotwords are made of."""

    def __init__(self, entries: Iterable[str], weight: float, store: HotwordStore | None = None) -> None:
        self.config = parse_hotwords("\n".join(entries), "asr.hotwords")
        self.weight = weight
        self.store = store

    def of(self, device_id: str | None, request: Iterable[Hotword] = ()) -> tuple[Hotword, ...]:
        """An utterance's hotwords: the config's, the device's (read now: a list set while it is
        connected applies to its next utterance), the request's, later ones winning for a shared
        word, each with its weight (`asr.hotword_weight` where it has none)."""
        device = self.store.get(device_id) if self.store is not None else ()
        return with_weight(merge(self.config, device, request), self.weight)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return None
    else:
        return None
    return f if f == f and abs(f) != float("inf") else None


def _problem(strict: bool, message: str) -> None:
    if strict:
        raise HotwordError(message)
    log.info("%s", message)


class HotwordStore:
    """Each device's hotwords, in the voiceprints' SQLite file (a table of its own), read per
    utterance so that a list set while the device is connected applies to its next utterance."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_speaker_db(self.path, _SCHEMA)

    def get(self, device_id: str | None) -> tuple[Hotword, ...]:
        if not device_id:
            return ()
        with self._lock:
            rows = self._db.execute(
                "SELECT word, weight FROM hotwords WHERE device_id = ? ORDER BY position", (device_id,)
            ).fetchall()
        return tuple(Hotword(word, weight) for word, weight in rows)

    def set(self, device_id: str, hotwords: Iterable[Hotword]) -> None:
        """Replace the device's list (an empty one deletes it)."""
        now = time.time()
        rows = [(device_id, i, hw.text, hw.weight, now) for i, hw in enumerate(hotwords)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM hotwords WHERE device_id = ?", (device_id,))
                self._db.executemany("INSERT INTO hotwords VALUES (?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, device_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM hotwords WHERE device_id = ?", (device_id,)).rowcount > 0

    def devices(self) -> dict[str, int]:
        """Each device with a list, and how many words it has."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, COUNT(*) FROM hotwords GROUP BY device_id ORDER BY device_id"
            ).fetchall()
        return {d: n for d, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
