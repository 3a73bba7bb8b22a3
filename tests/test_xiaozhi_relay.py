"""Relay mode end to end: a simulated device → our server → a stub chatbot server speaking the device
protocol (`loadtest.upstream`), over real sockets. The upstream must get the device's hello and
messages, each utterance as a text turn (with the speaker when known) and no audio; the device must
get the upstream's hello, messages and TTS audio in order, framed for its protocol version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

import pytest

from asr_server.adapters.xiaozhi.upstream import turn_text
from asr_server.adapters.xiaozhi.wire import AudioFrame, unpack_audio
from asr_server.types import Transcript
from loadtest.clips import load_clip, silence_packet
from loadtest.device import Device, DeviceClosed, DeviceConfig, HelloRejected
from loadtest.upstream import UpstreamOptions, UpstreamStub
from tests.support.audio import cer, clip, needs_audio

pytestmark = pytest.mark.slow

PACE = 3.0


async def relay(start_server, stub: UpstreamStub, **sections):
    return await start_server(
        upstream={"url": stub.url, "hello_timeout_s": 1.0, **sections.pop("upstream", {})}, **sections
    )


def device(server, device_id: str = "aa:bb:cc:dd:ee:07", **kw) -> Device:
    return Device(DeviceConfig(url=server.endpoints.device_url, device_id=device_id, **kw))


async def until(condition, timeout: float = 10.0) -> None:
    """Wait (bounded) for `condition()`: the server's side of a close lands a moment after the device's."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


async def closed_with(dev: Device, code: int) -> None:
    await until(lambda: dev.closed)
    assert dev._closed is not None and dev._closed.code == code
    await dev.close()


def failures(srv, reason: str) -> float:
    """The shared pipeline's count (other tests add to it too: compare before and after)."""
    return srv.metrics.registry.get_sample_value("asr_upstream_failures_total", {"reason": reason}) or 0


def logged_session_ids(caplog) -> set[str]:
    """The ids the server's log lines name our sessions by (the open line names the upstream's too,
    as "upstream session X")."""
    return {
        m.group(1)
        for r in caplog.records
        if r.name.startswith("asr_server.adapters")
        for m in re.finditer(r"(?<!upstream )\bsession ([0-9A-Za-z-]+)", r.getMessage())
    }


async def say(dev: Device, name: str) -> str:
    c = clip(name)
    await dev.send_opus(load_clip(c.path).packets, PACE)
    await dev.send_silence(900, PACE)
    return c.transcript


def start_to_chat(text: str) -> tuple[str, str | None, str]:
    """What xiaozhi-esp32-server makes of a turn's text (core/handle/receiveAudioHandle.py `startToChat`,
    intentHandler.py `handle_user_intent`, sendAudioHandle.py `send_stt_message`, at 7475ea2): the
    content its intents and `stt` use, the speaker (only with both `speaker` and `content`), and the
    text its LLM gets (the JSON itself, whatever fields it has)."""
    content, speaker = text, None
    if text.strip().startswith("{") and text.strip().endswith("}"):
        data = json.loads(text)
        if "content" in data:
            content = data["content"]
        if "speaker" in data and "content" in data:
            speaker = data["speaker"]
    return content, speaker, text


def test_turn_text_is_what_xiaozhi_servers_own_funasr_path_sends():
    zh = Transcript(text="打开灯", language="zh", emotion="HAPPY", event="Speech")
    # its FunASR path: json.dumps(lang_tag_filter(result)), then "speaker" added by the voiceprint provider
    assert json.loads(turn_text(zh, None)) == {"content": "打开灯", "language": "zh", "emotion": "🙂"}
    assert list(json.loads(turn_text(zh, "alice"))) == ["content", "language", "emotion", "speaker"]
    content, speaker, llm = start_to_chat(turn_text(zh, "alice"))
    assert (content, speaker) == ("打开灯", "alice") and json.loads(llm)["language"] == "zh"
    assert start_to_chat(turn_text(zh, None))[:2] == ("打开灯", None)
    ko = Transcript(text="불 켜 줘", language="ko", emotion=None)
    assert json.loads(turn_text(ko, None)) == {"content": "불 켜 줘", "language": "ko", "emotion": "😶"}
    # no language tag (not SenseVoice's output): the text, or its plain-text path's {"speaker", "content"}
    plain = Transcript(text="打开灯")
    assert turn_text(plain, None) == "打开灯"
    assert turn_text(plain, "alice") == '{"speaker": "alice", "content": "打开灯"}'


@needs_audio
@pytest.mark.parametrize("version", [1, 2, 3])
async def test_a_turn_goes_up_as_text_and_the_answer_comes_back_in_the_devices_framing(start_server, version):
    async with UpstreamStub(UpstreamOptions(frames=4)) as stub:
        srv = await relay(start_server, stub)
        async with device(srv, protocol_version=version) as dev:
            assert dev.server_hello is not None
            up = stub.sessions[0]
            assert dev.session_id == dev.server_hello["session_id"] != ""  # the upstream's session
            assert up.headers["Device-Id"] == "aa:bb:cc:dd:ee:07" and up.headers["Protocol-Version"] == "1"
            assert up.text[0]["type"] == "hello"
            await dev.listen("start", "auto")
            transcript = await say(dev, "zh_aishell")
            stt = (await dev.next_message("stt", 20)).data
            assert cer(transcript, stt["text"]) <= 0.2  # the upstream's stt: one bubble
            assert (await dev.next_message("tts", 5)).data["state"] == "start"
            assert (await dev.next_message("tts", 5)).data["state"] == "sentence_start"
            assert (await dev.next_message("tts", 5)).data["state"] == "stop"
            assert len(dev.binary) == 4
            for _, frame in dev.binary:
                assert isinstance(unpack_audio(frame, version), AudioFrame)
            assert not [m for m in dev.pending() if m.type == "stt"]  # no second stt from us
        turns = [start_to_chat(t) for t in stub.turns()]
        assert len(turns) == 1 and cer(transcript, turns[0][0]) <= 0.2
        assert json.loads(turns[0][2])["language"] == "zh"  # what its LLM gets, as from its own FunASR path
        assert up.binary == 0  # the device's audio stays with us
        assert [m["type"] for m in up.text] == ["hello", "listen", "listen"]  # hello, start, the turn


@needs_audio
async def test_manual_mode_turn_at_listen_stop_and_abort_reaches_the_upstream(start_server):
    async with UpstreamStub(UpstreamOptions(frames=2, think_ms=2000)) as stub:
        srv = await relay(start_server, stub)
        async with device(srv) as dev:
            await dev.listen("start", "manual")
            c = clip("en_tts_living")
            await dev.send_opus(load_clip(c.path).packets, PACE)
            await dev.listen("stop")
            assert (await dev.next_message("stt", 20)).data["text"]
            await dev.abort()  # during the upstream's "thinking"
            assert (await dev.next_message("tts", 5)).data["state"] == "stop"
        up = stub.sessions[0]
        assert [m["type"] for m in up.text] == ["hello", "listen", "listen", "listen", "abort"]


@needs_audio
async def test_auto_mode_takes_no_turn_while_the_answer_plays_realtime_barges_in(start_server):
    async with UpstreamStub(UpstreamOptions(frames=60, pace=True)) as stub:  # a 3.6 s answer
        srv = await relay(start_server, stub)
        for mode, expect_abort in (("auto", False), ("realtime", True)):
            async with device(srv) as dev:
                await dev.listen("start", mode)
                await say(dev, "ko_tts_living")
                assert (await dev.next_message("tts", 20)).data["state"] == "start"
                await say(dev, "ja_tts_living")  # spoken over the answer
                await asyncio.sleep(1.0)
            up = stub.sessions[-1]
            aborts = [m for m in up.text if m["type"] == "abort"]
            assert bool(aborts) == expect_abort, (mode, up.text)
            assert len([m for m in up.text if m.get("state") == "detect"]) == (2 if expect_abort else 1), mode


@pytest.mark.parametrize(
    "options, reason",
    [
        (UpstreamOptions(refuse=True), "refused the device: HTTP 503"),
        (UpstreamOptions(no_hello=True), "no hello within 1 s"),
    ],
)
async def test_an_upstream_that_refuses_or_stays_silent_gives_the_device_a_reason(start_server, options, reason):
    async with UpstreamStub(options) as stub:
        srv = await relay(start_server, stub)
        with pytest.raises(HelloRejected, match=reason):
            async with device(srv):
                pass
    value = srv.metrics.registry.get_sample_value
    assert value("asr_upstream_sessions") == 0


async def test_an_upstream_that_is_down_or_closes_closes_the_device_with_1013(start_server):
    stub = await UpstreamStub().start()
    url = stub.url
    await stub.stop()
    srv = await start_server(upstream={"url": url})
    with pytest.raises(HelloRejected, match="unreachable"):
        async with device(srv):
            pass
    async with UpstreamStub(UpstreamOptions(close_after_hello=True)) as stub:
        srv = await relay(start_server, stub)
        dev = device(srv)
        await dev.connect()
        err = (await dev.next_message("error", 5)).data
        assert "upstream closed (1011" in err["message"]
        for _ in range(50):
            if dev.closed:
                break
            await asyncio.sleep(0.05)
        assert dev._closed is not None and dev._closed.code == 1013
        await dev.close()


async def test_a_clean_close_of_the_upstream_reaches_the_device_as_the_same_close(start_server):
    """Its goodbye or its own idle timeout (1000): the device is closed alike, no error, no failure."""
    async with UpstreamStub(UpstreamOptions(close_after_hello=True, close_code=1000)) as stub:
        srv = await relay(start_server, stub)
        failures = srv.metrics.registry.get_sample_value("asr_upstream_failures_total", {"reason": "closed"}) or 0
        dev = device(srv)
        await dev.connect()
        for _ in range(50):
            if dev.closed:
                break
            await asyncio.sleep(0.05)
        assert dev._closed is not None and dev._closed.code == 1000
        assert not [m for m in dev.pending() if m.type == "error"]
        after = srv.metrics.registry.get_sample_value("asr_upstream_failures_total", {"reason": "closed"}) or 0
        assert after == failures  # the metrics are the shared pipeline's: count the change
        await dev.close()


async def test_a_device_that_vanishes_closes_its_upstream_socket(start_server):
    async with UpstreamStub() as stub:
        srv = await relay(start_server, stub)
        dev = device(srv)
        await dev.connect()
        assert srv.metrics.registry.get_sample_value("asr_upstream_sessions") == 1
        assert dev._ws is not None
        dev._ws.transport.abort()
        for _ in range(100):
            if srv.metrics.registry.get_sample_value("asr_upstream_sessions") == 0:
                break
            await asyncio.sleep(0.05)
        assert srv.metrics.registry.get_sample_value("asr_upstream_sessions") == 0


async def test_devices_the_upstream_gives_one_session_id_stay_distinct_sessions(start_server):
    """A careless upstream gives every device the same `session_id`: each device still talks to it
    in that session, but our sessions are keyed by our own ids (the upstream's is an attribute)."""
    async with UpstreamStub(UpstreamOptions(session_id="one-for-all")) as stub:
        srv = await relay(start_server, stub)
        async with device(srv) as first, device(srv, "aa:bb:cc:dd:ee:08") as second:
            assert first.session_id == second.session_id == "one-for-all"
            views = srv.board.sessions()
            assert len({v.session_id for v in views}) == 2 and "one-for-all" not in {v.session_id for v in views}
            assert [v.upstream_session_id for v in views] == ["one-for-all", "one-for-all"]
            await first.close()
            await until(lambda: len(srv.board.sessions()) == 1)
            assert srv.board.sessions()[0].device_id == "aa:bb:cc:dd:ee:08"  # the other one is still there
            assert len(srv.xiaozhi.sessions) == 1


async def test_an_upstream_frame_too_long_for_protocol_v3_is_dropped_with_one_log_line(start_server, caplog):
    """v3's length field is 16 bits and an Opus packet cannot be split: a longer frame (which no
    Opus packet is) is dropped, logged once, and the session goes on."""
    big, packet = bytes(70_000), silence_packet(60)
    async with UpstreamStub(UpstreamOptions(after_hello=(big, big, packet))) as stub:
        srv = await relay(start_server, stub)
        with caplog.at_level(logging.INFO, logger="asr_server"):
            async with device(srv, protocol_version=3) as dev:
                await until(lambda: dev.binary_received >= 1 or dev.closed)
                assert not dev.closed
                assert [unpack_audio(f, 3) for _, f in dev.binary] == [AudioFrame(packet)]
                assert not [m for m in dev.pending() if m.type == "error"]
                await dev.send_json({"type": "mcp", "payload": {}})  # the relay still carries messages
                await until(lambda: len(stub.sessions[0].text) == 2)
        drops = [r for r in caplog.records if "protocol v3" in r.getMessage()]
        assert len(drops) == 1 and drops[0].levelno == logging.WARNING, [r.getMessage() for r in drops]
        assert "70,000 bytes" in drops[0].getMessage()


async def test_an_upstream_message_over_max_message_bytes_is_named_to_the_device(start_server):
    """8 MB from the upstream: our side closes it with 1009 while it is still sending, so its close
    never comes back. The device is told that, not that the upstream vanished."""
    async with UpstreamStub(UpstreamOptions(after_hello=(bytes(8 << 20),))) as stub:
        srv = await relay(start_server, stub)
        before = failures(srv, "oversize")
        dev = device(srv)
        await dev.connect()
        message = (await dev.next_message("error", 10)).data["message"]
        assert "over upstream.max_message_bytes (1048576 bytes)" in message, message
        await closed_with(dev, 1013)
        assert failures(srv, "oversize") == before + 1


async def test_an_upstream_that_reads_nothing_is_named_and_its_session_logged_under_one_id(start_server, caplog):
    async with UpstreamStub(UpstreamOptions(reads=False)) as stub:
        srv = await relay(start_server, stub, upstream={"send_timeout_s": 0.5})
        before = failures(srv, "stuck")
        with caplog.at_level(logging.INFO, logger="asr_server"):
            dev = device(srv)
            await dev.connect()
            filler = {"type": "mcp", "payload": {"filler": "x" * 60_000}}
            with contextlib.suppress(DeviceClosed):
                for _ in range(1000):  # until the socket buffers are full and the relay gives up
                    if dev.closed or not dev._messages.empty():
                        break
                    await dev.send_json(filler)
            message = (await dev.next_message("error", 10)).data["message"]
            assert "the upstream read nothing for 0.5 s (upstream.send_timeout_s)" in message, message
            await closed_with(dev, 1013)
            await until(lambda: not srv.xiaozhi.sessions)
        assert failures(srv, "stuck") == before + 1
        ids = logged_session_ids(caplog)
        assert len(ids) == 1, ids  # one session, one id in every line
        closing = [r.getMessage() for r in caplog.records if " closed (" in r.getMessage()]
        assert closing and "the upstream read nothing" in closing[-1], closing
