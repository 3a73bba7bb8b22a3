"""The per-stream Opus decoder: libopus's samples exactly, any legal frame duration, a named error."""

from __future__ import annotations

import numpy as np
import opuslib
import pytest

from asr_server.audio.opus import OpusStreamDecoder
from asr_server.errors import OpusDecodeError


def _tone(rate: int, ms: int) -> np.ndarray:
    n = rate * ms // 1000
    return (np.sin(np.arange(n) * 2 * np.pi * 440 / rate) * 8000).astype(np.int16)


@pytest.mark.parametrize("ms", [20, 60, 120])
def test_decodes_to_the_samples_libopus_gives_for_every_frame_duration(ms):
    enc = opuslib.Encoder(16000, 1, opuslib.APPLICATION_VOIP)
    ours, reference = OpusStreamDecoder(), opuslib.Decoder(16000, 1)
    pcm = _tone(16000, ms * 5)
    step = 16000 * ms // 1000
    for i in range(0, len(pcm), step):
        packet = enc.encode(pcm[i : i + step].tobytes(), step)
        want = np.frombuffer(reference.decode(packet, step), dtype=np.int16).astype(np.float32) / 32768.0
        got = ours.decode(packet)
        assert got.dtype == np.float32 and np.array_equal(got, want)


def test_a_decoder_at_48_khz_takes_the_longest_packet():
    enc = opuslib.Encoder(48000, 1, opuslib.APPLICATION_VOIP)
    packet = enc.encode(_tone(48000, 120).tobytes(), 5760)
    assert OpusStreamDecoder(48000).decode(packet).shape == (5760,)


def test_a_corrupt_packet_is_a_named_error_and_the_stream_goes_on():
    enc = opuslib.Encoder(16000, 1, opuslib.APPLICATION_VOIP)
    dec = OpusStreamDecoder()
    with pytest.raises(OpusDecodeError, match=r"corrupt Opus packet \(3 bytes\)"):
        dec.decode(b"\xff\xff\xff")
    assert dec.decode(enc.encode(_tone(16000, 60).tobytes(), 960)).shape == (960,)
