"""The tiny stand-in models, built once by `benchmarks/standins.py` into `build/test-models/<key>/`.

The key hashes the sources that decide their content, so editing the builder, the frontend or the
export path rebuilds them and nothing else does. When the shared clips exist, the tiny SenseVoice
is trained on them and transcribes them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .audio import AUDIO, HAVE_AUDIO, REPO

TEST_MODELS = REPO / "build" / "test-models"
_SOURCES = ("benchmarks/standins.py", "asr_server/engines/features.py", "asr_server/modelfiles/onnx_export.py")


def clips_dir() -> Path | None:
    """The shared clip directory, or None where this checkout has none (CI)."""
    return AUDIO if HAVE_AUDIO else None


def models_key() -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update((REPO / rel).read_bytes())
    h.update(b"clips" if clips_dir() is not None else b"no-clips")
    return h.hexdigest()[:12]


def tiny_models_dir() -> Path:
    """Directory holding `SenseVoiceSmall/` and `campplus/campplus.onnx` of the tiny stand-ins."""
    from benchmarks.standins import build_models

    out = TEST_MODELS / models_key()
    build_models(out, size="tiny", audio_dir=clips_dir(), seed=0)
    return out


def sensevoice_dir() -> Path:
    return tiny_models_dir() / "SenseVoiceSmall"


def campplus_path() -> Path:
    return tiny_models_dir() / "campplus" / "campplus.onnx"


def load_clips() -> list:
    """The MANIFEST clips as `random_models.Clip` (16 kHz mono float32); empty without clips."""
    from benchmarks.standins import load_clips as _load

    d = clips_dir()
    return _load(d) if d is not None else []


ECAPA_YAML = """\
# A tiny ECAPA-TDNN in the layout of speechbrain/spkrec-ecapa-voxceleb (random weights, for tests).
n_mels: 80
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
out_n_neurons: 4
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [32, 32, 32, 32, 96]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 16
    se_channels: 16
    lin_neurons: 24
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 24
    out_neurons: !ref <out_n_neurons>
mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


def build_tiny_ecapa(out: Path, seed: int = 0) -> Path:
    """The five files `models pull --ecapa` places, for a tiny random ECAPA (speechbrain's classes)."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    out.mkdir(parents=True)
    (out / "hyperparams.yaml").write_text(ECAPA_YAML, encoding="utf-8")
    torch.manual_seed(seed)
    hp = load_hyperpyyaml(ECAPA_YAML, overrides={"pretrained_path": str(out)})
    emb = hp["embedding_model"].eval()
    torch.save(emb.state_dict(), out / "embedding_model.ckpt")
    torch.save(hp["classifier"].state_dict(), out / "classifier.ckpt")
    norm = hp["mean_var_norm_emb"]
    norm.train()
    norm(torch.randn(8, 1, 24), torch.ones(8))  # global statistics need one update before they can be saved
    norm._save(out / "mean_var_norm_emb.ckpt")
    enc = hp["label_encoder"]
    enc.update_from_iterable([f"spk{i}" for i in range(4)])
    enc.save(out / "label_encoder.txt")
    return out


#: The metadata sherpa-onnx's scripts/3dspeaker/export-onnx.py writes into its CAM++ export.
SHERPA_CAMPPLUS_METADATA = {
    "framework": "3d-speaker",
    "language": "Chinese",
    "url": "https://www.modelscope.cn/models/damo/speech_campplus_sv_zh-cn_16k-common/summary",
    "comment": "This model is from damo/speech_campplus_sv_zh-cn_16k-common",
    "sample_rate": "16000",
    "output_dim": "192",
    "normalize_samples": "1",
    "feature_normalize_type": "global-mean",
}


def sherpa_campplus(src: Path, dst: Path, **metadata: str) -> Path:
    """A CAM++ graph in sherpa-onnx's published layout, from our export `src`: input `x` [N,T,80],
    output `embedding` with its batch fixed at 1 (that script's dynamic_axes names `embeddings`, so
    the output keeps the traced shape), and its metadata (`metadata` overrides entries)."""
    import onnx

    model = onnx.load(str(src))
    (inp,) = model.graph.input
    old = inp.name
    inp.name = "x"
    for node in model.graph.node:
        node.input[:] = ["x" if n == old else n for n in node.input]
    out = model.graph.output[0].type.tensor_type.shape.dim[0]
    out.ClearField("dim_param")
    out.dim_value = 1
    for key, value in {**SHERPA_CAMPPLUS_METADATA, **metadata}.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def fake_hub(root: Path):
    """A stand-in for the hub clients (`modelfiles.hub._download`): copies the files of
    `root/<repo_id>/` that match the target's patterns, and records (repo_id, patterns) per call."""
    import fnmatch
    import shutil

    calls: list[tuple[str, tuple[str, ...]]] = []

    def download(target) -> None:
        calls.append((target.repo_id, tuple(target.patterns)))
        target.dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((root / target.repo_id).iterdir()):
            if any(fnmatch.fnmatch(f.name, pat) for pat in target.patterns):
                shutil.copy(f, target.dest / f.name)

    return download, calls
