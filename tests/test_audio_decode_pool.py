"""Uploads are decoded in worker processes: a file that crashes a decoder costs its own request only.

The pool on its own (a decoder killed mid-decode, a decode bomb's memory, no models in the
workers), the HTTP API around it, and `serve --workers 2` on the tiny models: the 8-channel files
that once segfaulted the server, a float sample of 3e38, 16 decode bombs and the whole corpus of
formats (`benchmarks.fuzz.audio_corpus`) leave every worker up and get 200 or a 4xx with a reason.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from asr_server.adapters.funasr.server import serve_funasr
from asr_server.adapters.http.context import DECODER
from asr_server.audio.decode_pool import RECYCLE_GROWTH_MB, DecodePool
from asr_server.config import load_config
from asr_server.errors import AudioTooLongError, DecoderCrashed
from benchmarks.fuzz import audio_corpus, upload_corpus
from tests.support.cluster import Cluster, start_cluster
from tests.support.fakes import fake_pipeline
from tests.support.servers import KEY, start_api, stop_api

# --- files ---------------------------------------------------------------------------------------


def tones(rate: int, channels: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) for i in range(channels)], 1).astype(np.float32)


def soundfile_bytes(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_s64(x: np.ndarray, rate: int) -> bytes:
    """A 64-bit integer PCM WAV (FFmpeg writes it; libsndfile cannot read it, so FFmpeg decodes it)."""
    buf = io.BytesIO()
    layout = {1: "mono", 2: "stereo", 8: "7.1"}[x.shape[1]]
    with av.open(buf, mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s64le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def eight_channel_files() -> dict[str, bytes]:
    """The uploads that segfaulted 17ee092 (PyAV counts 9 planes in a 7.1 frame)."""
    x = tones(16000, 8)
    return {
        "8ch.ogg": soundfile_bytes(x, 16000, "OGG", "VORBIS"),
        "8ch-s64.wav": wav_s64(x, 16000),
        "8ch-f64.wav": soundfile_bytes(x, 16000, "WAV", "DOUBLE"),
    }


def huge_sample_wav() -> bytes:
    """A float WAV with one finite sample of 3e38 (full scale is 1): it overflowed the features to NaN."""
    x = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    x[8000] = 3e38
    return soundfile_bytes(x, 16000, "WAV", "FLOAT")


def flac_bomb(seconds: float, rate: int = 8000) -> bytes:
    """A FLAC of silence whose header does not say its length: it decodes until a limit stops it."""
    data = bytearray(soundfile_bytes(np.zeros(int(seconds * rate), np.int16), rate, "FLAC", "PCM_16"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first; its total-samples field
    fields = int.from_bytes(data[18:26], "big")  # rate 20 bits, channels 3, bits 5, total samples 36
    data[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    return bytes(data)


def vorbis_bomb(seconds: float, rate: int = 1000) -> bytes:
    """Ogg Vorbis silence at 1 kHz: 33 KB for an hour (of 16 kHz output, 230 MB)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="OGG", subtype="VORBIS") as f:
        for _ in range(int(seconds / 10)):  # libsndfile's Vorbis encoder crashes on one huge write
            f.write(np.zeros(rate * 10, np.float32))
    return buf.getvalue()


# --- the pool on its own ---------------------------------------------------------------------------


class Running:
    """What the pool tells its metric: how many files its workers hold now."""

    def __init__(self) -> None:
        self.now = 0

    def set(self, n: int) -> None:
        self.now = n


@pytest.fixture
async def running() -> Running:
    return Running()


@pytest.fixture
async def pool(running):
    p = DecodePool(1, running.set)
    await asyncio.to_thread(p.warm)
    yield p
    p.close()


async def wait_running(running: Callable[[], float | None], want: int) -> None:
    """Until the decode's file is with its worker (the pool counts it once sent)."""
    for _ in range(500):
        if running() == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the decode never reached its worker (running: {running()})")


async def test_a_decoder_killed_during_a_decode_fails_that_decode_and_the_next_succeeds(pool, running, caplog):
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)  # holds the decode in the worker until it is killed
    try:
        job = asyncio.create_task(pool.decode(eight_channel_files()["8ch.ogg"], 60))
        await wait_running(lambda: running.now, 1)
        os.kill(pid, signal.SIGSEGV)
    finally:
        os.kill(pid, signal.SIGCONT)
    with pytest.raises(DecoderCrashed, match="SIGSEGV"):
        await job
    assert any("died on a" in r.getMessage() and "SIGSEGV" in r.getMessage() for r in caplog.records)
    (new,) = pool.pids
    assert new != pid
    d = await pool.decode(eight_channel_files()["8ch.ogg"], 60)
    assert d.source_channels == 8 and abs(d.duration_s - 1.0) < 0.05


async def test_a_decoder_that_died_while_idle_is_replaced_before_the_next_decode(pool):
    (pid,) = pool.pids
    os.kill(pid, signal.SIGKILL)
    d = await pool.decode(eight_channel_files()["8ch-s64.wav"], 60)
    assert d.source_channels == 8 and pool.pids != [pid]


async def test_a_decode_bombs_memory_goes_back_with_its_process(pool):
    (pid,) = pool.pids
    with pytest.raises(AudioTooLongError):
        await pool.decode(flac_bomb(3700), 3600)  # an hour of 16 kHz float (230 MB) before the limit stops it
    (new,) = pool.pids
    assert new != pid  # the worker that held it is gone, and a fresh one waits
    assert _rss_mb(new) < RECYCLE_GROWTH_MB + 64
    d = await pool.decode(soundfile_bytes(tones(16000, 1), 16000, "WAV", "PCM_16"), 60)
    assert d.decoder == "soundfile" and pool.pids == [new]  # a small decode keeps its worker


def test_the_decoder_processes_do_not_load_the_models(pool):
    (pid,) = pool.pids
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "avcodec" in maps and "sndfile" in maps  # the decoders are loaded before the first file
    assert "onnxruntime" not in maps and "libtorch" not in maps


def _rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20


# --- the HTTP API around it --------------------------------------------------------------------------


async def test_an_upload_whose_decoder_is_killed_gets_a_clear_400_and_the_next_one_200(tmp_path, caplog):
    runner, pipeline, bus, _ = await start_api(tmp_path, http={"max_decodes": 1})
    pool = runner.app[DECODER]
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/audio/transcriptions"
    wav = soundfile_bytes(tones(16000, 1), 16000, "WAV", "PCM_16")

    async def post(s: aiohttp.ClientSession) -> tuple[int, dict]:
        form = aiohttp.FormData()
        form.add_field("file", wav, filename="a.wav")
        async with s.post(url, data=form, headers={"Authorization": f"Bearer {KEY}"}) as r:
            return r.status, await r.json()

    try:
        async with aiohttp.ClientSession() as s:
            assert (await post(s))[0] == 200  # starts the decoder
            (pid,) = pool.pids
            os.kill(pid, signal.SIGSTOP)
            try:
                upload = asyncio.create_task(post(s))
                await wait_running(lambda: pipeline.metrics.registry.get_sample_value("asr_decodes_running"), 1)
                os.kill(pid, signal.SIGSEGV)
            finally:
                os.kill(pid, signal.SIGCONT)
            status, body = await upload
            assert status == 400 and body["error"]["code"] == "decoder_crashed"
            assert (
                "a.wav could not be decoded: the decoder process died on this file (killed by SIGSEGV)"
                in (body["error"]["message"])
            )
            assert (await post(s))[0] == 200
        assert pipeline.metrics.errors.labels("decoder_crashed")._value.get() == 1
        assert sum("died on a" in r.getMessage() for r in caplog.records) == 1
    finally:
        await stop_api(runner, pipeline, bus)


async def test_a_funasr_file_whose_decoder_is_killed_closes_1007_and_the_next_is_answered(tmp_path, running):
    cfg = load_config(
        None,
        env={},
        overrides={
            "funasr": {"host": "127.0.0.1", "port": 0, "self_signed_cert": str(tmp_path / "cert.pem")},
            "speaker": {"db": str(tmp_path / "vp.sqlite")},
        },
    )
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    decoder = DecodePool(1, running.set)
    await asyncio.to_thread(decoder.warm)
    server = await serve_funasr(cfg, pipeline, pipeline.metrics, decoder=decoder)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    wav = soundfile_bytes(tones(16000, 1), 16000, "WAV", "PCM_16")

    async def offline(ws) -> None:
        await ws.send(json.dumps({"mode": "offline", "wav_name": "f", "wav_format": "wav", "is_speaking": True}))
        await ws.send(wav)
        await ws.send(json.dumps({"is_speaking": False}))

    try:
        (pid,) = decoder.pids
        os.kill(pid, signal.SIGSTOP)
        async with connect(url) as ws:
            try:
                await offline(ws)
                await wait_running(lambda: running.now, 1)
                os.kill(pid, signal.SIGSEGV)
            finally:
                os.kill(pid, signal.SIGCONT)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1007 and "decoder process died" in ws.close_reason
        async with connect(url) as ws:
            await offline(ws)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["is_final"] is True and reply["wav_name"] == "f"
    finally:
        server.close()
        await server.wait_closed()
        decoder.close()
        await pipeline.close()


# --- serve --workers 2 on the tiny models -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    c = start_cluster(tmp_path_factory.mktemp("decoding"), models_dir)
    yield c
    c.stop()


def _server_tree(root: int) -> list[int]:
    """`root` and every process under it (the workers, their fork servers and decoders)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        tree += frontier
    return tree


def _alive(c: Cluster) -> bool:
    return c.process.poll() is None and all(Path(f"/proc/{p}").exists() for p in c.pids)


async def _post_files(c: Cluster, files: dict[str, bytes], times: int = 1) -> list[tuple[str, int, str]]:
    return await upload_corpus(c.http_url, [item for item in files.items() for _ in range(times)])


@pytest.mark.slow
async def test_eight_channel_uploads_are_downmixed_and_every_worker_stays_up(cluster):
    results = await _post_files(cluster, eight_channel_files(), times=4)  # new connections: both workers
    assert [status for _, status, _ in results] == [200] * 12, results
    async with aiohttp.ClientSession() as s:  # the voiceprint routes decode through the same pool
        for name, data in eight_channel_files().items():
            form = aiohttp.FormData()
            form.add_field("speaker_ids", "nobody")
            form.add_field("file", data, filename=name)
            async with s.post(f"{cluster.http_url}/voiceprint/identify", data=form) as r:
                assert r.status == 200, await r.text()
    assert _alive(cluster)
    assert not [line for line in cluster.log if "died" in line or "restart" in line]


@pytest.mark.slow
async def test_a_huge_finite_sample_is_clipped_not_a_server_error(cluster):
    data = huge_sample_wav()
    [(_, status, message)] = await _post_files(cluster, {"huge.wav": data})
    assert status == 200, message
    async with connect(cluster.funasr_url, open_timeout=10) as ws:
        await ws.send(json.dumps({"mode": "offline", "wav_name": "huge", "wav_format": "wav", "is_speaking": True}))
        await ws.send(data)
        await ws.send(json.dumps({"is_speaking": False}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert reply["is_final"] is True and reply["wav_name"] == "huge"
    assert not [line for line in cluster.log if "Traceback" in line or "mel energy" in line]


@pytest.mark.slow
async def test_sixteen_decode_bombs_give_their_memory_back(cluster):
    tree_rss = lambda: sum(_rss_mb(p) for p in _server_tree(cluster.process.pid))  # noqa: E731
    await _post_files(cluster, {"warm.wav": soundfile_bytes(tones(16000, 1), 16000, "WAV", "PCM_16")}, times=8)
    before = tree_rss()
    # each decodes to an hour of audio (http.max_audio_s) and more: 17ee092 decoded the Ogg ones in
    # its own process (16 took +1.2 GB it kept), now refused by their length; the FLAC says no
    # length, so a decoder process decodes it to the limit, and is replaced after
    bombs = {"bomb.ogg": vorbis_bomb(3700), "bomb.flac": flac_bomb(3700)}

    async def one(name: str) -> int:
        [(_, status, _)] = await _post_files(cluster, {name: bombs[name]})
        return status

    statuses = await asyncio.gather(
        *(one(name) for name, times in (("bomb.ogg", 12), ("bomb.flac", 4)) for _ in range(times))
    )
    assert statuses == [413] * 16
    grown = tree_rss() - before
    assert grown < 150, f"the server kept {grown:.0f} MB after 16 decode bombs"
    assert _alive(cluster)


@pytest.mark.slow
async def test_every_format_in_the_corpus_is_answered_200_or_a_4xx_with_a_reason(cluster):
    files = audio_corpus()
    assert len(files) >= 250  # every codec x channels x rate the libraries write
    results = await upload_corpus(cluster.http_url, files)
    bad = [(name, status, message) for name, status, message in results if status != 200]
    assert all(400 <= status < 500 and message for _, status, message in bad), bad
    assert len(bad) < len(results) / 10, bad  # the formats are real: nearly all are answered
    assert _alive(cluster)
    assert not [line for line in cluster.log if "Traceback" in line]
