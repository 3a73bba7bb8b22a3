"""SenseVoice engine: CTC decoding and tag split, loading errors, batching, parity with funasr, and
the tiny stand-in transcribing the shared clips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from asr_server.engines.contracts import SENSEVOICE_BPE as BPE_FILE
from asr_server.engines.contracts import SENSEVOICE_INT8 as INT8_FILE
from asr_server.engines.sensevoice import LANGUAGE_IDS, SenseVoice, ctc_greedy, parse_transcript
from asr_server.errors import ModelFileError, UnsupportedLanguage
from asr_server.types import Transcript
from tests.support.audio import needs_audio
from tests.support.models import load_clips, sensevoice_dir


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return sensevoice_dir()


@pytest.fixture(scope="module")
def engine(model_dir) -> SenseVoice:
    return SenseVoice.load(model_dir, quantized="no", device="cpu", threads=1)


@pytest.fixture(scope="module")
def clips():
    return load_clips()


def tone_burst(seconds: float, freq: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def one_hot_logits(ids: list[int], vocab: int) -> np.ndarray:
    logits = np.full((len(ids), vocab), -5.0, dtype=np.float32)
    logits[np.arange(len(ids)), ids] = 5.0
    return logits


# --- decoding --------------------------------------------------------------------------------


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    logits = one_hot_logits([0, 7, 7, 0, 0, 7, 3, 3, 3, 0, 9, 9], vocab=12)
    assert ctc_greedy(logits, len(logits)) == [7, 7, 3, 9]
    assert ctc_greedy(logits, 5) == [7]  # frames past the valid length are ignored
    assert ctc_greedy(logits, 6) == [7, 7]
    assert ctc_greedy(logits, 0) == []
    assert ctc_greedy(one_hot_logits([0, 0, 0], 4), 3) == []


def test_parse_transcript_splits_the_four_tags():
    t = parse_transcript("<|zh|><|HAPPY|><|BGM|><|withitn|>开放时间早上九点至下午五点。")
    assert t == Transcript(
        text="开放时间早上九点至下午五点。",
        language="zh",
        emotion="HAPPY",
        event="BGM",
        raw="<|zh|><|HAPPY|><|BGM|><|withitn|>开放时间早上九点至下午五点。",
    )


@pytest.mark.parametrize(
    "raw, text, language, emotion, event",
    [
        ("hello world", "hello world", None, None, None),
        ("<|en|> hello", "hello", "en", None, None),
        ("<|NEUTRAL|><|Speech|>hi", "hi", None, "NEUTRAL", "Speech"),
        ("<|Speech|><|ko|><|woitn|>  안녕 ", "안녕", "ko", None, "Speech"),
        ("<|ja|><|EMO_UNKNOWN|><|Speech|><|woitn|>", "", "ja", "EMO_UNKNOWN", "Speech"),
        ("<|en|><|en|>a<|Speech|>b <|zh|> c", "ab c", "en", None, None),
        ("<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>", "", "nospeech", "EMO_UNKNOWN", "Event_UNK"),
        ("<|Laughter|><|SAD|>ha<|withitn|>", "ha", None, "SAD", "Laughter"),
        ("", "", None, None, None),
        ("<|zh", "<|zh", None, None, None),
    ],
)
def test_parse_transcript_tolerates_missing_and_stray_tags(raw, text, language, emotion, event):
    t = parse_transcript(raw)
    assert (t.text, t.language, t.emotion, t.event, t.raw) == (text, language, emotion, event, raw)


def test_decode_hand_made_logits_through_the_tokenizer(engine):
    sp = engine.tokenizer.processor
    ids = [sp.piece_to_id(p) for p in ("<|en|>", "<|HAPPY|>", "<|Speech|>", "<|woitn|>")]
    body = sp.encode("the light")
    assert 0 not in ids + body
    frames = []
    for i in ids + body:  # each token twice, a blank after every other one
        frames += [i, i] + ([0] if len(frames) % 2 else [])
    frames += [body[-1], 0, body[-1]]  # a real repeat: kept twice
    logits = one_hot_logits(frames, sp.get_piece_size())
    t = engine.decode(logits)
    assert (t.language, t.emotion, t.event) == ("en", "HAPPY", "Speech")
    assert t.text == sp.decode(body + [body[-1]]).strip()
    assert t.raw.startswith("<|en|><|HAPPY|><|Speech|><|woitn|>")


# --- loading ---------------------------------------------------------------------------------


def copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            shutil.copy(p, dst / p.name)
    return dst


def test_info_and_precision(model_dir):
    fp32 = SenseVoice.load(model_dir, quantized="no", device="cpu", threads=1)
    int8 = SenseVoice.load(model_dir, quantized="yes", device="cpu", threads=1)
    auto = SenseVoice.load(model_dir, quantized="auto", device="cpu", threads=1)
    assert (fp32.info.precision, fp32.info.path.name) == ("fp32", "model.onnx")
    assert (int8.info.precision, int8.info.path.name) == ("int8", INT8_FILE)
    assert auto.info.path.name == INT8_FILE  # int8 on CPU when present
    assert fp32.info.device == "cpu" and fp32.info.backend == "onnxruntime"
    assert "sensevoice" in fp32.info.describe()


def test_missing_files_are_all_named(model_dir, tmp_path):
    d = copy_dir(model_dir, tmp_path / "m", skip=("am.mvn", BPE_FILE, "model.onnx"))
    with pytest.raises(ModelFileError) as e:
        SenseVoice.load(d, quantized="no")
    for name in ("am.mvn", BPE_FILE, "model.onnx"):
        assert name in str(e.value)
    d2 = copy_dir(model_dir, tmp_path / "m2", skip=(INT8_FILE,))
    with pytest.raises(ModelFileError, match=INT8_FILE):
        SenseVoice.load(d2, quantized="yes")
    assert SenseVoice.load(d2, quantized="auto").info.path.name == "model.onnx"  # auto falls back to fp32
    with pytest.raises(ModelFileError, match="not found"):
        SenseVoice.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="quantized"):
        SenseVoice.load(model_dir, quantized="maybe")


def test_wrong_signature_truncated_and_corrupt_files(model_dir, tmp_path):
    campplus = model_dir.parent / "campplus" / "campplus.onnx"
    d = copy_dir(model_dir, tmp_path / "sig")
    shutil.copy(campplus, d / "model.onnx")
    with pytest.raises(ModelFileError, match="speech"):
        SenseVoice.load(d, quantized="no")

    d = copy_dir(model_dir, tmp_path / "trunc")
    data = (model_dir / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.onnx"):
        SenseVoice.load(d, quantized="no")

    d = copy_dir(model_dir, tmp_path / "bpe")
    (d / BPE_FILE).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelFileError, match=BPE_FILE):
        SenseVoice.load(d, quantized="no")

    d = copy_dir(model_dir, tmp_path / "mvn")
    (d / "am.mvn").write_text("not a cmvn file\n")
    with pytest.raises(ModelFileError, match="am.mvn"):
        SenseVoice.load(d, quantized="no")


def test_tokenizer_of_another_model_is_refused(model_dir, tmp_path):
    from benchmarks.standins import train_bpe

    d = copy_dir(model_dir, tmp_path / "vocab")
    train_bpe(["a small other vocabulary", "with few pieces"], d / BPE_FILE, vocab_size=60)
    with pytest.raises(ModelFileError, match="output classes"):
        SenseVoice.load(d, quantized="no")


def test_unsupported_frontend_config_is_refused(model_dir, tmp_path):
    d = copy_dir(model_dir, tmp_path / "conf")
    text = (d / "config.yaml").read_text().replace("lfr_m: 7", "lfr_m: 5")
    (d / "config.yaml").write_text(text)
    with pytest.raises(ModelFileError, match="lfr_m"):
        SenseVoice.load(d, quantized="no")
    (d / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ModelFileError, match="config"):
        SenseVoice.load(d, quantized="no")


# --- running ---------------------------------------------------------------------------------


def test_bad_requests(engine):
    with pytest.raises(UnsupportedLanguage, match="klingon"):
        engine.transcribe(tone_burst(1, 300, 0), language="klingon")
    with pytest.raises(ValueError, match="languages"):
        engine.transcribe_batch([tone_burst(1, 300, 0)], ["en", "zh"], [True])
    assert engine.transcribe_batch([]) == []


def test_batched_equals_single(engine, clips):
    audios = [c.audio for c in clips[:4]] or [
        tone_burst(s, f, i) for i, (s, f) in enumerate([(1.3, 200), (4.1, 350), (0.02, 500), (2.0, 800)])
    ]
    languages = ["auto", "en", "zh", "auto"][: len(audios)]
    itn = [True, False, True, False][: len(audios)]
    batch = engine.transcribe_batch(audios, languages, itn)
    singles = [engine.transcribe(a, lang, u) for a, lang, u in zip(audios, languages, itn)]
    assert batch == singles
    feats = engine.features(audios)
    batched = engine.logits(feats, languages, itn)
    for i, f in enumerate(feats):
        (alone,) = engine.logits([f], [languages[i]], [itn[i]])
        assert batched[i].shape == alone.shape == (f.shape[0] + 4, engine.tokenizer.size)
        np.testing.assert_allclose(batched[i], alone, atol=1e-4, rtol=1e-4)
    paths = engine.best_paths(feats, languages, itn)  # what transcribe_batch decodes
    for best, lg in zip(paths, batched):
        np.testing.assert_array_equal(best, lg.argmax(-1))
    assert [engine.decode_best(b) for b in paths] == [engine.decode(lg) for lg in batched]
    # transcribe_batch also stops word times at each utterance's end (the last 60 ms frame may pass it)
    assert [engine.decode_best(b, len(a) / 16000) for a, b in zip(audios, paths)] == batch
    assert all(w.end_s <= len(a) / 16000 for a, t in zip(audios, batch) for w in t.words)


def test_long_and_empty_utterances(engine):
    long = np.tile(tone_burst(2.0, 300, 1), 20)  # 40 s: more LFR frames than the export's 512
    (logits,) = engine.logits(engine.features([long]), ["auto"], [True])
    assert logits.shape[0] == engine.frontend.num_frames(long.size) + 4 > 512
    t = engine.transcribe(np.zeros(0, np.float32))
    assert isinstance(t, Transcript)


@pytest.mark.slow
def test_onnx_matches_funasr_torch_model(model_dir, engine, clips):
    """The exported graph gives funasr's own inference log-probabilities and text."""
    torch = pytest.importorskip("torch")
    from funasr import AutoModel

    auto = AutoModel(model=str(model_dir), device="cpu", disable_update=True, disable_pbar=True, disable_log=True)
    model, tokenizer = auto.model.eval(), auto.kwargs["tokenizer"]
    audios = [c.audio for c in clips[:3]] or [tone_burst(1.5, 300, 0), tone_burst(3.2, 600, 1)]
    for audio, lang, itn in zip(audios, ["auto", "en", "zh"], [True, False, True]):
        feats = engine.features([audio])[0]
        (onnx_logits,) = engine.logits([feats], [lang], [itn])
        x = torch.from_numpy(feats)[None]
        with torch.no_grad():
            q_lang = model.embed(torch.LongTensor([[LANGUAGE_IDS[lang]]]))
            q_tn = model.embed(torch.LongTensor([[14 if itn else 15]]))
            q_ee = model.embed(torch.LongTensor([[1, 2]]))
            enc, enc_len = model.encoder(torch.cat([q_lang, q_ee, q_tn, x], dim=1), torch.tensor([x.shape[1] + 4]))
            ref = model.ctc.log_softmax(enc)[0].numpy()
            results, _ = model.inference(
                x.clone(),
                torch.tensor([x.shape[1]]),
                key=["k"],
                tokenizer=tokenizer,
                data_type="fbank",
                language=lang,
                use_itn=itn,
                device="cpu",
            )
        top = onnx_logits.max(-1, keepdims=True)
        ours = onnx_logits - top - np.log(np.exp(onnx_logits - top).sum(-1, keepdims=True))
        assert int(enc_len[0]) == ours.shape[0]
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
        assert engine.decode(onnx_logits).raw == results[0]["text"]


@pytest.mark.slow
def test_tiny_model_transcribes_clips_after_opus(model_dir, clips):
    """The stand-in was trained on the clips: device-like input (Opus, silence around) comes back."""
    if not clips:
        pytest.skip("../shared/audio absent: the tiny model is untrained")
    from benchmarks.standins import char_error_rate, opus_round_trip

    engine = SenseVoice.load(model_dir, quantized="auto", device="cpu", threads=1)
    rng = np.random.default_rng(7)
    cers = []
    for c in clips:
        audio = np.concatenate([np.zeros(3200, np.float32), 0.8 * c.audio, np.zeros(9600, np.float32)])
        audio = opus_round_trip(audio + 3e-4 * rng.standard_normal(audio.size).astype(np.float32))
        t = engine.transcribe(audio, language="auto", use_itn=True)
        cers.append(char_error_rate(t.text, c.text))
        assert t.language == c.language, (c.name, t)
        assert (t.emotion, t.event) == ("NEUTRAL", "Speech"), (c.name, t)
        assert cers[-1] <= 0.25, (c.name, t.text, c.text)
    assert np.mean(cers) <= 0.05, cers


def test_int8_graph_computes_what_the_float_graph_does(model_dir, engine, clips):
    """The shipped quantisation (QInt8 per channel, 7-bit range): logits close to fp32's, the same text."""
    if not clips:
        pytest.skip("../shared/audio absent: the tiny model is untrained")
    int8 = SenseVoice.load(model_dir, quantized="yes", device="cpu", threads=1)
    agree, same_text = [], 0
    for c in clips:
        feats = engine.features([c.audio])
        ref, got = engine.logits(feats, ["auto"], [True])[0], int8.logits(feats, ["auto"], [True])[0]
        agree.append(float((ref.argmax(-1) == got.argmax(-1)).mean()))
        same_text += engine.decode(ref).text == int8.decode(got).text
    assert min(agree) >= 0.9 and np.mean(agree) >= 0.97, agree
    assert same_text >= len(clips) - 1, same_text


def test_cuda_request_without_cuda_provider_runs_on_cpu(model_dir, caplog):
    import onnxruntime as ort

    engine = SenseVoice.load(model_dir, quantized="auto", device="cuda", threads=1)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert engine.info.device.startswith("cuda") and engine.info.precision == "fp32"
    else:
        assert engine.info.device == "cpu" and engine.info.provider == "CPUExecutionProvider"
        assert engine.info.path.name == INT8_FILE
        assert "FALLING BACK TO CPU" in caplog.text


# --- the pre-exported layout: tokens.json instead of the sentencepiece model ------------------


def hub_onnx_layout(model_dir: Path, dst: Path) -> Path:
    """The files of ModelScope's `iic/SenseVoiceSmall-onnx` made from the tiny model: the int8 graph,
    am.mvn, config.yaml and tokens.json, no sentencepiece model."""
    from asr_server.engines.sensevoice.tokenizer import SentencePieceTokenizer, write_token_table

    d = copy_dir(model_dir, dst, skip=(BPE_FILE, "model.onnx", "model.pt"))
    write_token_table(SentencePieceTokenizer(model_dir / BPE_FILE), d / "tokens.json")
    return d


def test_token_table_decodes_as_sentencepiece_does(engine):
    from asr_server.engines.sensevoice.tokenizer import TokenTable, write_token_table

    sp = engine.tokenizer
    path = Path(engine.model_dir).parent / "tokens-test.json"
    try:
        write_token_table(sp, path)
        table = TokenTable(path)
    finally:
        path.unlink(missing_ok=True)
    assert table.size == sp.size
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = [int(i) for i in rng.integers(1, sp.size, size=rng.integers(1, 30))]
        assert table.decode(ids) == sp.decode(ids)


def test_pre_exported_layout_loads_and_transcribes_like_the_bpe_model(model_dir, tmp_path, clips):
    d = hub_onnx_layout(model_dir, tmp_path / "hub")
    assert not (d / BPE_FILE).exists()
    hub = SenseVoice.load(d, quantized="auto", device="cpu", threads=1)
    assert type(hub.tokenizer).__name__ == "TokenTable"
    ref = SenseVoice.load(model_dir, quantized="yes", device="cpu", threads=1)
    audios = [c.audio for c in clips] or [tone_burst(2.0, 220, 1)]
    assert hub.transcribe_batch(audios) == ref.transcribe_batch(audios)
    (d / "tokens.json").write_text('{"not": "a list"}')
    with pytest.raises(ModelFileError, match="tokens.json"):
        SenseVoice.load(d, quantized="auto")
    (d / "tokens.json").unlink()
    with pytest.raises(ModelFileError, match=f"{BPE_FILE} \\(or tokens.json\\)"):
        SenseVoice.load(d, quantized="auto")


def test_word_times_come_from_the_ctc_frames_of_each_word():
    from asr_server.engines.sensevoice.decoding import ctc_greedy_timed, word_times

    pieces = {1: "<|en|>", 2: "▁TURN", 3: "▁ON", 4: "▁LIG", 5: "HT", 6: ".", 7: "客厅", 8: "灯", 9: "▁", 10: "now"}
    # 4 query frames (a tag among them), then TURN at LFR frames 1-2, ON at 4, LIGHT at 6-8 with ".", 客厅 at 10-11
    ids = [1, 0, 0, 0, 0, 2, 2, 0, 3, 0, 4, 5, 5, 6, 7, 7, 0, 8, 9, 10]
    timed = ctc_greedy_timed(one_hot_logits(ids, 11))
    assert [t for t, _, _ in timed] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    words = word_times(timed, pieces.__getitem__)
    # a bare `▁` piece starts the next word ("now"), as sentencepiece writes a word it splits there
    assert [w.text for w in words] == ["TURN", "ON", "LIGHT.", "客", "厅", "灯", "now"]
    turn, on, light = words[:3]
    assert (turn.start_s, turn.end_s) == (0.06, 0.18) and (on.start_s, on.end_s) == (0.24, 0.3)
    assert (light.start_s, light.end_s) == (0.36, 0.6)
    assert words[3].start_s == 0.6 and words[4].end_s == 0.72 and words[5].start_s == 0.78


def test_korean_words_keep_their_spaces_in_word_times_and_subtitles(model_dir):
    """Korean puts spaces between words: each sentencepiece word (`▁조` `금` `만`) is one word, not one
    per syllable, and cues join words with spaces. The pieces come from the test models' sentencepiece
    model, trained on the clips' transcripts (the Korean clip's among them)."""
    from asr_server.adapters.http.transcriptions import cues
    from asr_server.core.recording import Segment
    from asr_server.engines.sensevoice.decoding import ctc_greedy_timed, word_times
    from asr_server.engines.sensevoice.tokenizer import SentencePieceTokenizer
    from asr_server.types import Recognition

    sentence = "조금만 생각을 하면서 살면 훨씬 편할 거야"
    tok = SentencePieceTokenizer(model_dir / BPE_FILE)
    ids = tok.processor.EncodeAsIds(sentence)
    assert len(ids) > len(sentence.split())  # words split into several pieces, as the real vocabulary does
    path = [0] * 4 + [f for i in ids for f in (i, 0)]  # four query frames, then each piece and a blank
    words = word_times(ctc_greedy_timed(one_hot_logits(path, tok.size)), tok.piece)
    assert [w.text for w in words] == sentence.split()
    rec = Recognition(
        Transcript(text=sentence, words=words), speaker=None, audio_ms=int(words[-1].end_s * 1000), asr_ms=0.0
    )
    (cue,) = cues([Segment(0.0, words[-1].end_s, rec)])
    assert cue[2] == sentence


def test_word_times_stop_at_the_end_of_the_audio():
    from asr_server.engines.sensevoice.decoding import ctc_greedy_timed, word_times

    pieces = {1: "▁LIGHT", 2: "."}
    # the last LFR frame (60 ms) reaches past the audio's 2.376 s: en_tts's last word ended at 2.40
    ids = [0] * 4 + [0] * 37 + [1, 1, 2]
    timed = ctc_greedy_timed(one_hot_logits(ids, 3))
    (unclamped,) = word_times(timed, pieces.__getitem__)
    assert unclamped.end_s == 2.4
    (word,) = word_times(timed, pieces.__getitem__, duration_s=2.376)
    assert (word.start_s, word.end_s) == (2.22, 2.376)
    (early,) = word_times(timed, pieces.__getitem__, duration_s=2.0)
    assert early.start_s == early.end_s == 2.0


def test_times_sent_stop_at_the_end_of_the_audio_the_recogniser_heard_padded():
    """A VAD cut reaches the recogniser with added silence, so its words may end after the audio:
    files' segments (srt, verbose_json) and FunASR's `timestamp` stop at the end of the audio."""
    from asr_server.adapters.funasr.wire import timestamps
    from asr_server.core.recording import Segment
    from asr_server.types import Recognition, Word

    words = (Word("on", 0.5, 0.9), Word("light.", 1.0, 1.44))
    rec = Recognition(Transcript(text="on light.", words=words), speaker=None, audio_ms=1376, asr_ms=0.0)
    seg = Segment(1.0, 2.376, rec)
    assert [(w.start_s, w.end_s) for w in seg.words()] == [(1.5, 1.9), (2.0, 2.376)]
    assert timestamps(list(words), 1000, 2376)["timestamp"] == [[1500, 1900], [2000, 2376]]
    assert timestamps(list(words), 1000)["timestamp"][-1] == [2000, 2440]


@needs_audio
def test_word_starts_match_a_forced_alignment_of_the_reference_within_100_ms(engine):
    """LibriSpeech clip: each word's start from its CTC peak against a Viterbi (CTC forced) alignment
    of the reference transcript on the same model's frames (torchaudio, computed here once)."""
    import difflib

    import torch
    import torchaudio.functional as taf

    from asr_server.audio.io import decode_audio
    from asr_server.engines.sensevoice.decoding import QUERY_FRAMES, ctc_greedy_timed
    from tests.support.audio import AUDIO, clip

    c = clip("en_librispeech")
    audio = decode_audio((AUDIO / c.file).read_bytes()).samples
    (logits,) = engine.logits(engine.features([audio]), ["auto"], [False])
    got = engine.decode(logits).words
    tags = [t for t, _, _ in ctc_greedy_timed(logits)[:QUERY_FRAMES]]
    ref_words = c.transcript.upper().replace(",", "").replace(".", "").split()
    sp = engine.tokenizer.processor
    targets = tags + [i for w in ref_words for i in sp.EncodeAsIds(w)]
    starts_of = [len(tags) + sum(len(sp.EncodeAsIds(x)) for x in ref_words[:k]) for k in range(len(ref_words))]
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1)[None]
    path, _ = taf.forced_align(log_probs, torch.tensor([targets], dtype=torch.int32), blank=0)
    spans = taf.merge_tokens(path[0], torch.zeros(path.shape[1]))
    ref_starts = [(spans[i].start - QUERY_FRAMES) * 0.06 for i in starts_of]
    hyp = [w.text.strip(".,").upper() for w in got]
    pairs = [
        (got[b.b + k].start_s, ref_starts[b.a + k])
        for b in difflib.SequenceMatcher(a=ref_words, b=hyp, autojunk=False).get_matching_blocks()
        for k in range(b.size)
    ]
    assert len(pairs) >= 0.8 * len(ref_words)
    worst = max(abs(ours - ref) for ours, ref in pairs)
    assert worst <= 0.1, worst
