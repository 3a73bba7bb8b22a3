"""The FunASR runtime WebSocket protocol, driven by clients that follow FunASR's protocol document
and xiaozhi-esp32-server's `FunASRServer` provider message for message.

A real `Pipeline` (Silero VAD, segmenter, batchers) runs around deterministic fake engines whose
text is one word per half second ("w1 w2 ..."), so partials, segment finals and times are
checkable; `test_real_models_*` use the tiny SenseVoice model when it can be built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from asr_server.adapters.funasr.server import serve_funasr
from asr_server.adapters.funasr.wire import delta as _delta
from asr_server.adapters.funasr.wire import stable_prefix as _stable_prefix
from asr_server.audio.resample import float_to_pcm16
from asr_server.config import Config, load_config
from asr_server.core.events import EventBus
from asr_server.core.live import SessionBoard
from tests.support.audio import AUDIO, encode, needs_audio
from tests.support.fakes import fake_pipeline, fake_text

KEY = "funasr-key"
# FunASR's Python client: chunk_size [5, 10, 5] and chunk_interval 10 give 60 ms of 16 kHz PCM16 per message.
STRIDE = int(60 * 10 / 10 / 1000 * 16000 * 2)


def read(name: str) -> np.ndarray:
    x, sr = sf.read(AUDIO / name, dtype="float32", always_2d=True)
    return x.mean(axis=1)


class Server:
    def __init__(self, url, pipeline, bus):
        self.url, self.pipeline, self.bus = url, pipeline, bus

    def metric(self, name: str, labels: dict) -> float:
        return self.pipeline.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running(tmp_path: Path, board: SessionBoard | None = None, **funasr):
    cfg = load_config(
        None,
        env={},
        overrides={
            "funasr": {
                "host": "127.0.0.1",
                "port": 0,
                "self_signed_cert": str(tmp_path / "funasr-selfsigned.pem"),
                **funasr,
            },
            "http": {"api_keys": [KEY]},
            "speaker": {"db": str(tmp_path / "vp.sqlite")},
            "events": {"protocols": ["funasr"]},
        },
    )
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    bus = EventBus(cfg, pipeline.metrics)
    await bus.start()
    try:
        server = await serve_funasr(cfg, pipeline, pipeline.metrics, bus, board=board)
        scheme = "wss" if funasr.get("tls") == "on" else "ws"
        try:
            yield Server(f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}", pipeline, bus)
        finally:
            server.close()
            await server.wait_closed()
    finally:
        await bus.close()
        await pipeline.close()


@pytest.fixture
async def srv(tmp_path):
    async with running(tmp_path) as s:
        yield s


#: A VAD-endpointed utterance reaches the recogniser with vad.trailing_pad_ms of silence after it.
PAD = int(Config().vad.trailing_pad_ms * 16)


def clean(msg: dict) -> str:
    """A final's text without SenseVoice's tags (sent in `text` as FunASR does, and as `clean_text`)."""
    return msg.get("clean_text", msg["text"])


def connect(url: str, **kw):
    return websockets.connect(url, subprotocols=["binary"], ping_interval=None, **kw)


async def read_until_final(ws, out: list | None = None, timeout: float = 10.0) -> list[dict]:
    out = [] if out is None else out
    while True:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
        if out[-1].get("is_final"):
            return out


async def stream(
    ws, config: dict, pcm: bytes | list[tuple[bytes, object]], stride: int = STRIDE, end: dict | None = None
) -> list[dict]:
    """Send as FunASR's client does while reading concurrently; returns the messages up to the final one.

    `pcm` may be phases `[(audio, until), ...]`: after each phase's audio the sender waits until the
    messages received so far satisfy `until`, which shows they came while the audio was still open."""
    phases = pcm if isinstance(pcm, list) else [(pcm, None)]
    received: list[dict] = []
    reader = asyncio.create_task(read_until_final(ws, received))
    await ws.send(json.dumps(config, ensure_ascii=False))
    for audio, until in phases:
        for i in range(0, len(audio), stride):
            await ws.send(audio[i : i + stride])
        if until is not None:
            for _ in range(500):
                if until(received) or reader.done():
                    break
                await asyncio.sleep(0.02)
            assert until(received), f"mid-stream results missing: {received}"
    await ws.send(json.dumps(end or {"is_speaking": False}))
    return await reader


async def expect_close(ws, code: int, reason: str) -> None:
    with pytest.raises(ConnectionClosed) as e:
        for _ in range(20):
            await asyncio.wait_for(ws.recv(), 10)
    assert e.value.rcvd is not None, "closed without a close frame"
    assert e.value.rcvd.code == code, e.value.rcvd
    assert reason in e.value.rcvd.reason, e.value.rcvd.reason


# --- offline -----------------------------------------------------------------------------------


@needs_audio
async def test_xiaozhi_fun_server_provider_exchange(tmp_path):
    """What xiaozhi-esp32-server's fun_server.py does: subprotocol `binary`, `Authorization: Bearer; <key>`,
    no pings, the whole utterance in one binary message, then read until `is_final` (5 s per read)."""
    x = read("zh_tts_living_room_light_wyoming.wav")
    async with running(tmp_path, auth=True) as srv:
        async with connect(srv.url, additional_headers={"Authorization": f"Bearer; {KEY}"}) as ws:
            assert ws.subprotocol == "binary"
            await ws.send(
                json.dumps(
                    {
                        "mode": "offline",
                        "chunk_size": [5, 10, 5],
                        "chunk_interval": 10,
                        "wav_name": "session-123",
                        "is_speaking": True,
                        "itn": False,
                    }
                )
            )
            await ws.send(float_to_pcm16(x))
            await ws.send(json.dumps({"is_speaking": False}))
            msgs = await read_until_final(ws, timeout=5)
        assert len(msgs) == 1
        m = msgs[0]
        assert m["mode"] == "offline" and m["wav_name"] == "session-123" and m["is_final"] is True
        # FunASR's runtime puts SenseVoice's tags first; xiaozhi's `lang_tag_filter` reads them back
        tags = re.findall(r"<\|([^|]+)\|>", m["text"])
        assert tags == ["en", "NEUTRAL", "Speech"] and re.sub(r"<\|[^|]+\|>", "", m["text"]).strip() == fake_text(
            len(x)
        )
        assert m["clean_text"] == fake_text(len(x))
        assert m["language"] == "en" and m["emotion"] == "NEUTRAL" and m["spk_name"] == "unknown"
        assert srv.metric("asr_sessions_opened_total", {"protocol": "funasr"}) == 1
        assert srv.metric("asr_utterances_total", {"protocol": "funasr"}) == 1

        with pytest.raises(InvalidStatus) as e:
            async with connect(srv.url, additional_headers={"Authorization": "Bearer; wrong"}):
                pass
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect(srv.url):
                pass


def self_signed_cert(tmp_path: Path) -> Path:
    """A throwaway certificate+key PEM, like the one FunASR's runtime ships for its wss:// default
    (made by the server's own generator, given here as a configured `ssl_certfile`)."""
    from asr_server.adapters.funasr.tls import self_signed

    return self_signed(tmp_path / "funasr.pem")


async def test_wss_as_xiaozhi_is_ssl_default(tmp_path):
    """xiaozhi's FunASRServer defaults to `is_ssl: true` and does not verify the certificate."""
    async with running(tmp_path, ssl_certfile=str(self_signed_cert(tmp_path)), tls="on") as srv:
        assert srv.url.startswith("wss://")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        async with connect(srv.url, ssl=ctx, additional_headers={"Authorization": "Bearer; none"}) as ws:
            msgs = await stream(
                ws,
                {"mode": "offline", "wav_name": "tls", "is_speaking": True, "itn": False},
                float_to_pcm16(0.1 * np.ones(24000, np.float32)),
                stride=48000,
            )
        assert clean(msgs[0]) == fake_text(24000) and msgs[0]["is_final"] is True


async def test_tls_and_plain_on_one_port_with_a_generated_certificate(tmp_path):
    """The default (`tls: both`): FunASR's client (`--ssl 1`) and xiaozhi's provider (`is_ssl: true`)
    connect with TLS, others plain, to the same port; the certificate is made once."""
    async with running(tmp_path) as srv:
        assert srv.url.startswith("ws://")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for url, kw in ((srv.url.replace("ws://", "wss://"), {"ssl": ctx}), (srv.url, {})):
            async with connect(url, additional_headers={"Authorization": "Bearer; none"}, **kw) as ws:
                msgs = await stream(
                    ws,
                    {"mode": "offline", "wav_name": "tls", "is_speaking": True, "itn": False},
                    float_to_pcm16(0.1 * np.ones(16000, np.float32)),
                    stride=32000,
                )
            assert msgs[0]["clean_text"] == fake_text(16000), url
    pem = (tmp_path / "funasr-selfsigned.pem").read_bytes()
    assert b"BEGIN CERTIFICATE" in pem and b"PRIVATE KEY" in pem


async def test_bad_tls_files_are_a_config_error(tmp_path):
    from asr_server.config import ConfigError

    with pytest.raises(ConfigError, match="ssl_certfile"):
        async with running(tmp_path, ssl_certfile=str(tmp_path / "missing.pem")):
            pass


@needs_audio
async def test_protocol_document_offline_8k_pcm_in_chunks_then_a_second_request(srv):
    x = read("en_tts_living_room_light_wyoming.wav")
    pcm8k = float_to_pcm16(soxr.resample(x, 16000, 8000))
    config = {
        "mode": "offline",
        "wav_name": "wav_name",
        "wav_format": "pcm",
        "is_speaking": True,
        "hotwords": json.dumps({"阿里巴巴": 20, "通义实验室": 30}, ensure_ascii=False),
        "itn": True,
        "audio_fs": 8000,
    }
    async with connect(srv.url) as ws:
        msgs = await stream(ws, config, pcm8k, stride=STRIDE // 2)
        assert [(m["mode"], m["wav_name"], m["is_final"]) for m in msgs] == [("offline", "wav_name", True)]
        assert clean(msgs[0]) == fake_text(len(x))
        # The same connection takes another request (16 kHz, named differently).
        msgs = await stream(ws, {**config, "audio_fs": 16000, "wav_name": "second"}, float_to_pcm16(x[:16000]))
        assert msgs[0]["wav_name"] == "second" and clean(msgs[0]) == fake_text(16000)


@needs_audio
async def test_offline_file_bytes_long_audio_is_end_ack_and_empty_audio(srv):
    x = read("ja_tts_living_room_light_wyoming.wav")
    async with connect(srv.url) as ws:
        # A non-PCM wav_format: the client sends the file itself.
        await ws.send(json.dumps({"mode": "offline", "wav_name": "clip.mp3", "wav_format": "mp3", "is_speaking": True}))
        await ws.send(encode(x, 44100, "mp3", "libmp3lame"))
        await ws.send(json.dumps({"is_speaking": False, "is_end": True}))
        result = json.loads(await ws.recv())
        assert clean(result) == fake_text(len(x)) and result["is_final"] is True
        ack = json.loads(await ws.recv())
        assert ack == {"mode": "offline", "wav_name": "clip.mp3", "is_final": True, "is_end": True}

        # Longer than one utterance (vad.max_utterance_s): cut by the VAD, one final with the joined text.
        gap = np.zeros(16000 * 3, np.float32)
        long = np.concatenate([read("en_librispeech_1995-1837-0001_wenet.wav"), gap] * 4)
        msgs = await stream(
            ws, {"mode": "offline", "wav_name": "long", "wav_format": "pcm"}, float_to_pcm16(long), stride=len(long) * 2
        )
        assert len(msgs) == 1 and msgs[0]["is_final"]
        words = clean(msgs[0]).split()
        assert len(words) >= 4 * 10 and words.count("w1") >= 4  # at least one segment per repetition

        msgs = await stream(ws, {"mode": "offline", "wav_name": "nothing"}, b"")
        assert msgs == [
            {
                "mode": "offline",
                "wav_name": "nothing",
                "text": "",
                "is_final": True,
                "language": None,
                "emotion": None,
                "event": None,
                "spk_name": "unknown",
                "spk_score": 0.0,
            }
        ]


# --- 2pass / online ----------------------------------------------------------------------------


def two_utterances() -> np.ndarray:
    a, b = read("zh_aishell_BAC009S0724W0121_wenet.wav"), read("en_tts_living_room_light_wyoming.wav")
    gap = np.zeros(16000, np.float32)
    return np.concatenate([gap[:4000], a, gap, b, gap])


@needs_audio
async def test_2pass_partials_then_a_final_per_vad_segment(srv):
    audio = two_utterances()
    config = {
        "mode": "2pass",
        "wav_name": "mic",
        "wav_format": "pcm",
        "is_speaking": True,
        "chunk_size": [5, 10, 5],
        "chunk_interval": 10,
        "itn": True,
    }
    pcm = float_to_pcm16(audio)
    split = 2 * 16000 * 3  # 3 s in: the first utterance is still being spoken
    async with connect(srv.url) as ws:
        msgs = await stream(
            ws,
            config,
            [
                (pcm[:split], lambda got: any(m["mode"] == "2pass-online" for m in got)),
                (pcm[split:], lambda got: sum(m["mode"] == "2pass-offline" for m in got) >= 2),
            ],
        )
    partials = [m for m in msgs if m["mode"] == "2pass-online"]
    finals = [m for m in msgs if m["mode"] == "2pass-offline" and m["text"]]
    assert len(finals) == 2 and [f["index"] for f in finals] == [0, 1]
    assert finals[0]["start_time"] < finals[0]["end_time"] < finals[1]["start_time"] < finals[1]["end_time"]
    assert abs(finals[0]["start_time"] - 250) <= 350 and abs(finals[1]["start_time"] - 5530) <= 400
    assert all(f["slice_type"] == 2 and f["is_final"] is False for f in finals)
    # The reply to `is_speaking: false` is the only final one; the last utterance had ended already.
    assert msgs[-1]["is_final"] is True and msgs[-1]["text"] == "" and msgs[-1]["mode"] == "2pass-offline"
    assert sum(m["is_final"] for m in msgs) == 1
    assert all(p["is_final"] is False and p["text"] for p in partials)
    assert any(p["index"] == 0 for p in partials)
    for f in finals:  # FunASR clients concatenate partial deltas; the segment's final then replaces them
        assert clean(f) == fake_text(int((f["end_time"] - f["start_time"]) * 16) + PAD)
        ps = [p for p in partials if p["index"] == f["index"]]
        if ps:  # partials race the final when audio comes faster than real time
            assert ps[0]["slice_type"] == 0 and all(p["slice_type"] == 1 for p in ps[1:])
            assert clean(f).startswith("".join(p["text"] for p in ps))
            assert msgs.index(ps[-1]) < msgs.index(f)  # no partial after its final


@needs_audio
async def test_2pass_speech_running_at_the_end_is_the_final(srv):
    audio = read("zh_aishell_BAC009S0724W0121_wenet.wav")[: 3 * 16000]  # cut off mid-sentence
    async with connect(srv.url) as ws:
        msgs = await stream(ws, {"mode": "2pass", "wav_name": "m"}, float_to_pcm16(audio))
    finals = [m for m in msgs if m["mode"] == "2pass-offline"]
    assert len(finals) == 1 and finals[0]["is_final"] is True and finals[0] is msgs[-1]
    assert clean(finals[0]) == fake_text(int((finals[0]["end_time"] - finals[0]["start_time"]) * 16))


@needs_audio
async def test_online_deltas_add_up_to_each_segment(srv):
    async with connect(srv.url) as ws:
        msgs = await stream(
            ws,
            {"mode": "online", "wav_name": "o", "wav_format": "pcm", "is_speaking": True},
            float_to_pcm16(two_utterances()),
        )
    assert {m["mode"] for m in msgs} == {"online"}
    ends = [m for m in msgs if m.get("slice_type") == 2]
    assert len(ends) == 2
    expected = [fake_text(int((end["end_time"] - end["start_time"]) * 16) + PAD) for end in ends]
    for end, want in zip(ends, expected, strict=True):
        pieces = [m["text"] for m in msgs if m.get("index") == end["index"]]
        assert "".join(pieces).strip() == want
    # what a client concatenates reads as the utterances with a space between English ones
    assert "".join(m["text"] for m in msgs) == " ".join(expected)
    assert msgs[-1]["is_final"] is True and sum(m["is_final"] for m in msgs) == 1


@needs_audio
async def test_2pass_finals_concatenate_with_a_space_between_english_utterances(tmp_path):
    # FunASR's client appends each 2pass final (`text_print_2pass_offline += text`), as it appends online texts.
    async with running(tmp_path, text_tags=False) as s, connect(s.url) as ws:
        msgs = await stream(
            ws,
            {"mode": "2pass", "wav_name": "m", "wav_format": "pcm", "is_speaking": True},
            float_to_pcm16(two_utterances()),
        )
    finals = [m for m in msgs if m["mode"] == "2pass-offline" and m["text"]]
    expected = [fake_text(int((f["end_time"] - f["start_time"]) * 16) + PAD) for f in finals]
    assert len(finals) == 2 and "".join(f["text"] for f in finals) == " ".join(expected)
    assert not finals[0]["text"].startswith(" ")


def test_partial_text_helpers():
    assert _stable_prefix("w1 w2 w3") == "w1 w2 " and _stable_prefix("w1") == ""
    assert _stable_prefix("打开客厅") == "打开客" and _stable_prefix("") == ""
    assert _delta("w1 w2 ", "w1 w2 w3") == "w3" and _delta("打开客", "打开客厅的灯") == "厅的灯"
    assert _delta("打开可", "打开客厅") == "厅"  # a revised character stays as sent; nothing is repeated
    # a final that revises words already sent: the rest follows them, no word split or repeated
    assert _delta("Turn on the", "Turn off the living room light.") == " living room light."
    assert _delta("your", "your country") == " country"


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first,then,code,reason",
    [
        ('{"mode": "offline", "wav_name": ', None, 1007, "malformed JSON config"),
        ('["offline"]', None, 1007, "must be an object"),
        ('{"mode": "3pass"}', None, 1007, "unsupported mode '3pass'"),
        ('{"mode": "offline", "audio_fs": "fast"}', None, 1007, "'audio_fs' must be an integer"),
        ('{"mode": "offline", "chunk_size": [5, 10]}', None, 1007, "chunk_size"),
        ('{"mode": "offline", "is_speaking": "maybe"}', None, 1007, "'is_speaking' must be true or false"),
        (b"\x00\x01" * 100, None, 1008, "configuration message before audio"),
        ('{"mode": "offline", "wav_format": "pcm"}', b"\x00\x01\x02", 1007, "even number of bytes, got 3"),
        ('{"mode": "2pass", "wav_format": "mp3"}', None, 1003, "raw PCM only"),
    ],
)
async def test_bad_input_closes_with_code_and_reason(srv, first, then, code, reason):
    async with connect(srv.url) as ws:
        await ws.send(first)
        if then is not None:
            await ws.send(then)
        await expect_close(ws, code, reason)
    assert srv.metric("asr_errors_total", {"kind": "funasr_protocol"}) == 1


async def test_limits_close_1009(tmp_path):
    async with running(tmp_path, max_message_bytes=64 * 1024, max_audio_s=1.0) as srv:
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"mode": "offline"}))
            await ws.send(bytes(100 * 1024))  # one message over max_message_bytes
            await expect_close(ws, 1009, "")
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"mode": "offline"}))
            for _ in range(3):
                await ws.send(bytes(32000 * 2 // 3 * 2))  # 1.33 s of audio in three messages
            await expect_close(ws, 1009, "longer than funasr.max_audio_s")


async def test_engine_failure_closes_1011(srv):
    srv.pipeline.asr.fail = True
    async with connect(srv.url) as ws:
        await ws.send(json.dumps({"mode": "offline"}))
        await ws.send(float_to_pcm16(0.1 * np.ones(8000, np.float32)))
        await ws.send(json.dumps({"is_speaking": False}))
        await expect_close(ws, 1011, "recognition failed")


async def test_configured_path_and_idle_timeout(tmp_path):
    async with running(tmp_path, path="/funasr", idle_timeout_s=0.3) as srv:
        with pytest.raises(InvalidStatus) as e:
            async with connect(srv.url + "/other"):
                pass
        assert e.value.response.status_code == 404
        async with connect(srv.url + "/funasr") as ws:
            await expect_close(ws, 1000, "idle")


async def test_clients_without_subprotocol_are_served(srv):
    async with websockets.connect(srv.url) as ws:
        assert ws.subprotocol is None
        await ws.send(json.dumps({"mode": "offline", "wav_name": "plain"}))
        await ws.send(float_to_pcm16(0.1 * np.ones(16000, np.float32)))
        await ws.send(json.dumps({"is_speaking": False}))
        assert clean((await read_until_final(ws))[0]) == fake_text(16000)


@needs_audio
async def test_events_published_for_funasr_when_configured(srv):
    x = read("en_tts_living_room_light_wyoming.wav")
    with srv.bus.subscribe() as sub:
        async with connect(srv.url) as ws:
            await stream(ws, {"mode": "offline", "wav_name": "evt"}, float_to_pcm16(x), stride=len(x) * 2)
        event = await asyncio.wait_for(sub.get(), 5)
    assert event.protocol == "funasr" and event.text == fake_text(len(x)) and event.client_id == "evt"


async def test_funasr_sessions_are_on_the_live_board_until_they_close(tmp_path):
    """The console's live view lists FunASR clients too: mode, wav_name, frames, utterances, text."""
    board = SessionBoard()
    x = read("en_tts_living_room_light_wyoming.wav")
    async with running(tmp_path, board=board) as srv:
        async with connect(srv.url) as ws:
            assert [(v.protocol, v.state) for v in board.sessions()] == [("funasr", "idle")]
            pcm = float_to_pcm16(x)
            stride = (len(pcm) // 4 + 2) // 2 * 2  # about four messages of whole samples
            await stream(ws, {"mode": "offline", "wav_name": "kitchen"}, pcm, stride=stride)
            (v,) = board.sessions()
            frames = len(range(0, len(pcm), stride))
            assert (v.client_id, v.mode, v.version, v.frames, v.utterances) == ("kitchen", "offline", 0, frames, 1)
            assert v.last_text == fake_text(len(x)) and v.remote.startswith("127.0.0.1:")
        for _ in range(100):
            if not board.sessions():
                break
            await asyncio.sleep(0.02)
        assert board.sessions() == []


# --- through the real (tiny) models ------------------------------------------------------------


@needs_audio
async def test_real_models_offline_and_2pass(start_server):
    from tests.support.audio import cer, clip

    server = await start_server()
    c = clip("zh_aishell")
    pcm = float_to_pcm16(read(c.file))
    async with connect(server.endpoints.funasr_url) as ws:
        msgs = await stream(ws, {"mode": "offline", "wav_name": "zh", "itn": True}, pcm, stride=len(pcm))
        assert cer(c.transcript, clean(msgs[0])) <= 0.2, msgs[0]
        # FunASR's timestamp fields: [start_ms, end_ms] per word, in order, within the clip
        ts = msgs[0]["timestamp"]
        assert len(ts) >= 8 and all(0 <= a <= b <= c.duration_s * 1000 for a, b in ts)
        assert [a for a, _ in ts] == sorted(a for a, _ in ts)
        assert msgs[0]["stamp_sents"][0]["ts_list"] == ts
        assert msgs[0]["language"] == "zh"
        silence = float_to_pcm16(np.zeros(16000, np.float32))
        msgs = await stream(ws, {"mode": "2pass", "wav_name": "zh2"}, pcm + silence)
        finals = [m for m in msgs if m["mode"] == "2pass-offline" and m["text"]]
        assert len(finals) == 1 and cer(c.transcript, clean(finals[0])) <= 0.2, msgs


async def test_connections_beyond_max_sessions_are_refused_naming_the_limit(tmp_path):
    async with running(tmp_path, max_sessions=1) as s:
        async with connect(s.url):
            with pytest.raises(InvalidStatus) as e:
                async with connect(s.url):
                    pass
            assert e.value.response.status_code == 503
            assert b"funasr.max_sessions = 1" in e.value.response.body
        async with connect(s.url) as ws:  # the first one left: room again
            await ws.send(json.dumps({"mode": "offline", "is_speaking": False}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["is_final"] is True
