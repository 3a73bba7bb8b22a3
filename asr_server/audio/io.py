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

from ..constants import SAMPLE_RATE
from ..errors import AudioDecodeError, AudioTooLongError, EmptyAudioError
from .resample import Resampler

_BLOCK = 1 << 14  # source frames per block read from soundfile
# Compressed formats that libsndfile 1.2 reads but FFmpeg reads better: its Ogg/Opus decoder
# returns wrong samples for reads above ~64k frames, and FFmpeg is the reference for both.
_FFMPEG_FIRST = {"OGG", "MP3"}


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
            raise AudioTooLongError(
                f"audio is {f.frames / rate:.0f} s long, more than the allowed {max_duration_s:.0f} s"
            )
        res = Resampler(rate, _max_samples(max_duration_s))
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
        res: Resampler | None = None
        rate = channels = 0
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    if res is None:
                        rate, channels = frame.sample_rate, len(frame.layout.channels)
                        res = Resampler(rate, _max_samples(max_duration_s))
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
    `max_duration_s`, `AudioDecodeError` for anything that is not audio or holds NaN/infinity. Blocking: call it in a
    worker thread from async code.
    """
    if not data:
        raise EmptyAudioError("the file is empty (0 bytes)")
    decoded = _decode_soundfile(data, max_duration_s)
    if decoded is None:
        decoded = _decode_pyav(data, max_duration_s)
    if len(decoded.samples) == 0:
        raise EmptyAudioError("the file holds no audio samples")
    if not np.isfinite(decoded.samples).all():  # float WAV/AIFF can carry NaN or inf; one would fail a batch
        raise AudioDecodeError("the file holds non-finite samples (NaN or infinity)")
    return decoded
