"""The load-test harness against the project's own server on loopback, with the tiny models."""

from __future__ import annotations

import pytest

from loadtest.clips import load_clip
from loadtest.run import LoadOptions, run_load
from tests.support.audio import AUDIO, needs_audio
from tests.support.loadtest import assert_consistent

pytestmark = pytest.mark.slow  # a load-test step against the server


@needs_audio
async def test_harness_against_our_server_reports_consistent_numbers(server, tmp_path):
    clips = tuple(load_clip(p) for p in sorted(AUDIO.glob("*_tts_living_room_light_wyoming.wav")))
    silence = server.config.vad.min_silence_ms
    opts = LoadOptions(
        url=server.endpoints.device_url,
        clients=(3,),
        duration_s=8.0,
        think_ms=(200.0, 500.0),
        stagger_s=0.5,
        reply_timeout_s=8.0,
        server_silence_ms=float(silence),
        metrics_url=f"{server.endpoints.http_url}/metrics",
    )
    report = await run_load(opts, clips)
    assert_consistent(report)
    (step,) = report.steps
    s = step.stats
    assert s.utterances >= 3 and s.answered >= 1
    assert s.answered + s.missing + s.errors + s.disconnected + s.sent == s.utterances
    lat = s.latency
    assert lat.p50 <= lat.p90 <= lat.p95 <= lat.p99 <= lat.max
    # the server cannot answer before it has heard its end-of-speech silence... nearly: the harness's
    # speech-end estimate may sit up to a frame or two before the VAD's
    assert lat.p50 >= silence - 250
    ok = [x for x in step.samples if x.outcome == "ok"]
    assert all(x.text for x in ok)
    assert s.server_rss_peak_mb is not None and s.server_rss_peak_mb > 0
