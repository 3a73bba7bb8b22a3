"""`asr-server models`: pull fails fast offline, list/verify name every wrong file, the manifest holds.

The ONNX files here are built with the `onnx` helper API so that they have exactly the engines'
signatures (or deliberately not); no test touches an address other than loopback.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from asr_server import errors
from asr_server.cli import models as models_cli
from asr_server.config import Config, load_config
from asr_server.engines import contracts
from asr_server.engines.sensevoice.model import FRONTEND_CONF
from asr_server.errors import ModelFileError
from asr_server.modelfiles import export, hub, inspect, layout, manifest, repos
from tests.support.models import fake_hub

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper

# --------------------------------------------------------------------------- building model folders


def sensevoice_onnx(path: Path, vocab: int, lengths_type: int = TensorProto.INT32) -> None:
    """A graph with SenseVoice's exported signature: logits = speech @ W, lengths passed through."""
    w = numpy_helper.from_array(np.zeros((560, vocab), np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["speech", "W"], ["ctc_logits"]),
            helper.make_node("Identity", ["speech_lengths"], ["encoder_out_lens"]),
        ],
        "sensevoice",
        [
            helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["batch_size", "feats_length", 560]),
            helper.make_tensor_value_info("speech_lengths", lengths_type, ["batch_size"]),
            helper.make_tensor_value_info("language", TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info("textnorm", TensorProto.INT32, ["batch_size"]),
        ],
        [
            helper.make_tensor_value_info("ctc_logits", TensorProto.FLOAT, ["batch_size", "feats_length", vocab]),
            helper.make_tensor_value_info("encoder_out_lens", lengths_type, ["batch_size"]),
        ],
        initializer=[w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), str(path))


def campplus_onnx(path: Path, dim: int = 192) -> None:
    """A graph with CAM++'s signature: mean over time, then a projection to `dim`."""
    w = numpy_helper.from_array(np.zeros((80, dim), np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["feature"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["embedding"]),
        ],
        "campplus",
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim])],
        initializer=[w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), str(path))


def bpe_model(path: Path) -> int:
    """Train a tiny sentencepiece BPE model; returns its number of pieces."""
    spm = pytest.importorskip("sentencepiece")
    sentences = ["hello world", "the quick brown fox", "jumps over the lazy dog", "speech to text"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=40,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor()
    sp.Load(str(path))
    return sp.GetPieceSize()


@pytest.fixture(scope="module")
def bpe_bytes(tmp_path_factory) -> tuple[bytes, int]:
    p = tmp_path_factory.mktemp("bpe") / "bpe.model"
    n = bpe_model(p)
    return p.read_bytes(), n


def make_config(root: Path, **sections) -> Config:
    base = {
        "asr": {"model_dir": str(root / "SenseVoiceSmall")},
        "speaker": {"model": str(root / "campplus" / "campplus.onnx"), "db": str(root / "vp.sqlite")},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_config(None, env={}, overrides=base)


@pytest.fixture
def good(tmp_path, bpe_bytes) -> Config:
    """A complete, correct models folder (fp32 + int8 SenseVoice, CAM++) and its config."""
    root = tmp_path / "models"
    sv = root / "SenseVoiceSmall"
    sv.mkdir(parents=True)
    (root / "campplus").mkdir()
    data, pieces = bpe_bytes
    (sv / contracts.SENSEVOICE_BPE).write_bytes(data)
    sensevoice_onnx(sv / contracts.SENSEVOICE_FP32, pieces)
    sensevoice_onnx(sv / contracts.SENSEVOICE_INT8, pieces)
    (sv / contracts.SENSEVOICE_CMVN).write_text("<Nnet>\n<AddShift> 560 560\n<Rescale> 560 560\n</Nnet>\n")
    (sv / contracts.SENSEVOICE_CONFIG).write_text("encoder: SenseVoiceEncoderSmall\nmodel: SenseVoiceSmall\n")
    campplus_onnx(root / "campplus" / "campplus.onnx")
    return make_config(root)


def run_cli(config: Config, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    models_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    return args.func(args, config)


def closed_loopback_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- missing files


def test_missing_model_files_names_every_absent_file(tmp_path):
    cfg = make_config(tmp_path / "models")
    sv = Path(cfg.asr.model_dir)
    missing = set(layout.missing_model_files(cfg))
    # Alternatives are both named when neither is there: either ONNX file, the bpe model or tokens.json.
    assert missing == {
        sv / "am.mvn",
        sv / contracts.SENSEVOICE_BPE,
        sv / contracts.SENSEVOICE_TOKENS,
        sv / "config.yaml",
        sv / "model.onnx",
        sv / "model_quant.onnx",
        Path(cfg.speaker.model),
    }
    problems = inspect.check_models(cfg)
    assert any("neither model.onnx nor model_quant.onnx" in p for p in problems)
    assert any(f"neither {contracts.SENSEVOICE_BPE} nor {contracts.SENSEVOICE_TOKENS}" in p for p in problems)
    assert any(str(Path(cfg.speaker.model)) in p and "missing" in p for p in problems)
    with pytest.raises(ModelFileError, match="asr-server models pull"):
        inspect.require_models(cfg)


def test_missing_model_files_follows_the_config(tmp_path):
    root = tmp_path / "models"
    sv = root / "SenseVoiceSmall"
    int8_only = layout.missing_model_files(make_config(root, asr={"quantized": "yes"}, speaker={"enabled": False}))
    assert sv / "model_quant.onnx" in int8_only and sv / "model.onnx" not in int8_only
    assert not any("campplus" in str(p) for p in int8_only)
    torch_backend = layout.missing_model_files(make_config(root, engine={"backend": "torch"}))
    assert sv / "model.pt" in torch_backend and root / "campplus" / contracts.CAMPPLUS_WEIGHTS in torch_backend
    assert sv / "model.onnx" not in torch_backend
    ecapa = layout.missing_model_files(make_config(root, speaker={"model_type": "ecapa"}))
    assert root / "ecapa" / "ecapa.onnx" in ecapa and root / "ecapa" / "embedding_model.ckpt" not in ecapa
    assert root / "campplus" / "campplus.onnx" not in ecapa
    ecapa_torch = layout.missing_model_files(
        make_config(root, speaker={"model_type": "ecapa"}, engine={"backend": "torch"})
    )
    assert root / "ecapa" / "embedding_model.ckpt" in ecapa_torch and root / "ecapa" / "ecapa.onnx" not in ecapa_torch


def test_either_sensevoice_file_is_enough_in_auto_mode(good):
    Path(good.asr.model_dir, contracts.SENSEVOICE_FP32).unlink()
    assert layout.missing_model_files(good) == []
    assert inspect.check_models(good, deep=True) == []


# --------------------------------------------------------------------------- list / verify


def test_list_and_verify_accept_good_files(good, capsys):
    assert layout.missing_model_files(good) == []
    assert inspect.check_models(good, deep=True) == []
    assert run_cli(good, "list") == 0
    out = capsys.readouterr().out
    assert "speech float32[batch_size, feats_length, 560]" in out
    assert "matches the SenseVoice engine" in out and "matches the CAM++ engine" in out
    assert run_cli(good, "verify") == 0
    assert "all model files OK" in capsys.readouterr().out


def test_verify_compares_hashes_recorded_in_the_manifest(good, capsys):
    recorded = manifest.record_files(good, layout.dir_files(Path(good.asr.model_dir)), "local")
    assert len(recorded) == 5
    data = json.loads(manifest.manifest_path(good).read_text())
    entry = data["files"]["SenseVoiceSmall/model.onnx"]
    onnx_file = Path(good.asr.model_dir) / "model.onnx"
    assert entry["size"] == onnx_file.stat().st_size and entry["sha256"] == manifest.sha256_file(onnx_file)
    assert run_cli(good, "verify") == 0
    assert "sha256 ok" in capsys.readouterr().out


def test_truncated_file_is_named_and_fails_verify(good, capsys):
    target = Path(good.asr.model_dir) / "model.onnx"
    manifest.record_files(good, [target], "local")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    problems = inspect.check_models(good)  # the cheap start-up check sees the size
    assert len(problems) == 1 and str(target) in problems[0] and "truncated" in problems[0]
    assert run_cli(good, "verify") == 1
    out = capsys.readouterr().out
    assert f"BAD      {target}" in out and "not a valid ONNX model" in out


def test_truncated_file_without_manifest_is_still_caught(good):
    target = Path(good.speaker.model)
    target.write_bytes(target.read_bytes()[:100])
    problems = inspect.check_models(good, deep=True)
    assert len(problems) == 1 and problems[0].startswith(f"{target}: not a valid ONNX model")


def test_wrong_signature_is_named_and_fails_verify(good, capsys):
    campplus_onnx(Path(good.speaker.model), dim=64)
    sensevoice_onnx(Path(good.asr.model_dir) / "model_quant.onnx", 10, lengths_type=TensorProto.INT64)
    assert run_cli(good, "verify") == 1
    out = capsys.readouterr().out
    problems = inspect.check_models(good, deep=True)
    assert any(
        p.startswith(str(good.speaker.model)) and "output 'embedding' axis 1 is 64, expected 192" in p for p in problems
    )
    quant = str(Path(good.asr.model_dir) / "model_quant.onnx")
    assert any(p.startswith(quant) and "input 'speech_lengths' is int64, expected int32" in p for p in problems)
    assert any(p.startswith(quant) and "ctc_logits has 10 classes" in p for p in problems)
    assert "does not match the CAM++ engine" in out


def test_sha_mismatch_is_named_and_fails_verify(good, capsys):
    cmvn = Path(good.asr.model_dir) / "am.mvn"
    manifest.record_files(good, [cmvn], "local")
    data = bytearray(cmvn.read_bytes())
    data[-2] ^= 0x01  # same size, different content
    cmvn.write_bytes(bytes(data))
    assert inspect.check_models(good) == []  # sizes agree: only hashing sees it
    assert inspect.check_models(good, deep=True) == [f"{cmvn}: sha256 differs from the manifest (corrupt or replaced)"]
    assert run_cli(good, "verify") == 1
    assert "manifest: sha256 differs" in capsys.readouterr().out


def test_unreadable_manifest_and_support_files_are_named(good):
    manifest.manifest_path(good).write_text("{not json")
    (Path(good.asr.model_dir) / "config.yaml").write_text("- a list\n- not a mapping\n")
    (Path(good.asr.model_dir) / contracts.SENSEVOICE_BPE).write_bytes(b"garbage")
    problems = inspect.check_models(good, deep=True)
    assert any("unreadable manifest" in p for p in problems)
    assert any(p.endswith("config.yaml: not a YAML mapping") for p in problems)
    assert any(contracts.SENSEVOICE_BPE in p and "not a readable sentencepiece model" in p for p in problems)


@pytest.mark.parametrize("reader", ["_signature_onnx", "_signature_ort"])
def test_both_signature_readers_agree(good, reader):
    sig = getattr(contracts, reader)(Path(good.speaker.model))
    assert [(t.name, t.dtype) for t in sig.inputs] == [("feature", "float32")]
    assert sig.inputs[0].shape[-1] == 80 and sig.outputs[0].shape[-1] == 192
    assert contracts.match_signature(sig, contracts.CAMPPLUS) == []
    Path(good.speaker.model).write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        getattr(contracts, reader)(Path(good.speaker.model))


# --------------------------------------------------------------------------- pull


def test_pull_without_network_fails_fast_with_instructions(tmp_path, capsys):
    cfg = make_config(tmp_path / "models")
    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    with pytest.raises(errors.HubUnreachableError) as err:
        hub.pull_models(cfg, "modelscope", endpoint=endpoint, probe_timeout=2.0)
    msg = str(err.value)
    assert f"{endpoint}/models/iic/SenseVoiceSmall" in msg
    assert "iic/speech_campplus_sv_zh-cn_16k-common" in msg
    assert "Nothing was downloaded" in msg and "place the files by hand" in msg
    assert f"{cfg.asr.model_dir}/: model.onnx and/or model_quant.onnx" in msg
    assert "am.mvn" in msg and contracts.SENSEVOICE_BPE in msg and str(cfg.speaker.model) in msg
    assert not manifest.manifest_path(cfg).exists()
    assert run_cli(cfg, "pull", "--source", "hf", "--endpoint", endpoint, "--timeout", "2") == 1
    err_out = capsys.readouterr().err
    assert "FunAudioLLM/SenseVoiceSmall" in err_out and "csukuangfj/speaker-embedding-models" in err_out


def test_probe_gives_up_on_a_hub_that_never_answers():
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(errors.HubUnreachableError, match="127.0.0.1"):
            hub.probe_endpoint(url, timeout=0.5)


def test_probe_accepts_any_http_answer():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        hub.probe_endpoint(f"http://127.0.0.1:{srv.server_port}", timeout=5.0)
    finally:
        srv.shutdown()
        srv.server_close()


def test_pull_with_files_present_stays_offline_and_records_them(good, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pull touched the network although every file is present")

    monkeypatch.setattr(hub, "probe_endpoint", no_network)
    monkeypatch.setattr(hub, "_download", no_network)
    result = hub.pull_models(good, echo=lambda msg: None)
    assert result.fetched == () and result.exported == ()
    entries = manifest.read_manifest(manifest.manifest_path(good))
    assert set(entries) == {
        "SenseVoiceSmall/model.onnx",
        "SenseVoiceSmall/model_quant.onnx",
        "SenseVoiceSmall/am.mvn",
        f"SenseVoiceSmall/{contracts.SENSEVOICE_BPE}",
        "SenseVoiceSmall/config.yaml",
        "campplus/campplus.onnx",
    }
    assert {e.source for e in entries.values()} == {"local"}


def test_plan_pull_fetches_only_what_is_missing(good):
    sv = Path(good.asr.model_dir)
    (sv / "am.mvn").unlink()
    Path(good.speaker.model).unlink()
    (Path(good.speaker.model).parent / contracts.CAMPPLUS_WEIGHTS).write_bytes(b"weights")
    plan = hub.plan_pull(good, "hf", endpoint="http://127.0.0.1:9", ecapa=True)
    assert [(t.repo_id, t.dest) for t in plan] == [
        ("FunAudioLLM/SenseVoiceSmall", sv),
        ("speechbrain/spkrec-ecapa-voxceleb", sv.parent / "ecapa"),
    ]
    assert plan[0].patterns == ["am.mvn"]  # ONNX is here: only the small file missing beside it
    assert plan[0].url == "http://127.0.0.1:9/FunAudioLLM/SenseVoiceSmall"
    assert hub.plan_pull(good, "ms", force=True)[1].repo_id == "csukuangfj/speaker-embedding-models"


def test_pull_records_fetched_files_with_their_source(tmp_path, monkeypatch, good):
    sv = Path(good.asr.model_dir)
    (sv / "am.mvn").unlink()

    def fake_download(target):  # stands in for the hub client
        (target.dest / "am.mvn").write_text("<AddShift>\n<Rescale>\n")

    monkeypatch.setattr(hub, "probe_endpoint", lambda url, timeout: None)
    monkeypatch.setattr(hub, "_download", fake_download)
    result = hub.pull_models(good, endpoint="http://127.0.0.1:9", echo=lambda msg: None)
    assert [t.repo_id for t in result.fetched] == ["iic/SenseVoiceSmall"]
    entries = manifest.read_manifest(manifest.manifest_path(good))
    assert entries["SenseVoiceSmall/am.mvn"].source == "modelscope:iic/SenseVoiceSmall"
    assert entries["SenseVoiceSmall/model.onnx"].source == "local"
    assert inspect.check_models(good, deep=True) == []


def test_export_without_weights_names_the_missing_file(tmp_path, capsys):
    cfg = make_config(tmp_path / "models")
    with pytest.raises(errors.ExportError, match="model.pt not found"):
        export.export_models(cfg, echo=lambda msg: None)
    assert run_cli(cfg, "export") == 1
    assert "asr-server models pull" in capsys.readouterr().err


def test_verify_names_a_valid_graph_that_onnx_runtime_cannot_load(good, capsys):
    target = Path(good.speaker.model)
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["feature"], ["embedding"], domain="com.example")],
        "campplus",
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", 192])],
    )
    onnx.save(
        helper.make_model(
            graph, ir_version=8, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.example", 1)]
        ),
        str(target),
    )
    assert run_cli(good, "list") == 0  # the signature alone looks right
    capsys.readouterr()
    assert run_cli(good, "verify") == 1
    assert "ONNX Runtime cannot load it" in capsys.readouterr().out
    assert any(p.startswith(f"{target}: ONNX Runtime cannot load it") for p in inspect.check_models(good, deep=True))


def test_quiet_verify_prints_only_problems(good, capsys):
    assert run_cli(good, "verify", "--quiet") == 0
    assert capsys.readouterr().out == ""
    (Path(good.asr.model_dir) / "am.mvn").unlink()
    assert run_cli(good, "verify", "-q") == 1
    assert capsys.readouterr().out.strip() == f"{Path(good.asr.model_dir) / 'am.mvn'}: missing"


def test_a_failed_download_is_named_and_can_be_resumed(tmp_path, monkeypatch, capsys):
    cfg = make_config(tmp_path / "models")

    def broken_download(target):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(hub, "probe_endpoint", lambda url, timeout: None)
    monkeypatch.setattr(hub, "_download", broken_download)
    with pytest.raises(errors.DownloadError, match="iic/SenseVoiceSmall-onnx .*connection reset by peer"):
        hub.pull_models(cfg, endpoint="http://127.0.0.1:9", echo=lambda msg: None)
    assert run_cli(cfg, "pull", "--endpoint", "http://127.0.0.1:9") == 1
    assert "Run `asr-server models pull` again" in capsys.readouterr().err


# --------------------------------------------------------------------------- export (needs the torch extra)


def kaldi_cmvn(dim: int = 560) -> str:
    zeros, ones = " ".join(["0"] * dim), " ".join(["1"] * dim)
    return (
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {zeros} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {ones} ]\n</Nnet>\n"
    )


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory, bpe_bytes) -> Path:
    """Model folders as the hubs publish them (PyTorch weights, no ONNX), with tiny funasr models."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("funasr")
    import yaml
    from funasr.models.campplus.model import CAMPPlus
    from funasr.models.sense_voice.model import SenseVoiceSmall

    root = tmp_path_factory.mktemp("hub") / "models"
    sv, cp = root / "SenseVoiceSmall", root / "campplus"
    sv.mkdir(parents=True)
    cp.mkdir()
    data, pieces = bpe_bytes
    (sv / contracts.SENSEVOICE_BPE).write_bytes(data)
    (sv / "am.mvn").write_text(kaldi_cmvn())
    encoder_conf = dict(
        output_size=32,
        attention_heads=2,
        linear_units=64,
        num_blocks=2,
        tp_blocks=1,
        dropout_rate=0.0,
        positional_dropout_rate=0.0,
        attention_dropout_rate=0.0,
        input_layer="pe",
        pos_enc_class="SinusoidalPositionEncoder",
        normalize_before=True,
        kernel_size=11,
        sanm_shfit=0,
        selfattention_layer_type="sanm",
    )
    conf = {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": encoder_conf,
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>"},
        "frontend": "WavFrontend",
        "frontend_conf": {**FRONTEND_CONF, "cmvn_file": None},
    }
    (sv / "config.yaml").write_text(yaml.safe_dump(conf))
    (sv / "configuration.json").write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "file_path_metas": {
                    "init_param": "model.pt",
                    "config": "config.yaml",
                    "tokenizer_conf": {"bpemodel": contracts.SENSEVOICE_BPE},
                    "frontend_conf": {"cmvn_file": "am.mvn"},
                },
            }
        )
    )
    model = SenseVoiceSmall(
        encoder="SenseVoiceEncoderSmall",
        encoder_conf=encoder_conf,
        input_size=560,
        vocab_size=pieces,
        **conf["model_conf"],
    )
    torch.save(model.state_dict(), sv / "model.pt")
    campplus_conf = {"feat_dim": 80, "embedding_size": 192, "growth_rate": 8, "bn_size": 2, "init_channels": 16}
    (cp / "config.yaml").write_text(yaml.safe_dump({"model": "CAMPPlus", "model_conf": campplus_conf}))
    torch.save(CAMPPlus(**campplus_conf).state_dict(), cp / contracts.CAMPPLUS_WEIGHTS)
    return root


@pytest.mark.slow
def test_export_turns_the_weights_into_onnx_the_engines_accept(weights_root, capsys):
    cfg = make_config(weights_root)
    assert set(layout.missing_model_files(cfg)) == {
        Path(cfg.asr.model_dir) / "model.onnx",
        Path(cfg.asr.model_dir) / "model_quant.onnx",
        Path(cfg.speaker.model),
    }
    assert run_cli(cfg, "export") == 0
    assert layout.missing_model_files(cfg) == []
    assert run_cli(cfg, "verify") == 0
    out = capsys.readouterr().out
    assert "matches the SenseVoice engine" in out and "matches the CAM++ engine" in out
    entries = manifest.read_manifest(manifest.manifest_path(cfg))
    assert entries["SenseVoiceSmall/model_quant.onnx"].source == "export:SenseVoiceSmall"
    assert entries["campplus/campplus.onnx"].source == "export:campplus"
    assert export.export_models(cfg, echo=lambda msg: None) == []  # present: not exported again


# --------------------------------------------------------------------------- pre-exported ONNX first


#: `configuration.json` of `iic/SenseVoiceSmall-onnx` (56 bytes there): not the torch model's, whose
#: `file_path_metas` funasr reads beside model.pt. Its exact bytes are not known here; any that are
#: not the torch repo's show whether pull brings it.
ONNX_REPO_CONFIGURATION = '{"framework": "onnx", "task": "auto-speech-recognition"}'


@pytest.fixture
def modelscope_hub(tmp_path, monkeypatch):
    """The hubs' real layouts, built from the tiny stand-ins. ModelScope: `iic/SenseVoiceSmall-onnx`
    (int8 ONNX, tokens.json, am.mvn, config.yaml and its own configuration.json; no bpe model),
    `iic/SenseVoiceSmall` (weights, bpe model, am.mvn, config.yaml, configuration.json) and CAM++'s
    `iic/speech_campplus_sv_zh-cn_16k-common` (the weights and configuration.json only: no ONNX).
    Hugging Face: sherpa-onnx's `csukuangfj/speaker-embedding-models` (its CAM++ export among others)."""
    import shutil

    from asr_server.engines.sensevoice.tokenizer import SentencePieceTokenizer, write_token_table
    from asr_server.modelfiles.repos import CAMPPLUS_SHERPA_ONNX
    from tests.support.models import sherpa_campplus, tiny_models_dir

    tiny = tiny_models_dir()
    root = tmp_path / "hub"
    onnx_repo, pt_repo, cp_repo, sherpa_repo = (
        root / "iic/SenseVoiceSmall-onnx",
        root / "iic/SenseVoiceSmall",
        root / "iic/speech_campplus_sv_zh-cn_16k-common",
        root / "csukuangfj/speaker-embedding-models",
    )
    for d in (onnx_repo, pt_repo, cp_repo, sherpa_repo):
        d.mkdir(parents=True)
    sv = tiny / "SenseVoiceSmall"
    for name in ("model_quant.onnx", "am.mvn", "config.yaml"):
        shutil.copy(sv / name, onnx_repo / name)
    (onnx_repo / "configuration.json").write_text(ONNX_REPO_CONFIGURATION)
    write_token_table(SentencePieceTokenizer(sv / contracts.SENSEVOICE_BPE), onnx_repo / "tokens.json")
    for name in ("model.pt", "am.mvn", "config.yaml", "configuration.json", contracts.SENSEVOICE_BPE):
        shutil.copy(sv / name, pt_repo / name)
    shutil.copy(tiny / "campplus" / contracts.CAMPPLUS_WEIGHTS, cp_repo / contracts.CAMPPLUS_WEIGHTS)
    (cp_repo / "configuration.json").write_text('{"framework": "pytorch", "task": "speaker-verification"}')
    sherpa_campplus(tiny / "campplus" / "campplus.onnx", sherpa_repo / CAMPPLUS_SHERPA_ONNX)
    sherpa_campplus(
        tiny / "campplus" / "campplus.onnx", sherpa_repo / "3dspeaker_speech_campplus_sv_en_voxceleb_16k.onnx"
    )
    download, calls = fake_hub(root)
    monkeypatch.setattr(hub, "probe_endpoint", lambda url, timeout: None)
    monkeypatch.setattr(hub, "_download", download)
    return root, calls


@pytest.mark.parametrize("bpe_on_hub", [True, False], ids=["bpe-fetched-alone", "tokens-json-only"])
def test_pull_takes_pre_exported_onnx_and_never_exports(modelscope_hub, tmp_path, monkeypatch, bpe_on_hub):
    root, calls = modelscope_hub
    if not bpe_on_hub:
        (root / "iic/SenseVoiceSmall" / contracts.SENSEVOICE_BPE).unlink()

    def no_export(*args, **kwargs):
        raise AssertionError("pull exported although the hub has pre-exported ONNX files")

    monkeypatch.setattr(export, "export_sensevoice_files", no_export)
    monkeypatch.setattr(export, "_export_campplus", no_export)
    cfg = make_config(tmp_path / "models")
    result = hub.pull_models(cfg, endpoint="http://127.0.0.1:9", echo=lambda msg: None)
    assert [repo for repo, _ in calls] == [
        "iic/SenseVoiceSmall-onnx",
        "iic/SenseVoiceSmall",
        "csukuangfj/speaker-embedding-models",
    ]
    assert calls[1][1] == (contracts.SENSEVOICE_BPE,)  # only the bpe model, which the ONNX repo lacks
    assert calls[2][1] == ("3dspeaker_speech_campplus_sv_zh-cn_16k-common.onnx",)  # one file of that repo
    assert not any("*.bin" in pats or "model.pt" in pats for _, pats in calls)
    sv = Path(cfg.asr.model_dir)
    # no configuration.json: the ONNX repo's is not the one funasr reads beside model.pt
    assert sorted(p.name for p in sv.iterdir()) == sorted(
        ["am.mvn", "config.yaml", "model_quant.onnx", "tokens.json"]
        + ([contracts.SENSEVOICE_BPE] if bpe_on_hub else [])
    )
    cp = Path(cfg.speaker.model).parent
    assert Path(cfg.speaker.model).is_file() and [p.name for p in cp.iterdir()] == ["campplus.onnx"]
    assert result.exported == () and layout.missing_model_files(cfg) == []
    assert inspect.check_models(cfg, deep=True) == []
    entries = manifest.read_manifest(manifest.manifest_path(cfg))
    assert entries["SenseVoiceSmall/tokens.json"].source == "modelscope:iic/SenseVoiceSmall-onnx"
    # The folder serves: the engines load it and the text decodes from tokens.json.
    from asr_server.engines.sensevoice import SenseVoice
    from asr_server.engines.speaker.campplus import CampplusEmbedder

    tokenizer = SenseVoice.load(sv, device="cpu").tokenizer
    assert type(tokenizer).__name__ == ("SentencePieceTokenizer" if bpe_on_hub else "TokenTable")
    assert CampplusEmbedder.load(Path(cfg.speaker.model)).runtime.input == "x"  # sherpa-onnx's, as published


@pytest.mark.slow
def test_pre_exported_files_that_do_not_fit_are_named_and_export_takes_over(modelscope_hub, tmp_path, capsys):
    root, calls = modelscope_hub
    # A graph with sherpa-onnx's tensor names in place of funasr's.
    bad = root / "iic/SenseVoiceSmall-onnx" / "model_quant.onnx"
    sensevoice_onnx(bad, 10)
    model = onnx.load(str(bad))
    renames = {"speech": "x", "speech_lengths": "x_length", "language": "language", "textnorm": "text_norm"}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    for value in model.graph.input:
        value.name = renames[value.name]
    onnx.save(model, str(bad))
    messages: list[str] = []
    cfg = make_config(tmp_path / "models")
    result = hub.pull_models(cfg, endpoint="http://127.0.0.1:9", echo=messages.append)
    sv = Path(cfg.asr.model_dir)
    assert any("model_quant.onnx does not fit the engine" in m and "'speech' missing" in m for m in messages)
    assert (sv / "model_quant.onnx.rejected").is_file()
    assert [repo for repo, _ in calls][:2] == ["iic/SenseVoiceSmall-onnx", "iic/SenseVoiceSmall"]
    assert "model.pt" in calls[1][1]  # the fallback fetched the weights...
    assert sv / "model.onnx" in result.exported  # ...and exported them
    assert inspect.check_models(cfg, deep=True) == []


def test_export_fallback_without_torch_says_how_to_install_before_fetching_weights(
    modelscope_hub, tmp_path, monkeypatch, capsys
):
    root, calls = modelscope_hub
    monkeypatch.setattr(hub, "exporter_missing", lambda: "torch, funasr, onnx not installed")
    cfg = make_config(tmp_path / "models")
    with pytest.raises(errors.MissingDependencyError) as err:
        hub.pull_models(cfg, "hf", endpoint="http://127.0.0.1:9", echo=lambda msg: None)
    assert "no pre-exported ONNX on huggingface" in str(err.value)
    assert "scripts/setup.sh torch" in str(err.value)
    assert calls == []  # nothing fetched for nothing
    assert run_cli(cfg, "pull", "--source", "hf", "--endpoint", "http://127.0.0.1:9") == 1
    assert "scripts/setup.sh torch" in capsys.readouterr().err


def test_verify_checks_a_token_table_against_the_logits(good, bpe_bytes):
    sv = Path(good.asr.model_dir)
    (sv / contracts.SENSEVOICE_BPE).unlink()
    _, pieces = bpe_bytes
    (sv / contracts.SENSEVOICE_TOKENS).write_text(json.dumps([f"p{i}" for i in range(pieces)]))
    assert inspect.check_models(good, deep=True) == []
    (sv / contracts.SENSEVOICE_TOKENS).write_text(json.dumps([f"p{i}" for i in range(pieces + 3)]))
    problems = inspect.check_models(good, deep=True)
    assert any("classes but tokens.json has" in p for p in problems)
    (sv / contracts.SENSEVOICE_TOKENS).write_text("{")
    problems = inspect.check_models(good, deep=True)
    assert any("tokens.json" in p and "not a readable token table" in p for p in problems)
    (sv / contracts.SENSEVOICE_TOKENS).unlink()
    assert any("neither" in p and contracts.SENSEVOICE_TOKENS in p for p in inspect.check_models(good))


@pytest.mark.slow
def test_on_cuda_pull_exports_the_fp32_graph_the_int8_only_hub_lacks(modelscope_hub, tmp_path):
    root, calls = modelscope_hub
    cfg = make_config(tmp_path / "models", engine={"device": "cuda"})
    messages: list[str] = []
    result = hub.pull_models(cfg, endpoint="http://127.0.0.1:9", echo=messages.append)
    sv = Path(cfg.asr.model_dir)
    assert (sv / "model_quant.onnx").is_file() and (sv / "model.onnx").is_file()
    assert sv / "model.onnx" in result.exported
    assert any("for CUDA" in m for m in messages)
    assert inspect.check_models(cfg, deep=True) == []


# --------------------------------------------------------------------------- a fresh box, and the folders users have

PULL_WITHOUT_TORCH = """
import sys
from pathlib import Path

import numpy as np

from asr_server.config import load_config
from asr_server.modelfiles import hub, inspect
from tests.support.models import fake_hub

hub_root, models = Path(sys.argv[1]), Path(sys.argv[2])
download, calls = fake_hub(hub_root)
hub.probe_endpoint = lambda url, timeout: None
hub._download = download
cfg = load_config(None, env={}, overrides={
    "asr": {"model_dir": str(models / "SenseVoiceSmall")},
    "speaker": {"model": str(models / "campplus" / "campplus.onnx"), "db": str(models / "vp.sqlite")},
})
result = hub.pull_models(cfg, echo=lambda msg: None)
assert result.exported == (), result.exported
assert inspect.check_models(cfg, deep=True) == []
from asr_server.engines.sensevoice import SenseVoice
from asr_server.engines.speaker.campplus import CampplusEmbedder

audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
SenseVoice.load(cfg.asr.model_dir, device="cpu").transcribe(audio)
assert CampplusEmbedder.load(cfg.speaker.model).embed(audio).shape == (192,)
print("repos:", [repo for repo, _ in calls])
print("torch imported:", sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "funasr"))))
"""


def test_first_pull_on_a_fresh_box_serves_without_importing_torch(modelscope_hub, tmp_path):
    """`scripts/serve.sh`'s pull with the default models, from the hubs' real layouts, in a fresh
    interpreter: the folder serves (both engines load and run) and torch was never imported."""
    import subprocess
    import sys

    root, _ = modelscope_hub
    out = subprocess.run(
        [sys.executable, "-c", PULL_WITHOUT_TORCH, str(root), str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "repos: ['iic/SenseVoiceSmall-onnx', 'iic/SenseVoiceSmall', 'csukuangfj/speaker-embedding-models']" in (
        out.stdout
    )
    assert "torch imported: []" in out.stdout


def xiaozhi_folder(root: Path) -> Config:
    """models/SenseVoiceSmall/ as an xiaozhi-esp32-server user has it: model.pt (downloaded by hand),
    config.yaml, the bpe model and the torch repo's configuration.json; no am.mvn, no ONNX."""
    import shutil

    from tests.support.models import tiny_models_dir

    tiny = tiny_models_dir() / "SenseVoiceSmall"
    sv = root / "SenseVoiceSmall"
    sv.mkdir(parents=True)
    for name in ("model.pt", "config.yaml", "configuration.json", contracts.SENSEVOICE_BPE):
        shutil.copy(tiny / name, sv / name)
    return make_config(root)


def test_an_xiaozhi_folder_is_told_both_ways_out_and_where_am_mvn_lives(tmp_path):
    from asr_server.app import check_model_files
    from asr_server.errors import StartupError

    cfg = xiaozhi_folder(tmp_path / "elsewhere")  # not under models/: no README beside it
    problems = inspect.check_models(cfg)
    assert any("am.mvn: missing" in p for p in problems)
    with pytest.raises(StartupError) as err:
        check_model_files(cfg)
    msg = str(err.value)
    assert "`asr-server models pull`" in msg and "`asr-server models export`" in msg
    assert "scripts/setup.sh torch" in msg  # what export needs
    assert "iic/SenseVoiceSmall" in msg and "FunAudioLLM/SenseVoiceSmall" in msg  # where am.mvn lives
    readme = msg.split("verify`. ")[1].removesuffix(" has the details.")
    assert Path(readme).is_file() and Path(readme) == repos.CHECKOUT_MODELS_README
    report = inspect.inspect_models(cfg, hashes=False)
    assert "`asr-server models export`" in inspect.format_report(report, inspect.remedy(cfg))


def test_an_xiaozhi_folder_gets_am_mvn_alone_where_it_can_export(modelscope_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(repos, "exporter_missing", lambda: None)  # the torch lock is installed
    cfg = xiaozhi_folder(tmp_path / "models")
    (Path(cfg.speaker.model).parent).mkdir()
    (Path(cfg.speaker.model).parent / contracts.CAMPPLUS_WEIGHTS).write_bytes(b"weights")
    plan = hub.plan_pull(cfg)
    assert [(t.repo_id, tuple(t.patterns)) for t in plan] == [("iic/SenseVoiceSmall", ("am.mvn",))]


def test_an_xiaozhi_folder_without_torch_takes_the_pre_exported_graph_and_keeps_its_files(
    modelscope_hub, tmp_path, monkeypatch
):
    root, calls = modelscope_hub
    monkeypatch.setattr(repos, "exporter_missing", lambda: "torch, funasr not installed")
    monkeypatch.setattr(hub, "exporter_missing", lambda: "torch, funasr not installed")
    cfg = xiaozhi_folder(tmp_path / "models")
    sv = Path(cfg.asr.model_dir)
    configuration = (sv / "configuration.json").read_bytes()
    result = hub.pull_models(cfg, echo=lambda msg: None)
    assert [repo for repo, _ in calls] == ["iic/SenseVoiceSmall-onnx", "csukuangfj/speaker-embedding-models"]
    assert result.exported == ()
    assert (sv / "configuration.json").read_bytes() == configuration  # funasr's own, for export later
    assert (sv / "am.mvn").is_file() and (sv / "model_quant.onnx").is_file()
    assert inspect.check_models(cfg, deep=True) == []


def test_cam_onnx_hub_unreachable_falls_back_to_the_weights_on_the_hub_asked_for(modelscope_hub, tmp_path, monkeypatch):
    root, calls = modelscope_hub
    hf = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", hf)

    def probe(url, timeout):
        if url == hf:
            raise errors.HubUnreachableError(f"{url} unreachable")

    monkeypatch.setattr(hub, "probe_endpoint", probe)
    monkeypatch.setattr(hub, "exporter_missing", lambda: "torch not installed")
    messages: list[str] = []
    cfg = make_config(tmp_path / "models")
    with pytest.raises(errors.MissingDependencyError, match="scripts/setup.sh torch"):
        hub.pull_models(cfg, echo=messages.append)
    assert any("csukuangfj/speaker-embedding-models" in m and "HF_ENDPOINT" in m for m in messages)
    # SenseVoice came from the pre-exported repository; CAM++'s weights would need the export
    assert [repo for repo, _ in calls] == ["iic/SenseVoiceSmall-onnx", "iic/SenseVoiceSmall"]


def test_a_configuration_json_that_is_not_the_torch_models_is_named_and_replaced(modelscope_hub, tmp_path, monkeypatch):
    """iic/SenseVoiceSmall-onnx's configuration.json (fetched by earlier pulls) lacks file_path_metas,
    so funasr would not find model.pt's files: export names it, and pull puts the torch repo's there."""
    root, calls = modelscope_hub
    monkeypatch.setattr(repos, "exporter_missing", lambda: None)  # the torch lock is installed
    cfg = xiaozhi_folder(tmp_path / "models")
    sv = Path(cfg.asr.model_dir)
    torch_configuration = (sv / "configuration.json").read_bytes()
    (sv / "configuration.json").write_text(ONNX_REPO_CONFIGURATION)
    with pytest.raises(errors.ExportError, match="not the PyTorch model's"):
        export.export_sensevoice_files(sv, quantize=False)
    messages: list[str] = []
    hub.pull_models(cfg, export=False, echo=messages.append)
    assert calls[0] == ("iic/SenseVoiceSmall", ("am.mvn", "configuration.json"))
    assert (sv / "configuration.json").read_bytes() == torch_configuration
    assert (sv / "configuration.json.rejected").read_text() == ONNX_REPO_CONFIGURATION
    assert any("configuration.json.rejected" in m for m in messages)
