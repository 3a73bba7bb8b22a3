"""`benchmarks.recognizer`'s concurrency part: bursts interleaved across recognisers, rates over the rounds."""

from __future__ import annotations

import numpy as np

from benchmarks.recognizer import Bursts, Entry, time_bursts


def test_bursts_alternate_recognisers_round_by_round_and_level_by_level():
    calls: list[tuple[str, int]] = []
    clips = [np.zeros(160, np.float32), np.ones(160, np.float32)]

    def recogniser(name: str) -> Entry:
        return Entry(name, lambda audio: calls.append((name, len(calls))) or name)

    live = [(recogniser("a"), None), (recogniser("b"), None)]
    results = time_bursts(live, clips, levels=[1, 3], rounds=2)
    # every burst of one recogniser ends before the next recogniser's starts: a, b at 1; a, b at 3; again
    names = [name for name, _ in calls]
    assert names == (["a"] + ["b"] + ["a"] * 3 + ["b"] * 3) * 2
    for key in [("a", 1), ("b", 1), ("a", 3), ("b", 3)]:
        assert len(results[key].wall_s) == 2
    assert len(results["a", 3].latency_ms) == 6


def test_a_rate_counts_every_round():
    b = Bursts(latency_ms=[1.0] * 4, wall_s=[0.5, 1.5])
    assert b.rate(2) == 2.0  # 4 utterances in 2 s
