"""The export path (funasr PyTorch → ONNX) and the stand-in model builder."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("funasr")
ort = pytest.importorskip("onnxruntime")

from asr_server.modelfiles.manifest import sha256_file
from asr_server.modelfiles.onnx_export import export_campplus, export_sensevoice
from benchmarks import standins as R

pytestmark = pytest.mark.slow  # builds and exports models with torch

MICRO = R.SenseVoiceDims(
    output_size=32, attention_heads=2, linear_units=64, num_blocks=2, tp_blocks=1, dropout_rate=0.0
)


@pytest.fixture(scope="module")
def micro_sensevoice(tmp_path_factory):
    torch.manual_seed(0)
    model = R.new_sensevoice(MICRO, vocab_size=57).eval()
    out = tmp_path_factory.mktemp("sv")
    return model, export_sensevoice(model, out, quantize=True)


def test_sensevoice_export_signature(micro_sensevoice):
    _, files = micro_sensevoice
    sess = ort.InferenceSession(str(files.fp32), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, len(i.shape)) for i in sess.get_inputs()}
    assert inputs == {
        "speech": ("tensor(float)", 3),
        "speech_lengths": ("tensor(int32)", 1),
        "language": ("tensor(int32)", 1),
        "textnorm": ("tensor(int32)", 1),
    }
    assert [o.name for o in sess.get_outputs()] == ["ctc_logits", "encoder_out_lens"]
    assert sess.get_outputs()[0].shape[-1] == 57
    import onnx

    assert onnx.load(str(files.fp32)).opset_import[0].version == 14
    assert not list(files.fp32.parent.glob("*.data"))  # weights inside the file, no external data


@pytest.mark.parametrize("batch, frames", [(1, 9), (3, 41), (2, 600)])
def test_sensevoice_export_matches_torch(micro_sensevoice, batch, frames):
    model, files = micro_sensevoice
    rng = np.random.default_rng(frames)
    speech = rng.standard_normal((batch, frames, 560)).astype(np.float32)
    lengths = np.array([frames - 5 * i for i in range(batch)], dtype=np.int32)
    lang = np.array([0, 3, 4][:batch], dtype=np.int32)
    tn = np.array([14, 15, 14][:batch], dtype=np.int32)
    sess = ort.InferenceSession(str(files.fp32), providers=["CPUExecutionProvider"])
    logits, lens = sess.run(None, {"speech": speech, "speech_lengths": lengths, "language": lang, "textnorm": tn})
    assert logits.shape == (batch, frames + 4, 57)
    np.testing.assert_array_equal(lens, lengths + 4)
    with torch.no_grad():
        x = torch.from_numpy(speech)
        q = torch.cat(
            [
                model.embed(torch.from_numpy(lang).long())[:, None],
                model.embed(torch.LongTensor([[1, 2]])).repeat(batch, 1, 1),
                model.embed(torch.from_numpy(tn).long())[:, None],
                x,
            ],
            dim=1,
        )
        enc, enc_lens = model.encoder(q, torch.from_numpy(lengths).long() + 4)
        ref = model.ctc.ctc_lo(enc).numpy()
    for i in range(batch):
        n = int(lens[i])
        np.testing.assert_allclose(logits[i, :n], ref[i, :n], atol=1e-4, rtol=1e-4)


def test_int8_export_is_smaller_and_close(micro_sensevoice):
    _, files = micro_sensevoice
    assert files.int8 is not None and files.int8.stat().st_size < files.fp32.stat().st_size
    feeds = {
        "speech": np.random.default_rng(0).standard_normal((1, 30, 560)).astype(np.float32),
        "speech_lengths": np.array([30], np.int32),
        "language": np.array([0], np.int32),
        "textnorm": np.array([14], np.int32),
    }
    a = ort.InferenceSession(str(files.fp32), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(str(files.int8), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_export_leaves_the_callers_model_alone(micro_sensevoice):
    model, _ = micro_sensevoice
    assert "forward" not in vars(model)  # funasr's export() rebinds forward on the instance it gets
    assert not hasattr(model, "export_input_names")


def test_campplus_export_matches_torch(tmp_path):
    from funasr.models.campplus.model import CAMPPlus

    torch.manual_seed(0)
    model = CAMPPlus(**R.TINY_CAMPPLUS).eval()
    path = export_campplus(model, tmp_path / "campplus.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("feature", "tensor(float)")]
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    for batch, frames in [(1, 57), (3, 230)]:
        x = np.random.default_rng(frames).standard_normal((batch, frames, 80)).astype(np.float32)
        (emb,) = sess.run(None, {"feature": x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert emb.shape == (batch, 192)
        np.testing.assert_allclose(emb, ref, atol=1e-4, rtol=1e-4)


# --- the stand-in builder --------------------------------------------------------------------


def test_padded_vocabulary_has_published_size_and_tag_ids(tmp_path):
    import sentencepiece as spm

    R.train_bpe(R.SEED_TEXT, tmp_path / "seed.model", vocab_size=120)
    R.pad_bpe(tmp_path / "seed.model", tmp_path / "full.model", R.FULL_VOCAB_SIZE, R.FULL_TAG_IDS)
    seed = spm.SentencePieceProcessor(model_file=str(tmp_path / "seed.model"))
    full = spm.SentencePieceProcessor(model_file=str(tmp_path / "full.model"))
    assert full.get_piece_size() == R.FULL_VOCAB_SIZE
    for tag, i in R.FULL_TAG_IDS.items():
        assert full.id_to_piece(i) == tag
    assert all(full.piece_to_id(t) != full.unk_id() for t in R.TAGS)
    assert (full.unk_id(), full.bos_id(), full.eos_id()) == (0, 1, 2)
    text = "打开客厅的灯 turn on the light"
    assert full.decode(full.encode(text)) == seed.decode(seed.encode(text)) == text
    tagged = "<|en|><|NEUTRAL|><|Speech|><|withitn|>"
    tag_ids = set(R.FULL_TAG_IDS.values())
    assert [i for i in full.encode(tagged) if i in tag_ids] == [24885, 25004, 24993, 25016]


def test_char_error_rate():
    assert R.char_error_rate("abc", "abc") == 0
    assert R.char_error_rate("", "abcd") == 1
    assert R.char_error_rate("abxd", "abcd") == 0.25
    assert R.char_error_rate("打开灯", "打开客厅的灯") == 0.5


def test_opus_round_trip_keeps_length_and_content():
    t = np.arange(16000 * 2 + 123) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y = R.opus_round_trip(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert abs(np.sqrt(np.mean(y[2000:-2000] ** 2)) - np.sqrt(np.mean(x**2))) < 0.05


def test_random_build_without_clips_and_reuse(tmp_path):
    """No clips: random weights, still a complete directory the engines load; a second call reuses it."""
    from asr_server.engines.sensevoice import SenseVoice
    from asr_server.engines.speaker.campplus import CampplusEmbedder

    m = R.build_models(tmp_path, size="tiny", audio_dir=None, seed=3)
    assert (m.size, m.seed, m.trained, m.audio) == ("tiny", 3, False, None)
    for rel, meta in m.files.items():
        p = tmp_path / rel
        assert p.stat().st_size == meta["size"] and sha256_file(p) == meta["sha256"]
    assert {
        "SenseVoiceSmall/model.onnx",
        "SenseVoiceSmall/model_quant.onnx",
        "SenseVoiceSmall/am.mvn",
        f"SenseVoiceSmall/{R.BPE_NAME}",
        "SenseVoiceSmall/config.yaml",
        "SenseVoiceSmall/configuration.json",
        "SenseVoiceSmall/model.pt",
        "campplus/campplus.onnx",
    } <= set(m.files)
    assert json.loads((tmp_path / R.MANIFEST).read_text())["files"] == m.files

    sv = SenseVoice.load(tmp_path / R.SENSEVOICE_DIR)
    t = sv.transcribe(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    assert t.raw  # random weights emit something, never crash
    assert CampplusEmbedder.load(tmp_path / R.CAMPPLUS_DIR / "campplus.onnx").embed(
        np.zeros(8000, np.float32)
    ).shape == (192,)

    stamp = (tmp_path / R.SENSEVOICE_DIR / "model.onnx").stat().st_mtime_ns
    assert R.build_models(tmp_path, size="tiny", audio_dir=None, seed=3).files == m.files
    assert (tmp_path / R.SENSEVOICE_DIR / "model.onnx").stat().st_mtime_ns == stamp
    assert R.is_current(tmp_path, "tiny", 3, None)
    assert not R.is_current(tmp_path, "tiny", 4, None)
    assert not R.is_current(tmp_path, "full", 3, None)
    (tmp_path / R.CAMPPLUS_DIR / "campplus.onnx").write_bytes(b"truncated")
    assert not R.is_current(tmp_path, "tiny", 3, None)


def test_bad_clip_directory(tmp_path):
    with pytest.raises(R.BuildError, match="MANIFEST"):
        R.load_clips(tmp_path)
    (tmp_path / "MANIFEST.tsv").write_text("file\tlanguage\ttranscript\nx.wav\tde\thallo\n")
    with pytest.raises(R.BuildError, match="de"):
        R.load_clips(tmp_path)


def test_reexport_of_a_model_directory_reproduces_its_onnx(tmp_path):
    """`asr-server models export` path: model.pt + config.yaml → the same graph outputs as shipped."""
    from asr_server.modelfiles.onnx_export import load_funasr_sensevoice
    from tests.support.models import sensevoice_dir

    src = sensevoice_dir()
    model = load_funasr_sensevoice(src)
    assert type(model).__name__ == "SenseVoiceSmall"
    files = export_sensevoice(model, tmp_path, quantize=False)
    assert files.int8 is None and not (tmp_path / "model_quant.onnx").exists()
    feeds = {
        "speech": np.random.default_rng(1).standard_normal((2, 33, 560)).astype(np.float32),
        "speech_lengths": np.array([33, 20], np.int32),
        "language": np.array([0, 4], np.int32),
        "textnorm": np.array([14, 15], np.int32),
    }
    a = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(files.fp32), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(a[1], b[1])
    for i, n in enumerate(a[1]):
        np.testing.assert_allclose(a[0][i, :n], b[0][i, :n], atol=1e-5)
    with pytest.raises(Exception, match="model.pt"):
        load_funasr_sensevoice(tmp_path)
