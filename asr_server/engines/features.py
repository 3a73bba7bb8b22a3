"""Acoustic frontends: waveform → the feature matrices the models were trained on.

Both frontends are written here in numpy, so the ONNX and the torch
backends share them and the server needs neither torch nor funasr to compute features. The
parameters are the ones funasr applies at inference (`WavFrontend` for SenseVoice with dither
switched off, `campplus.utils.extract_feature` for CAM++); the tests hold them to funasr's output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import SAMPLE_RATE
from ..errors import CmvnFileError

#: Samples in one 25 ms analysis window; shorter input is zero-padded to one frame.
FRAME_SAMPLES = 400


@dataclass(frozen=True, slots=True)
class Cmvn:
    """Global CMVN as funasr stores it: features become `(x + shift) * scale`."""

    shift: np.ndarray  # −mean, float32 [D]
    scale: np.ndarray  # 1/std, float32 [D]

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    def apply(self, feats: np.ndarray) -> np.ndarray:
        return (feats + self.shift) * self.scale


def _vector_after(lines: list[str], tag: str, path: Path) -> np.ndarray:
    for i, line in enumerate(lines):
        if line.split()[:1] == [tag]:
            for follow in lines[i + 1 :]:
                parts = follow.split()
                if parts[:1] == ["<LearnRateCoef>"]:
                    # "<LearnRateCoef> 0 [ v1 v2 ... ]"
                    try:
                        open_at = parts.index("[")
                        close_at = parts.index("]")
                    except ValueError:
                        break
                    try:
                        return np.asarray(parts[open_at + 1 : close_at], dtype=np.float32)
                    except ValueError as e:
                        raise CmvnFileError(f"{path}: {tag} holds a non-number: {e}") from None
            break
    raise CmvnFileError(f"{path}: no {tag} vector (is this a Kaldi nnet am.mvn?)")


def load_cmvn(path: Path) -> Cmvn:
    """Read the `<AddShift>` and `<Rescale>` vectors of a Kaldi nnet-text `am.mvn`."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    shift = _vector_after(lines, "<AddShift>", path)
    scale = _vector_after(lines, "<Rescale>", path)
    if shift.shape != scale.shape or shift.size == 0:
        raise CmvnFileError(f"{path}: <AddShift> has {shift.size} values, <Rescale> {scale.size}")
    return Cmvn(shift=shift, scale=scale)


def write_cmvn(path: Path, mean: np.ndarray, std: np.ndarray) -> None:
    """Write `am.mvn` in the layout funasr reads (used when exporting or building models)."""
    mean = np.asarray(mean, dtype=np.float64).ravel()
    std = np.asarray(std, dtype=np.float64).ravel()
    if mean.shape != std.shape:
        raise ValueError("mean and std differ in size")
    if np.any(std <= 0):
        raise ValueError("std must be positive")
    d = mean.size

    def vec(v: np.ndarray) -> str:
        return " ".join(f"{x:.8g}" for x in v)

    text = (
        "<Nnet>\n"
        f"<Splice> {d} {d}\n[ 0 ]\n"
        f"<AddShift> {d} {d}\n<LearnRateCoef> 0 [ {vec(-mean)} ]\n"
        f"<Rescale> {d} {d}\n<LearnRateCoef> 0 [ {vec(1.0 / std)} ]\n"
        "</Nnet>\n"
    )
    Path(path).write_text(text, encoding="utf-8")


def as_mono_float(audio: np.ndarray) -> np.ndarray:
    """1-D float32 in [-1, 1] from float or int16 samples; anything else is a ValueError."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio as a 1-D array, got shape {audio.shape}")
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"expected float32 samples in [-1, 1] or int16, got {audio.dtype}")
    return audio.astype(np.float32, copy=False)


#: Kaldi's frame options as funasr sets them: 25 ms windows every 10 ms, snip_edges, DC offset
#: removed, pre-emphasis 0.97, a 512-point FFT, the power spectrum, mel bins from 20 Hz to Nyquist.
FRAME_SHIFT = 160
FFT_SIZE = 512
PREEMPHASIS = 0.97
MEL_LOW_HZ = 20.0


def _kaldi_window(window: str) -> np.ndarray:
    cosine = np.cos(2 * np.pi * np.arange(FRAME_SAMPLES) / (FRAME_SAMPLES - 1))
    if window == "hamming":
        return (0.54 - 0.46 * cosine).astype(np.float32)
    if window == "povey":  # a Hann window to the power 0.85
        return ((0.5 - 0.5 * cosine) ** 0.85).astype(np.float32)
    raise ValueError(f"window must be hamming or povey, not {window!r}")


@functools.cache
def _kaldi_mel_banks(num_bins: int, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kaldi's triangular mel filters over the power spectrum's first FFT_SIZE // 2 bins (Nyquist
    unweighted, as in Kaldi), kept sparse: the FFT bins each filter reads one after another, their
    weights, and where each filter's run starts. Summed with `np.add.reduceat`, not a matrix product:
    a product goes through the BLAS, whose threads spin against the server's own."""
    mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)  # noqa: E731
    low, high = mel(MEL_LOW_HZ), mel(sample_rate / 2)
    delta = (high - low) / (num_bins + 1)
    bins = mel(sample_rate / FFT_SIZE * np.arange(FFT_SIZE // 2))[None, :]
    b = np.arange(num_bins)[:, None]
    left, centre, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    rising, falling = (bins - left) / (centre - left), (right - bins) / (right - centre)
    weights = np.where((bins > left) & (bins < right), np.where(bins <= centre, rising, falling), 0.0)
    filters, columns = np.nonzero(weights)  # row-major: each filter's bins together, in order
    starts = np.searchsorted(filters, np.arange(num_bins))
    if len(np.unique(filters)) != num_bins:
        raise ValueError(f"{num_bins} mel bins leave some without an FFT bin at {sample_rate} Hz")
    return columns, weights[filters, columns].astype(np.float32), starts


_WINDOWS = {name: _kaldi_window(name) for name in ("hamming", "povey")}


def kaldi_fbank(samples: np.ndarray, *, window: str, num_bins: int = 80, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi log-mel filterbank, dither 0, snip_edges; returns float32 [T, num_bins].

    All frames at once in numpy (one FFT call over the whole utterance): kaldi-native-fbank computes
    the same frame by frame, slower (BENCHMARKS.md), and this lies closer to
    torchaudio's Kaldi fbank, funasr's reference (tests/test_engines_features.py). Input shorter
    than one 25 ms frame is zero-padded to one frame so that every utterance yields a feature row.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.shape[0] < FRAME_SAMPLES:
        x = np.pad(x, (0, FRAME_SAMPLES - x.shape[0]))
    n = 1 + (x.shape[0] - FRAME_SAMPLES) // FRAME_SHIFT
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME_SAMPLES)[::FRAME_SHIFT][:n]
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasised = np.empty_like(frames)
    emphasised[:, 0] = frames[:, 0] * (1 - PREEMPHASIS)
    emphasised[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
    spectrum = np.fft.rfft(emphasised * _WINDOWS[window], n=FFT_SIZE, axis=1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    columns, weights, starts = _kaldi_mel_banks(num_bins, sample_rate)
    mel = np.add.reduceat(power[:, columns] * weights, starts, axis=1)
    return np.log(np.maximum(mel, np.finfo(np.float32).eps))


def apply_lfr(feats: np.ndarray, m: int = 7, n: int = 6) -> np.ndarray:
    """Low frame rate stacking: m frames every n, (m−1)/2 copies of frame 0 in front.

    Output has ceil(T/n) rows of m·D values; windows that run past the end repeat the last frame.
    """
    t, d = feats.shape
    t_out = -(-t // n)
    left = (m - 1) // 2
    need = (t_out - 1) * n + m  # rows the last window reaches, counting the left padding
    padded = np.concatenate(
        [
            np.repeat(feats[:1], left, axis=0),
            feats,
            np.repeat(feats[-1:], max(0, need - left - t), axis=0),
        ]
    )
    idx = np.arange(t_out)[:, None] * n + np.arange(m)[None, :]
    return padded[idx].reshape(t_out, m * d)


class SenseVoiceFrontend:
    """SenseVoice features: fbank of the ×32768 waveform, LFR 7/6, global CMVN → [T', 560]."""

    lfr_m = 7
    lfr_n = 6
    num_bins = 80

    def __init__(self, cmvn_path: Path) -> None:
        self.cmvn = load_cmvn(cmvn_path)
        if self.cmvn.dim != self.dim:
            raise CmvnFileError(f"{cmvn_path}: CMVN has {self.cmvn.dim} dims, SenseVoice needs {self.dim}")

    @property
    def dim(self) -> int:
        return self.num_bins * self.lfr_m

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        return self.cmvn.apply(sensevoice_lfr(audio)).astype(np.float32, copy=False)

    @staticmethod
    def num_frames(num_samples: int) -> int:
        """LFR frames for `num_samples` of audio (before the model's four query frames)."""
        frames = 1 + (max(num_samples, FRAME_SAMPLES) - FRAME_SAMPLES) // 160
        return -(-frames // SenseVoiceFrontend.lfr_n)


def sensevoice_lfr(audio: np.ndarray) -> np.ndarray:
    """SenseVoice features before CMVN (what `am.mvn` is computed over): fbank of the ×32768
    waveform, hamming window, stacked 7 frames every 6 → [T', 560]."""
    samples = as_mono_float(audio) * 32768.0
    fbank = kaldi_fbank(samples, window="hamming", num_bins=SenseVoiceFrontend.num_bins)
    return apply_lfr(fbank, SenseVoiceFrontend.lfr_m, SenseVoiceFrontend.lfr_n)


def campplus_fbank(audio: np.ndarray) -> np.ndarray:
    """CAM++ filterbank before mean removal: 80 bins, povey window, waveform in [-1, 1] → [T, 80]."""
    return kaldi_fbank(as_mono_float(audio), window="povey", num_bins=80)


def campplus_features(audio: np.ndarray) -> np.ndarray:
    """CAM++ features: `campplus_fbank` minus its mean over time → [T, 80]."""
    fbank = campplus_fbank(audio)
    return fbank - fbank.mean(axis=0, keepdims=True)


# --- ECAPA-TDNN (speechbrain) ------------------------------------------------------------------
#: speechbrain's `Fbank` as spkrec-ecapa-voxceleb configures it: 25 ms Hamming window, 10 ms hop,
#: 400-point FFT, centred frames with zero padding, power spectrum, 80 triangular mel filters over
#: 0–8000 Hz, 10·log10 with a floor of 1e-10 and a top_db of 80 below each utterance's maximum.
ECAPA_N_FFT = 400
ECAPA_HOP = 160
ECAPA_MELS = 80
ECAPA_TOP_DB = 80.0


def _ecapa_mel_matrix() -> np.ndarray:
    """speechbrain's `Filterbank` triangular matrix [201, 80], computed in float32 as it does."""
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    mel = np.linspace(to_mel(0.0), to_mel(SAMPLE_RATE / 2), ECAPA_MELS + 2, dtype=np.float32)
    hz = (700.0 * (10.0 ** (mel / 2595.0) - 1.0)).astype(np.float32)
    band = (hz[1:] - hz[:-1])[:-1]
    central = hz[1:-1]
    freqs = np.linspace(0, SAMPLE_RATE // 2, ECAPA_N_FFT // 2 + 1, dtype=np.float32)
    slope = (freqs[None, :] - central[:, None]) / band[:, None]
    return np.maximum(0.0, np.minimum(slope + 1.0, 1.0 - slope)).T.astype(np.float32)


_ECAPA_MEL = _ecapa_mel_matrix()
# torch.hamming_window(400) is periodic: the denominator is N, not N − 1.
_ECAPA_WINDOW = (0.54 - 0.46 * np.cos(2 * np.pi * np.arange(ECAPA_N_FFT) / ECAPA_N_FFT)).astype(np.float32)


def ecapa_fbank(audio: np.ndarray) -> np.ndarray:
    """speechbrain's `Fbank(n_mels=80)` of one 16 kHz utterance: float32 [1 + N // 160, 80]."""
    x = as_mono_float(audio)
    x = np.pad(x, ECAPA_N_FFT // 2)
    n_frames = 1 + (x.shape[0] - ECAPA_N_FFT) // ECAPA_HOP
    idx = np.arange(ECAPA_N_FFT)[None, :] + ECAPA_HOP * np.arange(n_frames)[:, None]
    spec = np.fft.rfft(x[idx] * _ECAPA_WINDOW, axis=1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    db = 10.0 * np.log10(np.maximum(power @ _ECAPA_MEL, 1e-10))
    return np.maximum(db, db.max() - ECAPA_TOP_DB).astype(np.float32)


def ecapa_features(audio: np.ndarray) -> np.ndarray:
    """What ECAPA's embedding network reads: `ecapa_fbank` with speechbrain's sentence mean
    normalisation (`InputNormalization(norm_type="sentence", std_norm=False)`) over the utterance."""
    feats = ecapa_fbank(audio)
    return feats - feats.mean(axis=0, keepdims=True)
