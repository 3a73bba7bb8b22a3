"""Acoustic frontends: waveform → the feature matrices the models were trained on.

Both frontends are written here with kaldi-native-fbank and numpy, so the ONNX and the torch
backends share them and the server needs neither torch nor funasr to compute features. The
parameters are the ones funasr applies at inference (`WavFrontend` for SenseVoice with dither
switched off, `campplus.utils.extract_feature` for CAM++); the tests hold them to funasr's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kaldi_native_fbank as knf
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


def kaldi_fbank(samples: np.ndarray, *, window: str, num_bins: int = 80, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi log-mel filterbank, dither 0, snip_edges; returns float32 [T, num_bins].

    Input shorter than one 25 ms frame is zero-padded to one frame so that every utterance
    yields at least one feature row.
    """
    if samples.shape[0] < FRAME_SAMPLES:
        samples = np.pad(samples, (0, FRAME_SAMPLES - samples.shape[0]))
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = window
    opts.frame_opts.snip_edges = True
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.mel_opts.num_bins = num_bins
    opts.energy_floor = 0.0
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(sample_rate, samples)
    fb.input_finished()
    n = fb.num_frames_ready
    out = np.empty((n, num_bins), dtype=np.float32)
    for i in range(n):
        out[i] = fb.get_frame(i)
    return out


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
