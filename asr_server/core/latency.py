"""End-of-speech → reply latency over the last minutes, for the console's chart.

`/metrics` has the same latency as a cumulative histogram, whose buckets are too coarse for a
percentile (0.6 s to 0.8 s is one bucket) and which never forgets. This keeps the exact values
of the transcript events (every worker sees every worker's, so it is the whole server's) in
one bin per `bin_s`, each a uniform sample of at most `per_bin` values (reservoir sampling), so
memory stays bounded however busy the server is.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class _Bin:
    start: float
    seen: int = 0
    values: list[float] = field(default_factory=list)


class LatencyWindow:
    """Latencies (ms) of the last `bins` × `bin_s` seconds, by time bin."""

    def __init__(self, bin_s: float = 60.0, bins: int = 10, per_bin: int = 2000, seed: int = 0) -> None:
        self.bin_s = bin_s
        self.per_bin = per_bin
        self._bins: deque[_Bin] = deque(maxlen=bins)
        self._random = random.Random(seed)

    def add(self, latency_ms: float, at: float | None = None) -> None:
        at = time.time() if at is None else at
        start = at - at % self.bin_s
        if not self._bins or self._bins[-1].start < start:
            self._bins.append(_Bin(start))
        b = next((x for x in reversed(self._bins) if x.start == start), None)
        if b is None:  # older than the window (a late peer event): nothing to add it to
            return
        b.seen += 1
        if len(b.values) < self.per_bin:
            b.values.append(latency_ms)
        else:
            j = self._random.randrange(b.seen)
            if j < self.per_bin:
                b.values[j] = latency_ms

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Per bin and over the whole window: count, p50, p90, p99 (ms); bins older than the window
        are left out, empty bins are not invented."""
        now = time.time() if now is None else now
        horizon = now - self.bin_s * (self._bins.maxlen or 1)
        live = [b for b in self._bins if b.start > horizon]
        series = [{"start": b.start, "count": b.seen, **_percentiles(b.values)} for b in live]
        everything = [v for b in live for v in b.values]
        return {
            "bin_s": self.bin_s,
            "window_s": self.bin_s * (self._bins.maxlen or 1),
            "count": sum(b.seen for b in live),
            **_percentiles(everything),
            "series": series,
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1)}
