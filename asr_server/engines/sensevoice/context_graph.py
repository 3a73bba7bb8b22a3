"""The hotwords as an Aho-Corasick automaton over sentencepiece pieces: what contextual biasing scores with.

Each hotword is a path of piece ids from the root; every piece along it carries a bonus (the
hotword's weight, log-probability units). A decoding hypothesis holds a state (a node) and, for
each token it emits, `step` says how its context score changes:

- the token extends the match: + that piece's bonus (provisional);
- the token breaks the match: the state falls back along the failure links to the longest
  suffix that is still a hotword prefix, and the provisional bonus beyond that suffix is taken
  back (so a hypothesis gains nothing from a hotword it starts and does not finish);
- the node reached ends one or more hotwords (itself or a suffix, through the output links):
  their whole bonus is banked, so what the state later gives back leaves the match's bonus.

At the end of the utterance `unfinished` is the provisional bonus still held, taken back too.
This is the scheme of sherpa-onnx's `ContextGraph` (transducers) and WeNet's context graph (CTC),
written for the SenseVoice tokenizer's pieces.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...types import Hotword, unspaced
from .tokenizer import _WORD_START, Tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class ContextState:
    """One node: the hotword prefix spelt by the path to it."""

    depth_score: float
    """The provisional bonus a hypothesis holds here: the sum of the pieces' bonuses from the root."""
    next: dict[int, ContextState] = field(default_factory=dict)
    fail: ContextState | None = None
    word: int | None = None
    """The index of the hotword this node ends, if any."""
    output: ContextState | None = None
    """The nearest node on the failure chain that ends a hotword (a suffix that is one)."""
    banked: float = 0.0
    """What reaching this node banks: the bonus of every hotword ending here (itself and its suffixes)."""


@dataclass(frozen=True, slots=True)
class Step:
    """What emitting one token does to a hypothesis's context."""

    score: float
    state: ContextState
    matched: tuple[int, ...]
    """Indexes of the hotwords this token completed."""


class ContextGraph:
    """The hotwords' automaton; build with `ContextGraph.build(hotwords, tokenizer)`."""

    def __init__(self, words: Sequence[str], paths: Sequence[tuple[tuple[int, ...], float, int]]) -> None:
        """`paths`: (piece ids, bonus per piece, index into `words`) of each spelling of a hotword."""
        self.words = tuple(words)
        self.root = ContextState(0.0)
        for ids, bonus, index in paths:
            node = self.root
            for tid in ids:
                child = node.next.get(tid)
                if child is None:
                    child = node.next[tid] = ContextState(node.depth_score + bonus)
                else:  # a prefix shared by several hotwords: the strongest one's bonus
                    child.depth_score = max(child.depth_score, node.depth_score + bonus)
                node = child
            if node.word is None:  # two hotwords spelt alike: the first one's name
                node.word = index
        self._link()

    @staticmethod
    def words_bonus(node: ContextState) -> float:
        return node.depth_score if node.word is not None else 0.0

    @classmethod
    def build(cls, hotwords: Sequence[Hotword], tokenizer: Tokenizer, default_weight: float) -> ContextGraph:
        """The graph of `hotwords`; a word the tokenizer cannot spell (a piece it does not know) is
        skipped with a log line."""
        words: list[str] = []
        paths: list[tuple[tuple[int, ...], float, int]] = []
        for hw in hotwords:
            spellings = hotword_pieces(tokenizer, hw.text)
            if not spellings:
                log.info("hotword %r skipped: the tokenizer has no pieces for it", hw.text)
                continue
            bonus = default_weight if hw.weight is None else hw.weight
            for ids in spellings:
                paths.append((ids, bonus, len(words)))
            words.append(hw.text)
        return cls(words, paths)

    @property
    def empty(self) -> bool:
        return not self.root.next

    def _link(self) -> None:
        """Failure and output links, breadth first (a node's links need its parent's)."""
        queue: deque[ContextState] = deque()
        for child in self.root.next.values():
            child.fail = self.root
            child.banked = self.words_bonus(child)
            queue.append(child)
        while queue:
            node = queue.popleft()
            for tid, child in node.next.items():
                fail = node.fail
                while fail is not None and tid not in fail.next:
                    fail = fail.fail
                child.fail = self.root if fail is None else fail.next[tid]
                suffix = child.fail
                child.output = suffix if suffix.word is not None else suffix.output
                child.banked = self.words_bonus(child) + (child.output.banked if child.output is not None else 0.0)
                queue.append(child)

    def step(self, state: ContextState, token: int) -> Step:
        """Emit `token` from `state`: the score change, the new state, the hotwords completed."""
        node: ContextState | None = state
        while node is not None and token not in node.next:
            node = node.fail
        new = self.root if node is None else node.next[token]
        score = new.depth_score - state.depth_score + new.banked
        if not new.banked:
            return Step(score, new, ())
        matched: list[int] = []
        end: ContextState | None = new if new.word is not None else new.output
        while end is not None:
            assert end.word is not None
            matched.append(end.word)
            end = end.output
        return Step(score, new, tuple(matched))

    @staticmethod
    def unfinished(state: ContextState) -> float:
        """The provisional bonus a hypothesis ending in `state` must give back."""
        return state.depth_score


def hotword_pieces(tokenizer: Tokenizer, text: str) -> list[tuple[int, ...]]:
    """How the model may spell `text` in its output: the tokenizer's pieces of it and, for a word
    of Chinese or Japanese characters, one piece per character as well where the vocabulary has
    them (inside a sentence the model may split a word the tokenizer keeps whole). Such a word is
    spelt without the word-start `▁` the tokenizer puts before it (a `▁`-joined first piece is
    replaced by its bare form when the vocabulary has one); a spaced-script word keeps it. Empty
    when a piece is unknown (it would be the blank, id 0, which CTC never emits as a token)."""
    text = text.strip()
    if not text:
        return []
    ids = list(tokenizer.encode(text))
    if unspaced(text[0]) and ids:
        first = tokenizer.piece(ids[0])
        if first == _WORD_START:
            ids = ids[1:]
        elif first.startswith(_WORD_START):
            bare = tokenizer.piece_id(first[1:])
            if bare is not None:
                ids[0] = bare
    spellings = [tuple(ids)] if ids and tokenizer.unk_id not in ids else []
    if all(unspaced(ch) for ch in text):
        chars = [tokenizer.piece_id(ch) for ch in text]
        if all(c is not None and c != tokenizer.unk_id for c in chars) and tuple(chars) not in spellings:
            spellings.append(tuple(c for c in chars if c is not None))
    return spellings
