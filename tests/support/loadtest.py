"""Checks shared by the load-test tests."""

from __future__ import annotations

from loadtest.report import LoadReport


def assert_consistent(report: LoadReport) -> None:
    for step in report.steps:
        s = step.stats
        assert s.consistent(), s
        assert s.answered + s.missing + s.errors + s.disconnected + s.sent == s.utterances == len(step.samples)
        assert s.latency.count == s.answered
        assert s.counters.client_errors == 0, s.client_error_messages
        assert s.counters.cancelled == 0
        assert s.hello.count == s.counters.connects
        assert s.lateness.count == step.lateness.total > 0 or s.counters.connects == 0
        for x in step.samples:
            if x.outcome != "error":  # an error has a latency when a message said it, none when a 1013 close did
                assert (x.latency_ms is not None) == (x.outcome == "ok")
