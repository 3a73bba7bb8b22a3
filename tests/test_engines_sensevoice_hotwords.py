"""Contextual biasing for SenseVoice: the context graph, the biased CTC beam search, the engine's use of them.

The search must change nothing without hotwords (the greedy path, word times included, on every
shared clip's logits), must let a hotword that is the close second path win and leave a far one
alone, and must take back the bonus of a hotword begun and not finished.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from asr_server.engines.sensevoice import SenseVoice
from asr_server.engines.sensevoice.beam_search import biased_search
from asr_server.engines.sensevoice.context_graph import ContextGraph, hotword_pieces
from asr_server.engines.sensevoice.decoding import ctc_greedy_timed
from asr_server.engines.sensevoice.onnx import top_k
from asr_server.types import Hotword
from tests.support.models import load_clips, sensevoice_dir

W = 2.0  # bonus per piece in the synthetic cases


def graph(*words: tuple[int, ...], bonus: float = W) -> ContextGraph:
    return ContextGraph([f"hw{i}" for i in range(len(words))], [(w, bonus, i) for i, w in enumerate(words)])


def frames(spec: list[tuple[int, int | None, float]], vocab: int = 12, pad: int = 2) -> np.ndarray:
    """Logits [T, vocab]: blanks around each (best token, second token, its gap below the best) frame."""
    rows = []
    for best, second, gap in spec:
        rows.extend([_row(0, None, 0, vocab)] * pad)
        rows.append(_row(best, second, gap, vocab))
    rows.extend([_row(0, None, 0, vocab)] * pad)
    return np.stack(rows)


def _row(best: int, second: int | None, gap: float, vocab: int) -> np.ndarray:
    r = np.full(vocab, -30.0, np.float32)
    r[best] = 0.0
    if second is not None:
        r[second] = -gap
    return r


def search(logits: np.ndarray, g: ContextGraph):
    ids, scores = top_k(logits, 8)
    return biased_search(ids, scores, g)


def tokens(found) -> list[int]:
    return [t for t, _, _ in found.timed]


# --- the context graph ---------------------------------------------------------------------------


def test_graph_bonus_grows_along_a_hotword_and_is_banked_when_it_completes():
    g = graph((3, 4, 5))
    s1 = g.step(g.root, 3)
    s2 = g.step(s1.state, 4)
    s3 = g.step(s2.state, 5)
    assert (s1.score, s2.score) == (W, W)
    assert s3.matched == (0,) and s3.score == pytest.approx(W + 3 * W)  # the last piece, then the word banked
    total = s1.score + s2.score + s3.score - ContextGraph.unfinished(s3.state)
    assert total == pytest.approx(3 * W)  # a finished hotword keeps its whole bonus, once


def test_graph_partial_match_is_rolled_back_on_a_failed_token_and_at_the_end():
    g = graph((3, 4, 5))
    a = g.step(g.root, 3)
    b = g.step(a.state, 4)
    c = g.step(b.state, 7)  # 3 4 then 7: the match fails
    assert c.state is g.root and c.matched == ()
    assert a.score + b.score + c.score == pytest.approx(0.0)
    # unfinished at the end of the utterance: what it holds is given back
    assert a.score + b.score - ContextGraph.unfinished(b.state) == pytest.approx(0.0)


def test_graph_failure_links_fall_back_to_the_longest_suffix_that_is_a_hotword_prefix():
    g = graph((3, 4, 5), (4, 7))
    steps = [g.step(g.root, 3)]
    steps.append(g.step(steps[-1].state, 4))
    steps.append(g.step(steps[-1].state, 7))  # "3 4" fails at 7, its suffix "4" goes on to "4 7"
    assert steps[-1].matched == (1,)
    total = sum(s.score for s in steps) - ContextGraph.unfinished(steps[-1].state)
    assert total == pytest.approx(2 * W)  # only "4 7"'s bonus is kept


def test_graph_output_links_match_a_hotword_inside_a_longer_one():
    g = graph((3, 4, 5), (4,))
    a = g.step(g.root, 3)
    b = g.step(a.state, 4)
    assert b.matched == (1,)  # "4" ends inside "3 4 ..." through the output link


# --- the search ---------------------------------------------------------------------------------


def test_close_second_hotword_wins_and_far_one_does_not():
    hot = graph((3, 4, 5))
    close = frames([(1, 3, 0.5), (2, 4, 0.5), (6, 5, 0.5)])
    assert tokens(search(close, graph())) == [1, 2, 6]  # greedy
    found = search(close, hot)
    assert tokens(found) == [3, 4, 5] and found.hotwords == ("hw0",)
    far = frames([(1, 3, 8.0), (2, 4, 8.0), (6, 5, 8.0)])  # 24 nats below: 6 of bonus cannot pay for it
    found = search(far, hot)
    assert tokens(found) == [1, 2, 6] and found.hotwords == ()


def test_begun_and_unfinished_hotword_does_not_win():
    """Two close pieces of a three-piece hotword, the third far: the bonus of the two is taken back,
    so the greedy text stays (the beam had preferred the partial match on the way)."""
    hot = graph((3, 4, 5))
    logits = frames([(1, 3, 1.0), (2, 4, 1.0), (6, 5, 20.0)])
    found = search(logits, hot)
    assert tokens(found) == [1, 2, 6] and found.hotwords == ()


def test_begun_hotwords_filling_the_beam_do_not_change_the_text():
    """Five hotwords begun at once (each two close pieces of three; the pieces also start other
    hotwords) lift more prefixes than the beam holds above the greedy one; none is finished, so the
    text must stay the greedy one, which the beam keeps however many begun prefixes outrank it."""
    starts, seconds = [3, 4, 5, 7, 8], [9, 10, 11, 12, 13]
    words = [(a, b, 14) for a, b in zip(starts, seconds, strict=True)] + [(b, 15) for b in seconds]
    hot = graph(*words)
    blank = _row(0, None, 0, 20)
    first, second, last = (np.full(20, -30.0, np.float32) for _ in range(3))
    first[1], second[2], last[6] = 0.0, 0.0, 0.0
    first[starts], second[seconds] = -0.5, -0.5
    logits = np.stack([blank, first, blank, second, blank, last, blank])
    assert tokens(search(logits, graph())) == [1, 2, 6]
    found = search(logits, hot)
    assert tokens(found) == [1, 2, 6] and found.hotwords == ()


def test_word_times_follow_the_biased_path():
    logits = frames([(1, 3, 0.5), (2, 4, 0.5), (6, 5, 0.5)], pad=3)
    found = search(logits, graph((3, 4, 5)))
    greedy = ctc_greedy_timed(logits)
    assert [f for _, f, _ in found.timed] == [f for _, f, _ in greedy]  # same frames, other tokens


def test_repeated_tokens_need_a_blank_between_them():
    hot = graph((3, 3))
    one = np.stack([_row(3, None, 0, 12)] * 3 + [_row(0, None, 0, 12)])  # 3 3 3 _ : one token
    assert tokens(search(one, hot)) == [3]
    two = np.stack([_row(3, None, 0, 12), _row(0, None, 0, 12), _row(3, None, 0, 12)])
    found = search(two, hot)
    assert tokens(found) == [3, 3] and found.hotwords == ("hw0",)


# --- on the stand-in model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> SenseVoice:
    return SenseVoice.load(sensevoice_dir(), quantized="no", device="cpu", threads=1)


@pytest.fixture(scope="module")
def clip_logits(engine):
    clips = load_clips()
    if not clips:
        pytest.skip("shared clips absent")
    feats = engine.features([c.audio for c in clips])
    return clips, engine.logits(feats, ["auto"] * len(clips), [True] * len(clips))


def test_beam_without_hotwords_equals_greedy_on_every_shared_clip(clip_logits):
    clips, logits = clip_logits
    assert len(clips) == 13
    for clip, lg in zip(clips, logits, strict=True):
        ids, scores = top_k(lg, 8)
        found = biased_search(ids, scores, graph())
        assert found.timed == ctc_greedy_timed(lg), clip.name


def test_unrelated_hotwords_change_no_clip(engine, clips_unrelated):
    clips, hotwords = clips_unrelated
    audios = [c.audio for c in clips]
    greedy = engine.transcribe_batch(audios)
    biased = engine.transcribe_batch(audios, hotwords=[hotwords] * len(clips))
    assert [t.text for t in biased] == [t.text for t in greedy]
    assert [t.words for t in biased] == [t.words for t in greedy]


@pytest.fixture(scope="module")
def clips_unrelated(engine, clip_logits):
    from benchmarks.hotwords import unrelated

    clips = clip_logits[0]
    words = unrelated(engine.tokenizer, [c.text for c in clips])
    assert len(words) == 50
    return clips, words


def test_a_batch_mixes_biased_and_greedy_items(engine, clip_logits):
    clips, _ = clip_logits
    audios = [clips[0].audio, clips[1].audio]
    alone = engine.transcribe_batch(audios[1:])[0]
    mixed = engine.transcribe_batch(audios, hotwords=[(Hotword("滨海新区", 3.0),), ()])
    assert mixed[1] == alone  # the item without hotwords: greedy, as alone
    assert alone.hotwords == () and mixed[1].hotwords == ()


def test_hotword_the_tokenizer_cannot_spell_is_skipped_with_a_log_line(engine, caplog):
    assert hotword_pieces(engine.tokenizer, "ẞ☃") == []  # pieces it lacks: <unk>, which is the blank
    assert hotword_pieces(engine.tokenizer, "   ") == []
    with caplog.at_level(logging.INFO, "asr_server.engines.sensevoice.context_graph"):
        g = ContextGraph.build([Hotword("ẞ☃"), Hotword("广州")], engine.tokenizer, 1.5)
    assert g.words == ("广州",)
    assert "skipped" in caplog.text and "ẞ☃" in caplog.text


def test_chinese_hotword_is_spelt_without_the_word_start_piece_and_char_by_char(engine):
    tok = engine.tokenizer
    spellings = hotword_pieces(tok, "广州市")
    assert all(not tok.piece(ids[0]).startswith("\u2581") for ids in spellings)
    assert {tok.decode(list(ids)) for ids in spellings} == {"广州市"}
    assert tuple(tok.piece_id(ch) for ch in "广州市") in spellings
    assert len(spellings) == len(set(spellings))
    # either spelling in the model's output completes the hotword
    g = ContextGraph.build([Hotword("广州市")], tok, W)
    for ids in spellings:
        state, matched = g.root, ()
        for tid in ids:
            step = g.step(state, tid)
            state, matched = step.state, matched + step.matched
        assert matched == (0,)


def test_top_k_is_best_first_ties_to_the_lowest_id_as_argmax():
    logits = np.array([[[0.0, 2.0, 2.0, 1.0, -1.0]], [[5.0, 4.0, 3.0, 2.0, 1.0]]], np.float32)
    ids, scores = top_k(logits, 3)
    assert ids.tolist() == [[[1, 2, 3]], [[0, 1, 2]]]
    assert scores.tolist() == [[[0.0, 0.0, -1.0]], [[0.0, -1.0, -2.0]]]
    np.testing.assert_array_equal(ids[..., 0], logits.argmax(-1))
    assert logits[0, 0, 1] == 2.0  # the caller's logits are left as they were
