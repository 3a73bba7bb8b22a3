"""CAM++ speaker embedder: batching by length, normalisation, load errors, and same-clip vs other-clip
cosine ordering of the tiny stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asr_server.engines.speaker.campplus import MIN_FRAMES, CampplusEmbedder
from asr_server.errors import ModelFileError
from tests.support.audio import voice
from tests.support.models import campplus_path, load_clips


@pytest.fixture(scope="module")
def model_path() -> Path:
    return campplus_path()


@pytest.fixture(scope="module")
def embedder(model_path) -> CampplusEmbedder:
    return CampplusEmbedder.load(model_path, device="cpu", threads=1)


def test_info_and_dim(embedder):
    assert embedder.dim == 192
    assert embedder.info.name == "speaker" and embedder.info.device == "cpu"


def test_batch_equals_singles_and_is_normalised(embedder):
    audios = [voice(1.0, 110, 0), voice(2.5, 180, 1), voice(1.0, 240, 2), voice(0.05, 150, 3), voice(3.0, 90, 4)]
    batch = embedder.embed_batch(audios)
    assert batch.shape == (5, 192) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for a, row in zip(audios, batch):
        np.testing.assert_allclose(embedder.embed(a), row, atol=1e-5)
    assert embedder.embed_batch([]).shape == (0, 192)
    # one frame minus its own mean is all zeros: the result carries no voice, but stays finite
    tiny = embedder.embed(voice(0.004, 150, 3))
    assert np.isfinite(tiny).all() and np.linalg.norm(tiny) <= 1 + 1e-5


def test_equal_lengths_share_one_call_and_padding_is_never_used(model_path):
    calls = []
    emb = CampplusEmbedder.load(model_path)
    run = emb.runtime.run

    def spy(feats):
        calls.append(feats.shape)
        return run(feats)

    emb.runtime.run = spy
    emb.embed_batch([voice(1.0, 110, 0), voice(2.0, 150, 1), voice(1.0, 200, 2)])
    assert sorted(calls) == sorted([(2, 98, 80), (1, 198, 80)])
    calls.clear()
    emb.embed_batch([np.zeros(10, np.float32)])
    assert calls == [(1, MIN_FRAMES, 80)]


def test_load_errors(model_path, tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        CampplusEmbedder.load(tmp_path / "absent.onnx")
    sensevoice = model_path.parent.parent / "SenseVoiceSmall" / "model.onnx"
    with pytest.raises(ModelFileError, match="feature"):
        CampplusEmbedder.load(sensevoice)
    data = model_path.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="trunc.onnx"):
        CampplusEmbedder.load(tmp_path / "trunc.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        CampplusEmbedder.load(tmp_path / "junk.onnx")


@pytest.mark.slow
def test_sherpa_onnx_export_gives_the_same_embeddings(model_path, embedder, tmp_path):
    """sherpa-onnx's published CAM++ (input `x`, batch of one in its output shape, its frontend in
    metadata) is the same network: the engine takes it as it is and embeds as with our export."""
    pytest.importorskip("onnx")
    from tests.support.models import sherpa_campplus

    sherpa = CampplusEmbedder.load(sherpa_campplus(model_path, tmp_path / "sherpa.onnx"))
    assert sherpa.runtime.input == "x" and sherpa.runtime.one_at_a_time and sherpa.dim == 192
    audios = [voice(1.0, 110, 0), voice(1.0, 180, 1), voice(2.5, 240, 2), voice(0.05, 150, 3)]
    np.testing.assert_allclose(sherpa.embed_batch(audios), embedder.embed_batch(audios), atol=1e-5)


def test_an_export_for_another_frontend_is_refused_naming_it(model_path, tmp_path):
    pytest.importorskip("onnx")
    from tests.support.models import sherpa_campplus

    raw = sherpa_campplus(model_path, tmp_path / "wespeaker.onnx", normalize_samples="0", feature_normalize_type="")
    with pytest.raises(ModelFileError, match="normalize_samples='0'") as e:
        CampplusEmbedder.load(raw)
    assert "feature_normalize_type=''" in str(e.value)


def test_onnx_matches_funasr_campplus(model_path, embedder):
    torch = pytest.importorskip("torch")
    import yaml

    from asr_server.engines.features import campplus_features
    from asr_server.modelfiles.onnx_export import load_funasr_campplus

    dims = yaml.safe_load((model_path.parent / "config.yaml").read_text())["model_conf"]
    model = load_funasr_campplus(model_path.parent / "campplus_cn_common.bin", **dims)
    audio = voice(2.2, 130, 5)
    with torch.no_grad():
        ref = model(torch.from_numpy(campplus_features(audio))[None])[0].numpy()
    np.testing.assert_allclose(embedder.embed(audio), ref / np.linalg.norm(ref), atol=1e-4)


@pytest.mark.slow
def test_same_clip_after_opus_scores_above_other_clips(embedder):
    """Identification picks the best enrolled voice: every clip must find itself after an Opus trip."""
    clips = load_clips()
    if not clips:
        pytest.skip("../shared/audio absent: the tiny CAM++ is untrained")
    from benchmarks.standins import opus_round_trip

    enrolled = embedder.embed_batch([c.audio for c in clips])
    probes = embedder.embed_batch([opus_round_trip(0.6 * c.audio) for c in clips])
    sim = probes @ enrolled.T
    np.testing.assert_array_equal(sim.argmax(axis=1), np.arange(len(clips)))
    own = np.diag(sim)
    others = sim[~np.eye(len(clips), dtype=bool)]
    assert own.min() > 0.8, own
    assert own.mean() - others.mean() > 0.4, (own.mean(), others.mean())
    # distinct real speakers (JFK, an AISHELL and a LibriSpeech reader) fall clearly apart
    names = [c.name for c in clips]
    idx = [next(i for i, n in enumerate(names) if n.startswith(p)) for p in ("en_jfk", "zh_aishell", "en_librispeech")]
    for i in idx:
        for j in idx:
            if i != j:
                assert sim[i, i] - sim[i, j] > 0.1, (names[i], names[j], sim[i, i], sim[i, j])
