"""How many of the last seconds' replies missed the latency budget: the admission signal that
holds on any machine.

The queue's wait alone (`asr.admission_wait_ms`) says nothing about the compute: on a CPU three
times slower an utterance that waited 300 ms is already late, on a fast one it is not. The
replies' own end-of-speech → `stt` latency is what the budget is about, so admission watches it
too: while more than `asr.late_share` of the replies of the last `window_s` came after
`asr.budget_ms` (a shed utterance counts as late), the server is behind; new devices meet the 503
and the learned device cap drops. The cap grows back only while nearly none is late, so it does
not climb straight back over the edge it just found.

A round of shedding is judged on what came after the last (`ShedRound`): replies to utterances
whose speech ended since, and a queue wait that grew since. The replies of the seconds before a
round say nothing of its effect, and a wait that is draining needs no second round: judged on
them, three rounds of 10 % came a second apart and took 30 devices to 21 on a box that holds 27.

Where replies come slowly (a few devices on a slow CPU answer less than one a second, so 5 s held
too few to count and admission never saw them late), the window reaches back over the last
`min_replies`, up to `max_age_s`: at least 10, and enough that one late reply alone is not more
than `late_share` of them (20 at 0.05), so a single slow utterance never means behind.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from ..config import AsrConfig


@dataclass(frozen=True, slots=True)
class ShedRound:
    """When the last round of shedding was (`time.monotonic`) and how long the recogniser's next
    job had waited then: the next round needs evidence from after it."""

    at: float
    wait_s: float


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
        self._replies: deque[tuple[float, bool, float]] = deque()  # (noted, late, when the speech ended)
        self._late = 0

    @classmethod
    def of(cls, asr: AsrConfig) -> LateReplies:
        """The window `asr.budget_ms` and `asr.late_share` describe."""
        return cls(asr.budget_ms, late_share=asr.late_share)

    def add(self, latency_ms: float | None, now: float | None = None, age_ms: float | None = None) -> None:
        """One reply's latency from the end of speech; None: the utterance got no answer (shed),
        `age_ms` after its speech ended (unknown: now)."""
        late = latency_ms is None or latency_ms > self.budget_ms
        now = time.monotonic() if now is None else now
        age = latency_ms if latency_ms is not None else age_ms or 0.0
        self._replies.append((now, late, now - age / 1000))
        self._late += late
        self._trim(now)

    def share(self, now: float | None = None, since: float | None = None) -> tuple[float, int] | None:
        """The late share and the count of the window's replies (with `since`, only those to
        utterances whose speech ended after it); None while fewer than `min_replies` came (too few
        to tell a trend from one long utterance)."""
        self._trim(now)
        if since is None:
            n, late = len(self._replies), self._late
        else:
            after = [r[1] for r in self._replies if r[2] >= since]
            n, late = len(after), sum(after)
        return None if n < self.min_replies else (late / n, n)

    def _trim(self, now: float | None) -> None:
        now = time.monotonic() if now is None else now
        while self._replies and (
            self._replies[0][0] < now - self.max_age_s
            or (self._replies[0][0] < now - self.window_s and len(self._replies) > self.min_replies)
        ):
            self._late -= self._replies.popleft()[1]
