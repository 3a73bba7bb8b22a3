"""16 kHz mono float32 from whatever rate a source has, streamed in blocks (soxr).

`Resampler` serves file decoding (blocks of decoded float audio, with a cap on the output length
so a small file cannot unpack to hours); `PcmResampler` serves sockets that send raw PCM16 in
pieces (FunASR's protocol, at the client's `audio_fs`).
"""

from __future__ import annotations

import numpy as np
import soxr

from ..constants import SAMPLE_RATE
from ..errors import AudioTooLongError, PcmFormatError


class Resampler:
    """Mono float32 blocks at `rate` in, 16 kHz out, with the output length capped."""

    def __init__(self, rate: int, max_samples: int | None) -> None:
        self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32") if rate != SAMPLE_RATE else None
        self._max = max_samples
        self._blocks: list[np.ndarray] = []
        self._n = 0

    def push(self, mono: np.ndarray, last: bool = False) -> None:
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        # soxr may hand back a view of its own buffer, which the next call overwrites: copy.
        out = np.array(self._stream.resample_chunk(mono, last=last)) if self._stream is not None else mono
        if len(out):
            self._blocks.append(out)
            self._n += len(out)
        if self._max is not None and self._n > self._max:
            raise AudioTooLongError(f"audio is longer than the allowed {self._max / SAMPLE_RATE:.0f} s")

    def result(self) -> np.ndarray:
        if not self._blocks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._blocks)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit mono PCM to float32 in [-1, 1)."""
    if len(data) % 2:
        raise PcmFormatError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] to little-endian PCM16 (clipped)."""
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()


class PcmResampler:
    """Streaming PCM16 at any rate to 16 kHz float32, for sockets that send raw audio in pieces."""

    def __init__(self, rate: int) -> None:
        if not 4000 <= rate <= 192000:
            raise PcmFormatError(f"sample rate {rate} Hz is outside 4000..192000")
        self.rate = rate
        self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32") if rate != SAMPLE_RATE else None

    def push(self, data: bytes, last: bool = False) -> np.ndarray:
        pcm = pcm16_to_float(data)
        if self._stream is None:
            return pcm
        return np.array(self._stream.resample_chunk(pcm, last=last))
