"""Percentiles of samples and a mergeable histogram for frame send lateness.

Latencies are few (one per utterance) and kept whole; frame lateness is one number per 60 ms per
client (a million in a minute at 1,000 clients), so it is counted in 0.1 ms buckets that the
processes of a run add together.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

QUANTILES = (50.0, 90.0, 95.0, 99.0)


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p90/p95/p99/max of a set of samples in milliseconds; all None when it is empty."""

    count: int
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    max: float | None
    mean: float | None

    def ordered(self) -> bool:
        """p50 <= p90 <= p95 <= p99 <= max (vacuously true when empty)."""
        vals = [self.p50, self.p90, self.p95, self.p99, self.max]
        if any(v is None for v in vals):
            return all(v is None for v in vals)
        return all(a <= b for a, b in zip(vals, vals[1:]))  # type: ignore[operator]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (always one of the samples, so p99 of 10 samples is the max)."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summarize(values: Iterable[float]) -> Percentiles:
    vals = sorted(values)
    if not vals:
        return Percentiles(0, None, None, None, None, None, None)
    p = [percentile(vals, q) for q in QUANTILES]
    return Percentiles(len(vals), p[0], p[1], p[2], p[3], float(vals[-1]), float(sum(vals) / len(vals)))


class Histogram:
    """Counts of millisecond values in 0.1 ms buckets; values below zero count as zero."""

    RESOLUTION_MS = 0.1

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: Counter[int] = Counter(counts or {})
        self.max_ms = max((k * self.RESOLUTION_MS for k in self.counts), default=0.0)

    def add(self, ms: float) -> None:
        key = int(ms / self.RESOLUTION_MS) if ms > 0 else 0
        self.counts[key] += 1
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.max_ms = max(self.max_ms, other.max_ms)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the nearest-rank q-th percentile."""
        total = self.total
        if total == 0:
            raise ValueError("quantile of an empty histogram")
        rank = max(1, math.ceil(q / 100.0 * total))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return min((key + 1) * self.RESOLUTION_MS, max(self.max_ms, key * self.RESOLUTION_MS))
        return self.max_ms

    def summary(self) -> Percentiles:
        total = self.total
        if total == 0:
            return Percentiles(0, None, None, None, None, None, None)
        p = [self.quantile(q) for q in QUANTILES]
        mean = sum((k + 0.5) * self.RESOLUTION_MS * c for k, c in self.counts.items()) / total
        return Percentiles(total, p[0], p[1], p[2], p[3], max(self.max_ms, p[3]), mean)

    def to_dict(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.counts.items())}
