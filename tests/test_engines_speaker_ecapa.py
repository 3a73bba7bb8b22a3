"""ECAPA-TDNN on ONNX Runtime: the numpy features against speechbrain's `Fbank` and sentence mean
normalisation on the real clips, the exported graph against speechbrain on torch (a tiny random
ECAPA built with speechbrain's classes), batches against single calls, `models export` /
`verify` for the ECAPA folder, and the ONNX pipeline with `speaker.model_type: ecapa`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("speechbrain")
pytest.importorskip("funasr")

from asr_server.engines.contracts import ECAPA_ONNX
from asr_server.engines.features import ecapa_fbank, ecapa_features
from asr_server.engines.speaker.ecapa import EcapaOnnx, EcapaTorch, load_ecapa, relative_lengths
from asr_server.errors import ModelFileError
from tests.support.audio import voice
from tests.support.config import make_config
from tests.support.models import (
    build_tiny_ecapa,
    load_clips,
)

pytestmark = pytest.mark.slow  # speechbrain builds and checks the ECAPA stand-in

#: Largest difference, in dB, between the numpy fbank and speechbrain's (float32 FFTs in a
#: different order; ~1e-3 is typical on the clips, out of a range of 80 dB).
FBANK_ATOL = 5e-3
#: ONNX Runtime against torch on the same weights and the same features.
MIN_COSINE_TORCH = 0.999
#: A padded row against its single run: padding reaches the last frames only through the convolutions.
MIN_COSINE_PADDED = 0.999


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def clips():
    return load_clips()


@pytest.fixture(scope="module")
def ecapa_dir(tmp_path_factory) -> Path:
    from asr_server.modelfiles.onnx_export import export_ecapa

    d = build_tiny_ecapa(tmp_path_factory.mktemp("models") / "ecapa")
    export_ecapa(d, d / ECAPA_ONNX)
    return d


@pytest.fixture(scope="module")
def onnx_ecapa(ecapa_dir) -> EcapaOnnx:
    emb = load_ecapa(ecapa_dir, device="cpu", threads=1, backend="onnx")
    assert isinstance(emb, EcapaOnnx)
    return emb


@pytest.fixture(scope="module")
def torch_ecapa(ecapa_dir) -> EcapaTorch:
    return load_ecapa(ecapa_dir, device="cpu", threads=1, backend="torch")


# --- features ----------------------------------------------------------------------------------


def test_features_match_speechbrain(clips):
    from speechbrain.lobes.features import Fbank
    from speechbrain.processing.features import InputNormalization

    fbank = Fbank(n_mels=80).eval()
    norm = InputNormalization(norm_type="sentence", std_norm=False).eval()
    audios = [c.audio for c in clips[:6]] + [voice(0.7, 150, 0), voice(0.005, 200, 1)]
    for audio in audios:
        with torch.no_grad():
            ref = fbank(torch.from_numpy(audio)[None])
            ref_norm = norm(ref, torch.ones(1))[0].numpy()
        got = ecapa_fbank(audio)
        assert got.shape == (1 + len(audio) // 160, 80) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref[0].numpy(), atol=FBANK_ATOL)
        np.testing.assert_allclose(ecapa_features(audio), ref_norm, atol=FBANK_ATOL)


def test_features_take_int16_and_reject_stereo():
    audio = voice(0.5, 170, 2)
    pcm = np.round(audio * 32767).astype(np.int16)
    np.testing.assert_allclose(ecapa_fbank(pcm), ecapa_fbank(pcm.astype(np.float32) / 32768), atol=1e-4)
    with pytest.raises(ValueError, match="mono"):
        ecapa_fbank(np.zeros((2, 1600), np.float32))


# --- the exported graph ------------------------------------------------------------------------


def test_onnx_signature_and_info(onnx_ecapa, ecapa_dir):
    ins = {i.name: (i.type, i.shape) for i in onnx_ecapa.session.get_inputs()}
    assert ins["feats"][0] == "tensor(float)" and ins["feats"][1][2] == 80
    assert ins["lengths"][0] == "tensor(float)" and len(ins["lengths"][1]) == 1
    assert onnx_ecapa.dim == 24
    assert onnx_ecapa.info.backend == "onnxruntime" and onnx_ecapa.info.path == ecapa_dir / ECAPA_ONNX


def test_onnx_graph_matches_torch_network_with_lengths(onnx_ecapa, torch_ecapa):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((3, 157, 80)).astype(np.float32)
    lengths = relative_lengths([157, 120, 31])
    with torch.no_grad():
        ref = torch_ecapa.classifier.mods.embedding_model(torch.from_numpy(feats), torch.from_numpy(lengths))
    (got,) = onnx_ecapa.session.run(None, {"feats": feats, "lengths": lengths})
    np.testing.assert_allclose(got, ref.reshape(3, -1).numpy(), atol=1e-4)


def test_onnx_embeddings_match_torch(onnx_ecapa, torch_ecapa, clips):
    audios = [voice(1.5, 140, 5), voice(0.9, 230, 6)] + [c.audio for c in clips[:3]]
    for audio in audios:
        got, ref = onnx_ecapa.embed(audio), torch_ecapa.embed(audio)
        assert abs(float(np.linalg.norm(got)) - 1) < 1e-5
        assert cosine(got, ref) > MIN_COSINE_TORCH


def test_batched_and_single_agree(onnx_ecapa):
    audios = [voice(1.0, 110, 0), voice(1.0, 240, 1), voice(2.2, 180, 2), voice(0.05, 150, 3), voice(1.7, 200, 4)]
    batch = onnx_ecapa.embed_batch(audios)
    assert batch.shape == (5, 24)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for a, row in zip(audios, batch):
        np.testing.assert_allclose(onnx_ecapa.embed(a), row, atol=1e-5)
    assert onnx_ecapa.embed_batch([]).shape == (0, 24)


def test_padding_is_masked_by_lengths(onnx_ecapa):
    """The graph's own padding path (not used by `embed_batch`, which groups equal lengths): a
    padded row stays close to its unpadded run; only the convolutions' edges see the zeros."""
    short, long = ecapa_features(voice(1.0, 110, 0)), ecapa_features(voice(2.2, 180, 2))
    padded = onnx_ecapa.run([short, long])
    alone = onnx_ecapa.run([short])
    assert cosine(padded[0], alone[0]) > MIN_COSINE_PADDED
    np.testing.assert_allclose(padded[1], onnx_ecapa.run([long])[0], atol=1e-5)


def test_relative_lengths_never_admit_a_padding_frame():
    frames = list(range(1, 400))
    lengths = relative_lengths(frames + [400])
    kept = (np.arange(400, dtype=np.float32)[None, :] < (lengths * np.float32(400))[:, None]).sum(axis=1)
    assert kept.tolist() == frames + [400]


def test_onnx_file_missing_or_wrong(ecapa_dir, tmp_path):
    d = tmp_path / "ecapa"
    shutil.copytree(ecapa_dir, d)
    (d / ECAPA_ONNX).unlink()
    with pytest.raises(ModelFileError, match="models export"):
        load_ecapa(d, device="cpu", backend="onnx")
    (d / ECAPA_ONNX).write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="cannot load"):
        load_ecapa(d, device="cpu", backend="onnx")


# --- models export / verify and the pipeline ---------------------------------------------------


def _models_root(models_dir: Path, ecapa_dir: Path, root: Path, with_onnx: bool) -> Path:
    root.mkdir()
    (root / "SenseVoiceSmall").symlink_to(models_dir / "SenseVoiceSmall")
    (root / "ecapa").mkdir()
    for f in ecapa_dir.iterdir():
        if with_onnx or f.name != ECAPA_ONNX:
            shutil.copy(f, root / "ecapa" / f.name)
    return root


@pytest.mark.slow
def test_models_export_writes_ecapa_onnx(models_dir, ecapa_dir, tmp_path):
    from asr_server.modelfiles import export, inspect, layout

    root = _models_root(models_dir, ecapa_dir, tmp_path / "models", with_onnx=False)
    cfg = make_config(root, tmp_path / "vp.sqlite", speaker={"model_type": "ecapa", "db": str(tmp_path / "vp.sqlite")})
    assert layout.missing_model_files(cfg) == [root / "ecapa" / ECAPA_ONNX]
    produced = export.export_models(cfg, echo=lambda *_: None, missing_only=True)
    assert produced == [root / "ecapa" / ECAPA_ONNX]
    assert layout.missing_model_files(cfg) == []
    report = inspect.inspect_models(cfg)
    st = next(s for s in report.files if s.path == root / "ecapa" / ECAPA_ONNX)
    assert st.present and not st.problems, st.problems
    emb = load_ecapa(root / "ecapa", device="cpu", backend="onnx")
    np.testing.assert_allclose(
        emb.embed(voice(1.0, 150, 9)),
        load_ecapa(ecapa_dir, device="cpu", backend="onnx").embed(voice(1.0, 150, 9)),
        atol=1e-5,
    )


def test_verify_flags_a_campplus_file_posing_as_ecapa(models_dir, ecapa_dir, tmp_path):
    from asr_server.modelfiles import inspect

    root = _models_root(models_dir, ecapa_dir, tmp_path / "models", with_onnx=False)
    shutil.copy(models_dir / "campplus" / "campplus.onnx", root / "ecapa" / ECAPA_ONNX)
    cfg = make_config(root, tmp_path / "vp.sqlite", speaker={"model_type": "ecapa", "db": str(tmp_path / "vp.sqlite")})
    report = inspect.inspect_models(cfg)
    assert any(str(root / "ecapa" / ECAPA_ONNX) in p and "feats" in p for p in report.problems), report.problems


async def test_onnx_pipeline_with_ecapa(models_dir, ecapa_dir, tmp_path):
    from asr_server.core.pipeline import Pipeline

    root = _models_root(models_dir, ecapa_dir, tmp_path / "models", with_onnx=True)
    cfg = make_config(
        root,
        tmp_path / "vp.sqlite",
        speaker={"model_type": "ecapa", "db": str(tmp_path / "vp.sqlite")},
        engine={"backend": "onnx", "device": "cpu", "threads": 1},
    )
    p = Pipeline.load(cfg)
    try:
        assert isinstance(p.speaker, EcapaOnnx) and p.speaker.info.backend == "onnxruntime"
        assert p.voiceprints.model == "ecapa" and p.voiceprints.dim == 24
        audio = voice(1.2, 130, 4)
        unknown = await p.recognize(audio, language="auto")
        assert unknown.embed_ms is None  # nobody enrolled: no embedding computed
        emb = await p.embed(audio)
        assert emb.shape == (24,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5
        p.voiceprints.enroll("me", emb[None])
        got = await p.recognize(audio, language="auto")
        assert got.transcript is not None and got.embed_ms is not None and got.audio_ms == len(audio) // 16
        assert got.speaker is not None and got.speaker.name == "me"
    finally:
        await p.close()
