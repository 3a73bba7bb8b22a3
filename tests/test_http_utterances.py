"""`/v1/utterances` over loopback: every route with its key scope, bad filters, unknown ids, the
export; and the archive filled by a real device session and an upload (tiny models)."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from asr_server.adapters.http.app import build_app, start_http
from asr_server.config import load_config
from asr_server.core.archive import Archive, Query
from asr_server.core.events import EventBus
from tests.support.archive import decoded_samples, device_record, record
from tests.support.fakes import fake_pipeline
from tests.support.servers import AUTH, KEY

READ_KEY = "sk-read-only"
READ = {"Authorization": f"Bearer {READ_KEY}"}


@pytest.fixture
async def api(tmp_path):
    """The HTTP app around a fake pipeline and an archive holding three utterances (one a device's Ogg Opus)."""
    cfg = load_config(
        None,
        env={},
        overrides={
            "http": {"host": "127.0.0.1", "port": 0, "api_keys": [KEY], "read_keys": [READ_KEY]},
            "speaker": {"db": str(tmp_path / "vp.sqlite")},
            "archive": {"enabled": True, "dir": str(tmp_path / "archive")},
        },
    )
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    archive = Archive(cfg.archive, pipeline.metrics)
    archive.keep(device_record("turn on the light", "aa:bb", "alice", 1.2))
    archive.keep(record("what is the weather", "aa:bb", "bob"))
    archive.keep(record("good night", "cc:dd"))
    archive.flush()
    bus = EventBus(cfg, pipeline.metrics)
    await bus.start()
    app = build_app(cfg, pipeline, bus, pipeline.metrics, lambda: True, archive=archive)
    runner = await start_http(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        yield session, url, archive
    await runner.cleanup()
    await bus.close()
    await pipeline.close()
    archive.close()


async def test_list_filters_and_pages_with_a_read_key(api):
    s, url, _ = api
    async with s.get(f"{url}/v1/utterances", headers=READ) as r:
        assert r.status == 200
        body = await r.json()
    assert [u["text"] for u in body["data"]] == ["good night", "what is the weather", "turn on the light"]
    assert body["next"] is None
    first = body["data"][-1]
    assert first["device_id"] == "aa:bb" and first["protocol"] == "xiaozhi" and first["speaker"] == "alice"
    assert first["audio_format"] == "audio/ogg" and first["hotwords"] is None and first["corrected_text"] is None
    async with s.get(f"{url}/v1/utterances", params={"device_id": "aa:bb", "limit": "1"}, headers=READ) as r:
        page = await r.json()
    assert [u["text"] for u in page["data"]] == ["what is the weather"] and page["next"]
    params = {"device_id": "aa:bb", "limit": "1", "cursor": page["next"]}
    async with s.get(f"{url}/v1/utterances", params=params, headers=READ) as r:
        page = await r.json()
    assert [u["text"] for u in page["data"]] == ["turn on the light"] and page["next"] is None
    for params, texts in (
        ({"speaker": "bob"}, ["what is the weather"]),
        ({"q": "NIGHT"}, ["good night"]),
        ({"since": "2000-01-01T00:00:00+00:00", "until": "2001-01-01"}, []),
        ({"since": "0"}, ["good night", "what is the weather", "turn on the light"]),
    ):
        async with s.get(f"{url}/v1/utterances", params=params, headers=READ) as r:
            assert [u["text"] for u in (await r.json())["data"]] == texts, params


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "100000"},
        {"limit": "ten"},
        {"cursor": "-1"},
        {"cursor": "1 OR 1=1"},
        {"since": "yesterday"},
        {"until": "'; DROP TABLE utterances; --"},
        {"q": "x" * 201},
        {"device_id": "a\x00b"},
    ],
)
async def test_bad_filters_are_400_naming_the_parameter(api, params):
    s, url, archive = api
    async with s.get(f"{url}/v1/utterances", params=params, headers=READ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == next(iter(params))
    assert len(archive.search(Query())[0]) == 3


@pytest.mark.parametrize("q", ["' OR '1'='1", "%", "_", "\\", '"); DELETE FROM utterances; --', "the%light"])
async def test_fuzzed_searches_match_literally(api, q):
    s, url, archive = api
    async with s.get(f"{url}/v1/utterances", params={"q": q, "speaker": q}, headers=READ) as r:
        assert r.status == 200 and (await r.json())["data"] == []
    assert len(archive.search(Query())[0]) == 3


async def test_one_utterance_and_its_audio(api):
    s, url, archive = api
    rows = {r.text: r for r in archive.search(Query())[0]}
    device = rows["turn on the light"]
    async with s.get(f"{url}/v1/utterances/{device.id}", headers=READ) as r:
        assert r.status == 200 and (await r.json())["text"] == "turn on the light"
    async with s.get(f"{url}/v1/utterances/{device.id}/audio", headers=READ) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "audio/ogg"
        n, rate = decoded_samples(await r.read())
    assert rate == 48000 and abs(n / rate - 1.2) < 0.07  # 20 packets of 60 ms, less the 6.5 ms pre-skip
    async with s.get(f"{url}/v1/utterances/{rows['good night'].id}/audio", headers=READ) as r:
        assert r.headers["Content-Type"] == "audio/flac"
    for path in ("/v1/utterances/nope", "/v1/utterances/nope/audio", "/v1/utterances/..%2F..%2Fetc/audio"):
        async with s.get(url + path, headers=READ) as r:
            assert r.status == 404, path
            assert (await r.json())["error"]["code"] == "utterance_not_found"


async def test_keys_and_scopes(api):
    s, url, archive = api
    uid = archive.search(Query())[0][0].id
    reads = [("GET", "/v1/utterances"), ("GET", f"/v1/utterances/{uid}"), ("GET", f"/v1/utterances/{uid}/audio")]
    admin = [
        ("PATCH", f"/v1/utterances/{uid}"),
        ("DELETE", f"/v1/utterances/{uid}"),
        ("DELETE", "/v1/utterances?device_id=cc:dd"),
        ("GET", "/v1/utterances/export"),
    ]
    for method, path in reads + admin:
        async with s.request(method, url + path) as r:
            assert r.status == 401, (method, path)
        async with s.request(method, url + path, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401, (method, path)
    for method, path in admin:
        async with s.request(method, url + path, headers=READ, json={"corrected_text": "x"}) as r:
            assert r.status == 403, (method, path)
    assert len(archive.search(Query())[0]) == 3


async def test_admin_corrects_deletes_and_erases_a_device(api):
    s, url, archive = api
    rows = {r.text: r for r in archive.search(Query())[0]}
    uid = rows["turn on the light"].id
    async with s.patch(f"{url}/v1/utterances/{uid}", headers=AUTH, json={"corrected_text": "turn on the lights"}) as r:
        assert r.status == 200 and (await r.json())["corrected_text"] == "turn on the lights"
    for body in ({"text": "x"}, {"corrected_text": 5}, [1]):
        async with s.patch(f"{url}/v1/utterances/{uid}", headers=AUTH, json=body) as r:
            assert r.status == 400
    async with s.patch(f"{url}/v1/utterances/{uid}", headers=AUTH, data=b"not json") as r:
        assert r.status == 400
    async with s.patch(f"{url}/v1/utterances/nope", headers=AUTH, json={"corrected_text": "x"}) as r:
        assert r.status == 404
    async with s.delete(f"{url}/v1/utterances/{rows['good night'].id}", headers=AUTH) as r:
        assert r.status == 200 and (await r.json()) == {"deleted": 1}
    async with s.delete(f"{url}/v1/utterances/{rows['good night'].id}", headers=AUTH) as r:
        assert r.status == 404
    async with s.delete(f"{url}/v1/utterances", headers=AUTH) as r:
        assert r.status == 400  # erasing everything needs a device named
    async with s.delete(f"{url}/v1/utterances", params={"device_id": "aa:bb"}, headers=AUTH) as r:
        assert r.status == 200 and (await r.json()) == {"deleted": 2}
    assert archive.search(Query())[0] == []
    assert [p for p in archive.dir.rglob("*") if p.suffix in (".ogg", ".flac")] == []


async def test_export_is_a_tar_of_audio_and_a_jsonl_manifest(api):
    s, url, archive = api
    async with s.get(f"{url}/v1/utterances/export", params={"device_id": "aa:bb"}, headers=AUTH) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/x-tar"
        data = await r.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest = [json.loads(line) for line in tar.extractfile("metadata.jsonl").read().splitlines()]
        assert sorted(m["text"] for m in manifest) == ["turn on the light", "what is the weather"]
        for m in manifest:
            n, rate = decoded_samples(tar.extractfile(m["file_name"]).read())
            assert abs(n / rate - m["duration"]) < 0.07


async def test_with_no_key_configured_only_loopback_reads_or_edits_the_archive(tmp_path):
    """127.0.0.2 is not the loopback address the API trusts: an open API reads nothing of the archive."""
    cfg = load_config(
        None,
        env={},
        overrides={
            "speaker": {"db": str(tmp_path / "vp.sqlite")},
            "archive": {"enabled": True, "dir": str(tmp_path / "archive")},
        },
    )
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    archive = Archive(cfg.archive, pipeline.metrics)
    archive.keep(record("hello", "aa:bb"))
    archive.flush()
    bus = EventBus(cfg, pipeline.metrics)
    runner = await start_http(
        build_app(cfg, pipeline, bus, pipeline.metrics, lambda: True, archive=archive), "0.0.0.0", 0
    )
    port = runner.addresses[0][1]
    uid = archive.search(Query())[0][0].id
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as lan:
            for method, path in (("GET", "/v1/utterances"), ("GET", f"/v1/utterances/{uid}/audio")):
                async with lan.request(method, f"http://127.0.0.1:{port}{path}") as r:
                    assert r.status == 403 and "loopback" in (await r.json())["error"]["message"]
            async with lan.delete(f"http://127.0.0.1:{port}/v1/utterances", params={"device_id": "aa:bb"}) as r:
                assert r.status == 403
        async with aiohttp.ClientSession() as local:
            async with local.get(f"http://127.0.0.1:{port}/v1/utterances") as r:
                assert r.status == 200 and len((await r.json())["data"]) == 1
    finally:
        await runner.cleanup()
        await pipeline.close()
        archive.close()


async def test_routes_say_the_archive_is_off(tmp_path):
    cfg = load_config(None, env={}, overrides={"speaker": {"db": str(tmp_path / "vp.sqlite")}})
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    bus = EventBus(cfg, pipeline.metrics)
    runner = await start_http(build_app(cfg, pipeline, bus, pipeline.metrics, lambda: True), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{runner.addresses[0][1]}/v1/utterances") as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "archive_disabled"
    finally:
        await runner.cleanup()
        await pipeline.close()


async def test_a_device_and_an_upload_are_archived_end_to_end(start_server, tmp_path):
    """Real sessions on the tiny models: the device's utterance is kept as its own Opus packets,
    which decode to the utterance's length; an upload's segments as FLAC; recognition unchanged."""
    from loadtest.clips import load_clip
    from loadtest.device import Device, DeviceConfig
    from tests.support.audio import clip

    c = clip("zh_aishell")
    server = await start_server(archive={"enabled": True, "dir": str(tmp_path / "archive")})
    async with Device(DeviceConfig(url=server.endpoints.device_url, device_id="aa:bb:cc:dd:ee:31")) as dev:
        await dev.listen("start", "auto")
        await dev.send_opus(load_clip(c.path).packets, 3.0)
        await dev.send_silence(900, 3.0)
        stt = (await dev.next_message("stt", 20)).data
    async with Device(DeviceConfig(url=server.endpoints.device_url, device_id="push-to-talk")) as dev:
        await dev.listen("start", "manual")
        await dev.send_opus(load_clip(c.path).packets, 3.0)
        await dev.listen("stop")
        held = (await dev.next_message("stt", 20)).data
    wav = io.BytesIO()
    import soundfile as sf

    x, sr = sf.read(c.path, dtype="float32")
    sf.write(wav, x, sr, format="WAV")
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("file", wav.getvalue(), filename="a.wav", content_type="audio/wav")
        async with s.post(f"{server.endpoints.http_url}/v1/audio/transcriptions", data=form) as r:
            assert r.status == 200
    server.archive.flush()
    rows = server.archive.search(Query())[0]
    by_protocol = {r.protocol: r for r in rows}
    device = server.archive.search(Query(device_id="aa:bb:cc:dd:ee:31"))[0][0]
    assert device.text == stt["text"] and device.device_id == "aa:bb:cc:dd:ee:31" and device.session_id
    n, rate = decoded_samples(server.archive.audio(device)[0].read_bytes())
    assert abs(n / rate * 1000 - device.audio_ms) <= 2 * 60 + 7  # its packets: at most a frame either side
    manual = server.archive.search(Query(device_id="push-to-talk"))[0][0]  # the whole talk, its packets all
    assert manual.text == held["text"] and manual.audio_ms == len(load_clip(c.path).packets) * 60
    n, rate = decoded_samples(server.archive.audio(manual)[0].read_bytes())
    assert n == len(load_clip(c.path).packets) * 2880 - 312
    upload = by_protocol["openai"]
    n, rate = decoded_samples(server.archive.audio(upload)[0].read_bytes())
    assert rate == 16000 and abs(n / rate * 1000 - upload.audio_ms) <= 1
    assert np.isfinite(device.latency_ms)


async def test_funasr_finals_are_archived_and_a_protocol_switched_off_is_not(start_server, tmp_path):
    import soundfile as sf
    import websockets

    from tests.support.audio import clip

    c = clip("zh_aishell")
    archive = {"enabled": True, "dir": str(tmp_path / "archive"), "http": False}
    server = await start_server(archive=archive, funasr={"enabled": True})
    x, sr = sf.read(c.path, dtype="int16")
    async with websockets.connect(server.endpoints.funasr_url, subprotocols=["binary"]) as ws:
        await ws.send(json.dumps({"mode": "offline", "wav_name": "w", "wav_format": "pcm", "audio_fs": sr}))
        await ws.send(x.tobytes())
        await ws.send(json.dumps({"is_speaking": False}))
        final = json.loads(await ws.recv())
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("file", (await asyncio.to_thread(Path(c.path).read_bytes)), filename="a.wav")
        async with s.post(f"{server.endpoints.http_url}/v1/audio/transcriptions", data=form) as r:
            assert r.status == 200
    server.archive.flush()
    rows = server.archive.search(Query())[0]
    assert [r.protocol for r in rows] == ["funasr"] * len(rows) and rows  # archive.http: false
    assert "".join(r.text for r in reversed(rows)) == final.get("clean_text", final["text"])
    for r in rows:
        n, rate = decoded_samples(server.archive.audio(r)[0].read_bytes())
        assert rate == 16000 and abs(n / rate * 1000 - r.audio_ms) <= 1


async def test_recognition_goes_on_while_the_archive_is_paused(start_server, tmp_path):
    import time

    from tests.support.audio import clip

    wav = await asyncio.to_thread(Path(clip("zh_aishell").path).read_bytes)
    server = await start_server(archive={"enabled": True, "dir": str(tmp_path / "archive")})
    (tmp_path / "archive" / time.strftime("%Y-%m-%d", time.gmtime())).write_bytes(b"")  # every write fails
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            form = aiohttp.FormData()
            form.add_field("file", wav, filename="a.wav", content_type="audio/wav")
            async with s.post(f"{server.endpoints.http_url}/v1/audio/transcriptions", data=form) as r:
                assert r.status == 200 and (await r.json())["text"]
            server.archive.flush()
        async with s.get(f"{server.endpoints.http_url}/metrics") as r:
            metrics = await r.text()
    assert server.archive.paused and "asr_archive_paused 1.0" in metrics
    assert 'asr_archive_dropped_total{reason="paused"} 1.0' in metrics
    assert server.archive.search(Query())[0] == []


async def test_a_server_whose_archive_dir_cannot_be_written_does_not_start(start_server, tmp_path):
    from asr_server.errors import StartupError

    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match=r"^archive.dir '.*file/archive' cannot be written: .*") as e:
        await start_server(archive={"enabled": True, "dir": str(tmp_path / "file" / "archive")})
    assert "\n" not in str(e.value)
