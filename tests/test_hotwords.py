"""Where hotwords come from and what corrections do: the config, the device API and store, the FunASR
socket's `hotwords` field as FunASR's own client sends it, the transcription form's field; every
source's bad input; `asr.corrections` on the texts each front end sends.

Around the fake recogniser (it records each utterance's hotwords) except the device test, which
talks to a real server on the tiny models and watches what its recogniser is asked.
"""

from __future__ import annotations

import io
import json
import logging

import aiohttp
import numpy as np
import pytest
import soundfile as sf
import websockets

from asr_server.adapters.funasr.server import serve_funasr
from asr_server.audio.resample import float_to_pcm16
from asr_server.config import load_config
from asr_server.core.corrections import Corrections
from asr_server.core.events import EventBus
from asr_server.core.hotwords import MAX_HOTWORDS, HotwordSources, HotwordStore, merge, parse_hotwords
from asr_server.errors import ConfigError, HotwordError
from asr_server.types import Hotword, Transcript, Word
from tests.support.audio import needs_audio
from tests.support.fakes import fake_pipeline, fake_text
from tests.support.servers import AUTH, start_api, stop_api

SR = 16000


def noise(seconds: float) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)


# --- reading a source's text -------------------------------------------------------------------------


def test_funasr_clients_json_object_and_comma_forms():
    # what `funasr_wss_client.py --hotword FILE` sends from a file of "阿里巴巴 20" lines (microphone path)
    sent = json.dumps({"阿里巴巴": 2, "通义实验室": 3.5}, ensure_ascii=False)
    assert parse_hotwords(sent, "t") == (Hotword("阿里巴巴", 2.0), Hotword("通义实验室", 3.5))
    # ... and from its file path: the words joined by commas; and ours: new lines, optional weights
    assert parse_hotwords("阿里巴巴,通义实验室", "t") == (Hotword("阿里巴巴"), Hotword("通义实验室"))
    assert parse_hotwords("Philips Hue 2\n张三\n\n  ", "t") == (Hotword("Philips Hue", 2.0), Hotword("张三"))
    assert parse_hotwords("", "t") == () and parse_hotwords("  ,\n", "t") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": "x"}', "not a number"),
        ('{"a": 0}', "use 0 < weight"),
        ('{"a": 20}', "use 0 < weight"),
        ('{"a": 5.5}', "use 0 < weight"),
        ('{"a": true}', "not a number"),
        ("{not json", "not a JSON object"),
        ("[1, 2]", None),  # no brace: read as words, "[1" and "2]" are words
        ("x" * 65, "longer than 64"),
        (",".join(f"w{i}" for i in range(MAX_HOTWORDS + 1)), f"more than {MAX_HOTWORDS}"),
    ],
)
def test_strict_sources_name_what_is_wrong(text, message):
    if message is None:
        assert parse_hotwords(text, "form field 'hotwords'")
        return
    with pytest.raises(HotwordError, match=message):
        parse_hotwords(text, "form field 'hotwords'")


def test_lenient_source_skips_or_caps_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, "asr_server.core.hotwords"):
        assert parse_hotwords("{not json", "FunASR hotwords", strict=False) == ()
        got = parse_hotwords('{"阿里巴巴": 20, "bad": "x", "ok": 1}', "FunASR hotwords", strict=False)
        many = parse_hotwords(",".join(f"w{i}" for i in range(MAX_HOTWORDS + 5)), "FunASR hotwords", strict=False)
    assert got == (Hotword("阿里巴巴", 5.0), Hotword("ok", 1.0))  # FunASR's 20 is another model's scale: capped
    assert len(many) == MAX_HOTWORDS
    assert "not a JSON object" in caplog.text and "capped" in caplog.text and "not a number" in caplog.text


def test_sources_merge_later_wins_and_weights_default(tmp_path):
    store = HotwordStore(tmp_path / "vp.sqlite")
    store.set("dev", [Hotword("张三", 3.0), Hotword("卧室")])
    sources = HotwordSources(["张三", "小米台灯 2"], 1.5, store)
    assert sources.of("dev", (Hotword("卧室", 4.0),)) == (
        Hotword("小米台灯", 2.0),
        Hotword("张三", 3.0),
        Hotword("卧室", 4.0),
    )
    assert sources.of(None) == (Hotword("张三", 1.5), Hotword("小米台灯", 2.0))
    assert merge([Hotword("a", 1.0)], [Hotword("a", 2.0)]) == (Hotword("a", 2.0),)
    store.close()


def test_bad_config_stops_the_start(tmp_path):
    for asr in ({"hotwords": ["x" * 100]}, {"hotwords": ["名字 abc def 99"]}, {"corrections": ["no arrow"]}):
        cfg = load_config(None, env={}, overrides={"asr": asr})
        with pytest.raises(ConfigError):
            fake_pipeline(cfg, tmp_path / "vp.sqlite")


# --- corrections ---------------------------------------------------------------------------------------


def test_corrections_rewrite_text_and_words_and_keep_the_text_before():
    fix = Corrections(["章三=>张三", "living rum => living room"])
    t = Transcript("章三打开灯", words=(Word("章", 0.0, 0.2), Word("三", 0.2, 0.4), Word("打", 0.4, 0.6)))
    out = fix.apply(t)
    assert out.text == "张三打开灯" and out.uncorrected_text == "章三打开灯"
    assert [w.text for w in out.words] == ["张", "三", "打"]
    assert (out.words[0].start_s, out.words[1].end_s) == (0.0, 0.4)
    en = fix.apply(Transcript("the living rum light", words=(Word("living", 0.5, 0.8), Word("rum", 0.8, 1.0))))
    assert en.text == "the living room light" and [w.text for w in en.words] == ["living", "room"]
    untouched = Transcript("nothing here")
    assert fix.apply(untouched) is untouched


# --- the sources through the server ----------------------------------------------------------------------


async def test_http_form_field_device_header_and_corrections(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, asr={"hotwords": ["全局"], "corrections": ["w1=>hello"]})
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    pipeline.hotwords.store.set("dev-1", [Hotword("设备词", 2.0)])
    buf = io.BytesIO()
    sf.write(buf, noise(1.2), SR, format="WAV")
    wav = buf.getvalue()
    try:
        async with aiohttp.ClientSession(headers=AUTH) as http:

            def form(**fields):
                f = aiohttp.FormData()
                f.add_field("file", wav, filename="a.wav")
                for k, v in {"response_format": "verbose_json", **fields}.items():
                    f.add_field(k, v)
                return f

            async with http.post(
                f"{url}/v1/audio/transcriptions",
                data=form(hotwords="小米台灯 3, 张三"),
                headers={"Device-Id": "dev-1"},
            ) as r:
                body = await r.json()
                assert r.status == 200, body
            assert pipeline.asr.hotwords[-1] == (
                Hotword("全局", 1.5),
                Hotword("设备词", 2.0),
                Hotword("小米台灯", 3.0),
                Hotword("张三", 1.5),
            )
            assert body["text"] == fake_text(len(noise(1.2))).replace("w1", "hello", 1)
            for bad, why in (("a 99", "weight"), ("x" * 70, "longer")):
                async with http.post(f"{url}/v1/audio/transcriptions", data=form(hotwords=bad)) as r:
                    err = await r.json()
                    assert r.status == 400 and why in err["error"]["message"] and err["error"]["param"] == "hotwords"
    finally:
        await stop_api(runner, pipeline, bus)


async def test_device_api_sets_lists_and_deletes_with_an_admin_key(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, http={"read_keys": ["reader"]})
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    dev = f"{url}/v1/devices/aa:bb:cc/hotwords"
    try:
        async with aiohttp.ClientSession(headers=AUTH) as http:
            body = {"hotwords": [{"word": "张三", "weight": 2}, "小米台灯"]}
            async with http.put(dev, json=body) as r:
                assert r.status == 200
            async with http.get(dev) as r:
                assert (await r.json())["hotwords"] == [
                    {"word": "张三", "weight": 2.0},
                    {"word": "小米台灯", "weight": None},
                ]
            assert pipeline.hotwords.of("aa:bb:cc")[0] == Hotword("张三", 2.0)  # the next utterance's list
            async with http.get(f"{url}/v1/hotwords") as r:
                assert (await r.json())["devices"] == {"aa:bb:cc": 2}
            huge = {"hotwords": [f"w{i}" for i in range(MAX_HOTWORDS + 1)]}
            for bad in (huge, {"hotwords": [{"word": "a", "weight": "heavy"}]}, {"hotwords": 5}, {"hotwords": [3]}):
                async with http.put(dev, json=bad) as r:
                    assert r.status == 400, bad
            async with http.put(dev, data=b"not json") as r:
                assert r.status == 400
            async with http.get(dev) as r:  # a refused list leaves the stored one alone
                assert len((await r.json())["hotwords"]) == 2
            async with http.delete(dev) as r:
                assert r.status == 200
            async with http.delete(dev) as r:
                assert r.status == 404
            assert pipeline.hotwords.of("aa:bb:cc") == ()
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer reader"}) as http:
            async with http.get(dev) as r:
                assert r.status == 403
        async with aiohttp.ClientSession() as http, http.get(dev) as r:
            assert r.status == 401
    finally:
        await stop_api(runner, pipeline, bus)


async def funasr_offline(tmp_path, hotwords: str, **asr) -> tuple[list, dict]:
    cfg = load_config(
        None,
        env={},
        overrides={
            "funasr": {"host": "127.0.0.1", "port": 0, "self_signed_cert": str(tmp_path / "c.pem"), "tls": "off"},
            "speaker": {"db": str(tmp_path / "vp.sqlite")},
            "asr": asr,
        },
    )
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    bus = EventBus(cfg, pipeline.metrics)
    await bus.start()
    server = await serve_funasr(cfg, pipeline, pipeline.metrics, bus)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}") as ws:
            # the first message exactly as funasr_wss_client.py builds it (offline, --hotword FILE)
            await ws.send(
                json.dumps(
                    {
                        "mode": "offline",
                        "chunk_size": [5, 10, 5],
                        "chunk_interval": 10,
                        "encoder_chunk_look_back": 4,
                        "decoder_chunk_look_back": 0,
                        "audio_fs": 16000,
                        "wav_name": "demo",
                        "wav_format": "pcm",
                        "is_speaking": True,
                        "hotwords": hotwords,
                        "itn": True,
                    },
                    ensure_ascii=False,
                )
            )
            await ws.send(float_to_pcm16(noise(1.0)))
            await ws.send(json.dumps({"is_speaking": False}))
            final = json.loads(await ws.recv())
        return pipeline.asr.hotwords, final
    finally:
        server.close()
        await server.wait_closed()
        await bus.close()
        await pipeline.close()


async def test_funasr_field_as_funasrs_client_sends_it_and_its_bad_forms(tmp_path, caplog):
    sent = json.dumps({"阿里巴巴": 20, "通义实验室": 3}, ensure_ascii=False)
    asked, final = await funasr_offline(tmp_path / "a", sent, corrections=["w1=>你好"])
    assert asked[-1] == (Hotword("阿里巴巴", 5.0), Hotword("通义实验室", 3.0))
    assert final["is_final"] and "你好" in final["text"]
    with caplog.at_level(logging.INFO, "asr_server.core.hotwords"):
        asked, final = await funasr_offline(tmp_path / "b", '{"阿里巴巴": 20')  # cut short: not JSON
    assert asked[-1] == () and final["is_final"] and "w1" in final["text"]  # answered all the same
    assert "not a JSON object" in caplog.text


# --- a device's list on a real server -----------------------------------------------------------------------


@needs_audio
async def test_device_list_reaches_the_recogniser_for_its_utterances(server, monkeypatch):
    from loadtest.clips import load_clip
    from loadtest.device import Device, DeviceConfig
    from tests.support.audio import clip

    store = server.pipeline.hotwords.store
    store.set("02:00:00:00:00:42", [Hotword("客厅", 2.5)])
    engine = server.pipeline.asr
    asked: list = []
    real = engine.transcribe_batch

    def spy(audios, languages=None, use_itn=None, hotwords=None):
        asked.extend(hotwords or [()] * len(audios))
        return real(audios, languages, use_itn, hotwords)

    monkeypatch.setattr(engine, "transcribe_batch", spy)
    try:
        c = load_clip(clip("zh_tts_living_room_light").path)
        async with Device(DeviceConfig(url=server.endpoints.device_url, device_id="02:00:00:00:00:42")) as dev:
            await dev.listen("start", "auto")
            await dev.send_opus(c.packets, 3.0)
            await dev.send_silence(900, 3.0)
            await dev.next_message("stt", 20)
        assert (Hotword("客厅", 2.5),) in asked
    finally:
        store.delete("02:00:00:00:00:42")
