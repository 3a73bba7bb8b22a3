"""A device's Opus packets kept as they came, and muxed into an Ogg Opus file (no re-encoding).

`PacketLog` holds one stream's recent packets with where each begins in the samples pushed since
the stream's start (the same count the segmenter's `start_sample` uses), so an utterance's
sample range maps back to the packets that carried it. `mux_ogg_opus` writes them with PyAV's
Ogg muxer; the header is libopus's own (pre-skip 312 at 48 kHz: libopus's 6.5 ms lookahead, the
delay the device's libopus encoder put in front of the audio too).
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

from ..constants import SAMPLE_RATE

#: Ogg Opus granule positions count 48 kHz samples whatever rate the encoder ran at (RFC 7845).
_OGG_RATE = 48000
_TIME_BASE = Fraction(1, _OGG_RATE)


@dataclass(frozen=True, slots=True)
class OpusPacket:
    """One packet as the device sent it and the 16 kHz samples it decoded to."""

    data: bytes
    start: int
    """First sample, counted from the stream's start."""
    samples: int


class PacketLog:
    """A stream's packets of the last `keep_s` seconds of audio, by sample position."""

    def __init__(self, keep_s: float) -> None:
        self._keep = int(keep_s * SAMPLE_RATE)
        self._packets: deque[OpusPacket] = deque()
        self.samples = 0
        """Samples logged since the stream's start."""

    def add(self, data: bytes, samples: int) -> None:
        self._packets.append(OpusPacket(data, self.samples, samples))
        self.samples += samples
        while self._packets and self._packets[0].start + self._packets[0].samples < self.samples - self._keep:
            self._packets.popleft()

    def reset(self) -> None:
        """A new stream (its sample count starts again at 0)."""
        self._packets.clear()
        self.samples = 0

    def between(self, start: int, end: int) -> list[OpusPacket]:
        """The packets that carry any of samples [start, end)."""
        return [p for p in self._packets if p.start < end and p.start + p.samples > start]


def mux_ogg_opus(packets: list[OpusPacket]) -> bytes:
    """The packets in an Ogg Opus file, each with its own duration (devices may change frame size)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=_OGG_RATE)
        stream.codec_context.layout = "mono"
        stream.time_base = _TIME_BASE
        pts = 0
        for p in packets:
            packet = av.Packet(p.data)
            packet.stream = stream
            packet.time_base = _TIME_BASE
            packet.pts = packet.dts = pts
            packet.duration = p.samples * _OGG_RATE // SAMPLE_RATE
            pts += packet.duration
            container.mux(packet)
    return out.getvalue()
