"""Audio files and raw PCM in, 16 kHz mono float32 out.

Uploads arrive in whatever container the client had (wav, flac, mp3, ogg/opus, webm, m4a...).
libsndfile (`soundfile`) reads the uncompressed and lossless ones (wav, flac, aiff); everything
else goes to FFmpeg through PyAV, whose wheel carries the codecs. Both paths stream the
decoded audio through one soxr resampler in blocks, so memory follows the 16 kHz output, not
the source rate, and a limit on the decoded duration stops a small file that unpacks to hours.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soxr

from asr_server.audio.vad import SAMPLE_RATE

_BLOCK = 1 << 14  # source frames per block read from soundfile
# Compressed formats that libsndfile 1.2 reads but FFmpeg reads better: its Ogg/Opus decoder
# returns wrong samples for reads above ~64k frames, and FFmpeg is the reference for both.
_FFMPEG_FIRST = {"OGG", "MP3"}


class AudioDecodeError(ValueError):
    """The bytes are not audio that either decoder can read."""


class EmptyAudioError(AudioDecodeError):
    """The input holds no samples (an empty file, or a container with no audio in it)."""


class AudioTooLongError(AudioDecodeError):
    """The decoded audio is longer than the caller allows."""


class PcmFormatError(AudioDecodeError):
    """Raw PCM16 whose byte count is not a whole number of samples."""


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    """Decoded audio at 16 kHz mono, and what the source was."""

    samples: np.ndarray  # float32 in [-1, 1]
    source_rate: int
    source_channels: int
    decoder: str  # "soundfile" or "pyav"
    format: str  # container/format name as the decoder reports it

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


class _Resampler:
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


def _to_mono(block: np.ndarray) -> np.ndarray:
    """(frames, channels) or (frames,) float -> (frames,) by averaging channels."""
    return block if block.ndim == 1 else block.mean(axis=1, dtype=np.float32)


def _max_samples(max_duration_s: float | None) -> int | None:
    return None if max_duration_s is None else int(max_duration_s * SAMPLE_RATE)


def _decode_soundfile(data: bytes, max_duration_s: float | None) -> DecodedAudio | None:
    """libsndfile's decode, or None when it does not recognise the bytes."""
    import soundfile as sf

    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None
    with f:
        rate, channels, fmt = f.samplerate, f.channels, f.format
        if rate <= 0 or fmt in _FFMPEG_FIRST:
            return None
        if max_duration_s is not None and f.frames > 0 and f.frames / rate > max_duration_s + 1:
            raise AudioTooLongError(f"audio is {f.frames / rate:.0f} s long, more than the allowed "
                                    f"{max_duration_s:.0f} s")
        res = _Resampler(rate, _max_samples(max_duration_s))
        try:
            while True:
                block = f.read(_BLOCK, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                res.push(_to_mono(block))
        except sf.LibsndfileError as e:
            raise AudioDecodeError(f"the {fmt} file is damaged: {e}") from None
        res.push(np.zeros(0, np.float32), last=True)
    return DecodedAudio(res.result(), rate, channels, "soundfile", fmt.lower())


def _decode_pyav(data: bytes, max_duration_s: float | None) -> DecodedAudio:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise AudioDecodeError(f"not an audio file that can be decoded ({_reason(e)})") from None
    with container:
        fmt = container.format.name
        if not container.streams.audio:
            raise AudioDecodeError(f"not audio: the file ({fmt}) holds no audio stream")
        stream = container.streams.audio[0]
        # Convert sample format only (planar float), keeping rate and channels; soxr resamples.
        converter = av.AudioResampler(format="fltp")
        res: _Resampler | None = None
        rate = channels = 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    if res is None:
                        rate, channels = frame.sample_rate, len(frame.layout.channels)
                        res = _Resampler(rate, _max_samples(max_duration_s))
                    for out in converter.resample(frame):
                        res.push(out.to_ndarray().mean(axis=0, dtype=np.float32))
        except av.FFmpegError as e:
            if res is None:
                raise AudioDecodeError(f"not an audio file that can be decoded ({_reason(e)})") from None
            # A truncated tail: keep what decoded, as players do.
        if res is None:
            raise EmptyAudioError("the file holds no decodable audio")
        res.push(np.zeros(0, np.float32), last=True)
    return DecodedAudio(res.result(), rate, channels, "pyav", fmt)


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def decode_audio(data: bytes, max_duration_s: float | None = None) -> DecodedAudio:
    """Decode a whole audio file held in memory to 16 kHz mono float32.

    Raises `EmptyAudioError` for no bytes or no samples, `AudioTooLongError` beyond
    `max_duration_s`, `AudioDecodeError` for anything that is not audio. Blocking: call it in a
    worker thread from async code.
    """
    if not data:
        raise EmptyAudioError("the file is empty (0 bytes)")
    decoded = _decode_soundfile(data, max_duration_s)
    if decoded is None:
        decoded = _decode_pyav(data, max_duration_s)
    if len(decoded.samples) == 0:
        raise EmptyAudioError("the file holds no audio samples")
    return decoded


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
