"""The frontends against funasr's own implementation, and the am.mvn reader/writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asr_server.engines.features import (
    CmvnFileError,
    SenseVoiceFrontend,
    apply_lfr,
    campplus_features,
    load_cmvn,
    write_cmvn,
)
from tests.support.models import clips_dir

torch = pytest.importorskip("torch")


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics with a moving pitch, an envelope and a little noise: exercises every mel bin."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 20)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t) ** 2)
    x = 0.2 * x / np.abs(x).max() + 0.003 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def frontend_inputs() -> list[np.ndarray]:
    audios = [speech_like(3.37), speech_like(0.5, seed=1)]
    d = clips_dir()
    if d is not None:
        import soundfile as sf

        audio, sr = sf.read(str(d / "zh_aishell_BAC009S0724W0121_wenet.wav"), dtype="float32")
        assert sr == 16000
        audios.append(audio)
    return audios


@pytest.fixture(scope="module")
def cmvn_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("cmvn") / "am.mvn"
    write_cmvn(path, rng.normal(10, 2, 560), rng.uniform(2, 4, 560))
    return path


@pytest.mark.parametrize("frames", list(range(1, 40)) + [448, 449, 450, 451])
@pytest.mark.slow
def test_lfr_is_funasrs(frames):
    from funasr.frontends.wav_frontend import apply_lfr as funasr_lfr

    x = np.random.default_rng(frames).standard_normal((frames, 4)).astype(np.float32)
    ours = apply_lfr(x, 7, 6)
    ref = funasr_lfr(torch.from_numpy(x), 7, 6).numpy()
    assert ours.shape == ref.shape == (-(-frames // 6), 28)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("index", range(3))
@pytest.mark.slow
def test_sensevoice_frontend_matches_funasr_wavfrontend(cmvn_file, index):
    from funasr.frontends.wav_frontend import WavFrontend

    audios = frontend_inputs()
    if index >= len(audios):
        pytest.skip("clip absent")
    audio = audios[index]
    ours = SenseVoiceFrontend(cmvn_file)(audio)
    ref_fe = WavFrontend(
        cmvn_file=str(cmvn_file),
        fs=16000,
        window="hamming",
        n_mels=80,
        frame_length=25,
        frame_shift=10,
        lfr_m=7,
        lfr_n=6,
        dither=0.0,
    )
    ref, ref_len = ref_fe(torch.from_numpy(audio)[None], torch.tensor([audio.size]))
    ref = ref[0].numpy()
    assert ours.shape == ref.shape == (SenseVoiceFrontend.num_frames(audio.size), 560)
    assert int(ref_len[0]) == ours.shape[0]
    # float32 FFT differences between kaldi-native-fbank and torchaudio; features are O(1) after CMVN
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("index", range(3))
@pytest.mark.slow
def test_campplus_features_match_funasr(index):
    from funasr.models.campplus.utils import extract_feature

    audios = frontend_inputs()
    if index >= len(audios):
        pytest.skip("clip absent")
    audio = audios[index]
    ref, lengths, _ = extract_feature([torch.from_numpy(audio)])
    ours = campplus_features(audio)
    assert ours.shape == (lengths[0], 80)
    np.testing.assert_allclose(ours, ref[0].numpy(), atol=2e-3, rtol=0)
    np.testing.assert_allclose(ours.mean(axis=0), 0, atol=1e-4)


def test_frame_count_formula_matches_features(cmvn_file):
    fe = SenseVoiceFrontend(cmvn_file)
    for n in (0, 1, 399, 400, 401, 559, 560, 16000, 72000, 72001):
        assert fe(np.zeros(n, np.float32)).shape == (SenseVoiceFrontend.num_frames(n), 560), n


def test_short_and_int16_input(cmvn_file):
    fe = SenseVoiceFrontend(cmvn_file)
    assert fe(np.zeros(10, np.float32)).shape == (1, 560)
    x = speech_like(1.0)
    pcm = np.round(x * 32768).astype(np.int16)
    np.testing.assert_allclose(fe(pcm), fe(pcm.astype(np.float32) / 32768), atol=1e-5)
    assert campplus_features(np.zeros(0, np.float32)).shape == (1, 80)


def test_bad_audio_is_refused(cmvn_file):
    fe = SenseVoiceFrontend(cmvn_file)
    with pytest.raises(ValueError, match="1-D"):
        fe(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="float32"):
        fe(np.zeros(16000, np.int32))


def test_cmvn_round_trip(tmp_path):
    mean = np.linspace(-3, 12, 560)
    std = np.linspace(0.5, 4, 560)
    write_cmvn(tmp_path / "am.mvn", mean, std)
    cmvn = load_cmvn(tmp_path / "am.mvn")
    np.testing.assert_allclose(cmvn.shift, -mean, rtol=1e-6)
    np.testing.assert_allclose(cmvn.scale, 1 / std, rtol=1e-6)
    x = np.random.default_rng(0).normal(mean, std, (50, 560))
    np.testing.assert_allclose(cmvn.apply(x), (x - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cmvn_file_funasr_reads_the_same(tmp_path):
    from funasr.frontends.wav_frontend import load_cmvn as funasr_load_cmvn

    write_cmvn(tmp_path / "am.mvn", np.arange(560) / 100, np.full(560, 2.0))
    ours = load_cmvn(tmp_path / "am.mvn")
    ref = funasr_load_cmvn(str(tmp_path / "am.mvn")).numpy()
    np.testing.assert_array_equal(ref[0], ours.shift)
    np.testing.assert_array_equal(ref[1], ours.scale)


def test_bad_cmvn_files(tmp_path):
    p = tmp_path / "am.mvn"
    p.write_text("<Nnet>\n</Nnet>\n")
    with pytest.raises(CmvnFileError, match="AddShift"):
        load_cmvn(p)
    p.write_text("<AddShift> 2 2\n<LearnRateCoef> 0 [ 1 2 ]\n<Rescale> 3 3\n<LearnRateCoef> 0 [ 1 2 3 ]\n")
    with pytest.raises(CmvnFileError, match="2 values"):
        load_cmvn(p)
    p.write_text("<AddShift> 2 2\n<LearnRateCoef> 0 [ 1 x ]\n<Rescale> 2 2\n<LearnRateCoef> 0 [ 1 2 ]\n")
    with pytest.raises(CmvnFileError, match="non-number"):
        load_cmvn(p)
    write_cmvn(p, np.zeros(80), np.ones(80))
    with pytest.raises(CmvnFileError, match="560"):
        SenseVoiceFrontend(p)
