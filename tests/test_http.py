"""The HTTP API over loopback with real clients: `openai`, httpx (as xiaozhi-esp32-server posts), aiohttp
and websockets for the events stream, a webhook receiver.

Most tests run a real `Pipeline` (Silero VAD, batchers, SQLite voiceprints) around deterministic
fake engines, so shapes, times and errors are checkable; `test_real_models_*` go through the
tiny SenseVoice and CAM++ models the stand-in builder makes.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from dataclasses import dataclass

import aiohttp
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import websockets

from asr_server.adapters.http.transcriptions import parse_language
from asr_server.core.events import EventBus
from tests.support.audio import AUDIO, cer, encode, needs_audio
from tests.support.fakes import WebhookReceiver, fake_text, make_event
from tests.support.servers import AUTH, KEY, start_api, stop_api


def read(name: str) -> np.ndarray:
    x, sr = sf.read(AUDIO / name, dtype="float32", always_2d=True)
    assert sr == 16000
    return x.mean(axis=1)


def wav_bytes(x: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@dataclass
class Api:
    url: str
    pipeline: object
    bus: EventBus
    state: dict
    hook: WebhookReceiver

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
async def api(tmp_path_factory):
    async with WebhookReceiver() as hook:
        runner, pipeline, bus, state = await start_api(
            tmp_path_factory.mktemp("api"),
            events={"protocols": ["xiaozhi", "openai"], "webhook_url": hook.url},
            asr={"max_batch": 8},  # batching as on a GPU (a CPU's default is 1), so long files show it
        )
        yield Api(f"http://127.0.0.1:{runner.addresses[0][1]}", pipeline, bus, state, hook)
        await stop_api(runner, pipeline, bus)


def metric(api: Api, name: str, labels: dict) -> float:
    return api.pipeline.metrics.registry.get_sample_value(name, labels) or 0.0


# --- OpenAI transcriptions ---------------------------------------------------------------------


@needs_audio
async def test_openai_client_json_and_text(api):
    path = AUDIO / "zh_aishell_BAC009S0724W0121_wenet.wav"
    expected = fake_text(len(read(path.name)))
    with open(path, "rb") as f:
        result = await api.client().audio.transcriptions.create(model="whisper-1", file=f)
    assert result.text == expected
    with open(path, "rb") as f:
        text = await api.client().audio.transcriptions.create(
            model="whisper-1", file=f, response_format="text", language="zh", temperature=0.2, prompt="ignored"
        )
    assert text.strip() == expected
    assert metric(api, "asr_utterances_total", {"protocol": "openai"}) >= 2
    assert metric(api, "asr_stage_seconds_count", {"stage": "file_decode"}) >= 2


@needs_audio
async def test_openai_client_verbose_json_srt_vtt_for_a_long_file_cut_by_vad(api):
    """Five clips with 2 s of silence between them: 38 s, so the server cuts it with the VAD."""
    names = [
        "zh_aishell_BAC009S0724W0121_wenet.wav",
        "en_librispeech_1995-1837-0001_wenet.wav",
        "ja_sensevoice_example_transcribecpp.wav",
        "ko_sensevoice_example_transcribecpp.wav",
        "yue_sensevoice_example_transcribecpp.wav",
    ]
    gap = np.zeros(32000, np.float32)
    parts, spans, t = [], [], 0.0
    for n in names:
        x = read(n)
        parts += [x, gap]
        spans.append((t, t + len(x) / 16000))
        t += (len(x) + len(gap)) / 16000
    audio = np.concatenate(parts)
    assert len(audio) / 16000 > 30
    upload = ("long.wav", wav_bytes(audio), "audio/wav")
    before = list(api.pipeline.asr.batches)
    verbose = await api.client().audio.transcriptions.create(
        model="sensevoice", file=upload, response_format="verbose_json"
    )
    assert abs(verbose.duration - len(audio) / 16000) < 0.01
    assert verbose.language == "en"
    segs = verbose.segments
    assert len(segs) >= len(names)
    assert max(api.pipeline.asr.batches[len(before) :]) > 1  # the pieces were batched together
    for s in segs:  # every segment lies inside one clip (allowing the pre-roll and the tail)
        assert any(a - 0.35 <= s.start and s.end <= b + 0.45 for a, b in spans), (s.start, s.end, spans)
        extra = s.model_extra
        assert extra["language"] == "en" and extra["emotion"] == "NEUTRAL" and extra["event"] == "Speech"
        assert "speaker" in extra
        # VAD-cut: the recogniser heard the segment and vad.trailing_pad_ms of silence after it
        pad = int(api.pipeline.config.vad.trailing_pad_ms * 16)
        assert s.text == fake_text(int(round((s.end - s.start) * 16000)) + pad)
    for a, b in spans:  # and every clip is covered
        assert any(a - 0.35 <= s.start < b for s in segs)
    assert [s.start for s in segs] == sorted(s.start for s in segs)
    assert verbose.text == " ".join(s.text for s in segs)

    srt = await api.client().audio.transcriptions.create(model="x", file=upload, response_format="srt")
    blocks = srt.strip().split("\n\n")
    assert len(blocks) == len(segs)
    assert re.fullmatch(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n" + re.escape(segs[0].text), blocks[0])
    vtt = await api.client().audio.transcriptions.create(model="x", file=upload, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == len(segs)
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3} --> ", vtt)


@needs_audio
@pytest.mark.parametrize(
    "container,codec,rate,name,ctype",
    [
        ("mp3", "libmp3lame", 44100, "a.mp3", "audio/mpeg"),
        ("ogg", "libopus", 48000, "a.ogg", "audio/ogg"),
        ("webm", "libopus", 48000, "a.webm", "audio/webm"),
        ("mp4", "aac", 16000, "a.m4a", "audio/mp4"),
        ("flac", "flac", 22050, "a.flac", "audio/flac"),
    ],
)
async def test_containers_as_xiaozhi_openai_provider_posts_them(api, container, codec, rate, name, ctype):
    """xiaozhi-esp32-server's `openai` provider: multipart `file` + `model`, bearer key, reads `text`."""
    x = read("en_tts_living_room_light_wyoming.wav")
    data = encode(x, rate, container, codec, channels=2)
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(
            f"{api.url}/v1/audio/transcriptions",
            headers=api.auth,
            files={"file": (name, data, ctype)},
            data={"model": "sensevoice-small"},
        )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == fake_text(len(x))


async def test_bad_uploads_get_clear_errors(api):
    async def post(files=None, data=None, headers=None, content=None):
        async with httpx.AsyncClient(timeout=30) as c:
            return await c.post(
                f"{api.url}/v1/audio/transcriptions",
                headers=headers or api.auth,
                files=files,
                data=data,
                content=content,
            )

    wav = wav_bytes(np.zeros(1600, np.float32))
    cases = [
        (
            dict(files={"file": ("notes.txt", b"this is not audio at all" * 50, "text/plain")}),
            400,
            "invalid_audio",
            "not a supported audio file",
        ),
        (dict(files={"file": ("empty.wav", b"", "audio/wav")}), 400, "empty_file", "empty"),
        (
            dict(data={"model": "whisper-1"}, files={"other": ("a.wav", wav, "audio/wav")}),
            400,
            "missing_file",
            "missing form field 'file'",
        ),
        (
            dict(files={"file": ("a.wav", wav, "audio/wav")}, data={"response_format": "diarized_json"}),
            400,
            None,
            "response_format",
        ),
        (
            dict(files={"file": ("a.wav", wav, "audio/wav")}, data={"language": "fr"}),
            400,
            "unsupported_language",
            "'fr' is not supported",
        ),
        (dict(files={"file": ("a.wav", wav, "audio/wav")}, data={"stream": "true"}), 400, None, "streaming"),
        (
            dict(content=b'{"file": "x"}', headers={**api.auth, "Content-Type": "application/json"}),
            400,
            "invalid_content_type",
            "multipart/form-data",
        ),
        (
            dict(
                content=b"--xyz\r\nbroken header line\r\n\r\nabc\r\n--xyz--\r\n",
                headers={**api.auth, "Content-Type": "multipart/form-data; boundary=xyz"},
            ),
            400,
            "invalid_multipart",
            "malformed multipart body",
        ),
    ]
    for kwargs, status, code, message in cases:
        r = await post(**kwargs)
        assert r.status_code == status, (kwargs, r.text)
        err = r.json()["error"]
        assert message in err["message"], err
        assert err["type"] == "invalid_request_error"
        if code:
            assert err["code"] == code


async def test_wrong_or_missing_key_is_401(api):
    upload = ("a.wav", wav_bytes(np.zeros(1600)), "audio/wav")
    with pytest.raises(openai.AuthenticationError) as e:
        await api.client("wrong-key").audio.transcriptions.create(model="whisper-1", file=upload)
    assert e.value.status_code == 401 and "invalid API key" in str(e.value)
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{api.url}/v1/audio/transcriptions", files={"file": ("a.wav", b"x", "audio/wav")})
    assert r.status_code == 401 and r.json()["error"]["message"] == "missing API key"
    assert r.headers["WWW-Authenticate"] == "Bearer"


def _multipart_stream(total: int, boundary: str = "bnd"):
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = bytes(1 << 20)

    async def body():
        yield head
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            yield block[:n]
            sent += n
        yield tail

    return body, len(head) + total + len(tail), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize("chunked", [False, True])
async def test_100_mb_upload_is_413(api, chunked):
    """Refused by Content-Length before reading, or (chunked) as soon as the body passes 50 MB."""
    body, length, headers = _multipart_stream(100 * 1024 * 1024)
    headers = {**api.auth, **headers}
    if not chunked:
        headers["Content-Length"] = str(length)
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(f"{api.url}/v1/audio/transcriptions", headers=headers, content=body())
    assert r.status_code == 413
    assert "50 MB limit" in r.json()["error"]["message"]


async def test_models_list(api):
    models = await api.client().models.list()
    assert [m.id for m in models.data] == ["sensevoice-small"]
    model = await api.client().models.retrieve("sensevoice-small")
    assert model.id == "sensevoice-small" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:  # as OpenAI answers an id it does not have
        await api.client().models.retrieve("whisper-1")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"


async def test_cors_for_configured_origins_only(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, http={"cors_origins": ["https://chat.example.com"]})
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    preflight = {
        "Origin": "https://chat.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    try:
        async with httpx.AsyncClient() as c:
            r = await c.options(f"{url}/v1/audio/transcriptions", headers=preflight)
            assert r.status_code == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
            r = await c.get(f"{url}/v1/models", headers={"Origin": "https://chat.example.com", **AUTH})
            assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
            r = await c.get(f"{url}/v1/models", headers={"Origin": "https://evil.example", **AUTH})
            assert "Access-Control-Allow-Origin" not in r.headers
            r = await c.options(
                f"{url}/v1/audio/transcriptions", headers={**preflight, "Origin": "https://evil.example"}
            )
            assert r.status_code == 405 and "Access-Control-Allow-Origin" not in r.headers
    finally:
        await stop_api(runner, pipeline, bus)


def test_language_names():
    assert parse_language(None) is None and parse_language("auto") is None
    assert parse_language("zh-CN") == "zh" and parse_language("English") == "en"
    assert parse_language("yue") == "yue" and parse_language("zh-HK") == "yue"


# --- voiceprints -------------------------------------------------------------------------------


@needs_audio
async def test_voiceprint_register_identify_list_delete_health(api):
    """The calls xiaozhi-esp32-server (and its manager) make against voiceprint-api, with httpx."""
    alice = wav_bytes(read("zh_aishell_BAC009S0724W0121_wenet.wav"))
    bob = wav_bytes(read("en_librispeech_1995-1837-0001_wenet.wav"))
    base = f"{api.url}/voiceprint"
    async with httpx.AsyncClient(timeout=30, headers=api.auth) as c:
        for sid, audio in (("alice", alice), ("bob", bob)):
            r = await c.post(
                f"{base}/register", data={"speaker_id": sid}, files={"file": ("VoicePrint.WAV", audio, "audio/wav")}
            )
            assert r.status_code == 200, r.text
            assert r.json() == {"success": True, "msg": f"registered: {sid}"}

        r = await c.post(
            f"{base}/identify", data={"speaker_ids": "alice,bob"}, files={"file": ("audio.wav", alice, "audio/wav")}
        )
        assert r.status_code == 200 and r.json()["speaker_id"] == "alice" and r.json()["score"] > 0.99
        r = await c.post(
            f"{base}/identify", data={"speaker_ids": "bob, carol"}, files={"file": ("audio.wav", alice, "audio/wav")}
        )
        body = r.json()
        assert body["speaker_id"] == "" and body["score"] < 0.9  # below speaker.threshold: unknown
        r = await c.post(
            f"{base}/identify", data={"speaker_ids": "nobody"}, files={"file": ("audio.wav", alice, "audio/wav")}
        )
        assert r.json() == {"speaker_id": "", "score": 0.0}

        r = await c.get(f"{base}/list")
        assert [s["speaker_id"] for s in r.json()["speakers"]] == ["alice", "bob"]
        r = await c.get(f"{base}/health", params={"key": KEY}, headers={"Authorization": ""})
        assert r.json() == {"status": "healthy", "total_voiceprints": 2}

        assert (await c.delete(f"{base}/bob")).json()["success"] is True
        r = await c.delete(f"{base}/bob")
        assert r.status_code == 404 and "bob" in r.json()["detail"]
        assert (await c.get(f"{base}/health", params={"key": KEY})).json()["total_voiceprints"] == 1


async def test_voiceprint_bad_input(api):
    base = f"{api.url}/voiceprint"
    ok_audio = wav_bytes(0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    async with httpx.AsyncClient(timeout=30, headers=api.auth) as c:
        r = await c.post(
            f"{base}/register",
            data={"speaker_id": "x"},
            files={"file": ("a.wav", b"RIFF....WAVEnot really", "audio/wav")},
        )
        assert r.status_code == 400 and "not a supported audio file" in r.json()["detail"]
        r = await c.post(f"{base}/register", data={"speaker_id": "x"}, files={"file": ("a.wav", b"", "audio/wav")})
        assert r.status_code == 400 and "empty" in r.json()["detail"]
        r = await c.post(
            f"{base}/register",
            data={"speaker_id": "x"},
            files={"file": ("a.wav", wav_bytes(np.zeros(800, np.float32) + 0.1), "audio/wav")},
        )
        assert r.status_code == 400 and "too short" in r.json()["detail"]
        r = await c.post(f"{base}/register", files={"file": ("a.wav", ok_audio, "audio/wav")})
        assert r.status_code == 400 and "speaker_id" in r.json()["detail"]
        r = await c.post(
            f"{base}/identify", data={"speaker_ids": " , "}, files={"file": ("a.wav", ok_audio, "audio/wav")}
        )
        assert r.status_code == 400 and "speaker_ids" in r.json()["detail"]
        r = await c.post(
            f"{base}/identify",
            data={"speaker_ids": "a"},
            headers={"Authorization": "Bearer nope"},
            files={"file": ("a.wav", ok_audio, "audio/wav")},
        )
        assert r.status_code == 401 and r.json() == {"detail": "invalid API key"}
        r = await c.get(f"{base}/health", params={"key": "nope"}, headers={"Authorization": ""})
        assert r.status_code == 401


async def test_voiceprints_disabled_is_503(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, speaker=False)
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as c:
            r = await c.get(f"http://127.0.0.1:{runner.addresses[0][1]}/voiceprint/health", params={"key": KEY})
        assert r.status_code == 503 and "disabled" in r.json()["detail"]
    finally:
        await stop_api(runner, pipeline, bus)


# --- events ------------------------------------------------------------------------------------


async def test_events_websocket_filters_by_device(api):
    ws_url = api.url.replace("http://", "ws://") + "/v1/events"
    async with aiohttp.ClientSession() as s:
        async with (
            s.ws_connect(f"{ws_url}?device_id=dev-a", headers=api.auth) as only_a,
            s.ws_connect(ws_url, headers=api.auth) as everyone,
        ):
            assert (await only_a.receive_json(timeout=5)) == {"type": "subscribed", "device_ids": ["dev-a"]}
            assert (await everyone.receive_json(timeout=5))["device_ids"] is None
            api.bus.publish(make_event("for b", device_id="dev-b"))
            api.bus.publish(make_event("for a", device_id="dev-a"))
            got_a = await only_a.receive_json(timeout=5)
            assert got_a["text"] == "for a" and got_a["device_id"] == "dev-a" and got_a["type"] == "transcript"
            assert [(await everyone.receive_json(timeout=5))["text"] for _ in range(2)] == ["for b", "for a"]
    # Browsers pass the key in the query; the websockets client works too.
    async with websockets.connect(f"{ws_url}?token={KEY}&device_id=dev-c,dev-d") as ws:
        assert json.loads(await ws.recv())["device_ids"] == ["dev-c", "dev-d"]
        api.bus.publish(make_event("for d", device_id="dev-d"))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["text"] == "for d"


async def test_events_websocket_needs_the_key(api):
    ws_url = api.url.replace("http://", "ws://") + "/v1/events"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(ws_url, headers={"Authorization": "Bearer wrong"})
    assert e.value.status == 401


@needs_audio
async def test_transcription_reaches_the_webhook(api):
    x = read("en_tts_living_room_light_wyoming.wav")
    n = len(api.hook.bodies)
    await api.client().audio.transcriptions.create(model="m", file=("a.wav", wav_bytes(x), "audio/wav"))
    await api.hook.wait_for(n + 1)
    event = api.hook.bodies[n]
    assert event["protocol"] == "openai" and event["text"] == fake_text(len(x)) and event["device_id"] is None
    assert event["audio_ms"] == int(len(x) * 1000 / 16000)


# --- operations --------------------------------------------------------------------------------


async def test_health_ready_metrics(api):
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{api.url}/healthz")).json() == {"status": "ok"}
        r = await c.get(f"{api.url}/readyz")
        assert r.status_code == 200 and {m["name"] for m in r.json()["models"]} >= {"fake-sensevoice", "silero-vad"}
        api.state["ready"] = False
        try:
            assert (await c.get(f"{api.url}/readyz")).status_code == 503
        finally:
            api.state["ready"] = True
        r = await c.get(f"{api.url}/metrics")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert 'asr_sessions_opened_total{protocol="openai"}' in r.text
        for name in (
            "asr_sessions_open",
            "asr_reply_latency_seconds_bucket",
            "asr_stage_seconds_bucket",
            "asr_batch_size_bucket",
            "asr_queue_depth",
            "asr_errors_total",
            "asr_webhook_deliveries_total",
        ):
            assert name in r.text, name
        r = await c.get(f"{api.url}/nope")
        assert r.status_code == 404 and "no such endpoint" in r.json()["detail"]


# --- through the real (tiny) models ------------------------------------------------------------


@needs_audio
async def test_real_models_openai_and_voiceprint(start_server):
    from tests.support.audio import clip

    server = await start_server(http={"api_keys": [KEY]})
    c = clip("zh_aishell")
    client = openai.AsyncOpenAI(base_url=f"{server.endpoints.http_url}/v1", api_key=KEY, max_retries=0)
    mp3 = encode(read(c.file), 44100, "mp3", "libmp3lame", channels=2)
    verbose = await client.audio.transcriptions.create(
        model="sensevoice-small", file=("zh.mp3", mp3), response_format="verbose_json"
    )
    assert cer(c.transcript, verbose.text) <= 0.2, verbose.text
    assert verbose.segments[0].model_extra["language"] == "zh"
    timed = await client.audio.transcriptions.create(
        model="sensevoice-small",
        file=("zh.mp3", mp3),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    words = timed.words or []
    assert "".join(w.word for w in words).startswith("广州市") and len(words) >= 8
    assert all(0 <= w.start <= w.end <= timed.duration for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    srt = await client.audio.transcriptions.create(
        model="sensevoice-small", file=("zh.mp3", mp3), response_format="srt"
    )
    assert srt.count(" --> ") >= 2  # cues of word groups, not one per file
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as h:
        wav = wav_bytes(read(c.file))
        r = await h.post(
            f"{server.endpoints.http_url}/voiceprint/register",
            data={"speaker_id": "aishell-spk"},
            files={"file": ("a.wav", wav, "audio/wav")},
        )
        assert r.status_code == 200, r.text
        r = await h.post(
            f"{server.endpoints.http_url}/voiceprint/identify",
            data={"speaker_ids": "aishell-spk"},
            files={"file": ("a.wav", wav, "audio/wav")},
        )
        assert r.json()["speaker_id"] == "aishell-spk" and r.json()["score"] > 0.99
        await h.delete(f"{server.endpoints.http_url}/voiceprint/aishell-spk")


async def test_readyz_asks_the_engines(tmp_path):
    runner, pipeline, bus, state = await start_api(tmp_path)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/readyz"
    try:
        async with httpx.AsyncClient() as c:
            pipeline.asr.fail = True
            r = await c.get(url)
            assert r.status_code == 503 and "engine failed" in r.json()["detail"]
            pipeline.asr.fail = False
            r = await c.get(url)
            assert r.status_code == 200 and r.json()["status"] == "ready"
            state["ready"] = False
            r = await c.get(url)
            assert r.status_code == 503 and "starting or shutting down" in r.json()["detail"]
    finally:
        await stop_api(runner, pipeline, bus)


async def test_event_subscribers_beyond_the_limit_are_refused_naming_it(tmp_path):
    runner, pipeline, bus, _ = await start_api(tmp_path, events={"max_subscribers": 1})
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/events"
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
            async with s.get(
                url.replace("ws://", "http://"),
                headers={
                    "Authorization": f"Bearer {KEY}",
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            ) as refused:
                assert refused.status == 503
                assert "events.max_subscribers = 1" in (await refused.json())["error"]["message"]
    finally:
        await stop_api(runner, pipeline, bus)
