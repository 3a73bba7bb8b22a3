"""How many of the last seconds' replies missed the latency budget: the admission signal that
holds on any machine.

The queue's wait alone (`asr.admission_wait_ms`) says nothing about the compute: on a CPU three
times slower an utterance that waited 300 ms is already late, on a fast one it is not. The
replies' own end-of-speech → `stt` latency is what the budget is about, so admission watches it
too: while more than `asr.late_share` of the replies of the last `window_s` came after
`asr.budget_ms` (a shed utterance counts as late), the server is behind; new devices meet the 503
and the learned device cap drops. The cap grows back only while nearly none is late, so it does
not climb straight back over the edge it just found.

Where replies come slowly (a few devices on a slow CPU answer less than one a second, so 5 s held
too few to count and admission never saw them late), the window reaches back over the last
`min_replies`, up to `max_age_s`: at least 10, and enough that one late reply alone is not more
than `late_share` of them (20 at 0.05), so a single slow utterance never means behind.
"""

from __future__ import annotations

import math
import time
from collections import deque

from ..config import AsrConfig


class LateReplies:
    """The replies of the last `window_s` seconds (or the last `min_replies` of the last `max_age_s`,
    if more) and whether each missed `budget_ms`."""

    def __init__(
        self,
        budget_ms: float,
        window_s: float = 5.0,
        min_replies: int | None = None,
        max_age_s: float = 30.0,
        late_share: float = 0.1,
    ) -> None:
        self.budget_ms = budget_ms
        self.window_s = window_s
        self.min_replies = max(10, math.ceil(1 / late_share - 1e-9)) if min_replies is None else min_replies
        self.max_age_s = max_age_s
        self._replies: deque[tuple[float, bool]] = deque()
        self._late = 0
        self.added = 0  # replies ever noted: whoever acts on the share can tell whether new ones came since

    @classmethod
    def of(cls, asr: AsrConfig) -> LateReplies:
        """The window `asr.budget_ms` and `asr.late_share` describe."""
        return cls(asr.budget_ms, late_share=asr.late_share)

    def add(self, latency_ms: float | None, now: float | None = None) -> None:
        """One reply's latency from the end of speech; None: the utterance got no answer (shed)."""
        late = latency_ms is None or latency_ms > self.budget_ms
        self._replies.append((time.monotonic() if now is None else now, late))
        self._late += late
        self.added += 1
        self._trim(now)

    def share(self, now: float | None = None) -> tuple[float, int] | None:
        """The late share and the count of the window's replies; None while fewer than `min_replies`
        came (too few to tell a trend from one long utterance)."""
        self._trim(now)
        n = len(self._replies)
        return None if n < self.min_replies else (self._late / n, n)

    def _trim(self, now: float | None) -> None:
        now = time.monotonic() if now is None else now
        while self._replies and (
            self._replies[0][0] < now - self.max_age_s
            or (self._replies[0][0] < now - self.window_s and len(self._replies) > self.min_replies)
        ):
            self._late -= self._replies.popleft()[1]
