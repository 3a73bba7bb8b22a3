"""When the audio a device streams was spoken, from when its frames arrive.

A device streams in real time, so a frame cannot arrive before its audio was spoken: the audio
that reached the server with the least delay pins the device's clock, and every later frame is
at least as late as the audio it carries is long. When the server reads slower than the device
sends (a saturated event loop, frames waiting in the socket), the frames come in bursts, and
the difference between their arrival and their spoken time is the input lag, which no clock
started at arrival can see: a reply that reads 0.5 s after the endpoint was 5 s after the user
stopped talking. Latency and admission read `spoken` instead of the arrival.

The estimate only errs on the safe side (lag is never invented):
- a pause in the stream (the device stopped sending: a turn ended, Wi-Fi dropped for a while)
  restarts the clock at the next frame's arrival, since it says nothing of lag;
- the spoken clock may run `drift` fast, so a device crystal slower than the server's never
  accumulates into phantom lag over an hour of streaming;
- a device that sends faster than real time (a buffered wake word, a file pushed at once) never
  makes its audio look spoken after it arrived.
"""

from __future__ import annotations


class InputClock:
    """The spoken time of a stream's latest audio (server clock, `time.perf_counter` seconds)."""

    def __init__(self, max_gap_s: float = 1.0, drift: float = 0.001) -> None:
        self.max_gap_s = max_gap_s
        self.drift = drift
        self.spoken: float | None = None
        """When the end of the latest audio was spoken; None before the first frame."""
        self._arrived = 0.0
        self._lag = 0.0

    def note(self, arrived: float, seconds: float) -> float:
        """A frame of `seconds` of audio arrived at `arrived`: returns when its end was spoken."""
        if self.spoken is None or arrived - self._arrived > self.max_gap_s:
            self.spoken = arrived  # a (re)start: nothing to compare with
        else:
            self.spoken = min(arrived, self.spoken + seconds * (1 + self.drift))
        self._arrived = arrived
        self._lag = arrived - self.spoken
        return self.spoken

    def held(self, now: float) -> None:
        """The reader was held up until `now` by the server itself (backpressure), not by the
        device: the silence before the next frame is no pause of the stream."""
        self._arrived = max(self._arrived, now)

    @property
    def lag(self) -> float:
        """Seconds between the latest frame's arrival and its spoken end (0 before any)."""
        return self._lag

    def reset(self) -> None:
        """The stream starts over (`listen start`): the device may have paused."""
        self.spoken = None
        self._lag = 0.0
