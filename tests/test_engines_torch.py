"""The PyTorch backends against ONNX Runtime on the tiny stand-ins: same logits (within 1e-3),
same decoded text, same CAM++ embeddings; batched calls equal single calls; the torch-backed
pipeline end to end; ECAPA through speechbrain on a stand-in built here; and the documented
fallbacks and errors (fp16 or CUDA asked for on a CPU, torch missing, ECAPA on ONNX without its file)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("funasr")

from asr_server.engines.sensevoice import SenseVoice
from asr_server.engines.sensevoice.torch import TorchSenseVoice
from asr_server.engines.speaker.campplus import CampplusEmbedder, TorchCampplus
from asr_server.errors import (
    BackendUnavailableError,
    ModelFileError,
)
from tests.support.audio import voice
from tests.support.config import make_config
from tests.support.models import (
    build_tiny_ecapa,
    load_clips,
)

pytestmark = pytest.mark.slow  # the torch stack: funasr and speechbrain against ONNX Runtime

#: Largest difference allowed between ONNX Runtime and torch fp32 logits (same graph, same weights;
#: only kernel order differs, typically ~1e-5).
LOGIT_ATOL = 1e-3
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(scope="module")
def sv_dir(models_dir) -> Path:
    return models_dir / "SenseVoiceSmall"


@pytest.fixture(scope="module")
def cam_onnx(models_dir) -> Path:
    return models_dir / "campplus" / "campplus.onnx"


@pytest.fixture(scope="module")
def onnx_sv(sv_dir) -> SenseVoice:
    return SenseVoice.load(sv_dir, quantized="no", device="cpu", threads=1)


@pytest.fixture(scope="module")
def torch_sv(sv_dir) -> SenseVoice:
    return SenseVoice.load(sv_dir, device="cpu", threads=1, backend="torch")


@pytest.fixture(scope="module")
def clips():
    return load_clips()


@pytest.fixture(scope="module")
def audios(clips) -> list[np.ndarray]:
    """Utterances of different lengths: the clips where present, else synthetic voices."""
    if clips:
        return [c.audio for c in clips[:4]]
    return [voice(1.3, 120, 0), voice(2.9, 200, 1), voice(0.6, 160, 2), voice(2.0, 95, 3)]


# --- SenseVoice --------------------------------------------------------------------------------


def test_torch_backend_info(torch_sv, sv_dir):
    info = torch_sv.info
    assert (info.backend, info.device, info.precision, info.path) == ("torch", "cpu", "fp32", sv_dir / "model.pt")
    assert info.gpu_memory_mb is None and "torch/CPU" in info.describe()
    assert isinstance(torch_sv.runtime, TorchSenseVoice)
    assert torch_sv.runtime.vocab_size == torch_sv.tokenizer.size


def test_logits_match_onnx(torch_sv, onnx_sv, audios):
    feats = torch_sv.features(audios)
    languages, itn = ["auto", "zh", "en", "auto"], [True, False, True, False]
    ours = torch_sv.logits(feats, languages, itn)
    ref = onnx_sv.logits(feats, languages, itn)
    for a, b in zip(ours, ref):
        assert a.dtype == np.float32 and a.shape == b.shape
        assert float(np.abs(a - b).max()) < LOGIT_ATOL
        assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.98


def test_decoded_text_matches_onnx_on_the_clips(torch_sv, onnx_sv, clips):
    if not clips:
        pytest.skip("../shared/audio absent")
    audios = [c.audio for c in clips]
    ours = torch_sv.transcribe_batch(audios)
    ref = onnx_sv.transcribe_batch(audios)
    assert [t.raw for t in ours] == [t.raw for t in ref]
    assert sum(bool(t.text) for t in ours) == len(clips)  # the trained stand-in says something on every clip


def test_the_best_path_is_the_argmax_of_the_logits_taken_on_the_device(torch_sv, audios):
    """`best_path` (what transcription reads) copies ids, not logits, and loses nothing: the same
    ids as the logits' argmax on the host, so the same transcripts as decoding the logits."""
    feats = torch_sv.features(audios)
    languages, itn = ["auto", "zh", "en", "auto"], [True, False, True, False]
    paths = torch_sv.best_paths(feats, languages, itn)
    logits = torch_sv.logits(feats, languages, itn)
    for best, lg in zip(paths, logits):
        assert best.dtype == np.int32 and best.shape == lg.shape[:1]
        np.testing.assert_array_equal(best, lg.argmax(-1))
    assert [torch_sv.decode_best(b) for b in paths] == [torch_sv.decode(lg) for lg in logits]


def test_top_k_taken_on_the_device_is_the_logits_top_k(torch_sv, audios):
    """`top_k` (what the hotword search reads) copies k ids and scores a frame, the same as the
    host's top-k of the logits: best first, scores less the frame's best."""
    from asr_server.engines.sensevoice.onnx import top_k

    feats = torch_sv.features(audios)
    languages, itn = ["auto"] * len(audios), [True] * len(audios)
    tops = torch_sv.top_k(feats, languages, itn, 8)
    for (ids, scores), lg in zip(tops, torch_sv.logits(feats, languages, itn), strict=True):
        ref_ids, ref_scores = top_k(lg, 8)
        assert ids.dtype == np.int32 and ids.shape == (lg.shape[0], 8)
        np.testing.assert_array_equal(ids[:, 0], lg.argmax(-1))
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
        assert (ids == ref_ids).mean() > 0.99  # equal scores may come in either order


def test_batched_and_single_calls_agree(torch_sv, audios):
    feats = torch_sv.features(audios)
    batch = torch_sv.logits(feats, ["auto"] * len(feats), [True] * len(feats))
    for f, b in zip(feats, batch):
        (single,) = torch_sv.logits([f], ["auto"], [True])
        assert single.shape == b.shape == (f.shape[0] + 4, single.shape[1])
        np.testing.assert_allclose(b, single, atol=1e-4, rtol=0)


def test_backend_run_contract(torch_sv):
    backend = torch_sv.runtime
    feats = np.random.default_rng(0).standard_normal((2, 9, 560)).astype(np.float32)
    logits, lens = backend.run(
        feats, np.array([9, 5], np.int32), np.array([0, 3], np.int32), np.array([14, 15], np.int32)
    )
    assert logits.dtype == np.float32 and logits.shape == (2, 13, backend.vocab_size)
    assert lens.dtype == np.int32 and lens.tolist() == [13, 9]
    with pytest.raises(ValueError, match="560"):
        backend.run(feats[:, :, :80], np.array([9, 5], np.int32), np.zeros(2, np.int32), np.zeros(2, np.int32))


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(sv_dir, caplog):
    engine = SenseVoice.load(sv_dir, device="cpu", threads=1, backend="torch", precision="fp16")
    assert engine.info.precision == "fp32"
    assert "fp16 needs CUDA" in caplog.text


def test_autocast_fp16_path_keeps_float32_outputs_and_the_argmax(torch_sv, audios, monkeypatch):
    """The fp16 code path (autocast) without a GPU: CPU autocast stands in for CUDA's, so a dtype
    clash in the forward would show here; outputs stay float32 and the best path barely moves."""
    feats = torch_sv.features(audios)
    ref = torch_sv.logits(feats, ["auto"] * len(feats), [True] * len(feats))
    monkeypatch.setattr(torch_sv.runtime._at, "autocast", lambda: torch.autocast("cpu", dtype=torch.float16))
    out = torch_sv.logits(feats, ["auto"] * len(feats), [True] * len(feats))
    for a, b in zip(out, ref):
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert 0 < float(np.abs(a - b).max()) < 0.5  # fp16 did run, and stayed close
        assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


@pytest.mark.skipif(CUDA, reason="a CUDA device is present")
def test_cuda_asked_without_cuda_falls_back_loudly(sv_dir, caplog):
    engine = SenseVoice.load(sv_dir, device="cuda", threads=1, backend="torch")
    assert engine.info.device == "cpu"
    assert "FALLING BACK TO CPU" in caplog.text
    assert SenseVoice.load(sv_dir, device="auto", threads=1, backend="torch").info.device == "cpu"


def test_missing_or_corrupt_weights_are_named(sv_dir, tmp_path):
    d = tmp_path / "sv"
    shutil.copytree(sv_dir, d)
    (d / "model.pt").unlink()
    with pytest.raises(ModelFileError, match="model.pt"):
        SenseVoice.load(d, device="cpu", backend="torch")
    assert SenseVoice.load(d, quantized="no", device="cpu").info.backend == "onnxruntime"  # ONNX needs no model.pt
    (d / "model.pt").write_bytes((sv_dir / "model.pt").read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="cannot load .*model.pt"):
        SenseVoice.load(d, device="cpu", backend="torch")
    state = torch.load(sv_dir / "model.pt", weights_only=True)
    del state["ctc.ctc_lo.bias"]
    torch.save(state, d / "model.pt")
    with pytest.raises(ModelFileError, match="tensors missing .*ctc.ctc_lo.bias"):
        SenseVoice.load(d, device="cpu", backend="torch")


def test_missing_torch_is_a_clear_error(sv_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(BackendUnavailableError, match="scripts/setup.sh torch"):
        TorchSenseVoice(sv_dir, device="cpu")


def test_onnx_serving_never_imports_torch(models_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from asr_server.config import load_config
        from asr_server.core.pipeline import Pipeline
        cfg = load_config(None, env={{}}, overrides={{
            "asr": {{"model_dir": {str(models_dir / "SenseVoiceSmall")!r}}},
            "speaker": {{"model": {str(models_dir / "campplus" / "campplus.onnx")!r},
                        "db": {str(tmp_path / "vp.sqlite")!r}}},
            "engine": {{"device": "cpu", "threads": 1}}}})
        Pipeline.load(cfg)
        print(sorted(m for m in ("torch", "funasr", "speechbrain") if m in sys.modules))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@needs_cuda
def test_cuda_fp32_and_fp16_agree_with_cpu(sv_dir, torch_sv, audios):
    feats = torch_sv.features(audios)
    ref = torch_sv.logits(feats, ["auto"] * len(feats), [True] * len(feats))
    for precision, atol, agree in (("fp32", 1e-2, 0.99), ("fp16", None, 0.9)):
        gpu = SenseVoice.load(sv_dir, device="cuda", backend="torch", precision=precision)
        assert gpu.info.device.startswith("cuda") and gpu.info.precision == precision
        assert gpu.info.gpu_memory_mb is not None and gpu.info.gpu_memory_mb > 0
        out = gpu.logits(feats, ["auto"] * len(feats), [True] * len(feats))
        for a, b in zip(out, ref):
            assert a.dtype == np.float32 and np.isfinite(a).all()
            if atol is not None:
                assert float(np.abs(a - b).max()) < atol
            assert (a.argmax(-1) == b.argmax(-1)).mean() >= agree


# --- CAM++ -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_cam(cam_onnx) -> CampplusEmbedder:
    return CampplusEmbedder.load(cam_onnx, device="cpu", threads=1, backend="torch")


def test_campplus_matches_onnx(torch_cam, cam_onnx, audios):
    onnx = CampplusEmbedder.load(cam_onnx, device="cpu", threads=1)
    assert isinstance(torch_cam.runtime, TorchCampplus)
    assert torch_cam.info.path.name == "campplus_cn_common.bin" and torch_cam.dim == onnx.dim
    probes = audios + [voice(0.1, 150, 9)]  # one shorter than the minimum: repeated, on both
    ours, ref = torch_cam.embed_batch(probes), onnx.embed_batch(probes)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() > 0.9999, cos


def test_campplus_batched_and_single_agree(torch_cam):
    audios = [voice(1.0, 110, 0), voice(1.0, 240, 1), voice(1.6, 180, 2)]
    batch = torch_cam.embed_batch(audios)
    for a, row in zip(audios, batch):
        np.testing.assert_allclose(torch_cam.embed(a), row, atol=1e-5)
    raw = torch_cam.runtime.run(np.stack([torch_cam.features(a) for a in audios[:2]]))
    assert raw.dtype == np.float32 and raw.shape == (2, torch_cam.dim)


def test_campplus_missing_weights_are_named(cam_onnx, tmp_path):
    d = tmp_path / "campplus"
    shutil.copytree(cam_onnx.parent, d)
    (d / "campplus_cn_common.bin").unlink()
    with pytest.raises(ModelFileError, match="campplus_cn_common.bin"):
        CampplusEmbedder.load(d / "campplus.onnx", device="cpu", backend="torch")


def test_models_check_expects_the_torch_weights(models_dir, tmp_path):
    """`models.missing_model_files` asks for exactly the files the torch backends read."""
    from asr_server.modelfiles.layout import missing_model_files

    d = tmp_path / "models"
    shutil.copytree(models_dir / "SenseVoiceSmall", d / "SenseVoiceSmall")
    shutil.copytree(models_dir / "campplus", d / "campplus")
    cfg = make_config(d, tmp_path / "vp.sqlite", engine={"backend": "torch", "device": "cpu"})
    assert missing_model_files(cfg) == []
    (d / "SenseVoiceSmall" / "model.pt").unlink()
    (d / "campplus" / "campplus_cn_common.bin").unlink()
    for f in ("model.onnx", "model_quant.onnx"):
        (d / "SenseVoiceSmall" / f).unlink()
    (d / "campplus" / "campplus.onnx").unlink()
    assert sorted(p.name for p in missing_model_files(cfg)) == ["campplus_cn_common.bin", "model.pt"]


# --- the pipeline on the torch backend --------------------------------------------------------


async def test_torch_pipeline_recognizes_like_onnx_fp32(models_dir, tmp_path, onnx_sv, audios, clips):
    from asr_server.core.pipeline import Pipeline

    cfg = make_config(models_dir, tmp_path / "vp.sqlite", engine={"backend": "torch", "device": "cpu", "threads": 1})
    p = Pipeline.load(cfg)
    try:
        assert [m.backend for m in p.models][1:] == ["torch", "torch"]  # VAD stays on ONNX Runtime
        assert p.voiceprints.model == "campplus.onnx"  # voiceprints carry over between backends
        audio = audios[0]
        emb = await p.embed(audio)
        assert emb.shape == (192,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5
        p.voiceprints.enroll("me", emb[None])
        got = await p.recognize(audio, language="auto")
        assert got.transcript.raw == onnx_sv.transcribe(audio, language="auto").raw
        if clips:
            assert got.transcript.text and got.transcript.language == clips[0].language
        assert got.embed_ms is not None and got.audio_ms == len(audio) // 16
        assert got.speaker is not None and got.speaker.name == "me"
    finally:
        await p.close()


# --- ECAPA -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ecapa_dir(tmp_path_factory) -> Path:
    pytest.importorskip("speechbrain")
    return build_tiny_ecapa(tmp_path_factory.mktemp("models") / "ecapa")


@pytest.fixture(scope="module")
def ecapa(ecapa_dir):
    from asr_server.engines.speaker.ecapa import load_ecapa

    return load_ecapa(ecapa_dir, device="cpu", threads=1)


def test_ecapa_matches_speechbrains_encode_batch(ecapa, ecapa_dir):
    from speechbrain.inference.speaker import EncoderClassifier

    assert ecapa.dim == 24 and ecapa.info.backend == "torch" and ecapa.info.path == ecapa_dir
    sb = EncoderClassifier.from_hparams(
        source=str(ecapa_dir), savedir=None, overrides={"pretrained_path": str(ecapa_dir)}, run_opts={"device": "cpu"}
    )
    audio = voice(1.5, 140, 5)
    ref = sb.encode_batch(torch.from_numpy(audio)[None]).reshape(-1).numpy()
    np.testing.assert_allclose(ecapa.embed(audio), ref / np.linalg.norm(ref), atol=1e-5)


def test_ecapa_batched_and_single_agree(ecapa):
    audios = [voice(1.0, 110, 0), voice(1.0, 240, 1), voice(2.2, 180, 2), voice(0.05, 150, 3)]
    batch = ecapa.embed_batch(audios)
    assert batch.shape == (4, 24)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for a, row in zip(audios, batch):
        np.testing.assert_allclose(ecapa.embed(a), row, atol=1e-5)


def test_ecapa_errors(ecapa_dir, tmp_path):
    from asr_server.engines.speaker.ecapa import load_ecapa

    # The ONNX backend reads ecapa.onnx, which only `models export` writes: absent here.
    with pytest.raises(ModelFileError, match="models export"):
        load_ecapa(ecapa_dir, device="cpu", backend="onnx")
    with pytest.raises(ModelFileError, match="models pull --ecapa"):
        load_ecapa(tmp_path / "nowhere", device="cpu")
    d = tmp_path / "ecapa"
    shutil.copytree(ecapa_dir, d)
    (d / "embedding_model.ckpt").write_bytes(b"\0" * 100)
    with pytest.raises(ModelFileError, match="cannot load ECAPA"):
        load_ecapa(d, device="cpu")


async def test_ecapa_pipeline(models_dir, ecapa_dir, tmp_path):
    from asr_server.core.pipeline import Pipeline

    root = tmp_path / "models"
    root.mkdir()
    (root / "SenseVoiceSmall").symlink_to(models_dir / "SenseVoiceSmall")
    (root / "ecapa").symlink_to(ecapa_dir)
    cfg = make_config(
        root,
        tmp_path / "vp.sqlite",
        speaker={"model_type": "ecapa", "db": str(tmp_path / "vp.sqlite")},
        engine={"backend": "torch", "device": "cpu", "threads": 1},
    )
    p = Pipeline.load(cfg)
    try:
        assert p.speaker.info.path == root / "ecapa" and p.voiceprints.model == "ecapa"
        emb = await p.embed(voice(1.2, 130, 4))
        assert emb.shape == (24,)
    finally:
        await p.close()
