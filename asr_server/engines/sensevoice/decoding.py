"""SenseVoice's output, decoded: greedy CTC, then the leading tags split from the text.

The first four tokens of every SenseVoice result are tags: language, emotion, audio event and
the ITN flag (`<|zh|><|NEUTRAL|><|Speech|><|withitn|>…`). Clients get them as fields beside the
clean text.
"""

from __future__ import annotations

import re

import numpy as np

from ...errors import UnsupportedLanguage
from ...types import Transcript

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
