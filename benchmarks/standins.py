"""Stand-in models built offline with funasr's own classes and the project's export path.

No machine of this project can download weights, yet the engines, the server and the benchmarks
need model files of the real layout. This module builds them:

* ``--size tiny``: a shrunk SenseVoice (funasr ``SenseVoiceSmall``, small encoder) and a tiny
  CAM++. With ``--audio`` pointing at the clip directory (``MANIFEST.tsv`` + clips), SenseVoice
  is overfitted for well under a minute on those clips (720 steps, CTC + funasr's tag loss), with
  the same features the server computes (``engines.features``) and augmentation that mimics the
  device path (gain, noise, leading and trailing silence, an Opus round trip), so that it
  transcribes them end to end; CAM++ gets its final projection trained to tell the clips apart
  (one class per clip). Without clips both keep random weights.
* ``--size full``: the real dimensions (234 M parameters, vocabulary 25055; CAM++ 192-dim) with
  random weights, for timing only. Its sentencepiece model is padded with unused pieces to 25055
  entries and places the tags at the ids the published vocabulary uses.

``python -m benchmarks.standins --size tiny --out build/models --audio ../shared/audio``
writes ``OUT/SenseVoiceSmall/`` (model.onnx, model_quant.onnx, am.mvn, the bpe model, config.yaml,
configuration.json, model.pt), ``OUT/campplus/`` (campplus.onnx, campplus_cn_common.bin,
config.yaml) and ``OUT/standins.json`` (files with sizes and sha256, training and evaluation
figures); a build whose manifest matches the request (size, seed, clips, builder source) is reused.
Builds are deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asr_server.engines import features as F
from asr_server.engines.sensevoice.model import FRONTEND_CONF
from asr_server.modelfiles.manifest import sha256_file

log = logging.getLogger("benchmarks.standins")

SENSEVOICE_DIR = "SenseVoiceSmall"
CAMPPLUS_DIR = "campplus"
#: The build record (what was built, from what, how well it trained). Not `manifest.json`, which is
#: the model folder's file list that `asr-server models` writes and reads (one writer, one schema).
MANIFEST = "standins.json"
BPE_NAME = "chn_jpn_yue_eng_ko_spectok.bpe.model"
CAMPPLUS_WEIGHTS = "campplus_cn_common.bin"

LANGUAGES = ("zh", "en", "yue", "ja", "ko", "nospeech")
EMOTIONS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN")
EVENTS = ("Speech", "BGM", "Laughter", "Applause", "Cry", "Sneeze", "Cough", "Breath")
ITN = ("withitn", "woitn")
TAGS = tuple(f"<|{t}|>" for t in LANGUAGES + EMOTIONS + EVENTS + ITN)
#: Ids of tags in the published SenseVoice vocabulary (funasr's model code and public tokenizer
#: tests); the full-size stand-in puts the tags there. Tags not listed get nearby free ids.
FULL_VOCAB_SIZE = 25055
FULL_TAG_IDS = {
    "<|zh|>": 24884,
    "<|en|>": 24885,
    "<|yue|>": 24888,
    "<|ja|>": 24892,
    "<|ko|>": 24896,
    "<|nospeech|>": 24992,
    "<|Speech|>": 24993,
    "<|HAPPY|>": 25001,
    "<|SAD|>": 25002,
    "<|ANGRY|>": 25003,
    "<|NEUTRAL|>": 25004,
    "<|EMO_UNKNOWN|>": 25009,
    "<|withitn|>": 25016,
    "<|woitn|>": 25017,
}
#: Language query ids of funasr's SenseVoiceSmall (`lid_dict`, `textnorm_dict`).
QUERY_IDS = {"zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13, "withitn": 14, "woitn": 15}

# Text for the tokenizer when no clips are given: a few sentences per language so that every
# script SenseVoice serves has pieces.
SEED_TEXT = (
    "turn on the living room light",
    "what is the weather like today",
    "set a timer for ten minutes",
    "打开客厅的灯",
    "今天天气怎么样",
    "把音量调小一点",
    "開客廳嘅燈",
    "今日天氣點樣",
    "リビングの電気をつけて",
    "今日の天気はどうですか",
    "거실 불 켜줘",
    "오늘 날씨 어때",
)


@dataclass(frozen=True, slots=True)
class SenseVoiceDims:
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    tp_blocks: int
    dropout_rate: float


TINY = SenseVoiceDims(output_size=128, attention_heads=4, linear_units=256, num_blocks=3, tp_blocks=1, dropout_rate=0.0)
FULL = SenseVoiceDims(
    output_size=512, attention_heads=4, linear_units=2048, num_blocks=50, tp_blocks=20, dropout_rate=0.1
)
TINY_CAMPPLUS = {"feat_dim": 80, "embedding_size": 192, "growth_rate": 8, "bn_size": 2, "init_channels": 16}
FULL_CAMPPLUS = {"feat_dim": 80, "embedding_size": 192}


@dataclass(frozen=True, slots=True)
class TrainPlan:
    """How long and how hard the tiny models are trained (fixed step counts: builds are repeatable)."""

    augmented_copies: int = 14
    opus_share: float = 0.8
    noise_dbfs: tuple[float, float] = (-90.0, -45.0)
    asr_steps: int = 720
    asr_groups: int = 3
    asr_lr: float = 3e-3
    itn_share: float = 0.7
    spk_steps: int = 300
    spk_crops: int = 3
    spk_crop: int = 150
    spk_lr: float = 1e-2
    spk_margin: float = 0.2


class BuildError(RuntimeError):
    """The stand-in models could not be built (bad clip directory, failed export)."""


@dataclass(frozen=True, slots=True)
class Clip:
    name: str
    language: str
    text: str
    audio: np.ndarray  # 16 kHz mono float32


@dataclass(slots=True)
class Manifest:
    size: str
    seed: int
    builder: str
    audio: dict[str, str] | None
    trained: bool
    build_s: float = 0.0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# clips and augmentation


def load_clips(audio_dir: Path) -> list[Clip]:
    """Read `MANIFEST.tsv` and its clips, downmixed and resampled to 16 kHz mono."""
    import soundfile as sf
    import soxr

    audio_dir = Path(audio_dir)
    manifest = audio_dir / "MANIFEST.tsv"
    if not manifest.is_file():
        raise BuildError(f"{audio_dir}: no MANIFEST.tsv")
    clips = []
    with manifest.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            try:
                name, lang, text = row["file"], row["language"].split()[0], row["transcript"].strip()
            except (KeyError, AttributeError, IndexError):
                raise BuildError(f"{manifest}: needs columns file, language, transcript") from None
            if lang not in QUERY_IDS or lang == "nospeech":
                raise BuildError(f"{manifest}: {name} has language {row['language']!r}, not one of zh en yue ja ko")
            audio, sr = sf.read(str(audio_dir / name), dtype="float32", always_2d=True)
            audio = audio.mean(axis=1)
            if sr != F.SAMPLE_RATE:
                audio = soxr.resample(audio, sr, F.SAMPLE_RATE)
            clips.append(Clip(name=name, language=lang, text=text, audio=np.ascontiguousarray(audio, np.float32)))
    if not clips:
        raise BuildError(f"{manifest}: no clips")
    return clips


def audio_fingerprint(audio_dir: Path) -> dict[str, str]:
    """Identifies the clip set a build was trained on: the manifest's hash and the clips' sizes."""
    audio_dir = Path(audio_dir)
    h = hashlib.sha256((audio_dir / "MANIFEST.tsv").read_bytes())
    for p in sorted(audio_dir.iterdir()):
        if p.name != "MANIFEST.tsv" and p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return {"dir": str(audio_dir), "sha256": h.hexdigest()}


def opus_round_trip(audio: np.ndarray, bitrate: int | None = None, frame: int = 960) -> np.ndarray:
    """Encode to 16 kHz mono Opus in `frame`-sample packets (60 ms, as the firmware sends) and decode."""
    import opuslib

    enc = opuslib.Encoder(F.SAMPLE_RATE, 1, "voip")
    if bitrate:
        enc.bitrate = bitrate
    dec = opuslib.Decoder(F.SAMPLE_RATE, 1)
    n = audio.shape[0]
    pcm = (np.clip(np.pad(audio, (0, (-n) % frame)), -1.0, 1.0) * 32767.0).astype(np.int16)
    out = [
        np.frombuffer(dec.decode(enc.encode(pcm[i : i + frame].tobytes(), frame), frame), dtype=np.int16)
        for i in range(0, pcm.shape[0], frame)
    ]
    return (np.concatenate(out).astype(np.float32) / 32768.0)[:n]


def augment(
    rng: np.random.Generator,
    audio: np.ndarray,
    opus_share: float = 0.6,
    noise_dbfs: tuple[float, float] = (-75.0, -45.0),
) -> np.ndarray:
    """One device-like variant: gain, up to 0.5 s silence before and 0.8 s after, faint noise, often Opus."""
    gain = 10.0 ** (rng.uniform(-12.0, 6.0) / 20.0)
    pre, post = int(rng.integers(0, 8000)), int(rng.integers(0, 13000))
    y = np.concatenate([np.zeros(pre, np.float32), np.clip(audio * gain, -1, 1), np.zeros(post, np.float32)])
    y = y + rng.standard_normal(y.shape[0]).astype(np.float32) * 10.0 ** (rng.uniform(*noise_dbfs) / 20.0)
    if rng.random() < opus_share:
        y = opus_round_trip(y, int(rng.choice([0, 16000, 24000, 32000])))
    return y.astype(np.float32)


def char_error_rate(hyp: str, ref: str, normalize: bool = False) -> float:
    """Levenshtein distance over characters divided by the reference length; with `normalize`,
    case, spaces and punctuation are ignored (what the end-to-end tests compare)."""
    if normalize:
        hyp, ref = ("".join(c for c in s.lower() if c.isalnum()) for s in (hyp, ref))
    prev = list(range(len(ref) + 1))
    for i, a in enumerate(hyp, 1):
        cur = [i] + [0] * len(ref)
        for j, b in enumerate(ref, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b))
        prev = cur
    return prev[-1] / max(1, len(ref))


# ---------------------------------------------------------------------------------------------
# tokenizer, config files


def train_bpe(texts: Sequence[str], out_path: Path, vocab_size: int = 300) -> None:
    """Sentencepiece BPE over `texts` with every tag as a user-defined piece; unk 0 (= CTC blank), bos 1, eos 2."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "text.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "bpe"),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            user_defined_symbols=list(TAGS),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
        shutil.copyfile(Path(tmp) / "bpe.model", out_path)


def pad_bpe(src: Path, out_path: Path, vocab_size: int, tag_ids: dict[str, int]) -> None:
    """Rewrite a sentencepiece model to exactly `vocab_size` pieces with tags at `tag_ids`.

    Free slots get UNUSED pieces, which encoding never produces; the trained pieces keep their
    order after the special ones. Used to give the full-size stand-in the published vocabulary size.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(src).read_bytes())
    pieces = list(proto.pieces)
    specials, tags, rest = pieces[:3], [], []
    for p in pieces[3:]:
        (tags if p.piece in TAGS else rest).append(p)
    slots: list[Any] = [None] * vocab_size
    for i, p in enumerate(specials):
        slots[i] = p
    free_tag_ids = iter(i for i in range(24880, vocab_size) if i not in tag_ids.values())
    for p in tags:
        slots[tag_ids[p.piece] if p.piece in tag_ids else next(free_tag_ids)] = p
    free = (i for i in range(vocab_size) if slots[i] is None)
    for p in rest:
        slots[next(free)] = p
    del proto.pieces[:]
    for i, p in enumerate(slots):
        if p is None:
            p = pb.ModelProto.SentencePiece(piece=f"<unused{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
        proto.pieces.append(p)
    Path(out_path).write_bytes(proto.SerializeToString())


def sensevoice_config(dims: SenseVoiceDims) -> dict[str, Any]:
    """`config.yaml` in the schema of the published model (paths are filled in by configuration.json)."""
    return {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {
            "output_size": dims.output_size,
            "attention_heads": dims.attention_heads,
            "linear_units": dims.linear_units,
            "num_blocks": dims.num_blocks,
            "tp_blocks": dims.tp_blocks,
            "dropout_rate": dims.dropout_rate,
            "positional_dropout_rate": dims.dropout_rate,
            "attention_dropout_rate": dims.dropout_rate,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": 11,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
        "frontend": "WavFrontend",
        "frontend_conf": {**FRONTEND_CONF, "cmvn_file": None},
    }


CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "auto-speech-recognition",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "model_name_in_hub": {"ms": "", "hf": ""},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"bpemodel": BPE_NAME},
        "frontend_conf": {"cmvn_file": "am.mvn"},
    },
}


def new_sensevoice(dims: SenseVoiceDims, vocab_size: int) -> Any:
    from funasr.models.sense_voice.model import SenseVoiceSmall

    conf = sensevoice_config(dims)
    return SenseVoiceSmall(
        encoder=conf["encoder"],
        encoder_conf=conf["encoder_conf"],
        input_size=560,
        vocab_size=vocab_size,
        **conf["model_conf"],
    )


# ---------------------------------------------------------------------------------------------
# training


@dataclass(slots=True)
class FeaturePool:
    """Per clip: features of the clean clip and of its augmented copies (index 0 is clean)."""

    lfr: list[list[np.ndarray]]  # SenseVoice LFR features before CMVN, [T', 560]
    fbank: list[list[np.ndarray]]  # CAM++ fbank before mean removal, [T, 80]


def make_pool(
    clips: Sequence[Clip], rng: np.random.Generator, copies: int, plan: TrainPlan = TrainPlan()
) -> FeaturePool:
    pool = FeaturePool(lfr=[], fbank=[])
    for clip in clips:
        waves = [clip.audio] + [augment(rng, clip.audio, plan.opus_share, plan.noise_dbfs) for _ in range(copies)]
        pool.lfr.append([F.sensevoice_lfr(w) for w in waves])
        pool.fbank.append([F.campplus_fbank(w) for w in waves])
    return pool


def train_sensevoice(
    model: Any,
    sp: Any,
    clips: Sequence[Clip],
    feats: list[list[np.ndarray]],
    rng: np.random.Generator,
    plan: TrainPlan,
    scale: np.ndarray,
) -> list[float]:
    """Overfit on the clips with funasr's own loss (CTC on the text, CE on the four tag positions).

    Targets are `<|lang|><|NEUTRAL|><|Speech|><|withitn|>` + transcript, as SenseVoice emits them;
    funasr maps the language tag to its query with probability 0.8 (else "auto"). Clips are split
    into length groups, one optimiser step per group, to waste little on padding.
    """
    import torch

    pid = sp.piece_to_id
    # funasr keys its query lookups by the published vocabulary's tag ids: point them at ours.
    model.lid_int_dict = {pid(f"<|{lang}|>"): QUERY_IDS[lang] for lang in LANGUAGES}
    model.textnorm_int_dict = {pid("<|withitn|>"): QUERY_IDS["withitn"], pid("<|woitn|>"): QUERY_IDS["woitn"]}
    bodies = [sp.encode(c.text) for c in clips]
    for clip, body in zip(clips, bodies):
        if 0 in body:
            raise BuildError(f"{clip.name}: transcript has characters outside the tokenizer")
    order = sorted(range(len(clips)), key=lambda i: clips[i].audio.shape[0])
    n_groups = max(1, min(plan.asr_groups, len(clips)))
    groups = [order[k * len(order) // n_groups : (k + 1) * len(order) // n_groups] for k in range(n_groups)]
    scale_t = torch.from_numpy(scale.astype(np.float32))

    opt = torch.optim.AdamW(model.parameters(), lr=plan.asr_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=plan.asr_lr, total_steps=plan.asr_steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(plan.asr_steps):
        xs, ys = [], []
        for i in groups[step % n_groups]:
            f = feats[i][int(rng.integers(len(feats[i])))]
            itn = "withitn" if rng.random() < plan.itn_share else "woitn"
            tags = [pid(f"<|{clips[i].language}|>"), pid("<|NEUTRAL|>"), pid("<|Speech|>"), pid(f"<|{itn}|>")]
            xs.append(torch.from_numpy(f))
            ys.append(torch.tensor(tags + bodies[i]))
        x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
        # a level change of the waveform shifts every log-mel bin alike
        x = x + torch.from_numpy(rng.uniform(-1.5, 1.5, (x.shape[0], 1, 1)).astype(np.float32)) * scale_t
        xl = torch.tensor([t.shape[0] for t in xs])
        y = torch.nn.utils.rnn.pad_sequence(ys, batch_first=True, padding_value=-1)
        yl = torch.tensor([t.shape[0] for t in ys])
        loss, _, _ = model(x, xl, y, yl)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("sensevoice step %d/%d loss %.3f", step, plan.asr_steps, loss.item())
    model.eval()
    return losses


def train_campplus(
    model: Any, fbanks: list[list[np.ndarray]], rng: np.random.Generator, plan: TrainPlan
) -> list[float]:
    """Teach the tiny CAM++ to tell the clips apart: one class per clip, additive angular margin.

    Only the final projection (CAM++'s `dense` layer and its BatchNorm) is trained; the network
    below it keeps its random weights. Its pooled statistics are computed once for random crops
    of every augmented copy and for each whole clip, so training costs seconds, not minutes; a
    random CAM++ alone scores every pair of clips near 1 (they differ mostly in one direction).
    """
    import torch

    model.eval()
    trunk = torch.nn.Sequential(model.head, *[m for n, m in model.xvector.named_children() if n != "dense"])
    crops, labels = [], []
    for i, variants in enumerate(fbanks):
        for f in variants:
            for _ in range(plan.spk_crops):
                length = min(plan.spk_crop, f.shape[0])
                s = int(rng.integers(0, f.shape[0] - length + 1))
                c = np.resize(f[s : s + length], (plan.spk_crop, f.shape[1]))  # short clips: repeat
                crops.append(c - c.mean(axis=0))
                labels.append(i)
    pooled = []
    with torch.no_grad():
        for b in range(0, len(crops), 64):
            pooled.append(trunk(torch.from_numpy(np.stack(crops[b : b + 64])).permute(0, 2, 1)))
        for i, variants in enumerate(fbanks):
            f = variants[0]
            pooled.append(trunk(torch.from_numpy(f - f.mean(axis=0))[None].permute(0, 2, 1)))
            labels.append(i)
    x = torch.cat(pooled)
    y = torch.tensor(labels)

    dense = model.xvector.dense
    bns = [m for m in dense.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    n_cls = len(fbanks)
    with torch.no_grad():
        dim = dense(x[:2]).shape[-1]
    classes = torch.nn.Parameter(torch.randn(n_cls, dim) * 0.01)
    opt = torch.optim.Adam(list(dense.parameters()) + [classes], lr=plan.spk_lr)
    dense.train()
    losses = []
    for _ in range(plan.spk_steps):
        emb = torch.nn.functional.normalize(dense(x), dim=-1)
        cos = emb @ torch.nn.functional.normalize(classes, dim=-1).T
        logits = 30.0 * (cos - plan.spk_margin * torch.nn.functional.one_hot(y, n_cls))
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for bn in bns:  # final statistics over all examples, not a running average of the steps
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        dense(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# evaluation of what was built (through the server's own engines)


def evaluate_sensevoice(model_dir: Path, clips: Sequence[Clip], rng: np.random.Generator) -> dict[str, Any]:
    """Per-clip CER of the exported int8 and fp32 models on device-like input: Opus round trip
    (60 ms packets, default bitrate) with 0.3 s of lead-in and 0.5 s of trailing silence."""
    from asr_server.engines.sensevoice import SenseVoice

    audios = []
    for c in clips:
        padded = np.concatenate([np.zeros(4800, np.float32), c.audio, np.zeros(8000, np.float32)])
        noisy = padded + rng.standard_normal(padded.shape[0]).astype(np.float32) * 1e-4
        audios.append(opus_round_trip(noisy))
    result: dict[str, Any] = {"input": "opus 16 kHz 60 ms packets, +0.3 s/+0.5 s silence, language auto"}
    for quant in ("yes", "no"):
        engine = SenseVoice.load(model_dir, quantized=quant, device="cpu", threads=1)
        per_clip = {}
        for c, audio in zip(clips, audios):
            t = engine.transcribe(audio, language="auto", use_itn=True)
            per_clip[c.name] = {
                "cer": round(char_error_rate(t.text, c.text), 4),
                "text": t.text,
                "language": t.language,
            }
        key = "int8" if quant == "yes" else "fp32"
        result[key] = {"mean_cer": round(float(np.mean([v["cer"] for v in per_clip.values()])), 4), "clips": per_clip}
    return result


def evaluate_campplus(onnx_path: Path, clips: Sequence[Clip]) -> dict[str, Any]:
    """Cosine of each clip after an Opus round trip against every clean clip."""
    from asr_server.engines.speaker.campplus import CampplusEmbedder

    emb = CampplusEmbedder.load(onnx_path, device="cpu", threads=1)
    enrolled = emb.embed_batch([c.audio for c in clips])
    probes = emb.embed_batch([opus_round_trip(c.audio * 0.7) for c in clips])
    sim = probes @ enrolled.T
    off = sim - np.eye(len(clips)) * 10.0
    return {
        "same_clip_min": round(float(np.diag(sim).min()), 4),
        "same_clip_mean": round(float(np.diag(sim).mean()), 4),
        "other_clip_max": round(float(off.max()), 4),
        "other_clip_mean": round(float((sim.sum() - np.trace(sim)) / max(1, sim.size - len(clips))), 4),
        "argmax_accuracy": round(float((sim.argmax(axis=1) == np.arange(len(clips))).mean()), 4),
    }


# ---------------------------------------------------------------------------------------------
# the build


def builder_hash() -> str:
    """Hash of the sources that decide what a build contains."""
    import asr_server.engines.features
    import asr_server.modelfiles.onnx_export

    h = hashlib.sha256()
    for p in (
        Path(__file__),
        Path(asr_server.engines.features.__file__),
        Path(asr_server.modelfiles.onnx_export.__file__),
    ):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def read_manifest(out: Path) -> Manifest | None:
    try:
        data = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
        return Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None


def is_current(out: Path, size: str, seed: int, audio: dict[str, str] | None) -> bool:
    """True when `out` holds a complete build for exactly this request."""
    m = read_manifest(out)
    if m is None or (m.size, m.seed, m.audio, m.builder) != (size, seed, audio, builder_hash()):
        return False
    return all(
        (Path(out) / rel).is_file() and (Path(out) / rel).stat().st_size == meta["size"]
        for rel, meta in m.files.items()
    )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_sensevoice(
    d: Path,
    size: str,
    clips: Sequence[Clip],
    pool: FeaturePool | None,
    rng: np.random.Generator,
    plan: TrainPlan,
    manifest: Manifest,
) -> None:
    """Tokenizer, am.mvn, config files, model.pt and the two ONNX files in `d`."""
    import sentencepiece as spm
    import torch
    import yaml

    from asr_server.modelfiles.onnx_export import export_sensevoice

    d.mkdir()
    bpe = d / BPE_NAME
    texts = [c.text for c in clips]
    if size == "tiny":
        train_bpe(texts or list(SEED_TEXT), bpe, vocab_size=300)
    else:
        seed_bpe = d.parent / "seed.bpe.model"
        train_bpe(texts + list(SEED_TEXT), seed_bpe, vocab_size=300)
        pad_bpe(seed_bpe, bpe, FULL_VOCAB_SIZE, FULL_TAG_IDS)
        seed_bpe.unlink()
        manifest.notes.append(
            f"vocabulary: BPE over the transcripts padded with unused pieces to "
            f"{FULL_VOCAB_SIZE}; tags at the published ids where known"
        )
    sp = spm.SentencePieceProcessor(model_file=str(bpe))

    if pool is not None:
        allf = np.concatenate([f for v in pool.lfr for f in v])
        mean, std = allf.mean(axis=0), allf.std(axis=0) + 1e-3
    else:  # typical log-mel level of speech; exact values do not matter for random weights
        mean, std = np.full(560, 10.0), np.full(560, 3.0)
    F.write_cmvn(d / "am.mvn", mean, std)

    dims = TINY if size == "tiny" else FULL
    model = new_sensevoice(dims, sp.get_piece_size())
    if manifest.trained and pool is not None:
        t0 = time.perf_counter()
        normed = [[((f - mean) / std).astype(np.float32) for f in v] for v in pool.lfr]
        losses = train_sensevoice(model, sp, clips, normed, rng, plan, 1.0 / std)
        manifest.evaluation["sensevoice_training"] = {
            "steps": plan.asr_steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-plan.asr_groups :])), 4),
        }
    model.eval()
    torch.save(model.state_dict(), d / "model.pt")
    (d / "config.yaml").write_text(yaml.safe_dump(sensevoice_config(dims), sort_keys=False), encoding="utf-8")
    (d / "configuration.json").write_text(json.dumps(CONFIGURATION_JSON, indent=2), encoding="utf-8")
    export_sensevoice(model, d, quantize=True)


def _build_campplus(
    d: Path, size: str, pool: FeaturePool | None, rng: np.random.Generator, plan: TrainPlan, manifest: Manifest
) -> None:
    """CAM++ weights, config.yaml and campplus.onnx in `d`, in funasr's layout for CAM++
    (`funasr/campplus`): the hub model's weight file name and constructor arguments as
    config.yaml's model_conf, so that `asr-server models export` can re-export them."""
    import torch
    import yaml
    from funasr.models.campplus.model import CAMPPlus

    from asr_server.modelfiles.onnx_export import export_campplus

    d.mkdir()
    dims = TINY_CAMPPLUS if size == "tiny" else FULL_CAMPPLUS
    cam = CAMPPlus(**dims, memory_efficient=False)
    if manifest.trained and pool is not None:
        t0 = time.perf_counter()
        losses = train_campplus(cam, pool.fbank, rng, plan)
        manifest.evaluation["campplus_training"] = {
            "steps": plan.spk_steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-5:])), 4),
        }
    cam.eval()
    torch.save(cam.state_dict(), d / CAMPPLUS_WEIGHTS)
    (d / "config.yaml").write_text(
        yaml.safe_dump({"model": "CAMPPlus", "model_conf": dict(dims)}, sort_keys=False), encoding="utf-8"
    )
    export_campplus(cam, d / "campplus.onnx")


def build_models(
    out: Path,
    size: str = "tiny",
    audio_dir: Path | None = None,
    seed: int = 0,
    plan: TrainPlan = TrainPlan(),
    force: bool = False,
) -> Manifest:
    """Build (or reuse) the stand-in models in `out`; returns the manifest.

    Outputs are assembled in a staging folder and moved into place, and the manifest is written
    last, so an interrupted build is never mistaken for a complete one. A lock file serialises
    concurrent builders of the same folder (parallel test workers).
    """
    import torch

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be tiny or full, not {size!r}")
    out = Path(out)
    audio = audio_fingerprint(audio_dir) if audio_dir is not None else None
    with _locked(out):
        if not force and is_current(out, size, seed, audio):
            log.info("%s: up to date (%s, seed %d)", out, size, seed)
            current = read_manifest(out)
            assert current is not None
            return current
        (out / MANIFEST).unlink(missing_ok=True)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        clips = load_clips(audio_dir) if audio_dir is not None else []
        train = size == "tiny" and bool(clips)
        manifest = Manifest(size=size, seed=seed, builder=builder_hash(), audio=audio, trained=train)
        if not train:
            manifest.notes.append("random weights (no training)")
        stage = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
        try:
            pool = make_pool(clips, rng, plan.augmented_copies if train else 0, plan) if clips else None
            _build_sensevoice(stage / SENSEVOICE_DIR, size, clips, pool, rng, plan, manifest)
            _build_campplus(stage / CAMPPLUS_DIR, size, pool, rng, plan, manifest)
            if clips:
                if train:
                    manifest.evaluation["sensevoice"] = evaluate_sensevoice(
                        stage / SENSEVOICE_DIR, clips, np.random.default_rng(seed + 1)
                    )
                manifest.evaluation["campplus"] = evaluate_campplus(stage / CAMPPLUS_DIR / "campplus.onnx", clips)
            for sub in (SENSEVOICE_DIR, CAMPPLUS_DIR):
                shutil.rmtree(out / sub, ignore_errors=True)
                (stage / sub).rename(out / sub)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

        for p in sorted(q for sub in (SENSEVOICE_DIR, CAMPPLUS_DIR) for q in (out / sub).rglob("*") if q.is_file()):
            manifest.files[str(p.relative_to(out))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest.build_s = round(time.perf_counter() - t0, 1)
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(manifest), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, out / MANIFEST)
        log.info("%s: built %s models in %.1f s", out, size, manifest.build_s)
        return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.standins", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--audio", type=Path, default=None, help="clip directory with MANIFEST.tsv; the tiny models are trained on it"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs are current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.audio is not None and not (args.audio / "MANIFEST.tsv").is_file():
        parser.error(f"--audio {args.audio}: no MANIFEST.tsv there")
    try:
        m = build_models(args.out, args.size, args.audio, args.seed, force=args.force)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in m.evaluation.items()}
    print(
        json.dumps(
            {"out": str(args.out), "size": m.size, "trained": m.trained, "build_s": m.build_s, "evaluation": summary},
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
