"""Decoding uploads: every common container and rate comes out as the same 16 kHz mono signal."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from asr_server.audio.io import decode_audio
from asr_server.audio.resample import PcmResampler, float_to_pcm16, pcm16_to_float
from asr_server.errors import AudioDecodeError, AudioFormatError, AudioTooLongError, EmptyAudioError, PcmFormatError
from tests.support.audio import AUDIO, encode, needs_audio

ZH = AUDIO / "zh_aishell_BAC009S0724W0121_wenet.wav"


def similarity(decoded: np.ndarray, ref: np.ndarray) -> float:
    """Peak normalised cross-correlation (codecs add a little delay and noise)."""
    n = min(len(decoded), len(ref))
    a, b = decoded[:n], ref[:n]
    c = np.correlate(a, b, "full")
    return float(c.max() / np.sqrt(np.dot(a, a) * np.dot(b, b)))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    if not ZH.is_file():
        pytest.skip("../shared/audio absent")
    x, sr = sf.read(ZH, dtype="float32")
    assert sr == 16000
    return x


@needs_audio
@pytest.mark.parametrize(
    "container,codec,rate,channels,decoder",
    [
        ("wav", "pcm_s16le", 16000, 1, "soundfile"),
        ("wav", "pcm_s16le", 8000, 1, "soundfile"),
        ("wav", "pcm_s16le", 44100, 2, "soundfile"),
        ("flac", "flac", 48000, 2, "soundfile"),
        ("mp3", "libmp3lame", 44100, 2, "pyav"),
        ("ogg", "libopus", 48000, 1, "pyav"),
        ("webm", "libopus", 48000, 2, "pyav"),
        ("mp4", "aac", 16000, 1, "pyav"),  # .m4a
    ],
)
def test_containers_and_rates_decode_to_16k_mono(speech, container, codec, rate, channels, decoder):
    d = decode_audio(encode(speech, rate, container, codec, channels))
    assert d.decoder == decoder
    assert d.source_rate == rate and d.source_channels == channels
    assert d.samples.dtype == np.float32 and d.samples.ndim == 1
    assert abs(d.duration_s - len(speech) / 16000) < 0.1
    assert similarity(d.samples, speech) > 0.9


@needs_audio
def test_real_clip_flac_44k_stereo():
    d = decode_audio((AUDIO / "en_jfk_whisper.flac").read_bytes())
    assert (d.source_rate, d.source_channels) == (44100, 2)
    assert abs(d.duration_s - 11.0) < 0.01


@pytest.mark.parametrize(
    "data", [b"this is plain text, not audio" * 20, b'{"mode": "offline"}', b"\x00" * 4000, bytes(range(256)) * 20]
)
def test_not_audio_is_a_named_error(data):
    with pytest.raises(AudioDecodeError, match="not"):
        decode_audio(data)


def test_image_is_not_audio():
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="image2pipe") as out:
        s = out.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 8, 8, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
        for p in [*s.encode(frame), *s.encode(None)]:
            out.mux(p)
    with pytest.raises(AudioDecodeError, match="no audio stream"):
        decode_audio(buf.getvalue())


def test_empty_inputs():
    with pytest.raises(EmptyAudioError, match="0 bytes"):
        decode_audio(b"")
    header_only = io.BytesIO()
    sf.write(header_only, np.zeros(0, np.float32), 16000, format="WAV")
    with pytest.raises(EmptyAudioError, match="no audio samples"):
        decode_audio(header_only.getvalue())


def test_duration_limit_stops_decoding():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 5, np.float32), 16000, format="FLAC")
    with pytest.raises(AudioTooLongError, match="allowed 2 s"):
        decode_audio(buf.getvalue(), max_duration_s=2)
    tone = 0.1 * np.sin(np.arange(16000 * 5) / 16000 * 2 * np.pi * 440).astype(np.float32)
    with pytest.raises(AudioTooLongError):
        decode_audio(encode(tone, 16000, "mp3", "libmp3lame"), max_duration_s=2)
    assert decode_audio(buf.getvalue(), max_duration_s=10).duration_s == 5.0


def test_pcm16_roundtrip_and_odd_length():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0], np.float32)
    y = pcm16_to_float(float_to_pcm16(x))
    assert np.allclose(x, y, atol=1 / 32768)
    with pytest.raises(PcmFormatError, match="even number of bytes, got 3"):
        pcm16_to_float(b"\x00\x01\x02")


def test_pcm_resampler_streams_8k_to_16k():
    t = np.arange(8000) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    pcm = float_to_pcm16(tone)
    r = PcmResampler(8000)
    out = np.concatenate([r.push(pcm[i : i + 640]) for i in range(0, len(pcm), 640)] + [r.push(b"", last=True)])
    assert abs(len(out) - 16000) <= 2
    ref = (0.3 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)).astype(np.float32)
    assert similarity(out, ref) > 0.99
    assert PcmResampler(16000).push(pcm).shape == (8000,)
    with pytest.raises(PcmFormatError, match="sample rate"):
        PcmResampler(1000)


@pytest.mark.parametrize(
    "kind,channels", [("ogg", 6), ("ogg", 8), ("ogg", 16), ("wav-s64", 8), ("wav-f64", 8), ("wav-f64", 16)]
)
def test_many_channels_are_downmixed_to_one(kind, channels):
    """17ee092 segfaulted on 8 and 16 channels through FFmpeg (PyAV miscounts 7.1's planes)."""
    from tests.test_audio_decode_pool import soundfile_bytes, tones, wav_s64

    x = tones(16000, channels)
    data = {
        "ogg": lambda: soundfile_bytes(x, 16000, "OGG", "VORBIS"),
        "wav-s64": lambda: wav_s64(x, 16000),
        "wav-f64": lambda: soundfile_bytes(x, 16000, "WAV", "DOUBLE"),
    }[kind]()
    d = decode_audio(data)
    assert d.source_channels == channels and d.samples.ndim == 1
    assert abs(d.duration_s - 1.0) < 0.02
    # the channels mixed as `ffmpeg -ac 1` mixes them (by layout: 5.1 and 7.1 weigh the centre, drop the LFE)
    assert similarity(d.samples, x.mean(axis=1)) > 0.8
    assert np.abs(d.samples).max() <= 1.0


def test_a_float_sample_beyond_full_scale_is_clipped_not_overflowed():
    """A finite 3e38 passed the NaN check and overflowed the features to NaN (a 500); it plays clipped."""
    x = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    x[8000] = 3e38
    x[9000] = -1e20
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], 1), 44100, format="WAV", subtype="FLOAT")  # downmixed and resampled too
    d = decode_audio(buf.getvalue())
    assert np.isfinite(d.samples).all() and np.abs(d.samples).max() < 1.1  # soxr's ringing at the clip
    assert similarity(d.samples, soxr.resample(np.clip(x, -1, 1), 44100, 16000)) > 0.99


@pytest.mark.parametrize(
    "channels,rate,message",
    [(33, 16000, "33 channels; at most 32"), (1, 500, "500 Hz; 1000..384000"), (1, 768000, "768000 Hz")],
)
def test_absurd_headers_are_refused_before_decoding(channels, rate, message):
    buf = io.BytesIO()
    sf.write(buf, np.zeros((rate // 10, channels), np.float32), rate, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioFormatError, match=message):
        decode_audio(buf.getvalue())


def test_a_flac_written_as_a_stream_without_its_length_decodes():
    """libsndfile reads no length as 2**63 - 1 frames (17ee092: 413 'audio is 1152921504606847 s
    long') and fails at the end; FFmpeg decodes it, up to the duration limit."""
    from tests.test_audio_decode_pool import flac_bomb

    assert decode_audio(flac_bomb(30)).duration_s == 30.0
    with pytest.raises(AudioTooLongError, match="allowed 20 s"):
        decode_audio(flac_bomb(30), max_duration_s=20)
