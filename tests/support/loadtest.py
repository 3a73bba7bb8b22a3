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
            closed_1013 = x.outcome == "error" and (x.error or "").startswith("shed: connection closed with 1013")
            # an answer or an error message has a latency; a 1013 close, like every other outcome, has none
            assert (x.latency_ms is not None) == (x.outcome in ("ok", "error") and not closed_1013)
