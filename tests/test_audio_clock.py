"""The input clock: when a streamed frame's audio was spoken, lag included, never invented."""

from __future__ import annotations

import pytest

from asr_server.audio.clock import InputClock

FRAME = 0.06


def stream(clock: InputClock, arrivals: list[float]) -> list[float]:
    """The lag of each 60 ms frame arriving at `arrivals`."""
    lags = []
    for t in arrivals:
        clock.note(t, FRAME)
        lags.append(clock.lag)
    return lags


def test_a_real_time_stream_has_no_lag_and_its_audio_was_spoken_as_it_arrived():
    clock = InputClock()
    lags = stream(clock, [10 + i * FRAME for i in range(100)])
    assert max(lags) == pytest.approx(0.0, abs=1e-9)
    assert clock.spoken == pytest.approx(10 + 99 * FRAME)


def test_a_reader_at_half_speed_sees_the_lag_grow_by_the_audio_it_has_not_read():
    clock = InputClock()
    lags = stream(clock, [i * 2 * FRAME for i in range(50)])  # 60 ms of audio read every 120 ms
    assert lags[-1] == pytest.approx(49 * FRAME, rel=0.01)  # lag grows by one frame per frame read
    assert clock.spoken == pytest.approx(49 * 2 * FRAME - lags[-1])


def test_a_backlog_read_at_once_is_lag_that_drains_as_the_reader_catches_up():
    clock = InputClock()
    # 0.9 s of frames held (in a socket, or by Wi-Fi) arrive together at 1.5 s
    arrivals = [i * FRAME for i in range(10)] + [1.5] * 16 + [1.5 + i * FRAME for i in range(1, 10)]
    lags = stream(clock, arrivals)
    assert lags[10] == pytest.approx(0.9, abs=0.001)  # the first held frame waited longest
    assert lags[25] == pytest.approx(0.0, abs=1e-6) and max(lags[26:]) == pytest.approx(0.0, abs=1e-6)


def test_a_pause_in_the_stream_is_no_lag():
    clock = InputClock(max_gap_s=1.0)
    stream(clock, [i * FRAME for i in range(10)])
    lags = stream(clock, [5 + i * FRAME for i in range(10)])  # the device stopped sending for 4.4 s
    assert max(lags) == pytest.approx(0.0, abs=1e-9)


def test_a_wait_the_server_imposed_is_not_taken_for_a_pause():
    clock = InputClock(max_gap_s=1.0)
    stream(clock, [i * FRAME for i in range(10)])
    clock.held(2.0)  # the reader stopped reading (backpressure) until 2.0
    lags = stream(clock, [2.0] * 5)  # the frames that waited in the socket meanwhile
    assert lags[0] == pytest.approx(2.0 - 10 * FRAME, abs=0.01)


def test_a_slow_device_clock_and_a_fast_sender_invent_no_lag():
    slow = InputClock()
    lags = stream(slow, [i * FRAME * 1.0002 for i in range(60_000)])  # an hour, a crystal 200 ppm slow
    assert max(lags) < 0.001
    fast = InputClock()
    lags = stream(fast, [i * 0.001 for i in range(100)])  # a file pushed as fast as the socket goes
    assert max(lags) == 0.0 and fast.spoken == pytest.approx(0.099)


def test_reset_starts_the_clock_over():
    clock = InputClock()
    stream(clock, [i * 2 * FRAME for i in range(20)])
    assert clock.lag > 0.5
    clock.reset()
    assert clock.lag == 0.0 and clock.spoken is None
    assert stream(clock, [3.0]) == [0.0]
