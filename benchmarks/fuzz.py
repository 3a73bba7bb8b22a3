"""Seeded, bounded fuzzing of every parser the server exposes, against a real server process.

    python -m benchmarks.fuzz --models build/test-models/<hash> --count 2000 --seed 0

Starts `asr-server serve` (tiny models are enough: the parsers are the target) on free loopback
ports and feeds each target `--count` inputs built from valid messages by mutation (types swapped,
numbers huge or non-ASCII, strings with lone surrogates, control characters or 64 KB, JSON nested
100,000 deep, bytes flipped, lengths lied about), from clients that also vanish mid-message:

- `xiaozhi-text`: hello and the JSON messages, with mutated upgrade headers;
- `xiaozhi-binary`: protocol v1/v2/v3 frames (headers and Opus payloads mutated);
- `funasr`: the FunASR socket's configuration messages and audio;
- `http`: every endpoint, multipart bodies mutated, keys mutated;
- `corpus`: every container/codec x channels x rate soundfile and PyAV write, uploaded once each;
- `tls`: the FunASR port's TLS stage: half handshakes, idle sockets, garbage after 0x16 and
  clients that leave mid-handshake, from 16 addresses, with the server's RSS around each case.

Then it reads the server's log and metrics and prints, per target: inputs sent, whether the server
survived, tracebacks in its log, sessions left open, and the peak RSS. A clean run is 0 tracebacks
and 0 sessions left. Same seed, same inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException
from websockets.typing import Subprotocol

from loadtest.clips import DEFAULT_AUDIO_DIR, load_clip

from .capacity import free_port, server_env, stop_server, wait_ready
from .slowloris import usage
from .stages import machine

ROOT = Path(__file__).resolve().parent.parent

# --- mutation ------------------------------------------------------------------------------------

_ODD_STRINGS = [
    "",
    "\ud800",
    "a\udcffb",
    "x" * 65536,
    "\n\rFAKE LOG LINE",
    "²",
    "٣",
    "null",
    "%0A",
    "\x00",
    "🎙" * 100,
]
_ODD_NUMBERS: list[Any] = [0, -1, 2**63, 10**30, 1e308, -1e308, 0.5, True, False, None]


def _deep(rng: random.Random) -> str:
    n = rng.choice([100, 10_000, 100_000])
    return "[" * n + "]" * n if rng.random() < 0.5 else '{"a":' * n + "1" + "}" * n


def mutate_value(rng: random.Random, value: Any, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.25:
        return rng.choice(_ODD_STRINGS)
    if r < 0.45:
        return rng.choice(_ODD_NUMBERS)
    if r < 0.55:
        return [value] if depth < 3 else value
    if r < 0.65:
        return {"k": value} if depth < 3 else value
    if isinstance(value, dict) and depth < 3:
        return {k: mutate_value(rng, v, depth + 1) if rng.random() < 0.5 else v for k, v in value.items()}
    return value


def mutate_json(rng: random.Random, template: dict[str, Any]) -> str | bytes:
    """One mutated message: a valid template with fields changed, dropped or added, or broken JSON."""
    r = rng.random()
    if r < 0.05:
        return _deep(rng)
    if r < 0.1:
        return rng.randbytes(rng.randint(0, 64))
    msg = dict(template)
    for key in list(msg):
        if rng.random() < 0.3:
            msg[key] = mutate_value(rng, msg[key])
        elif rng.random() < 0.1:
            del msg[key]
    if rng.random() < 0.2:
        msg[rng.choice(["extra", "type", "state", "mode"])] = mutate_value(rng, "x")
    text = json.dumps(msg, ensure_ascii=rng.random() < 0.5)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: sent as its JSON escape, which decodes back to it
        text = json.dumps(msg, ensure_ascii=True)
    if rng.random() < 0.1:
        text = text[: rng.randint(0, len(text))]  # truncated
    if rng.random() < 0.05:
        text = text.replace('"1"', "1" * 5000)
    return text


def flip(rng: random.Random, data: bytes, n: int = 3) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


# --- targets -------------------------------------------------------------------------------------

XIAOZHI_TEMPLATES = [
    {"type": "hello", "version": 1, "transport": "websocket", "audio_params": {"format": "opus", "sample_rate": 16000}},
    {"type": "listen", "state": "start", "mode": "auto"},
    {"type": "listen", "state": "stop"},
    {"type": "listen", "state": "detect", "text": "你好小智"},
    {"type": "abort", "reason": "wake_word_detected"},
    {"type": "mcp", "payload": {"jsonrpc": "2.0"}},
]
HELLO = json.dumps(XIAOZHI_TEMPLATES[0])


def _headers(rng: random.Random) -> dict[str, str]:
    return {
        "Device-Id": rng.choice(["aa:bb", "é" * 10, "d" * 500]),
        "Protocol-Version": rng.choice(["1", "2", "3", "0", "99", "x", ""]),
    }


def _query(rng: random.Random) -> str:
    """Device ids in the query string, as browsers send them: `%0A` would forge a log line."""
    return "?device-id=" + rng.choice(["a%0AFAKE%20ERROR%20line", "%F0%9F%8E", "%ED%A0%80", "x" * 300, "ok"])


async def _ws_session(url: str, headers: dict[str, str], messages: list[str | bytes], vanish: bool) -> None:
    try:
        async with connect(url, additional_headers=headers, open_timeout=5, close_timeout=1, max_size=None) as ws:
            for m in messages:
                await ws.send(m)
            if vanish:
                ws.transport.abort()
                return
            try:
                while True:  # read what the server answers, briefly
                    await asyncio.wait_for(ws.recv(), 0.05)
            except (TimeoutError, WebSocketException):
                pass
    except (OSError, TimeoutError, WebSocketException, UnicodeError):
        pass  # refused, closed by the server: the outcomes fuzzing expects


async def fuzz_xiaozhi_text(url: str, rng: random.Random, count: int) -> int:
    sent = 0
    while sent < count:
        n = rng.randint(1, 20)
        msgs: list[str | bytes] = [HELLO if rng.random() < 0.8 else mutate_json(rng, XIAOZHI_TEMPLATES[0])]
        msgs += [mutate_json(rng, rng.choice(XIAOZHI_TEMPLATES)) for _ in range(n)]
        await _ws_session(url + _query(rng), _headers(rng), msgs, rng.random() < 0.2)
        sent += len(msgs)
    return sent


async def fuzz_xiaozhi_binary(url: str, rng: random.Random, count: int, packets: list[bytes]) -> int:
    import struct

    sent = 0
    while sent < count:
        version = rng.choice([1, 2, 3])
        frames: list[str | bytes] = [HELLO, json.dumps({"type": "listen", "state": "start", "mode": "auto"})]
        for _ in range(rng.randint(1, 40)):
            p = rng.choice(packets)
            p = flip(rng, p, rng.randint(0, 4)) if rng.random() < 0.5 else p
            if version == 2:
                size = len(p) if rng.random() < 0.8 else rng.randrange(1 << 32)
                typ = 0 if rng.random() < 0.8 else rng.choice([1, 2, 65535])
                body = p if typ != 1 else mutate_json(rng, XIAOZHI_TEMPLATES[1])
                body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
                size = len(body) if size == len(p) else size
                frame = struct.pack(">HHIII", rng.choice([2, 2, 2, 3]), typ, 0, rng.randrange(1 << 32), size) + body
            elif version == 3:
                size = len(p) if rng.random() < 0.8 else rng.randrange(1 << 16)
                frame = struct.pack(">BBH", 0 if rng.random() < 0.9 else 7, 0, size) + p
            else:
                frame = p if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 2000))
            frames.append(frame[: rng.randint(0, len(frame))] if rng.random() < 0.05 else frame)
        await _ws_session(url, {"Protocol-Version": str(version)}, frames, rng.random() < 0.2)
        sent += len(frames)
    return sent


FUNASR_TEMPLATE = {
    "mode": "2pass",
    "chunk_size": [5, 10, 5],
    "chunk_interval": 10,
    "wav_name": "microphone",
    "is_speaking": True,
    "wav_format": "pcm",
    "audio_fs": 16000,
    "itn": True,
    "svs_lang": "auto",
    "hotwords": "",
}


async def fuzz_funasr(url: str, rng: random.Random, count: int, pcm: bytes) -> int:
    sent = 0
    while sent < count:
        msgs: list[str | bytes] = [
            mutate_json(rng, FUNASR_TEMPLATE) if rng.random() < 0.7 else json.dumps(FUNASR_TEMPLATE)
        ]
        for _ in range(rng.randint(0, 15)):
            if rng.random() < 0.7:
                start = rng.randrange(max(1, len(pcm) - 20000))
                chunk = pcm[start : start + rng.choice([1, 959, 960, 9600, 19200])]
                msgs.append(flip(rng, chunk, 2) if rng.random() < 0.2 else chunk)
            else:
                msgs.append(mutate_json(rng, {"is_speaking": False}))
        msgs.append(json.dumps({"is_speaking": False}))
        await _ws_session(url, {}, msgs, rng.random() < 0.2)
        sent += len(msgs)
    return sent


def _wav(rng: random.Random) -> bytes:
    x = (rng.random() * np.sin(np.arange(rng.choice([0, 10, 8000, 32000])) / 9)).astype(np.float32)
    if rng.random() < 0.2:
        x[: len(x) // 2] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, rng.choice([8000, 16000, 44100]), format="WAV", subtype=rng.choice(["PCM_16", "FLOAT"]))
    data = buf.getvalue()
    return flip(rng, data, rng.randint(1, 20)) if rng.random() < 0.2 else data


async def fuzz_http(url: str, rng: random.Random, count: int) -> int:
    endpoints = [
        ("POST", "/v1/audio/transcriptions", ["model", "language", "response_format", "temperature", "prompt"]),
        ("POST", "/voiceprint/register", ["speaker_id"]),
        ("POST", "/voiceprint/identify", ["speaker_ids"]),
        ("GET", "/voiceprint/list", []),
        ("GET", "/voiceprint/health", []),
        ("DELETE", "/voiceprint/%20x%0A", []),
        ("GET", "/v1/models", []),
        ("GET", "/healthz", []),
        ("GET", "/readyz", []),
        ("GET", "/metrics", []),
        ("GET", "/v1/events?device_id=" + "a," * 500, []),
        ("PUT", "/v1/audio/transcriptions", []),
        ("GET", "/nope", []),
    ]
    sent = 0
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        while sent < count:
            method, path, fields = rng.choice(endpoints)
            headers = {}
            if rng.random() < 0.3:
                headers["Authorization"] = rng.choice(["Bearer x", "Bearer", "Basic é", "Bearer " + "k" * 9000])
            data: Any = None
            if method == "POST":
                form = aiohttp.FormData()
                for f in fields:
                    if rng.random() < 0.7:
                        v = mutate_value(rng, "whisper-1")
                        text = v if isinstance(v, str) else json.dumps(v)
                        form.add_field(f, text.encode("utf-8", "surrogatepass"))  # lone surrogates as raw bytes
                for _ in range(rng.choice([0, 0, 0, 50, 500])):
                    form.add_field(f"x{rng.random()}", "y")
                if rng.random() < 0.9:
                    form.add_field("file", _wav(rng), filename=rng.choice(["a.wav", None, "\ud800.wav"]))
                data = form
                if rng.random() < 0.1:
                    data, headers["Content-Type"] = (
                        rng.randbytes(rng.randint(0, 5000)),
                        "multipart/form-data; boundary=zz",
                    )
            try:
                async with s.request(method, url + path, data=data, headers=headers) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError, UnicodeError, ValueError, TypeError):
                pass  # refused, reset, or a request the client library itself cannot build
            sent += 1
    return sent


# --- a corpus of real audio formats ----------------------------------------------------------------
#
# Every container/codec, channel count and rate that soundfile or PyAV can write, a quarter second
# each (a tone per channel): what an upload may really be. The server must answer each with 200 or
# a 4xx that says why, and stay up (an 8-channel Ogg Vorbis file once segfaulted it).

CORPUS_CHANNELS = (1, 2, 6, 8, 16)
CORPUS_RATES = (8000, 16000, 44100, 48000, 96000)
# (extension, libsndfile format, subtype): WAV 8/16/24/32-bit int and 32/64-bit float, FLAC,
# Ogg Vorbis, Ogg Opus, MP3
_SOUNDFILE_CODECS = [
    *[("wav", "WAV", s) for s in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")],
    ("flac", "FLAC", "PCM_16"),
    ("flac", "FLAC", "PCM_24"),
    ("ogg", "OGG", "VORBIS"),
    ("opus", "OGG", "OPUS"),
    ("mp3", "MP3", "MPEG_LAYER_III"),
]
# (extension, FFmpeg muxer, encoder): what libsndfile cannot write
_PYAV_CODECS = [("wav", "wav", "pcm_s64le"), ("m4a", "ipod", "aac"), ("webm", "webm", "libopus")]
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1", 16: "hexadecagonal"}


def _tones(rate: int, channels: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) for i in range(channels)], 1).astype(np.float32)


def _pyav_file(x: np.ndarray, rate: int, muxer: str, codec: str) -> bytes:
    buf = io.BytesIO()
    layout = _LAYOUTS[x.shape[1]]
    with av.open(buf, mode="w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        # packed s16 (one plane: PyAV 18 miscounts the planes of 7.1 and up); the encoder converts
        frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def audio_corpus(seconds: float = 0.25) -> list[tuple[str, bytes]]:
    """(name, file) for every codec x channels x rate the libraries write; the rest are skipped
    (Opus has no 44.1/96 kHz, MP3 no more than 2 channels, FLAC no more than 8...)."""
    files = []
    for channels in CORPUS_CHANNELS:
        for rate in CORPUS_RATES:
            x = _tones(rate, channels, seconds)
            for ext, fmt, subtype in _SOUNDFILE_CODECS:
                buf = io.BytesIO()
                try:
                    sf.write(buf, x, rate, format=fmt, subtype=subtype)
                except (sf.LibsndfileError, RuntimeError, ValueError):
                    continue  # a combination libsndfile cannot write
                files.append((f"{subtype.lower()}-{channels}ch-{rate}.{ext}", buf.getvalue()))
            for ext, muxer, codec in _PYAV_CODECS:
                try:
                    data = _pyav_file(x, rate, muxer, codec)
                except av.FFmpegError:
                    continue  # a combination the encoder refuses
                files.append((f"{codec}-{channels}ch-{rate}.{ext}", data))
    return files


async def upload_corpus(url: str, files: list[tuple[str, bytes]], key: str | None = None) -> list[tuple[str, int, str]]:
    """POST each file to `/v1/audio/transcriptions`: (name, status, error message or ""); status 0
    when no answer came."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        for name, data in files:
            form = aiohttp.FormData()
            form.add_field("file", data, filename=name)
            try:
                async with s.post(f"{url}/v1/audio/transcriptions", data=form, headers=headers) as r:
                    body = await r.json(content_type=None)
                    results.append((name, r.status, (body.get("error") or {}).get("message", "")))
            except (aiohttp.ClientError, TimeoutError) as e:  # the server died, or hung
                results.append((name, 0, f"no answer: {type(e).__name__}: {e}"))
    return results


async def fuzz_corpus(url: str, rng: random.Random, count: int) -> int:
    """Upload the corpus (every file, `count` ignored); any answer but 200 or a 4xx with a reason
    is printed."""
    results = await upload_corpus(url, audio_corpus())
    for name, status, message in results:
        if not (status == 200 or (400 <= status < 500 and message)):
            print(f"corpus: {name}: {status} {message!r}", file=sys.stderr)
    refused = sum(status != 200 for _, status, _ in results)
    print(f"corpus: {len(results)} files, {len(results) - refused} answered 200", file=sys.stderr)
    return len(results)


# --- TLS on the FunASR port ----------------------------------------------------------------------
#
# The FunASR port serves wss:// and ws:// at once (`funasr.tls: both`): the first byte decides, and a
# 0x16 starts a TLS handshake that holds ~320 KB until it ends. These cases attack that stage, not a
# parser: half handshakes (the byte 0x16 and nothing after), idle sockets (nothing at all), garbage
# after 0x16, and real ClientHellos cut off or followed by a close mid-handshake. Held sockets come
# from `TLS_ADDRESSES` loopback addresses, as a flood from many clients would, and wait for the
# server to close them; a wss:// and a ws:// client must still get in while they are held.

TLS_ADDRESSES = [f"127.0.1.{i}" for i in range(1, 17)]
TLS_CASES = ("half handshake", "idle", "garbage after 0x16", "closed mid-handshake")


@dataclass
class TlsCase:
    """What one TLS case did to the server: sockets, how many the server closed, its RSS in MB."""

    name: str
    sockets: int = 0
    closed_by_server: int = 0
    not_connected: int = 0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_after: float = 0.0
    fds_before: int = 0
    fds_after: int = 0
    probes: str = ""


def _insecure_context() -> ssl.SSLContext:
    """A client context that takes the server's self-signed certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def _client_hello() -> bytes:
    """A real TLS ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _insecure_context().wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def _held(port: int, source: str, first: bytes, hold_s: float) -> bool | None:
    """A socket that sends `first` and waits: True when the server closed it within `hold_s`, None
    when it did not connect."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return None
    try:
        if first:
            writer.write(first)
            await writer.drain()
        async with asyncio.timeout(hold_s):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset by the server: closed all the same
        return True
    finally:
        writer.close()


async def _cut_handshake(port: int, source: str, rng: random.Random) -> bool:
    """A real client that leaves mid-handshake: its ClientHello cut short, or whole and then gone after
    the server's first flight, by FIN or RST. True when it got as far as it meant to."""
    hello = _client_hello()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return False
    try:
        cut = rng.random() < 0.5
        writer.write(hello[: rng.randint(1, len(hello) - 1)] if cut else hello)
        await writer.drain()
        if not cut:
            async with asyncio.timeout(10):
                await reader.read(65536)  # the ServerHello and the rest of the server's first flight
        if rng.random() < 0.5:  # RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def _garbage(rng: random.Random) -> bytes:
    """0x16 and then what a TLS record is not: random bytes, or a record header whose length lies."""
    if rng.random() < 0.5:
        return b"\x16" + rng.randbytes(rng.randint(1, 5000))
    length = rng.choice([0, 1, 2**14 + 2048, 65535])
    return b"\x16" + rng.choice([b"\x03\x01", b"\x03\x03", b"\xff\xff"]) + struct.pack(">H", length) + rng.randbytes(8)


async def _tls_probes(port: int) -> str:
    """A wss:// and a ws:// client, from an address the attack does not use, each within 5 s."""
    ctx = _insecure_context()
    got = []
    for url, tls in ((f"wss://127.0.0.1:{port}/", ctx), (f"ws://127.0.0.1:{port}/", None)):
        try:
            async with asyncio.timeout(5), connect(url, subprotocols=[Subprotocol("binary")], ssl=tls):
                got.append(url.split(":", 1)[0])
        except (OSError, TimeoutError, WebSocketException):
            pass
    return "+".join(got) or "none"


async def _sample_rss(pid: int, into: list[float]) -> None:
    while True:
        into.append(usage(pid).rss_mb)
        await asyncio.sleep(0.2)


async def fuzz_tls(port: int, rng: random.Random, count: int, pid: int, cases: list[TlsCase]) -> int:
    """`count` sockets in all, a quarter per case; the held ones at once, waiting up to 60 s each for
    the server to close them. Appends each case's figures to `cases`."""
    n = max(1, count // len(TLS_CASES))
    for name in TLS_CASES:
        before = usage(pid)
        case = TlsCase(name, sockets=n, rss_before=before.rss_mb, fds_before=before.fds)
        peak = [case.rss_before]

        sampler = asyncio.create_task(_sample_rss(pid, peak))
        source = [TLS_ADDRESSES[i % len(TLS_ADDRESSES)] for i in range(n)]
        if name == "closed mid-handshake":
            done: list[bool | None] = list(
                await asyncio.gather(*(_cut_handshake(port, source[i], rng) for i in range(n)))
            )
            case.probes = await _tls_probes(port)
        else:
            first = {
                "half handshake": lambda: b"\x16",
                "idle": lambda: b"",
                "garbage after 0x16": lambda: _garbage(rng),
            }
            held = [asyncio.create_task(_held(port, source[i], first[name](), 60.0)) for i in range(n)]
            await asyncio.sleep(1.0)  # every socket open and sent; then the probes meet what they hold
            case.probes = await _tls_probes(port)
            done = list(await asyncio.gather(*held))
        case.closed_by_server = sum(d is True for d in done) if name != "closed mid-handshake" else 0
        case.not_connected = sum(d is None for d in done) if name != "closed mid-handshake" else 0
        await asyncio.sleep(1.0)
        sampler.cancel()
        after = usage(pid)
        case.rss_after, case.fds_after = after.rss_mb, after.fds
        case.rss_peak = max(peak + [case.rss_after])
        cases.append(case)
    return n * len(TLS_CASES)


def print_tls(cases: list[TlsCase]) -> None:
    print(
        "\n| TLS case | sockets | closed by the server | did not connect | probes in (wss+ws) "
        "| server RSS MB before / peak / after | server fds before / after |"
    )
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    for c in cases:
        closed = "- | -" if c.name == "closed mid-handshake" else f"{c.closed_by_server} | {c.not_connected}"
        print(
            f"| {c.name} | {c.sockets} | {closed} | {c.probes} | "
            f"{c.rss_before:.0f} / {c.rss_peak:.0f} / {c.rss_after:.0f} | {c.fds_before} / {c.fds_after} |"
        )


# --- the run -------------------------------------------------------------------------------------


def _rss_peak_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def _open_sessions(http: str) -> float:
    with urllib.request.urlopen(http + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^asr_sessions_open\{[^}]*\} (\S+)$", text, re.M))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="folder with SenseVoiceSmall/ and campplus/")
    ap.add_argument("--count", type=int, default=2000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="xiaozhi-text,xiaozhi-binary,funasr,http,corpus,tls")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO_DIR)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    work = Path(args.out or ROOT / "build" / "fuzz" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    ports = {"xiaozhi": free_port(), "http": free_port(), "funasr": free_port()}
    env = server_env(args.models.resolve(), ports, [], work / "voiceprints.sqlite")
    env.update(
        {
            "ASR_SERVER__FUNASR__ENABLED": "true",
            "ASR_SERVER__FUNASR__HOST": "127.0.0.1",
            "ASR_SERVER__FUNASR__PORT": str(ports["funasr"]),
            "ASR_SERVER__FUNASR__SELF_SIGNED_CERT": str(work / "funasr-selfsigned.pem"),
            "ASR_SERVER__LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
    )
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asr_server", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    http = f"http://127.0.0.1:{ports['http']}"
    rows = []
    tls_cases: list[TlsCase] = []
    try:
        wait_ready(http, proc)
        clip = next(p for p in sorted(args.audio.iterdir()) if p.suffix in (".wav", ".flac"))
        packets = list(load_clip(clip).packets)[:50]
        x, sr = sf.read(clip, dtype="int16")
        pcm = np.asarray(x if x.ndim == 1 else x[:, 0]).tobytes()
        device_url = f"ws://127.0.0.1:{ports['xiaozhi']}/xiaozhi/v1/"
        targets: dict[str, Callable[[random.Random], Any]] = {
            "xiaozhi-text": lambda rng: fuzz_xiaozhi_text(device_url, rng, args.count),
            "xiaozhi-binary": lambda rng: fuzz_xiaozhi_binary(device_url, rng, args.count, packets),
            "funasr": lambda rng: fuzz_funasr(f"ws://127.0.0.1:{ports['funasr']}/", rng, args.count, pcm),
            "http": lambda rng: fuzz_http(http, rng, args.count),
            "corpus": lambda rng: fuzz_corpus(http, rng, args.count),
            "tls": lambda rng: fuzz_tls(ports["funasr"], rng, args.count, proc.pid, tls_cases),
        }
        for name in args.targets.split(","):
            before = log_path.read_text(errors="replace").count("Traceback")
            t0 = time.perf_counter()
            sent = asyncio.run(targets[name](random.Random(f"{args.seed}-{name}")))
            wall = time.perf_counter() - t0
            time.sleep(1.5)  # let vanished clients' sessions close
            alive = proc.poll() is None
            tracebacks = log_path.read_text(errors="replace").count("Traceback") - before
            left = _open_sessions(http) if alive else float("nan")
            rows.append((name, sent, alive, tracebacks, left, _rss_peak_mb(proc.pid) if alive else float("nan"), wall))
    finally:
        stop_server(proc)
        log.close()
    load = os.getloadavg()
    print(f"machine: {machine()}; load average before: {load[0]:.2f}; seed {args.seed}; {datetime.now(UTC):%Y-%m-%d}")
    print("| parser | inputs | server alive | tracebacks | sessions left | peak RSS MB | s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, sent, alive, tb, left, rss, wall in rows:
        print(f"| {name} | {sent} | {'yes' if alive else 'NO'} | {tb} | {left:.0f} | {rss:.0f} | {wall:.0f} |")
    if tls_cases:
        print_tls(tls_cases)
    print(f"\nserver log: {log_path}")
    return 0 if all(r[2] and r[3] == 0 and r[4] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
