"""Log lines that a client cannot flood or forge.

Client text reaches the log through error messages, device ids and transcripts. One formatter
for the whole process escapes control characters (a `%0A` in a query-string Device-Id would
otherwise start a forged line) and cuts every message to `MAX_MESSAGE_CHARS`, so one bad
message costs a line, never 64 KB. `Throttle` keeps a chatty session to a few warnings.
"""

from __future__ import annotations

import logging
import time

MAX_MESSAGE_CHARS = 1000
_CONTROL = {c: f"\\x{c:02x}" for c in range(32) if c not in (9,)} | {10: "\\n", 13: "\\r", 127: "\\x7f"}


def escape(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line (control characters escaped, lone surrogates replaced), at most `limit` characters."""
    n = len(text)
    text = text[:limit].translate(_CONTROL).encode("utf-8", "replace").decode("utf-8")
    return f"{text}… ({n - limit} more characters)" if n > limit else text


class SafeFormatter(logging.Formatter):
    """Formats the message part escaped and bounded; tracebacks (our own text) stay as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def setup_logging(level: str, process: str | None = None) -> None:
    """One escaped, bounded format for the process; `process` names it in every line (`worker 1`)."""
    handler = logging.StreamHandler()
    tag = f"[{process}] " if process else ""
    handler.setFormatter(SafeFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))


class Throttle:
    """At most `burst` log lines per `per_s` seconds for one session; `allow` says whether to log,
    and the first line after a quiet spell says how many were left out."""

    def __init__(self, burst: int = 5, per_s: float = 60.0) -> None:
        self.burst = burst
        self.per_s = per_s
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= self.per_s:
            self._window, self._count = now, 0
        self._count += 1
        if self._count > self.burst:
            self.suppressed += 1
            return False
        return True

    def note(self) -> str:
        """A suffix for the next line logged: how many were left out before it (then reset)."""
        if not self.suppressed:
            return ""
        n, self.suppressed = self.suppressed, 0
        return f" ({n} similar lines left out)"
