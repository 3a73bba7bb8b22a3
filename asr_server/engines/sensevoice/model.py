"""SenseVoice-Small: batched utterances in, clean text plus language, emotion and event out.

The engine is three parts, so that the PyTorch runtime can replace ONNX Runtime without touching
the rest: the frontend (`features.SenseVoiceFrontend`), a runtime that maps padded features to CTC
logits (`onnx.OnnxSenseVoice` or `torch.TorchSenseVoice`), and the decoder (greedy CTC, the
tokenizer, the tag split in `decoding`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from ...constants import SAMPLE_RATE
from ...errors import CmvnFileError, ModelFileError
from ...types import Hotword, Transcript
from .. import contracts
from ..base import ModelInfo, read_yaml_mapping
from ..features import SenseVoiceFrontend
from .beam_search import BEAM, biased_search
from .context_graph import ContextGraph
from .decoding import TEXTNORM_IDS, ctc_runs, language_id, parse_transcript, word_times
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

#: What our frontend computes (funasr's `frontend_conf` keys); a config.yaml that asks for anything else is refused.
FRONTEND_CONF = {
    "fs": 16000,
    "window": "hamming",
    "n_mels": 80,
    "frame_length": 25,
    "frame_shift": 10,
    "lfr_m": 7,
    "lfr_n": 6,
}


#: The bonus per piece of a hotword given without a weight, where no caller says (`asr.hotword_weight`
#: does in the server): sherpa-onnx's default context score.
DEFAULT_HOTWORD_WEIGHT = 1.5
_GRAPHS_KEPT = 32


class SenseVoiceRuntime(Protocol):
    """Features in, CTC logits out. `run` takes padded features [B,T,560] f32, lengths, language
    and textnorm ids (int32 [B]) and returns logits [B,T+4,V] and their valid lengths [B];
    `best_path` returns each frame's argmax token id [B,T+4] int32 instead (all that greedy
    decoding reads), so a GPU copies back ids, not 25,055 floats a frame; `top_k` returns each
    frame's best `k` token ids and their logits less the frame's best [B,T+4,k] (what the biased
    search reads, for utterances with hotwords), the same way."""

    info: ModelInfo
    vocab_size: int | None

    def run(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def best_path(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def top_k(
        self, feats: np.ndarray, lengths: np.ndarray, lang_ids: np.ndarray, textnorm_ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _check_frontend_config(path: Path) -> None:
    conf = read_yaml_mapping(path)
    front = conf.get("frontend_conf") or {}
    if not isinstance(front, dict):
        raise ModelFileError(f"{path}: frontend_conf is not a mapping")
    for key, want in FRONTEND_CONF.items():
        got = front.get(key, want)
        if got != want:
            raise ModelFileError(f"{path}: frontend_conf.{key} is {got!r}; this server computes {want!r}")


def select_model_file(model_dir: Path, quantized: str, cuda: bool) -> Path:
    """The ONNX file `quantized` (auto | yes | no) asks for: auto takes int8 on CPU, fp32 on CUDA."""
    fp32, int8 = model_dir / contracts.SENSEVOICE_FP32, model_dir / contracts.SENSEVOICE_INT8
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
        log.warning("%s: no %s; the int8 model runs slowly on CUDA", model_dir, contracts.SENSEVOICE_FP32)
    return second if second.is_file() else first


class SenseVoice:
    """SenseVoice-Small recogniser: frontend + runtime + decoder. Not thread-safe: one caller at a time
    (the micro-batcher's worker thread)."""

    def __init__(
        self, model_dir: Path, frontend: SenseVoiceFrontend, runtime: SenseVoiceRuntime, tokenizer: Tokenizer
    ) -> None:
        self.model_dir = Path(model_dir)
        self.frontend = frontend
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.info = runtime.info
        self._graphs: dict[tuple[Hotword, ...], ContextGraph] = {}  # per hotword list, newest last

    @classmethod
    def load(
        cls,
        model_dir: Path,
        quantized: str = "auto",
        device: str = "cpu",
        threads: int = 0,
        backend: str = "onnx",
        precision: str = "fp32",
    ) -> SenseVoice:
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
            weights = model_dir / contracts.SENSEVOICE_WEIGHTS
        else:
            cuda = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
            weights = select_model_file(model_dir, quantized, cuda)
            if precision != "fp32":
                log.warning(
                    "engine.precision=%s applies to the torch backend; ONNX Runtime runs %s", precision, weights.name
                )
        needed = [weights, model_dir / contracts.SENSEVOICE_CMVN, model_dir / contracts.SENSEVOICE_CONFIG]
        missing = [p.name for p in needed if not p.is_file()]
        if (
            not (model_dir / contracts.SENSEVOICE_BPE).is_file()
            and not (model_dir / contracts.SENSEVOICE_TOKENS).is_file()
        ):
            missing.append(f"{contracts.SENSEVOICE_BPE} (or {contracts.SENSEVOICE_TOKENS})")
        if missing:
            raise ModelFileError(f"{model_dir}: missing {', '.join(missing)}")
        _check_frontend_config(model_dir / contracts.SENSEVOICE_CONFIG)
        try:
            frontend = SenseVoiceFrontend(model_dir / contracts.SENSEVOICE_CMVN)
        except (CmvnFileError, OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"cannot read {model_dir / contracts.SENSEVOICE_CMVN}: {e}") from None
        tokenizer = load_tokenizer(model_dir)
        runner: SenseVoiceRuntime
        if backend == "torch":
            from .torch import TorchSenseVoice

            runner = TorchSenseVoice(model_dir, device, precision, threads)
        else:
            from .onnx import OnnxSenseVoice

            runner = OnnxSenseVoice(
                weights, device, threads, "int8" if weights.name == contracts.SENSEVOICE_INT8 else "fp32"
            )
        if runner.vocab_size is not None and runner.vocab_size != tokenizer.size:
            raise ModelFileError(
                f"{weights}: {runner.vocab_size} output classes but {tokenizer.path.name} has "
                f"{tokenizer.size} pieces (files from different models?)"
            )
        return cls(model_dir, frontend, runner, tokenizer)

    def abort(self, thread: int | None = None) -> None:
        """Stop the batch `thread` computes (or all) where the runtime can (ONNX Runtime can; torch
        runs to its end)."""
        stop = getattr(self.runtime, "abort", None)
        if stop is not None:
            stop(thread)

    def features(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.frontend(a) for a in audios]

    def logits(
        self, feats: Sequence[np.ndarray], languages: Sequence[str], use_itn: Sequence[bool]
    ) -> list[np.ndarray]:
        """Runtime call on unpadded features; returns each item's valid logits [T+4, V]."""
        return self._call(self.runtime.run, feats, languages, use_itn)

    def best_paths(
        self, feats: Sequence[np.ndarray], languages: Sequence[str], use_itn: Sequence[bool]
    ) -> list[np.ndarray]:
        """Like `logits`, but each item's best path [T+4] (argmax token ids): what decoding reads."""
        return self._call(self.runtime.best_path, feats, languages, use_itn)

    def top_k(
        self, feats: Sequence[np.ndarray], languages: Sequence[str], use_itn: Sequence[bool], k: int = BEAM
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like `logits`, but each item's best `k` token ids per frame and their logits less the
        frame's best ([T+4, k] each, best first): what the biased search reads."""
        batch = self._batch(feats, languages, use_itn)
        if batch is None:
            return []
        ids, scores, lens = self.runtime.top_k(*batch, k)
        return [(ids[i, : int(lens[i])], scores[i, : int(lens[i])]) for i in range(len(feats))]

    def _call(
        self,
        call: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
        feats: Sequence[np.ndarray],
        languages: Sequence[str],
        use_itn: Sequence[bool],
    ) -> list[np.ndarray]:
        batch = self._batch(feats, languages, use_itn)
        if batch is None:
            return []
        out, out_lens = call(*batch)
        return [out[i, : int(out_lens[i])] for i in range(len(feats))]

    def _batch(
        self, feats: Sequence[np.ndarray], languages: Sequence[str], use_itn: Sequence[bool]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The runtime's inputs: padded features, lengths, language and textnorm ids (None: no items)."""
        n = len(feats)
        if not (len(languages) == len(use_itn) == n):
            raise ValueError(f"got {n} utterances, {len(languages)} languages and {len(use_itn)} use_itn flags")
        if n == 0:
            return None
        lang_ids = np.array([language_id(lang) for lang in languages], dtype=np.int32)
        tn_ids = np.array([TEXTNORM_IDS[bool(u)] for u in use_itn], dtype=np.int32)
        lengths = np.array([f.shape[0] for f in feats], dtype=np.int32)
        batch = np.zeros((n, int(lengths.max()), self.frontend.dim), dtype=np.float32)
        for i, f in enumerate(feats):
            batch[i, : f.shape[0]] = f
        return batch, lengths, lang_ids, tn_ids

    def decode(self, logits: np.ndarray) -> Transcript:
        """One item's valid logits [T+4, V] decoded."""
        return self.decode_best(np.asarray(logits).argmax(axis=-1))

    def decode_best(self, best: np.ndarray, duration_s: float | None = None) -> Transcript:
        """One item's best path [T+4] decoded: text, tags and word times (none past `duration_s`)."""
        return self.decode_timed(ctc_runs(best), duration_s)

    def decode_timed(
        self, timed: list[tuple[int, int, int]], duration_s: float | None = None, hotwords: tuple[str, ...] = ()
    ) -> Transcript:
        """Emitted tokens with their frames decoded: text, tags, word times, the hotwords matched."""
        transcript = parse_transcript(self.tokenizer.decode([t for t, _, _ in timed]))
        words = word_times(timed, self.tokenizer.piece, duration_s)
        return dataclasses.replace(transcript, words=words, hotwords=hotwords)

    def decode_biased(
        self, ids: np.ndarray, scores: np.ndarray, graph: ContextGraph | None, duration_s: float | None = None
    ) -> Transcript:
        """One item's top-k [T+4, k] decoded: by the biased search with `graph`, greedily without one."""
        if graph is None:
            return self.decode_best(ids[:, 0], duration_s)
        found = biased_search(ids, scores, graph)
        return self.decode_timed(found.timed, duration_s, found.hotwords)

    def context_graph(self, hotwords: Sequence[Hotword]) -> ContextGraph | None:
        """The context graph of a hotword list (None: none to bias with); the last few lists'
        graphs are kept, since a device's or the config's list comes back with every utterance."""
        key = tuple(hotwords)
        if not key:
            return None
        graph = self._graphs.pop(key, None)
        if graph is None:
            graph = ContextGraph.build(key, self.tokenizer, DEFAULT_HOTWORD_WEIGHT)
        self._graphs[key] = graph
        while len(self._graphs) > _GRAPHS_KEPT:
            del self._graphs[next(iter(self._graphs))]
        return None if graph.empty else graph

    def transcribe_batch(
        self,
        audios: Sequence[np.ndarray],
        languages: Sequence[str] | None = None,
        use_itn: Sequence[bool] | None = None,
        hotwords: Sequence[Sequence[Hotword]] | None = None,
    ) -> list[Transcript]:
        """Recognise utterances (16 kHz mono float32 in [-1, 1]) in one runtime call.

        `languages` default to "auto" and `use_itn` to True for every item. Items with `hotwords`
        are decoded by the biased beam search (the batch's runtime call then returns each frame's
        best tokens, not only its best one); without any, greedily, as before.
        """
        languages = ["auto"] * len(audios) if languages is None else languages
        use_itn = [True] * len(audios) if use_itn is None else use_itn
        graphs = [self.context_graph(h) for h in hotwords] if hotwords is not None else []
        feats = self.features(audios)
        if not any(g is not None for g in graphs):
            paths = self.best_paths(feats, languages, use_itn)
            return [self.decode_best(b, len(a) / SAMPLE_RATE) for a, b in zip(audios, paths, strict=True)]
        tops = self.top_k(feats, languages, use_itn)
        return [
            self.decode_biased(ids, scores, g, len(a) / SAMPLE_RATE)
            for a, (ids, scores), g in zip(audios, tops, graphs, strict=True)
        ]

    def transcribe(self, audio: np.ndarray, language: str = "auto", use_itn: bool = True) -> Transcript:
        return self.transcribe_batch([audio], [language], [use_itn])[0]
