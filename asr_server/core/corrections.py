"""Corrections: `asr.corrections`, `wrong=>right` rules (FunASR's format) applied to every final text.

What biasing cannot fix (a homophone the model prefers, a product spelt its own way) is rewritten
after recognition, in the core, so the device, the FunASR client, the HTTP answer and the events
all get the same text. The rules apply in order, each to every occurrence; the words of
`verbose_json` follow: a run of words that spelt the wrong text becomes the right text's words over
the same time span. The text before is kept on the transcript (`uncorrected_text`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..errors import HotwordError
from ..types import Transcript, Word, unspaced

#: Rules at most, and characters per side: corrections are names and terms, not a translation table.
MAX_RULES = 1000
MAX_RULE_CHARS = 64


class Corrections:
    """Parsed `wrong=>right` rules; `apply` rewrites a transcript."""

    def __init__(self, rules: Sequence[str]) -> None:
        if len(rules) > MAX_RULES:
            raise HotwordError(f"asr.corrections: {len(rules)} rules; at most {MAX_RULES}")
        self.rules: list[tuple[str, str]] = []
        for rule in rules:
            wrong, sep, right = str(rule).partition("=>")
            wrong, right = wrong.strip(), right.strip()
            if not sep or not wrong:
                raise HotwordError(f"asr.corrections: {str(rule)[:80]!r} is not a 'wrong=>right' rule")
            if len(wrong) > MAX_RULE_CHARS or len(right) > MAX_RULE_CHARS:
                raise HotwordError(f"asr.corrections: {str(rule)[:40]!r}… is longer than {MAX_RULE_CHARS} characters")
            self.rules.append((wrong, right))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def apply(self, transcript: Transcript) -> Transcript:
        """The transcript with every rule applied; itself where none matched."""
        text, words = transcript.text, transcript.words
        for wrong, right in self.rules:
            if wrong in text:
                text = text.replace(wrong, right)
                words = _replace_words(words, wrong, right)
        if text == transcript.text:
            return transcript
        return dataclasses.replace(transcript, text=text, words=words, uncorrected_text=transcript.text)


def _replace_words(words: tuple[Word, ...], wrong: str, right: str) -> tuple[Word, ...]:
    """Each run of words that spells `wrong` (spaces aside) replaced by the words of `right`, its
    time span shared out evenly among them."""
    target = "".join(wrong.split())
    out: list[Word] = []
    i = 0
    while i < len(words):
        j, spelt = i, ""
        while j < len(words) and len(spelt) < len(target) and target.startswith(spelt + words[j].text):
            spelt += words[j].text
            j += 1
        if spelt == target and j > i:
            out.extend(_spread(right, words[i].start_s, words[j - 1].end_s))
            i = j
        else:
            out.append(words[i])
            i += 1
    return tuple(out)


def _spread(text: str, start: float, end: float) -> list[Word]:
    parts = [ch for ch in text if not ch.isspace()] if all(unspaced(c) for c in text) else text.split()
    if not parts:
        return []
    span = (end - start) / len(parts)
    return [Word(p, round(start + k * span, 3), round(start + (k + 1) * span, 3)) for k, p in enumerate(parts)]
