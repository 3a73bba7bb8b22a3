"""SenseVoice's output, decoded: greedy CTC, then the leading tags split from the text.

The first four tokens of every SenseVoice result are tags: language, emotion, audio event and
the ITN flag (`<|zh|><|NEUTRAL|><|Speech|><|withitn|>…`). Clients get them as fields beside the
clean text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import numpy as np

from ...errors import UnsupportedLanguage
from ...types import Transcript, Word, unspaced

_WORD_START = "\u2581"

#: Ids of the learned language queries (an embedding table, not vocabulary ids).
LANGUAGE_IDS: dict[str, int] = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
TEXTNORM_IDS: dict[bool, int] = {True: 14, False: 15}  # withitn, woitn

EMOTIONS = frozenset({"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"})
EVENTS = frozenset({"Speech", "BGM", "Laughter", "Applause", "Cry", "Sneeze", "Cough", "Breath", "Event_UNK"})
ITN_TAGS = frozenset({"withitn", "woitn"})
_LANGUAGE_TAG = re.compile(r"^(?:[a-z]{2,3}|nospeech)$")
_TAG = re.compile(r"<\|([^|<>]*)\|>")


def ctc_greedy(logits: np.ndarray, length: int, blank: int = 0) -> list[int]:
    """Best path of one item: argmax per frame over the first `length` frames, repeats merged, blanks dropped."""
    return [t for t, _, _ in ctc_greedy_timed(np.asarray(logits[:length]), blank)]


#: SenseVoice puts four query frames (language, event/emotion, ITN) before the audio's LFR frames,
#: each of which covers 60 ms (6 fbank frames of 10 ms).
QUERY_FRAMES = 4
FRAME_S = 0.06


def ctc_greedy_timed(logits: np.ndarray, blank: int = 0) -> list[tuple[int, int, int]]:
    """Best path with times: (token id, first frame, last frame) of each emitted token's run."""
    return ctc_runs(np.asarray(logits).argmax(axis=-1), blank)


def ctc_runs(best: np.ndarray, blank: int = 0) -> list[tuple[int, int, int]]:
    """A best path's (each frame's argmax token id) emitted tokens: (id, first frame, last frame)
    of each run, repeats merged, blanks dropped."""
    best = np.asarray(best)
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, best.shape[0] + 1):
        if i == best.shape[0] or best[i] != best[start]:
            if best[start] != blank:
                out.append((int(best[start]), start, i - 1))
            start = i
    return out


def word_times(
    timed: list[tuple[int, int, int]], piece: Callable[[int], str], duration_s: float | None = None
) -> tuple[Word, ...]:
    """Tokens grouped into words with their times: a sentencepiece word starts at `▁` (English,
    Korean and every other spaced script), every Chinese or Japanese character is a word,
    punctuation and byte pieces stay with the word before; tags are left out. A word runs from its
    first token's first frame (or the bare `▁` before it) to its last token's last frame; times
    stop at `duration_s`, the audio's length (the last 60 ms frame may reach past it)."""
    words: list[list] = []
    boundary: int | None = None  # the frame of a bare `▁` piece: the next piece starts a word there
    for tid, f0, f1 in timed:
        p = piece(tid)
        if p.startswith("<|") and p.endswith("|>"):
            continue
        text = p.replace(_WORD_START, " ")
        core = text.strip()
        if not core:
            if _WORD_START in p and boundary is None:
                boundary = f0
            continue
        starts = p.startswith(_WORD_START) or boundary is not None
        if boundary is not None:
            f0, boundary = boundary, None
        continues = words and not unspaced(core[0]) and not unspaced(words[-1][0][-1:])
        attach = words and not starts and (continues or _is_punct(core) or p.startswith("<0x"))
        if attach:
            words[-1][0] += core if not p.startswith("<0x") else ""
            words[-1][2] = f1
        elif unspaced(core[0]) and len(core) > 1 and not _is_punct(core):
            # a piece of several Chinese or Japanese characters: one word each, its frames shared out evenly
            span = (f1 + 1 - f0) / len(core)
            for k, ch in enumerate(core):
                words.append([ch, f0 + k * span, f0 + (k + 1) * span - 1])
        else:
            words.append([core, f0, f1])
    end = float("inf") if duration_s is None else round(duration_s, 3)
    return tuple(
        Word(
            w,
            min(end, round(max(0, f0 - QUERY_FRAMES) * FRAME_S, 3)),
            min(end, round(max(0, f1 + 1 - QUERY_FRAMES) * FRAME_S, 3)),
        )
        for w, f0, f1 in words
    )


def _is_punct(text: str) -> bool:
    return all(unicodedata.category(c).startswith("P") for c in text)


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
