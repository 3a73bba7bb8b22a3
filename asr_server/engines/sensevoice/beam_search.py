"""CTC prefix beam search with contextual biasing: how an utterance with hotwords is decoded.

Greedy decoding takes each frame's best token; this keeps the `BEAM` best prefixes instead, each
frame extending them by the frame's best `BEAM` tokens, and scores a prefix by its CTC path plus
the hotword bonus its `ContextGraph` state holds. A hotword that is the close second path (its
pieces a little below the best at their frames) wins with its bonus; one far below does not.

A prefix's CTC score is its best alignment's (Viterbi: the max over alignments, not their sum),
so with no hotword in play the best prefix is exactly the greedy path, word times included; the
beam always keeps that path, so a text changes only for a hotword said in full. Scores are the frame's logits less its best
one: every prefix consumes the same frames, so that equals log-probability differences without a
softmax over the 25,055 classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .context_graph import ContextGraph, ContextState

#: Prefixes kept per frame, and tokens tried per frame (the frame's best ones). 8 found every
#: hotword of the synthetic cases and keeps a 5 s utterance's search near 10 ms (BENCHMARKS.md).
BEAM = 8
#: A token this far (log-probability) below its frame's best is not tried: over twice a hotword's
#: largest bonus per piece (5, `MAX_HOTWORD_WEIGHT` in core.hotwords), it could not win its frame.
CANDIDATE_GAP = 12.0

Timed = tuple[tuple[int, int, int], ...]
_NONE = -math.inf


@dataclass(slots=True)
class _Prefix:
    """One prefix's best alignments ending in a blank and in its last token, and its context."""

    blank: float
    token: float
    blank_times: Timed
    token_times: Timed
    context: ContextState
    bonus: float
    matched: tuple[int, ...]

    @property
    def ctc(self) -> float:
        return max(self.blank, self.token)

    @property
    def times(self) -> Timed:
        return self.blank_times if self.blank >= self.token else self.token_times


@dataclass(frozen=True, slots=True)
class Biased:
    """The search's best prefix: (token id, first frame, last frame) of each token, and the
    hotwords it matched (their texts, each once, in the order first spoken)."""

    timed: list[tuple[int, int, int]]
    hotwords: tuple[str, ...]


def biased_search(ids: np.ndarray, scores: np.ndarray, graph: ContextGraph, blank: int = 0) -> Biased:
    """The best prefix of one utterance given each frame's best tokens `ids` [T, k] and their
    `scores` [T, k] (log-probability, or logits less the frame's best), best first."""
    beam: dict[tuple[int, ...], _Prefix] = {(): _Prefix(0.0, _NONE, (), (), graph.root, 0.0, ())}
    for t in range(ids.shape[0]):
        best = float(scores[t, 0])
        cands = [
            (int(c), float(s))
            for c, s in zip(ids[t, :BEAM], scores[t, :BEAM], strict=True)
            if s >= best - CANDIDATE_GAP
        ]
        nxt: dict[tuple[int, ...], _Prefix] = {}
        for prefix, h in beam.items():
            ctc, times = h.ctc, h.times
            for c, s in cands:
                if c == blank:
                    _offer(nxt, prefix, h, ctc + s, times, blank=True)
                    continue
                last = prefix[-1] if prefix else None
                if c == last:  # the same token again: its run goes on, or (after a blank) it is said again
                    f0 = h.token_times[-1][1] if h.token_times else t
                    _offer(nxt, prefix, h, h.token + s, (*h.token_times[:-1], (c, f0, t)), blank=False)
                    if h.blank > _NONE:
                        _extend(nxt, graph, prefix, h, c, h.blank + s, (*h.blank_times, (c, t, t)))
                else:
                    _extend(nxt, graph, prefix, h, c, ctc + s, (*times, (c, t, t)))
        beam = _prune(nxt)
    final = max(beam.values(), key=lambda h: h.ctc + h.bonus - ContextGraph.unfinished(h.context))
    return Biased(list(final.times), tuple(dict.fromkeys(graph.words[i] for i in final.matched)))


def _prune(nxt: dict[tuple[int, ...], _Prefix]) -> dict[tuple[int, ...], _Prefix]:
    """The `BEAM` best prefixes with their bonus, and the best without (the greedy path): a beam
    filled with prefixes that a begun hotword lifts must not lose it, or a hotword that then fails
    would leave a text the bonus had chosen though none of it was kept."""
    ranked = sorted(nxt.items(), key=lambda kv: kv[1].ctc + kv[1].bonus, reverse=True)
    kept = dict(ranked[:BEAM])
    plain = max(nxt.items(), key=lambda kv: kv[1].ctc)
    kept.setdefault(plain[0], plain[1])
    return kept


def _offer(
    nxt: dict[tuple[int, ...], _Prefix], prefix: tuple[int, ...], h: _Prefix, score: float, times: Timed, blank: bool
) -> None:
    """`prefix` (no new token) reached with `score`, ending in a blank or in its last token."""
    n = nxt.get(prefix)
    if n is None:
        n = nxt[prefix] = _Prefix(_NONE, _NONE, (), (), h.context, h.bonus, h.matched)
    if blank and score > n.blank:
        n.blank, n.blank_times = score, times
    elif not blank and score > n.token:
        n.token, n.token_times = score, times


def _extend(
    nxt: dict[tuple[int, ...], _Prefix],
    graph: ContextGraph,
    prefix: tuple[int, ...],
    h: _Prefix,
    c: int,
    score: float,
    times: Timed,
) -> None:
    """`prefix` + `c` reached with `score`: a new token, scored by the context graph too."""
    new = (*prefix, c)
    n = nxt.get(new)
    if n is None:
        step = graph.step(h.context, c)
        n = nxt[new] = _Prefix(_NONE, _NONE, (), (), step.state, h.bonus + step.score, h.matched + step.matched)
    if score > n.token:
        n.token, n.token_times = score, times
