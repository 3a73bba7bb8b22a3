"""Hotwords: what the biased decoding costs, and what it changes on the shared clips.

    python -m benchmarks.hotwords --models build/bench-models --repeat 20

Cost: one 5 s utterance (the first 5 s of the JFK clip) through the model once; its logits then
decoded, interleaved round by round, greedily (the server's path without hotwords: argmax, runs,
tokenizer) and by the biased beam search (top-k, search, tokenizer) with no hotword, 10 and 1,000
(the cap of one source); the context graph's build is timed apart (the engine keeps the last lists'
graphs). Beside it, the whole recognition (features, model, decoding) A/B through `transcribe_batch`
without hotwords and with an empty list per item (both the greedy call the server makes for an
utterance without any), and with 10.

Effect (the 13 shared clips through the model, greedy against biased): with 50 words that occur in
none of them every text must stay as it was; with each clip's own rare words (`RARE`), how many of
those words the greedy text lacks and the biased one has. On random-weight stand-ins these say
that biasing invents nothing and recovers what is close; real weights are the real test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asr_server.engines.sensevoice import SenseVoice
from asr_server.engines.sensevoice.beam_search import BEAM, biased_search
from asr_server.engines.sensevoice.context_graph import ContextGraph, hotword_pieces
from asr_server.engines.sensevoice.decoding import ctc_runs
from asr_server.engines.sensevoice.onnx import top_k
from asr_server.engines.sensevoice.tokenizer import Tokenizer
from asr_server.types import Hotword

from .stages import machine

#: Names, rooms, devices, products that none of the shared clips says, in the five languages; the
#: trained tiny stand-in's tokenizer (300 pieces) spells 70 of them: none with b or p, no CJK one.
CANDIDATES = (
    "张三", "李四", "小米台灯", "空气净化器", "扫地机器人", "卧室", "书房", "阳台", "音量", "天气", "今日",
    "Alice", "Bob", "Dyson", "Roomba", "Philips Hue", "Spotify", "Netflix", "thermostat", "garage", "kitchen",
    "garden", "window", "shower", "heater", "dryer", "fridge", "stove", "hallway", "mirror", "towel", "alarm",
    "radio", "sofa", "kettle", "oven", "door", "drawer", "laundry", "heating", "stairs", "humidifier", "monday",
    "tuesday", "thursday", "saturday", "sunday", "weekend", "morning", "evening", "midnight", "dinner", "tomato",
    "mango", "honey", "yogurt", "mother", "father", "sister", "daughter", "granny", "Emma", "Olivia", "Noah",
    "Liam", "Ethan", "Harry", "Sarah", "Gerald", "Edward", "Diana", "Hannah", "Fiona", "Martin", "Oliver",
    "Wendy", "Tony", "Kate", "Nora", "Frank", "Greta", "Helga", "Ingrid", "Tom", "Amy", "Ruth", "Hugo",
    "さくら", "エアコン", "テレビ", "冷蔵庫", "민수", "지은", "에어컨", "냉장고", "날씨", "오늘", "雪櫃", "冷氣機",
)  # fmt: skip


def unrelated(tokenizer: Tokenizer, texts: list[str], n: int = 50) -> tuple[Hotword, ...]:
    """`n` candidates the tokenizer spells that none of `texts` contains."""
    low = [t.lower() for t in texts]
    ok = [w for w in CANDIDATES if hotword_pieces(tokenizer, w) and not any(w.lower() in t for t in low)]
    return tuple(Hotword(w, WEIGHT) for w in ok[:n])


#: Each clip's rare words: the names and terms a user would make hotwords of.
RARE = {
    "en_jfk_whisper.flac": ("Americans", "country"),
    "zh_aishell_BAC009S0724W0121_wenet.wav": ("广州市", "房地产", "中介协会"),
    "en_librispeech_1995-1837-0001_wenet.wav": ("FANTASY", "COTTON", "SORROW"),
    "zh_funasr_llamacpp_sample.wav": ("滨海新区",),
    "zh_sensevoice_example_transcribecpp.wav": ("开放时间", "九点", "五点"),
    "ja_sensevoice_example_transcribecpp.wav": ("弁当制", "学校販売"),
    "ko_sensevoice_example_transcribecpp.wav": ("생각을", "훨씬"),
    "yue_sensevoice_example_transcribecpp.wav": ("表達", "意思"),
    "en_tts_living_room_light_wyoming.wav": ("living room",),
    "zh_tts_living_room_light_wyoming.wav": ("客厅",),
    "ja_tts_living_room_light_wyoming.wav": ("リビング",),
    "ko_tts_living_room_light_wyoming.wav": ("거실",),
    "yue_tts_living_room_light_wyoming.wav": ("客厅",),
}

WEIGHT = 1.5  # asr.hotword_weight's default


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _hotwords(n: int, engine: SenseVoice) -> tuple[Hotword, ...]:
    """`n` hotwords: the unrelated words, then made-up ones from the vocabulary's pieces."""
    words = list(CANDIDATES[:n])
    rng = np.random.default_rng(0)
    pieces = [p for p in (engine.tokenizer.piece(i) for i in range(engine.tokenizer.size)) if p and "<" not in p]
    while len(words) < n:
        words.append("".join(rng.choice(pieces, 3)).replace("\u2581", " ").strip()[:64] or f"w{len(words)}")
    return tuple(Hotword(w, WEIGHT) for w in dict.fromkeys(words))


def cost(engine: SenseVoice, audio: np.ndarray, repeat: int) -> None:
    logits = engine.logits(engine.features([audio]), ["auto"], [True])[0]
    graphs = {n: ContextGraph.build(_hotwords(n, engine), engine.tokenizer, WEIGHT) for n in (0, 10, 1000)}
    print(f"logits: {logits.shape[0]} frames x {logits.shape[1]} classes; beam {BEAM}")

    def greedy() -> None:
        engine.decode_timed(ctc_runs(logits.argmax(axis=-1)))

    def beam(g: ContextGraph) -> Callable[[], None]:
        def run() -> None:
            ids, scores = top_k(logits, BEAM)
            found = biased_search(ids, scores, g)
            engine.decode_timed(found.timed, hotwords=found.hotwords)

        return run

    cases: dict[str, Callable[[], None]] = {"greedy": greedy}
    cases.update({f"beam, {n} hotwords": beam(g) for n, g in graphs.items()})
    cases["graph build, 1000 hotwords"] = lambda: ContextGraph.build(_hotwords(1000, engine), engine.tokenizer, WEIGHT)
    cases["recognition, no hotwords"] = lambda: engine.transcribe_batch([audio])
    cases["recognition, hotwords=[()]"] = lambda: engine.transcribe_batch([audio], hotwords=[()])
    ten = _hotwords(10, engine)
    cases["recognition, 10 hotwords"] = lambda: engine.transcribe_batch([audio], hotwords=[ten])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(repeat):  # interleaved: a busy second of a shared machine falls on every case
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    base = _median(times["greedy"])
    print("\n| decoding of one 5 s utterance | median ms | p90 ms | x greedy |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        p90 = sorted(ts)[int(0.9 * (len(ts) - 1))]
        print(f"| {name} | {_median(ts):.2f} | {p90:.2f} | {_median(ts) / base:.1f} |")


def effect(engine: SenseVoice, clips: list) -> None:
    audios = [c.audio for c in clips]
    greedy = engine.transcribe_batch(audios)
    words = unrelated(engine.tokenizer, [c.text for c in clips])
    biased = engine.transcribe_batch(audios, hotwords=[words] * len(clips))
    same = sum(g.text == b.text for g, b in zip(greedy, biased, strict=True))
    invented = [(c.name, b.hotwords) for c, b in zip(clips, biased, strict=True) if b.hotwords]
    print(f"\n{len(words)} unrelated hotwords ({', '.join(w.text for w in words)})")
    print(f"{same} of {len(clips)} texts unchanged; hotwords put in: {invented or 'none'}")
    print("\n| clip | rare words (spelt by the tokenizer) | in greedy text | in biased text | biased text |")
    print("|---|---|---:|---:|---|")
    totals = [0, 0, 0]
    for clip, g in zip(clips, greedy, strict=True):
        rare = RARE.get(clip.name, ())
        b = engine.transcribe_batch([clip.audio], hotwords=[tuple(Hotword(w, WEIGHT) for w in rare)])[0]
        has_g = sum(w.lower() in g.text.lower() for w in rare)
        has_b = sum(w.lower() in b.text.lower() for w in rare)
        totals = [totals[0] + len(rare), totals[1] + has_g, totals[2] + has_b]
        spelt = sum(bool(hotword_pieces(engine.tokenizer, w)) for w in rare)
        print(f"| {clip.name} | {', '.join(rare)} ({spelt}) | {has_g} | {has_b} | {b.text[:60]} |")
    print(f"| all | {totals[0]} words | {totals[1]} | {totals[2]} | |")


def noisy(engine: SenseVoice, clips: list, snrs: tuple[float, ...] = (10.0, 5.0, 0.0)) -> None:
    """The clips with white noise at each SNR, where the stand-in starts to garble words: how many
    rare words the greedy and the biased texts have, and whether 50 unrelated words change any text."""
    words = unrelated(engine.tokenizer, [c.text for c in clips])
    rng = np.random.default_rng(0)
    print("\n| SNR dB | rare words | in greedy texts | in biased texts | texts changed by 50 unrelated hotwords |")
    print("|---:|---:|---:|---:|---:|")
    for snr in snrs:
        audios = []
        for c in clips:
            power = float(np.mean(c.audio**2))
            audios.append(
                (c.audio + rng.standard_normal(len(c.audio)) * np.sqrt(power / 10 ** (snr / 10))).astype(np.float32)
            )
        greedy = engine.transcribe_batch(audios)
        rare = [tuple(Hotword(w, WEIGHT) for w in RARE.get(c.name, ())) for c in clips]
        biased = engine.transcribe_batch(audios, hotwords=rare)
        other = engine.transcribe_batch(audios, hotwords=[words] * len(clips))
        total = sum(len(r) for r in rare)
        has_g = sum(h.text.lower() in g.text.lower() for r, g in zip(rare, greedy, strict=True) for h in r)
        has_b = sum(h.text.lower() in b.text.lower() for r, b in zip(rare, biased, strict=True) for h in r)
        changed = sum(g.text != o.text for g, o in zip(greedy, other, strict=True))
        print(f"| {snr:g} | {total} | {has_g} | {has_b} | {changed} of {len(clips)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path("build/bench-models"), help="for the cost (full size)")
    ap.add_argument("--effect-models", type=Path, default=None, help="for the effect (default: --models)")
    ap.add_argument("--audio", type=Path, default=Path(os.environ.get("ASR_SERVER_TEST_AUDIO", "../shared/audio")))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from benchmarks.standins import load_clips

    print(machine())
    print(f"load average before: {open('/proc/loadavg').read().strip()}")
    engine = SenseVoice.load(args.models / "SenseVoiceSmall", quantized="yes", device="cpu", threads=args.threads)
    clips = load_clips(args.audio)
    jfk = next(c for c in clips if c.name.startswith("en_jfk"))
    cost(engine, jfk.audio[: 5 * 16000], args.repeat)
    if args.effect_models is not None:
        engine = SenseVoice.load(args.effect_models / "SenseVoiceSmall", quantized="no", threads=args.threads)
    effect(engine, clips)
    noisy(engine, clips)
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
