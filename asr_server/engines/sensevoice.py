"""SenseVoice-Small: batched utterances in, clean text plus language, emotion and event out.

The engine is three parts, so that a PyTorch backend can replace ONNX Runtime without touching
the rest: the frontend (`features.SenseVoiceFrontend`), a backend that maps padded features to
CTC logits (`OnnxSenseVoiceBackend` here), and the decoder (greedy CTC, sentencepiece, tag split).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import onnxruntime as ort

from ..results import Transcript
from .features import CmvnFileError, SenseVoiceFrontend
from .runtime import ModelFileError, ModelInfo, check_signature, open_onnx, read_yaml_mapping
from .tokenizer import BPE_FILE, TOKENS_FILE, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model_quant.onnx"
TORCH_WEIGHTS_FILE = "model.pt"
CMVN_FILE = "am.mvn"
CONFIG_FILE = "config.yaml"

#: Ids of the learned language queries (an embedding table, not vocabulary ids).
LANGUAGE_IDS: dict[str, int] = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
TEXTNORM_IDS: dict[bool, int] = {True: 14, False: 15}  # withitn, woitn

EMOTIONS = frozenset({"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED",
                      "EMO_UNKNOWN"})
EVENTS = frozenset({"Speech", "BGM", "Laughter", "Applause", "Cry", "Sneeze", "Cough", "Breath",
                    "Event_UNK"})
ITN_TAGS = frozenset({"withitn", "woitn"})
_LANGUAGE_TAG = re.compile(r"^(?:[a-z]{2,3}|nospeech)$")
_TAG = re.compile(r"<\|([^|<>]*)\|>")

_ONNX_INPUTS = {"speech": "tensor(float)", "speech_lengths": "tensor(int32)",
                "language": "tensor(int32)", "textnorm": "tensor(int32)"}
_ONNX_OUTPUTS = ["ctc_logits", "encoder_out_lens"]

# What our frontend computes; a config.yaml that asks for anything else is refused.
_FRONTEND_EXPECTED = {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                      "frame_shift": 10, "lfr_m": 7, "lfr_n": 6}


class UnsupportedLanguage(ValueError):
    """A language SenseVoice has no query for."""


class SenseVoiceBackend(Protocol):
    """Features in, CTC logits out. `run` takes padded features [B,T,560] f32, lengths, language
    and textnorm ids (int32 [B]) and returns logits [B,T+4,V] and their valid lengths [B]."""

    info: ModelInfo
    vocab_size: int | None

    def run(self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray,
            textnorm_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class OnnxSenseVoiceBackend:
    """The funasr-exported graph under ONNX Runtime."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0, precision: str = "fp32") -> None:
        self.path = Path(path)
        self.session, provider, used_device, load_s = open_onnx(self.path, device, threads)
        check_signature(self.session, self.path, _ONNX_INPUTS, _ONNX_OUTPUTS)
        out = {o.name: o for o in self.session.get_outputs()}["ctc_logits"]
        dim = out.shape[-1] if out.shape else None
        self.vocab_size: int | None = dim if isinstance(dim, int) else None
        self.info = ModelInfo(name="sensevoice", path=self.path, backend="onnxruntime", device=used_device,
                              provider=provider, precision=precision, load_s=load_s)

    def run(self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray,
            textnorm_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, lens = self.session.run(_ONNX_OUTPUTS, {
            "speech": np.ascontiguousarray(feats, dtype=np.float32),
            "speech_lengths": np.asarray(lengths, dtype=np.int32),
            "language": np.asarray(lang_ids, dtype=np.int32),
            "textnorm": np.asarray(textnorm_ids, dtype=np.int32),
        })
        return logits, lens


def ctc_greedy(logits: np.ndarray, length: int, blank: int = 0) -> list[int]:
    """Best path of one item: argmax per frame over the first `length` frames, repeats merged, blanks dropped."""
    best = np.asarray(logits[:length]).argmax(axis=-1)
    if best.size == 0:
        return []
    keep = np.ones(best.shape[0], dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    best = best[keep]
    return [int(t) for t in best[best != blank]]


def parse_transcript(raw: str) -> Transcript:
    """Split SenseVoice's leading `<|lang|><|EMO|><|Event|><|itn|>` tags from the text.

    Tolerates missing, reordered or repeated tags (untrained models emit anything): each leading
    tag fills the first free field it fits; every other `<|...|>` is removed from the text.
    """
    language = emotion = event = None
    pos = 0
    while True:
        while pos < len(raw) and raw[pos].isspace():
            pos += 1
        m = _TAG.match(raw, pos)
        if m is None:
            break
        tag = m.group(1)
        if tag in EMOTIONS:
            emotion = emotion or tag
        elif tag in EVENTS:
            event = event or tag
        elif tag in ITN_TAGS:
            pass
        elif _LANGUAGE_TAG.match(tag) and language is None:
            language = tag
        pos = m.end()
    text = _TAG.sub("", raw[pos:])
    text = re.sub(r"\s+", " ", text).strip()
    return Transcript(text=text, language=language, emotion=emotion, event=event, raw=raw)


def language_id(language: str) -> int:
    try:
        return LANGUAGE_IDS[language]
    except KeyError:
        raise UnsupportedLanguage(f"unsupported language {language!r}; use one of {', '.join(LANGUAGE_IDS)}") from None


def _check_frontend_config(path: Path) -> None:
    conf = read_yaml_mapping(path)
    front = conf.get("frontend_conf") or {}
    if not isinstance(front, dict):
        raise ModelFileError(f"{path}: frontend_conf is not a mapping")
    for key, want in _FRONTEND_EXPECTED.items():
        got = front.get(key, want)
        if got != want:
            raise ModelFileError(f"{path}: frontend_conf.{key} is {got!r}; this server computes {want!r}")


def select_model_file(model_dir: Path, quantized: str, cuda: bool) -> Path:
    """The ONNX file `quantized` (auto | yes | no) asks for: auto takes int8 on CPU, fp32 on CUDA."""
    fp32, int8 = model_dir / FP32_FILE, model_dir / INT8_FILE
    if quantized == "yes":
        return int8
    if quantized == "no":
        return fp32
    if quantized != "auto":
        raise ValueError(f"quantized must be auto, yes or no, not {quantized!r}")
    first, second = (fp32, int8) if cuda else (int8, fp32)
    if first.is_file():
        return first
    if second.is_file() and cuda:
        log.warning("%s: no %s; the int8 model runs slowly on CUDA", model_dir, FP32_FILE)
    return second if second.is_file() else first


class SenseVoice:
    """SenseVoice-Small recogniser: frontend + backend + decoder. Not thread-safe: one caller at a time
    (the micro-batcher's worker thread)."""

    def __init__(self, model_dir: Path, frontend: SenseVoiceFrontend, backend: SenseVoiceBackend,
                 tokenizer: Tokenizer) -> None:
        self.model_dir = Path(model_dir)
        self.frontend = frontend
        self.backend = backend
        self.tokenizer = tokenizer
        self.info = backend.info

    @classmethod
    def load(cls, model_dir: Path, quantized: str = "auto", device: str = "cpu", threads: int = 0,
             backend: str = "onnx", precision: str = "fp32") -> "SenseVoice":
        """Load a SenseVoice directory (`model.onnx`/`model_quant.onnx`, or `model.pt` for
        `backend="torch"`; `am.mvn`, the bpe model or a pre-exported model's `tokens.json`,
        `config.yaml`). Raises `ModelFileError` naming every missing or unreadable file.
        `precision` (fp32 | fp16) applies to the torch backend."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelFileError(f"SenseVoice model directory not found: {model_dir}")
        if backend not in ("onnx", "torch"):
            raise ValueError(f"backend must be onnx or torch, not {backend!r}")
        if backend == "torch":
            weights = model_dir / TORCH_WEIGHTS_FILE
        else:
            cuda = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
            weights = select_model_file(model_dir, quantized, cuda)
            if precision != "fp32":
                log.warning("engine.precision=%s applies to the torch backend; ONNX Runtime runs %s", precision,
                            weights.name)
        needed = [weights, model_dir / CMVN_FILE, model_dir / CONFIG_FILE]
        missing = [p.name for p in needed if not p.is_file()]
        if not (model_dir / BPE_FILE).is_file() and not (model_dir / TOKENS_FILE).is_file():
            missing.append(f"{BPE_FILE} (or {TOKENS_FILE})")
        if missing:
            raise ModelFileError(f"{model_dir}: missing {', '.join(missing)}")
        _check_frontend_config(model_dir / CONFIG_FILE)
        try:
            frontend = SenseVoiceFrontend(model_dir / CMVN_FILE)
        except (CmvnFileError, OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"cannot read {model_dir / CMVN_FILE}: {e}") from None
        tokenizer = load_tokenizer(model_dir)
        if backend == "torch":
            from .torch_backend import TorchSenseVoiceBackend

            runner: SenseVoiceBackend = TorchSenseVoiceBackend(model_dir, device, precision, threads)
        else:
            runner = OnnxSenseVoiceBackend(weights, device, threads, "int8" if weights.name == INT8_FILE else "fp32")
        if runner.vocab_size is not None and runner.vocab_size != tokenizer.size:
            raise ModelFileError(f"{weights}: {runner.vocab_size} output classes but {tokenizer.path.name} has "
                                 f"{tokenizer.size} pieces (files from different models?)")
        return cls(model_dir, frontend, runner, tokenizer)

    def features(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.frontend(a) for a in audios]

    def logits(self, feats: Sequence[np.ndarray], languages: Sequence[str],
               use_itn: Sequence[bool]) -> list[np.ndarray]:
        """Backend call on unpadded features; returns each item's valid logits [T+4, V]."""
        n = len(feats)
        if not (len(languages) == len(use_itn) == n):
            raise ValueError(f"got {n} utterances, {len(languages)} languages and {len(use_itn)} use_itn flags")
        if n == 0:
            return []
        lang_ids = np.array([language_id(lang) for lang in languages], dtype=np.int32)
        tn_ids = np.array([TEXTNORM_IDS[bool(u)] for u in use_itn], dtype=np.int32)
        lengths = np.array([f.shape[0] for f in feats], dtype=np.int32)
        batch = np.zeros((n, int(lengths.max()), self.frontend.dim), dtype=np.float32)
        for i, f in enumerate(feats):
            batch[i, :f.shape[0]] = f
        logits, out_lens = self.backend.run(batch, lengths, lang_ids, tn_ids)
        return [logits[i, :int(out_lens[i])] for i in range(n)]

    def decode(self, logits: np.ndarray) -> Transcript:
        ids = ctc_greedy(logits, logits.shape[0])
        return parse_transcript(self.tokenizer.decode(ids))

    def transcribe_batch(self, audios: Sequence[np.ndarray], languages: Sequence[str] | None = None,
                         use_itn: Sequence[bool] | None = None) -> list[Transcript]:
        """Recognise utterances (16 kHz mono float32 in [-1, 1]) in one backend call.

        `languages` default to "auto" and `use_itn` to True for every item.
        """
        languages = ["auto"] * len(audios) if languages is None else languages
        use_itn = [True] * len(audios) if use_itn is None else use_itn
        return [self.decode(lg) for lg in self.logits(self.features(audios), languages, use_itn)]

    def transcribe(self, audio: np.ndarray, language: str = "auto", use_itn: bool = True) -> Transcript:
        return self.transcribe_batch([audio], [language], [use_itn])[0]
