"""End to end over a real socket: a simulated xiaozhi device streams real Opus speech to the server.

Endpointing depends on the audio, not on wall time, so most tests send faster than real time
(`pace`); the flood limit (200 frames/s after a 1 s burst) is respected by pace <= 3 with 60 ms frames.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from loadtest.clips import Clip, encode_pcm, load_clip
from loadtest.device import ConnectError, Device, DeviceConfig, ReplyTimeout
from tests.support.audio import cer, clip, needs_audio
from tests.support.servers import HELLO, expect_close, raw_connect, send_until_closed, wait_sessions_empty

pytestmark = pytest.mark.slow  # real-time device streams end to end

PACE = 3.0
REPLY_S = 20.0


def device(server, **kw) -> Device:
    return Device(DeviceConfig(url=server.endpoints.device_url, **kw))


async def say(dev: Device, c: Clip, silence_ms: int = 900, pace: float | None = PACE) -> None:
    await dev.send_opus(c.packets, pace)
    await dev.send_silence(silence_ms, pace)


async def no_message(dev: Device, type: str = "stt", wait: float = 1.5) -> None:
    with pytest.raises(ReplyTimeout):
        await dev.next_message(type, timeout=wait)


@needs_audio
@pytest.mark.parametrize("version", [1, 2, 3])
async def test_auto_mode_one_reply_per_utterance(server, version):
    c = clip("zh_aishell")
    async with device(server, protocol_version=version, device_id="aa:bb:cc:dd:ee:01") as dev:
        assert dev.session_id and dev.server_hello["transport"] == "websocket"
        await dev.listen("start", "auto")
        await say(dev, load_clip(c.path))
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert msg["session_id"] == dev.session_id
        assert cer(c.transcript, msg["text"]) <= 0.2, msg
        assert msg["language"] == "zh"
        assert msg["emotion"] == "NEUTRAL" and msg["event"] == "Speech"
        assert abs(msg["audio_ms"] - c.duration_s * 1000) < 1200
        # from the end of speech: the endpoint's silence (vad.min_silence_ms, 400) plus the processing after it
        assert 350 <= msg["latency_ms"] - msg["processing_ms"] <= 600, msg
        assert msg["processing_ms"] >= 0
        await no_message(dev)  # exactly one reply
    await wait_sessions_empty(server)


@needs_audio
async def test_two_utterances_in_one_stream_in_order_and_silence_gives_nothing(server):
    a, b = clip("en_tts_living"), clip("ja_tts_living")
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await dev.send_silence(2000, None)  # silence only: no reply
        await no_message(dev, wait=1.0)
        await say(dev, load_clip(a.path))
        await say(dev, load_clip(b.path))
        first = (await dev.next_message("stt", REPLY_S)).data
        second = (await dev.next_message("stt", REPLY_S)).data
        assert cer(a.transcript, first["text"]) <= 0.2 and first["language"] == "en"
        assert cer(b.transcript, second["text"]) <= 0.2 and second["language"] == "ja"
        await no_message(dev)


@needs_audio
@pytest.mark.parametrize("frame_ms", [20, 40])
async def test_shorter_opus_frames(server, frame_ms):
    c = clip("ko_tts_living")
    async with device(server, frame_ms=frame_ms) as dev:
        await dev.listen("start", "auto")
        await say(dev, load_clip(c.path, frame_ms=frame_ms), pace=1.5)
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert cer(c.transcript, msg["text"]) <= 0.2 and msg["language"] == "ko"


@needs_audio
async def test_manual_mode_ends_at_listen_stop(server):
    c = clip("yue_tts_living")
    async with device(server) as dev:
        await dev.listen("start", "manual")
        await dev.send_opus(load_clip(c.path).packets, PACE)  # no trailing silence: only `stop` ends it
        await no_message(dev, wait=1.0)
        await dev.listen("stop")
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert cer(c.transcript, msg["text"]) <= 0.2 and msg["language"] == "yue"
        # push-to-talk with nothing said: no reply
        await dev.listen("start", "manual")
        await dev.send_silence(1500, None)
        await dev.listen("stop")
        await no_message(dev)


@needs_audio
async def test_realtime_mode_and_wake_word_flow(server):
    c = clip("zh_tts_living")
    async with device(server) as dev:
        # the firmware sends the buffered wake-word audio, then detect, then listen start
        await dev.send_opus(load_clip(clip("ko_tts_living").path).packets, None)
        await dev.detect("你好小智")
        await dev.listen("start", "realtime")
        await say(dev, load_clip(c.path))
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert cer(c.transcript, msg["text"]) <= 0.2  # the wake-word audio before `listen start` is not recognised
        await say(dev, load_clip(c.path))
        assert cer(c.transcript, (await dev.next_message("stt", REPLY_S)).data["text"]) <= 0.2


@needs_audio
async def test_listen_stop_in_auto_mode_flushes_the_utterance(server):
    c = clip("zh_sensevoice")
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await dev.send_opus(load_clip(c.path).packets, PACE)
        await dev.listen("stop")
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert cer(c.transcript, msg["text"]) <= 0.25


@needs_audio
async def test_abort_drops_the_utterance_in_progress(server):
    c = clip("en_tts_living")
    packets = load_clip(c.path).packets
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await dev.send_opus(packets[: len(packets) * 2 // 3], PACE)
        await dev.abort()
        await dev.send_silence(900, PACE)
        await no_message(dev)
        await say(dev, load_clip(c.path))  # the session still works after an abort
        assert cer(c.transcript, (await dev.next_message("stt", REPLY_S)).data["text"]) <= 0.2


@needs_audio
async def test_speaker_identified_after_enrollment(server, pipeline):
    from asr_server.audio.io import decode_audio

    jfk, other = clip("en_jfk"), clip("zh_funasr")
    assert pipeline.voiceprints is not None
    emb = await pipeline.embed(decode_audio(jfk.path.read_bytes()).samples)
    pipeline.voiceprints.enroll("jfk", [emb])
    emb2 = await pipeline.embed(decode_audio(other.path.read_bytes()).samples)
    pipeline.voiceprints.enroll("mandarin-speaker", [emb2])
    try:
        async with device(server) as dev:
            await dev.listen("start", "manual")
            await dev.send_opus(load_clip(jfk.path).packets, PACE)
            await dev.listen("stop")
            msg = (await dev.next_message("stt", REPLY_S)).data
            assert msg["speaker"] is not None and msg["speaker"]["name"] == "jfk", msg
            assert msg["speaker"]["score"] >= pipeline.config.speaker.threshold
            await dev.listen("start", "manual")
            await dev.send_opus(load_clip(other.path).packets, PACE)
            await dev.listen("stop")
            msg = (await dev.next_message("stt", REPLY_S)).data
            assert msg["speaker"] is not None and msg["speaker"]["name"] == "mandarin-speaker", msg
    finally:
        pipeline.voiceprints.remove("jfk")
        pipeline.voiceprints.remove("mandarin-speaker")


@needs_audio
async def test_identity_and_token_as_query_parameters(start_server):
    srv = await start_server(xiaozhi={"auth": {"enabled": True, "tokens": ["s3cret"]}})
    c = clip("en_tts_living")
    async with Device(
        DeviceConfig(
            url=srv.endpoints.device_url,
            token="s3cret",
            auth_in_query=True,
            device_id="aa:bb:cc:dd:ee:99",
            protocol_version=3,
        )
    ) as dev:
        session = srv.xiaozhi.sessions[dev.session_id]
        assert session.client.device_id == "aa:bb:cc:dd:ee:99" and session.client.protocol_version == 3
        await dev.listen("start", "auto")
        await say(dev, load_clip(c.path))
        assert (await dev.next_message("stt", REPLY_S)).data["text"]
    with pytest.raises(ConnectError) as e:
        await Device(DeviceConfig(url=srv.endpoints.device_url, token="wrong")).connect()
    assert e.value.args[0].endswith("401")
    with pytest.raises(ConnectError, match="401"):
        await Device(DeviceConfig(url=srv.endpoints.device_url)).connect()


@needs_audio
async def test_sessions_run_concurrently_and_a_vanished_client_disturbs_nobody(server):
    c = clip("zh_aishell")
    steady = device(server, device_id="aa:00:00:00:00:01")
    vanishing = device(server, device_id="aa:00:00:00:00:02")
    await steady.connect()
    await vanishing.connect()
    assert len(server.xiaozhi.sessions) == 2
    await steady.listen("start", "auto")
    await vanishing.listen("start", "auto")
    packets = load_clip(c.path).packets
    await asyncio.gather(steady.send_opus(packets, PACE), vanishing.send_opus(packets[: len(packets) // 2], PACE))
    vanishing._ws.transport.abort()  # gone mid-utterance, no close frame
    await steady.send_silence(900, PACE)
    msg = (await steady.next_message("stt", REPLY_S)).data
    assert cer(c.transcript, msg["text"]) <= 0.2
    await steady.close()
    await wait_sessions_empty(server)


# --- bad input ---------------------------------------------------------------------------------


async def test_binary_before_hello(server):
    ws = await raw_connect(server)
    await ws.send(b"\x01\x02\x03")
    msgs = await expect_close(ws, 1002, "binary frame before hello")
    assert msgs and msgs[0]["type"] == "error"
    await wait_sessions_empty(server)


async def test_malformed_and_unknown_json_get_errors_and_the_session_lives(server):
    import json

    ws = await raw_connect(server)
    await ws.send(HELLO)
    hello = json.loads(await ws.recv())
    await ws.send("{this is not json")
    err = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert err["type"] == "error" and "malformed JSON" in err["message"]
    await ws.send('{"type":"teleport"}')
    err = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert "unknown message type 'teleport'" in err["message"]
    await ws.send('{"type":"listen","state":"start","mode":"auto"}')
    await ws.send('{"type":"nonsense"}')  # its error reply proves the listen before it was handled
    await asyncio.wait_for(ws.recv(), 5)
    assert server.xiaozhi.sessions[hello["session_id"]].listening
    await ws.close()
    await wait_sessions_empty(server)


async def test_first_message_not_hello(server):
    ws = await raw_connect(server)
    await ws.send('{"type":"listen","state":"start"}')
    await expect_close(ws, 1002, "first message must be hello")


async def test_wrong_protocol_version(server):
    ws = await raw_connect(server, {"Protocol-Version": "9"})
    msgs = await expect_close(ws, 1002, "unsupported Protocol-Version 9")
    assert msgs[0]["type"] == "error"


async def test_v2_header_size_mismatch_and_corrupt_opus(server):
    import json
    import struct

    ws = await raw_connect(server, {"Protocol-Version": "2"})
    await ws.send(HELLO)
    json.loads(await ws.recv())
    await ws.send(struct.pack(">HHIII", 2, 0, 0, 0, 50) + b"x" * 10)
    err = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert "header says 50 payload bytes, message has 10" in err["message"]
    await ws.send(struct.pack(">HHIII", 2, 0, 0, 0, 3) + b"\xff\xff\xff")
    err = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert "corrupt Opus" in err["message"]
    await ws.send(struct.pack(">HHIII", 2, 0, 0, 0, 3) + b"\xff\xff\xff")  # reported once, then only counted
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.recv(), 0.5)
    assert server.metrics.errors.labels("opus")._value.get() >= 2
    await ws.close()


async def test_oversize_message_closes_1009(server):
    ws = await raw_connect(server)
    await ws.send(HELLO)
    await ws.recv()
    await ws.send(b"\x00" * (server.config.server.max_message_bytes + 1))
    await expect_close(ws, 1009, "")
    await wait_sessions_empty(server)


async def test_frame_flood_closes_1008(start_server):
    srv = await start_server(xiaozhi={"max_frames_per_s": 20})
    ws = await raw_connect(srv)
    await ws.send(HELLO)
    await ws.recv()
    from loadtest.clips import silence_packet

    pkt = silence_packet(60)
    await send_until_closed(ws, pkt, 200)
    msgs = await expect_close(ws, 1008, "frame flood")
    assert any("frame flood" in m.get("message", "") for m in msgs)
    await wait_sessions_empty(srv)


async def test_hello_timeout(start_server):
    srv = await start_server(xiaozhi={"hello_timeout_s": 0.3})
    ws = await raw_connect(srv)
    await expect_close(ws, 1008, "no hello within 0.3 s")


async def test_idle_session_is_closed_and_an_active_one_is_not(start_server):
    srv = await start_server(xiaozhi={"idle_timeout_s": 0.6})
    from loadtest.clips import silence_packet

    quiet, busy = await raw_connect(srv), await raw_connect(srv)
    for ws in (quiet, busy):
        await ws.send(HELLO)
        await ws.recv()
    for _ in range(25):  # 1.5 s of frames: the busy one stays open past the timeout
        await busy.send(silence_packet(60))
        await asyncio.sleep(0.06)
    await expect_close(quiet, 1000, "idle for 0.6 s")
    assert busy.close_code is None
    await busy.close()
    await wait_sessions_empty(srv)


async def test_wrong_path_is_404(server):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as e:
        await raw_connect(server, path="/elsewhere/")
    assert e.value.response.status_code == 404


async def test_session_limit_is_503(start_server):
    srv = await start_server(xiaozhi={"max_sessions": 1})
    async with device(srv):
        with pytest.raises(ConnectError, match="503"):
            await device(srv).connect()


async def test_silent_stream_sends_nothing_and_runs_no_recogniser(server, pipeline):
    def recognised():
        return pipeline.metrics.registry.get_sample_value("asr_batch_size_sum", {"engine": "asr"}) or 0.0

    before = recognised()
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await dev.send_silence(3000, None)
        await no_message(dev, wait=1.0)
    # quiet noise under the speech threshold: nothing either
    noise = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.002).astype(np.float32)
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await dev.send_opus(encode_pcm(noise, 60), None)
        await no_message(dev, wait=1.0)
    assert recognised() == before


@needs_audio
async def test_speculation_is_used_at_the_endpoint_and_voided_by_resumed_speech(server, pipeline):
    def outcomes():
        get = pipeline.metrics.registry.get_sample_value
        return {k: get("asr_speculations_total", {"outcome": k}) or 0.0 for k in ("used", "dropped", "discarded")}

    c = load_clip(clip("en_tts_living").path)
    before = outcomes()
    async with device(server) as dev:
        await dev.listen("start", "auto")
        # The clip's speech runs from 0.22 s to 1.5 s: 1.6 s of it, then the whole clip, is a pause of
        # about 320 ms: a speculation starts (after 96 ms), then speech goes on before the endpoint (400 ms).
        await dev.send_opus(c.packets[:27], PACE)
        await say(dev, c)
        msg = (await dev.next_message("stt", REPLY_S)).data
        await no_message(dev)  # the pause did not split the utterance
    after = outcomes()
    assert after["used"] - before["used"] == 1
    assert (after["dropped"] + after["discarded"]) - (before["dropped"] + before["discarded"]) >= 1
    t = msg["timings"]
    assert t["speculated"] is True and t["asr_ms"] > 0 and t["asr_queue_ms"] >= 0


@needs_audio
async def test_latency_counts_the_audio_a_slow_reader_left_waiting_in_the_socket(server):
    """Frames read at half the speed they carry (a server reading slower than its devices send):
    the reply's latency runs from when the speech was spoken, not from when its frames were read."""
    c = load_clip(clip("en_tts_living").path)
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await dev.send_opus(c.packets, 0.5)
        await dev.send_silence(900, 0.5)
        msg = (await dev.next_message("stt", REPLY_S)).data
    # Speech ends about 1.5 s into the clip, so at its endpoint the reader was ~1.9 s behind the
    # device: that, plus the endpoint's silence, came before the processing. Read as it arrived,
    # it was the silence alone (350-600 ms: see test_auto_mode_one_reply_per_utterance).
    assert msg["latency_ms"] - msg["processing_ms"] >= 1500, msg
    assert cer(clip("en_tts_living").transcript, msg["text"]) <= 0.2


@needs_audio
async def test_frames_that_came_during_a_slow_vad_call_go_into_the_next_call_together(server, pipeline, monkeypatch):
    """A session awaiting each frame's VAD call in turn reads one frame per call; with the VAD
    slower than the frames come, it catches up by taking all that waited in one call instead."""
    feed = pipeline.feed
    calls: list[int] = []

    async def slow_feed(stream, pcm):
        calls.append(len(pcm))
        await asyncio.sleep(0.1)  # five 60 ms frames come meanwhile at pace 3
        return await feed(stream, pcm)

    monkeypatch.setattr(pipeline, "feed", slow_feed)
    c = clip("en_tts_living")
    packets = load_clip(c.path).packets
    async with device(server) as dev:
        await dev.listen("start", "auto")
        await say(dev, load_clip(c.path))
        msg = (await dev.next_message("stt", REPLY_S)).data
    assert cer(c.transcript, msg["text"]) <= 0.2
    frames = sum(calls) / 960  # as far as the session got before it closed (past the endpoint)
    assert frames >= len(packets) and all(n % 960 == 0 for n in calls)  # whole frames, none lost
    assert len(calls) <= frames / 2, calls


@needs_audio
@pytest.mark.parametrize("name", ["en_librispeech", "ja_sensevoice"])
async def test_a_long_utterance_is_recognised_in_phrases_with_the_same_text(pipeline, models_dir, tmp_path, name):
    from asr_server.app import AsrServer
    from asr_server.core.metrics import Metrics
    from asr_server.core.pipeline import Pipeline
    from tests.support.config import make_config

    c = clip(name)
    texts = {}
    for pause in (160, 0):
        cfg = make_config(models_dir, tmp_path / "vp.sqlite", vad={"phrase_pause_ms": pause})
        p = Pipeline(cfg, pipeline.vad, pipeline.asr, pipeline.speaker, None, Metrics())
        srv = AsrServer(cfg, p)
        await srv.start()
        try:
            async with device(srv) as dev:
                await dev.listen("start", "auto")
                await say(dev, load_clip(c.path))
                texts[pause] = (await dev.next_message("stt", REPLY_S)).data
        finally:
            await srv.stop()
            await p.close()
    phrased, whole = texts[160], texts[0]
    assert phrased["timings"]["phrases"] >= 1 and whole["timings"]["phrases"] == 0
    assert cer(c.transcript, phrased["text"]) <= 0.2, phrased["text"]
    # (the language is not compared: the tiny stand-in learnt its tags on whole clips, not on phrases)
    assert phrased["text"] == whole["text"] or cer(whole["text"], phrased["text"]) <= 0.1
    assert abs(phrased["audio_ms"] - whole["audio_ms"]) < 200
