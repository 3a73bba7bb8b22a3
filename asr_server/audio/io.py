"""Audio files and raw PCM in, 16 kHz mono float32 out.

Uploads arrive in whatever container the client had (wav, flac, mp3, ogg/opus, webm, m4a...).
libsndfile (`soundfile`) reads the uncompressed and lossless ones (wav, flac, aiff) and soxr
resamples them in blocks; everything else goes to FFmpeg through PyAV, whose wheel carries the
codecs, and FFmpeg itself downmixes and resamples to 16 kHz mono float (a filter graph, as PyAV's
`AudioResampler` builds one, with a downmix that cannot clip): the frames this code touches are always one plane, whatever layout the file has (PyAV 18 reports
9 planes for 7.1 audio, and reading a multi-plane frame ran past its end and crashed the process).
Memory follows the 16 kHz output, not the source. Before decoding, the header's channels, rate and
duration are checked (`AudioFormatError`, `AudioTooLongError`), and a limit on the decoded duration
stops a small file that unpacks to hours.

Float samples are clipped to full scale (±1) as they are read: float PCM above full scale plays
clipped in every player (and in FFmpeg's conversion to integers), and a sample of 3e38 would
otherwise overflow the downmix, the resampler and the features to infinity.

These decoders run native code on untrusted bytes: the server calls `decode_audio` in a worker
process (`audio/decode_pool.py`), never in its own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from ..constants import SAMPLE_RATE
from ..errors import AudioDecodeError, AudioFormatError, AudioTooLongError, EmptyAudioError
from .resample import Resampler

_BLOCK = 1 << 14  # source frames per block read from soundfile
_UNKNOWN_FRAMES = 1 << 62
# Compressed formats that libsndfile 1.2 reads but FFmpeg reads better: its Ogg/Opus decoder
# returns wrong samples for reads above ~64k frames, and FFmpeg is the reference for both.
_FFMPEG_FIRST = {"OGG", "MP3"}
#: The most channels a file may have: 22.2 surround has 24 and third-order ambisonics 16; a file
#: with more is not a recording of speech, and each channel costs decode time before the downmix.
MAX_CHANNELS = 32
#: The rates a file may have: 1 kHz would hold nothing of speech, and 384 kHz is the highest rate
#: audio interfaces record; beyond it a file costs decode time for no audio anyone can hear.
MIN_RATE, MAX_RATE = 1_000, 384_000


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


def _full_scale(block: np.ndarray) -> np.ndarray:
    """Float samples as a player hears them: NaN or infinity refused, the rest clipped to ±1."""
    if not np.isfinite(block).all():  # float WAV/AIFF can carry NaN or inf; one would fail a batch
        raise AudioDecodeError("the file holds non-finite samples (NaN or infinity)")
    return np.clip(block, -1.0, 1.0, out=block)


def _max_samples(max_duration_s: float | None) -> int | None:
    return None if max_duration_s is None else int(max_duration_s * SAMPLE_RATE)


def _check_header(channels: int, rate: int, seconds: float | None, max_duration_s: float | None) -> None:
    """Refuse what the header says before a sample is decoded."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFormatError(f"the file has {channels} channels; at most {MAX_CHANNELS} are accepted")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(f"the file's sample rate is {rate} Hz; {MIN_RATE}..{MAX_RATE} Hz are accepted")
    if max_duration_s is not None and seconds is not None and seconds > max_duration_s + 1:
        raise AudioTooLongError(f"audio is {seconds:.0f} s long, more than the allowed {max_duration_s:.0f} s")


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
        if f.frames >= _UNKNOWN_FRAMES:  # written as a stream, without its length: libsndfile fails at
            return None  # its end ("psf_fseek() failed"), FFmpeg reads it
        _check_header(channels, rate, f.frames / rate if f.frames > 0 else None, max_duration_s)
        res = Resampler(rate, _max_samples(max_duration_s))
        try:
            while True:
                block = f.read(_BLOCK, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                res.push(_full_scale(block).mean(axis=1, dtype=np.float32))
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
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        _check_header(channels, rate, seconds, max_duration_s)
        to_mono = _mono_graph(stream)
        limit = _max_samples(max_duration_s)
        blocks: list[np.ndarray] = []
        n = 0
        decoded_any = False
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    decoded_any = True
                    to_mono.push(frame)
                    n += _pull(to_mono, blocks)
                    if limit is not None and n > limit:
                        raise AudioTooLongError(f"audio is longer than the allowed {limit / SAMPLE_RATE:.0f} s")
            to_mono.push(None)
            _pull(to_mono, blocks)
        except av.FFmpegError as e:
            if not decoded_any:
                raise AudioDecodeError(f"not an audio file that can be decoded ({_reason(e)})") from None
            # A truncated tail: keep what decoded, as players do.
        if not decoded_any:
            raise EmptyAudioError("the file holds no decodable audio")
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return DecodedAudio(samples, rate, channels, "pyav", fmt)


def _mono_graph(stream):
    """An FFmpeg filter graph from the stream's frames to 16 kHz mono float, one plane.

    `rematrix_maxval=1` scales the downmix so that it cannot pass full scale: FFmpeg's default
    matrix sums the channels, which clips a 16-microphone array's recording."""
    import av

    graph = av.filter.Graph()
    chain = [
        graph.add_abuffer(template=stream),
        graph.add("aresample", f"{SAMPLE_RATE}:rematrix_maxval=1"),
        graph.add("aformat", f"sample_fmts=flt:channel_layouts=mono:sample_rates={SAMPLE_RATE}"),
        graph.add("abuffersink"),
    ]
    for a, b in zip(chain, chain[1:], strict=False):
        a.link_to(b)
    graph.configure()
    return graph


def _pull(graph, blocks: list[np.ndarray]) -> int:
    """Move what the graph has ready into `blocks`; returns the samples moved."""
    import av

    n = 0
    while True:
        try:
            frame = graph.pull()
        except (BlockingIOError, av.EOFError):
            return n
        blocks.append(_full_scale(frame.to_ndarray().reshape(-1)))
        n += len(blocks[-1])


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def decode_audio(data: bytes, max_duration_s: float | None = None) -> DecodedAudio:
    """Decode a whole audio file held in memory to 16 kHz mono float32 in [-1, 1].

    Raises `EmptyAudioError` for no bytes or no samples, `AudioTooLongError` beyond
    `max_duration_s`, `AudioFormatError` for channels or a rate out of bounds, `AudioDecodeError`
    for anything that is not audio or holds NaN/infinity. Blocking: the server runs it in a
    `DecodePool` worker process; the CLI calls it directly.
    """
    if not data:
        raise EmptyAudioError("the file is empty (0 bytes)")
    decoded = _decode_soundfile(data, max_duration_s)
    if decoded is None:
        decoded = _decode_pyav(data, max_duration_s)
    if len(decoded.samples) == 0:
        raise EmptyAudioError("the file holds no audio samples")
    return decoded


def encode_flac(samples: np.ndarray) -> bytes:
    """16 kHz mono float32 samples as a 16-bit FLAC file: lossless and about half a WAV's size, at
    about 1 ms of CPU per 3 s (libsndfile's Ogg Opus costs 50 times that)."""
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return out.getvalue()
