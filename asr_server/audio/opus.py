"""Opus decoding for one device stream: any legal frame duration in, 16 kHz mono float32 out."""

from __future__ import annotations

import numpy as np
import opuslib

from ..constants import SAMPLE_RATE
from ..errors import OpusDecodeError

_MAX_FRAME = SAMPLE_RATE * 120 // 1000  # the longest Opus packet, 120 ms


class OpusStreamDecoder:
    """A per-session decoder: Opus keeps state between packets, so streams never share one.

    libopus resamples internally, so a device encoding at another rate still decodes to 16 kHz.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._decoder = opuslib.Decoder(sample_rate, 1)

    def decode(self, packet: bytes) -> np.ndarray:
        try:
            pcm = self._decoder.decode(packet, _MAX_FRAME)
        except opuslib.OpusError as e:
            raise OpusDecodeError(f"corrupt Opus packet ({len(packet)} bytes): {e}") from None
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
