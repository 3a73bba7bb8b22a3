"""The real Silero VAD that the silero-vad package ships, through our per-stream framing."""

import numpy as np
import pytest
import soundfile as sf

from asr_server.constants import VAD_CONTEXT as CONTEXT
from asr_server.constants import VAD_WINDOW as WINDOW
from asr_server.core.streaming import rms_dbfs
from asr_server.engines.vad import SileroVad, VadStream, packaged_model_path
from asr_server.errors import ModelFileError
from tests.support.audio import AUDIO, needs_audio


@pytest.fixture(scope="module")
def vad():
    return SileroVad.load()


def probs_for(vad, audio):
    stream = VadStream()
    out = []
    for x in stream.inputs(stream.push_block(audio)):
        (p,), state = vad.run(x[None], stream.state[:, None, :])
        stream.advance(state[:, 0, :])
        out.append(p)
    return np.array(out)


def test_packaged_model_found_and_info(vad):
    assert packaged_model_path().name == "silero_vad.onnx"
    assert vad.info.provider == "CPUExecutionProvider"


def test_windows_carry_context_and_leftover():
    s = VadStream()
    a = np.arange(700, dtype=np.float32)
    chunks = s.push_block(a)
    assert chunks.shape == (1, WINDOW)
    (w1,) = s.inputs(chunks)
    assert np.all(w1[:CONTEXT] == 0) and np.all(w1[CONTEXT:] == a[:WINDOW])
    chunks = s.push_block(np.arange(700, 1024, dtype=np.float32))
    (w2,) = s.inputs(chunks)
    np.testing.assert_array_equal(w2[:CONTEXT], a[WINDOW - CONTEXT : WINDOW])
    np.testing.assert_array_equal(w2[CONTEXT:], np.arange(512, 1024, dtype=np.float32))


def test_block_inputs_equal_window_by_window():
    """Framing many chunks at once gives each the same context as framing them one push at a time."""
    audio = np.random.default_rng(0).standard_normal(5 * WINDOW + 100).astype(np.float32)
    whole = VadStream()
    at_once = whole.inputs(whole.push_block(audio))
    step = VadStream()
    one_by_one = [step.inputs(step.push_block(audio[i : i + 300])) for i in range(0, len(audio), 300)]
    np.testing.assert_array_equal(at_once, np.concatenate([x for x in one_by_one if len(x)]))


@needs_audio
def test_speech_scores_high_silence_low(vad):
    audio, sr = sf.read(AUDIO / "zh_aishell_BAC009S0724W0121_wenet.wav", dtype="float32")
    assert sr == 16000
    padded = np.concatenate([np.zeros(16000, np.float32), audio, np.zeros(16000, np.float32)])
    p = probs_for(vad, padded)
    lead = p[: 16000 // WINDOW - 2]
    assert lead.max() < 0.3
    assert np.mean(p > 0.5) > 0.3  # a good share of the clip is voiced


@needs_audio
def test_batched_streams_equal_separate_calls(vad):
    a, _ = sf.read(AUDIO / "en_tts_living_room_light_wyoming.wav", dtype="float32")
    b, _ = sf.read(AUDIO / "ko_tts_living_room_light_wyoming.wav", dtype="float32")
    n = min(len(a), len(b))
    sep_a, sep_b = probs_for(vad, a[:n]), probs_for(vad, b[:n])
    sa, sb = VadStream(), VadStream()
    batched_a, batched_b = [], []
    for xa, xb in zip(sa.inputs(sa.push_block(a[:n])), sb.inputs(sb.push_block(b[:n]))):
        (pa, pb), state = vad.run(np.stack([xa, xb]), np.stack([sa.state, sb.state], axis=1))
        sa.advance(state[:, 0, :]), sb.advance(state[:, 1, :])
        batched_a.append(pa), batched_b.append(pb)
    np.testing.assert_allclose(batched_a, sep_a, atol=1e-5)
    np.testing.assert_allclose(batched_b, sep_b, atol=1e-5)


def test_bad_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        SileroVad.load(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelFileError, match="cannot load"):
        SileroVad.load(bad)


def test_rms_dbfs():
    assert rms_dbfs(np.zeros(512, np.float32)) < -100
    assert abs(rms_dbfs(np.ones(512, np.float32)) - 0.0) < 1e-6
