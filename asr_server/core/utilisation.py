"""How much of an engine's throughput the load asks for: a leading signal for admission.

The lateness of the replies shows that the recogniser is past its capacity only once utterances
came late, and the wait at its queue only once a backlog formed. Both say nothing while it
still keeps up, so a slow start that doubles the devices on "keeping up" went from 32 to 64 on a
box that answers 30-35 (full-size SenseVoice on 2 cores): the first seconds of the wave were
answered at p95 1.7 s, and shedding in 10 % steps took 5 s to get back. The recogniser's load,
the share of its lanes' time the work of the last seconds took plus what waits for them, rises
in proportion to the devices long before any reply is late, so admission can let in what the
remaining share holds (as BBR paces by the bottleneck's measured rate instead of waiting for loss).

`load` can pass 1: the backlog is counted at the cost per unit of size measured meanwhile, so
an engine that fell behind reads how far behind it is, not merely busy.
"""

from __future__ import annotations

from collections import deque


class Utilisation:
    """The busy intervals of an engine's lanes, and the load they show over a recent window."""

    def __init__(self, lanes: int, window_s: float = 5.0) -> None:
        self.lanes = lanes
        self.window_s = window_s
        self._done: deque[tuple[float, float, float]] = deque()  # (start, end, size computed)
        self._running: dict[int, float] = {}  # lane -> when its call started

    def started(self, lane: int, at: float) -> None:
        self._running[lane] = at

    def started_at(self, lane: int, default: float) -> float:
        """When lane `lane`'s running call started (`default` if none runs)."""
        return self._running.get(lane, default)

    def finished(self, lane: int, at: float, size: float) -> None:
        """Lane `lane`'s call ended at `at`, having computed items of total `size`."""
        start = self._running.pop(lane, at)
        self._done.append((start, at, size))
        while self._done and self._done[0][1] < at - self.window_s:
            self._done.popleft()

    def call_load(self) -> float | None:
        """The load one more call adds: the kept calls' mean compute (the last window's, as of the
        last call to finish: a measurement stays until newer calls replace it, so the start-up
        warm-up's answers until the first clients') as a share of the lanes' window. None before
        any call finished."""
        if not self._done:
            return None
        return sum(end - start for start, end, _ in self._done) / len(self._done) / (self.lanes * self.window_s)

    def cost_per_size(self, now: float) -> float | None:
        """Seconds of one lane per unit of size over the calls that ended in the last `window_s`;
        None if none did."""
        recent = [(start, end, n) for start, end, n in self._done if end >= now - self.window_s]
        busy = sum(end - start for start, end, _ in recent)
        size = sum(n for _, _, n in recent)
        return busy / size if size > 0 and busy > 0 else None

    def load(self, now: float, waiting_size: float = 0.0) -> float:
        """The share of the lanes' time over the last `window_s` that the work took (calls still
        running count up to `now`), plus the work waiting (`waiting_size`, at the cost per unit of
        size measured in the window) as a share of the same time. 0 for an idle engine."""
        lo = now - self.window_s
        busy = size = 0.0
        for start, end, n in self._done:
            if end > lo:
                overlap = end - max(start, lo)
                busy += overlap
                size += n * overlap / (end - start) if end > start else n
        busy += sum(now - max(start, lo) for start in self._running.values())
        backlog = waiting_size * busy / size if size > 0 else 0.0
        return (busy + backlog) / (self.lanes * self.window_s)
