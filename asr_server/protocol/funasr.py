"""FunASR's runtime WebSocket protocol, served by this server's engines.

The wire format is FunASR's `runtime/docs/websocket_protocol.md`: the client sends a JSON
configuration (`mode` offline / online / 2pass, `wav_name`, `is_speaking`, `itn`, `audio_fs`,
`wav_format`, `hotwords`, `chunk_size`...), then binary audio (PCM16 little-endian mono at
`audio_fs`, in one message or many; offline mode also takes a whole file when `wav_format` is
not `pcm`), then `{"is_speaking": false}`. Results are JSON text messages:
`{"mode", "wav_name", "text", "is_final", ...}`.

- offline: one message per request, after `is_speaking: false`, `mode: "offline"`.
- 2pass: while audio arrives, `2pass-online` partials (re-decoding the utterance so far every
  `funasr.partial_interval_ms`); at each VAD endpoint a `2pass-offline` message with the
  utterance's text. `2pass-online` text is a delta that extends the previous partials of the
  same utterance (FunASR clients concatenate it); `2pass-offline` text replaces them.
- online: the same partial deltas as `online`, and the rest of the utterance's text at its end.

`is_final` is true on exactly one message per request: the one that answers
`is_speaking: false`, as FunASR's C++ runtime does (xiaozhi-esp32-server's `FunASRServer`
provider reads until it). Besides FunASR's fields each final carries SenseVoice's `language`,
`emotion`, `event` and the speaker as FunASR's Python server names it (`spk_name`, `spk_score`).

Protocol errors close the socket with a code and a reason: 1007 malformed or ill-typed JSON and
PCM with an odd byte count, 1008 audio before the configuration, 1003 non-PCM audio in a
streaming mode, 1009 a message or request over the limits, 1011 an engine failure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import time
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from asr_server.audio.io import AudioDecodeError, PcmFormatError, PcmResampler, decode_audio
from asr_server.audio.segmenter import (Dropped, Segmenter, SpeechResumed, SpeechStarted, Speculate,
                                        Utterance)
from asr_server.audio.vad import SAMPLE_RATE, WINDOW, VadStream
from asr_server.auth import ApiKeys, bearer_token
from asr_server.config import Config, ConfigError, FunAsrConfig
from asr_server.events import EventBus, TranscriptEvent
from asr_server.metrics import Metrics
from asr_server.pipeline import Pipeline
from asr_server.recording import dominant, join_texts, recognize_recording
from asr_server.results import Recognition

log = logging.getLogger(__name__)

PROTOCOL = "funasr"
MODES = ("offline", "online", "2pass")
_LANGUAGES = ("auto", "zh", "en", "yue", "ja", "ko", "nospeech")
_WINDOW_MS = WINDOW * 1000 / SAMPLE_RATE

CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011


class FunAsrProtocolError(Exception):
    """A client broke the protocol; `code` is the WebSocket close code that says how."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RequestConfig:
    """The client's configuration message(s), validated. Later messages update earlier ones."""

    mode: str = "2pass"
    wav_name: str = "microphone"
    wav_format: str = "pcm"
    audio_fs: int = SAMPLE_RATE
    itn: bool = True
    language: str | None = None  # `svs_lang` (FunASR's name for SenseVoice's language), None = auto
    chunk_size: tuple[int, ...] = (5, 10, 5)
    chunk_interval: int = 10
    hotwords: str | None = None  # accepted; SenseVoice has no hotword biasing

    @property
    def is_pcm(self) -> bool:
        return self.wav_format.lower() in ("pcm", "")

    def update(self, msg: dict[str, Any]) -> "RequestConfig":
        """A new configuration with the keys of `msg` applied; `FunAsrProtocolError` on a bad value."""
        changes: dict[str, Any] = {}
        if "mode" in msg:
            if msg["mode"] not in MODES:
                raise FunAsrProtocolError(CLOSE_INVALID,
                                          f"unsupported mode {msg['mode']!r}; use offline, online or 2pass")
            changes["mode"] = msg["mode"]
        if "wav_name" in msg:
            changes["wav_name"] = _string(msg, "wav_name")[:256]
        if "wav_format" in msg:
            changes["wav_format"] = _string(msg, "wav_format")
        if "audio_fs" in msg:
            fs = _integer(msg, "audio_fs")
            if not 4000 <= fs <= 192000:
                raise FunAsrProtocolError(CLOSE_INVALID, f"audio_fs {fs} is outside 4000..192000")
            changes["audio_fs"] = fs
        for key in ("itn", "svs_itn"):
            if key in msg:
                changes["itn"] = _boolean(msg, key)
        if "svs_lang" in msg:
            lang = _string(msg, "svs_lang").lower()
            if lang not in _LANGUAGES:
                raise FunAsrProtocolError(CLOSE_INVALID, f"svs_lang {lang!r} is not one of {', '.join(_LANGUAGES)}")
            changes["language"] = None if lang == "auto" else lang
        if "chunk_size" in msg:
            changes["chunk_size"] = _chunk_size(msg["chunk_size"])
        if "chunk_interval" in msg:
            changes["chunk_interval"] = _integer(msg, "chunk_interval")
        if "hotwords" in msg:
            hw = msg["hotwords"]
            changes["hotwords"] = hw if isinstance(hw, str) else json.dumps(hw, ensure_ascii=False)
        return replace(self, **changes) if changes else self


def _bad_type(key: str, want: str, value: Any) -> FunAsrProtocolError:
    return FunAsrProtocolError(CLOSE_INVALID, f"config key {key!r} must be {want}, got {json.dumps(value)[:40]}")


def _string(msg: dict, key: str) -> str:
    v = msg[key]
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise _bad_type(key, "a string", v)


def _integer(msg: dict, key: str) -> int:
    v = msg[key]
    if isinstance(v, bool):
        raise _bad_type(key, "an integer", v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    raise _bad_type(key, "an integer", v)


def _boolean(msg: dict, key: str) -> bool:
    v = msg[key]
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise _bad_type(key, "true or false", v)


def _chunk_size(v: Any) -> tuple[int, ...]:
    items = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v
    try:
        if not isinstance(items, list) or len(items) != 3 or any(isinstance(x, bool) for x in items):
            raise ValueError
        return tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise _bad_type("chunk_size", "three integers such as [5, 10, 5]", v) from None


def parse_message(text: str) -> dict[str, Any]:
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise FunAsrProtocolError(CLOSE_INVALID, f"malformed JSON config: {e.msg} at char {e.pos}") from None
    if not isinstance(msg, dict):
        raise FunAsrProtocolError(CLOSE_INVALID, "the JSON config must be an object")
    if "is_speaking" in msg and not isinstance(msg["is_speaking"], bool):
        _boolean(msg, "is_speaking")
    return msg


def _stable_prefix(text: str) -> str:
    """A partial's text without its last unit (word or character), which the next decode may still change."""
    text = text.rstrip()
    if not text:
        return ""
    if text[-1].isascii():
        cut = text.rfind(" ")
        return text[:cut + 1] if cut >= 0 else ""
    return text[:-1]


def _delta(sent: str, text: str) -> str:
    """What extends `sent` to `text`; when the decode revised sent text, what follows the common part."""
    if text.startswith(sent):
        return text[len(sent):]
    common = 0
    for a, b in zip(sent, text):
        if a != b:
            break
        common += 1
    return text[common:]


def _spawn(coro) -> asyncio.Task:
    """A background task whose failure is logged by its awaiter or, if nobody awaits it, dropped quietly."""
    task = asyncio.create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _result_fields(rec: Recognition | None) -> dict[str, Any]:
    t = rec.transcript if rec is not None else None
    speaker = rec.speaker if rec is not None else None
    return {
        "language": t.language if t else None, "emotion": t.emotion if t else None, "event": t.event if t else None,
        "spk_name": speaker.name if speaker else "unknown", "spk_score": round(speaker.score, 4) if speaker else 0.0,
    }


@dataclass(slots=True)
class _Utterance:
    """A streaming utterance in progress: its audio so far and the partial text already sent."""

    index: int
    start_chunk: int
    sent: str = ""
    partials: int = 0
    last_partial_chunk: int = 0
    partial_task: asyncio.Task | None = None
    speculation: asyncio.Task | None = None
    done: bool = False


@dataclass(slots=True)
class _Stream:
    """Per-request streaming state (online/2pass): VAD, segmenter, the utterance in progress."""

    segmenter: Segmenter
    vad: VadStream = field(default_factory=VadStream)
    utterance: _Utterance | None = None
    next_index: int = 0


class FunAsrConnection:
    """One client connection: configuration, audio, results, in the order the protocol needs."""

    _ids = itertools.count(1)

    def __init__(self, server: "FunAsrServer", ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.pipeline = server.pipeline
        self.metrics = server.metrics
        self.session_id = f"funasr-{next(self._ids)}"
        self.request: RequestConfig | None = None
        self._offline_pcm: list[np.ndarray] = []
        self._offline_samples = 0
        self._offline_bytes: list[bytes] = []
        self._offline_nbytes = 0
        self._resampler: PcmResampler | None = None
        self._stream: _Stream | None = None

    # --- the message loop --------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.server.config.funasr
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.recv(), cfg.idle_timeout_s)
                except asyncio.TimeoutError:
                    await self.ws.close(1000, f"idle for {cfg.idle_timeout_s:g} s")
                    return
                if isinstance(message, str):
                    await self._on_text(message)
                else:
                    await self._on_audio(message)
        except FunAsrProtocolError as e:
            self.metrics.errors.labels("funasr_protocol").inc()
            log.info("%s: closing %d: %s", self.session_id, e.code, e.reason)
            await self.ws.close(e.code, e.reason[:120])
        except ConnectionClosed:
            pass
        finally:
            self._cancel_stream_tasks()

    async def _on_text(self, text: str) -> None:
        msg = parse_message(text)
        current = self.request or RequestConfig()
        new = current.update(msg)
        if self.request is not None and new.mode != self.request.mode and self._has_audio():
            raise FunAsrProtocolError(CLOSE_POLICY, "mode cannot change while a request's audio is being sent")
        if new.mode != "offline" and not new.is_pcm:
            raise FunAsrProtocolError(CLOSE_UNSUPPORTED, f"{new.mode} mode takes raw PCM only; "
                                                         f"wav_format {new.wav_format!r} needs mode offline")
        if self.request is None or new.audio_fs != self.request.audio_fs or new.mode != self.request.mode:
            if self._has_audio():
                raise FunAsrProtocolError(CLOSE_POLICY, "audio_fs cannot change while a request's audio is being sent")
            self._resampler = PcmResampler(new.audio_fs)
            self._stream = None
        if new.hotwords and new.hotwords != current.hotwords:
            log.debug("%s: hotwords ignored (SenseVoice has no hotword biasing)", self.session_id)
        self.request = new
        if "is_speaking" in msg and not _boolean(msg, "is_speaking"):
            await self._finish(ack="is_end" in msg and _boolean(msg, "is_end"))

    def _has_audio(self) -> bool:
        return bool(self._offline_pcm or self._offline_bytes or
                    (self._stream is not None and self._stream.segmenter.windows_fed > 0))

    async def _on_audio(self, data: bytes) -> None:
        req = self.request
        if req is None:
            raise FunAsrProtocolError(CLOSE_POLICY, "send the JSON configuration message before audio")
        if not data:
            return
        if req.mode == "offline" and not req.is_pcm:
            self._offline_nbytes += len(data)
            if self._offline_nbytes > self.server.config.funasr.max_message_bytes:
                raise FunAsrProtocolError(CLOSE_TOO_BIG, "audio file larger than funasr.max_message_bytes")
            self._offline_bytes.append(data)
            return
        assert self._resampler is not None
        try:
            pcm = self._resampler.push(data)
        except PcmFormatError as e:
            raise FunAsrProtocolError(CLOSE_INVALID, str(e)) from None
        if req.mode == "offline":
            self._offline_samples += len(pcm)
            if self._offline_samples > self.server.config.funasr.max_audio_s * SAMPLE_RATE:
                raise FunAsrProtocolError(CLOSE_TOO_BIG, f"audio longer than funasr.max_audio_s "
                                                         f"({self.server.config.funasr.max_audio_s:g} s)")
            self._offline_pcm.append(pcm)
        else:
            await self._stream_audio(pcm)

    async def _finish(self, ack: bool) -> None:
        """`is_speaking: false`: the request's last result, `is_final: true`."""
        req = self.request
        assert req is not None
        if req.mode == "offline":
            await self._finish_offline(req)
        else:
            await self._finish_stream(req)
        if ack:
            await self._send({"mode": req.mode, "wav_name": req.wav_name, "is_final": True, "is_end": True})

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message, ensure_ascii=False))

    async def _recognize(self, coro):
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s: recognition failed", self.session_id)
            self.metrics.errors.labels("funasr_engine").inc()
            raise FunAsrProtocolError(CLOSE_INTERNAL, f"recognition failed: {type(e).__name__}") from None

    # --- offline -----------------------------------------------------------------------

    async def _finish_offline(self, req: RequestConfig) -> None:
        t0 = time.perf_counter()
        if self._offline_bytes:
            data = b"".join(self._offline_bytes)
            try:
                audio = (await asyncio.to_thread(decode_audio, data, self.server.config.funasr.max_audio_s)).samples
            except AudioDecodeError as e:
                raise FunAsrProtocolError(CLOSE_INVALID, f"wav_format {req.wav_format!r}: {e}") from None
        else:
            assert self._resampler is not None
            tail = self._resampler.push(b"", last=True)
            audio = np.concatenate(self._offline_pcm + [tail]) if self._offline_pcm else tail
        self._offline_pcm, self._offline_bytes = [], []
        self._offline_samples = self._offline_nbytes = 0
        self._resampler = PcmResampler(req.audio_fs)
        message: dict[str, Any] = {"mode": "offline", "wav_name": req.wav_name, "text": "", "is_final": True}
        if len(audio) == 0:
            await self._send({**message, **_result_fields(None)})
            return
        segments = await self._recognize(recognize_recording(self.pipeline, audio, req.language, req.itn))
        text = join_texts([s.text for s in segments])
        first = segments[0].recognition if segments else None
        message.update(text=text, **_result_fields(first))
        if len(segments) > 1:
            message["language"] = dominant([(s.recognition.transcript.language, s.end_s - s.start_s)
                                            for s in segments])
        await self._send(message)
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self._count(segments and [s.recognition for s in segments], req)

    # --- online / 2pass ----------------------------------------------------------------

    async def _stream_audio(self, pcm: np.ndarray) -> None:
        req = self.request
        assert req is not None
        if self._stream is None:
            self._stream = _Stream(Segmenter(self.pipeline.config.vad))
        st = self._stream
        for chunk, prob in await self.pipeline.vad_chunks(st.vad, pcm):
            for event in st.segmenter.push(chunk, prob):
                await self._on_segment_event(req, st, event, end_of_stream=False)
            self._maybe_partial(req, st)

    async def _on_segment_event(self, req: RequestConfig, st: _Stream, event, end_of_stream: bool) -> None:
        utt = st.utterance
        if isinstance(event, SpeechStarted):
            st.utterance = _Utterance(st.next_index, event.start_sample // WINDOW,
                                      last_partial_chunk=st.segmenter.windows_fed)
            st.next_index += 1
        elif isinstance(event, Speculate) and utt is not None:
            utt.speculation = _spawn(self.pipeline.recognize(event.audio, req.language, req.itn))
        elif isinstance(event, SpeechResumed) and utt is not None and utt.speculation is not None:
            utt.speculation.cancel()
            utt.speculation = None
        elif isinstance(event, Dropped) and utt is not None:
            self._end_utterance(utt)
            st.utterance = None
        elif isinstance(event, Utterance) and utt is not None:
            self._end_utterance(utt, keep_speculation=event.speculated)
            await self._final(req, utt, event, end_of_stream)
            st.utterance = None

    def _end_utterance(self, utt: _Utterance, keep_speculation: bool = False) -> None:
        utt.done = True
        if utt.partial_task is not None:
            utt.partial_task.cancel()
        if utt.speculation is not None and not keep_speculation:
            utt.speculation.cancel()
            utt.speculation = None

    async def _final(self, req: RequestConfig, utt: _Utterance, event: Utterance, end_of_stream: bool) -> None:
        t0 = time.perf_counter()
        rec: Recognition | None = None
        if utt.speculation is not None:
            try:
                rec = await utt.speculation
            except asyncio.CancelledError:
                rec = None
            except Exception:
                rec = None  # retried below, and an engine failure surfaces there
        if rec is None:
            rec = await self._recognize(self.pipeline.recognize(event.audio, req.language, req.itn))
        text = "" if rec.is_empty else rec.transcript.text.strip()
        start_ms = int(utt.start_chunk * _WINDOW_MS)
        message: dict[str, Any] = {
            "mode": "2pass-offline" if req.mode == "2pass" else "online", "wav_name": req.wav_name,
            "text": text if req.mode == "2pass" else _delta(utt.sent, text), "is_final": end_of_stream,
            "slice_type": 2, "index": utt.index, "start_time": start_ms,
            "end_time": start_ms + int(len(event.audio) * 1000 / SAMPLE_RATE), **_result_fields(rec),
        }
        await self._send(message)
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self._count([rec], req)

    def _maybe_partial(self, req: RequestConfig, st: _Stream) -> None:
        utt = st.utterance
        if utt is None or utt.done or (utt.partial_task is not None and not utt.partial_task.done()):
            return
        interval = self.server.config.funasr.partial_interval_ms / _WINDOW_MS
        fed = st.segmenter.windows_fed
        if fed - utt.last_partial_chunk < interval:
            return
        utt.last_partial_chunk = fed
        audio = st.segmenter.audio_so_far()
        utt.partial_task = _spawn(self._partial(req, utt, audio))

    async def _partial(self, req: RequestConfig, utt: _Utterance, audio: np.ndarray) -> None:
        try:
            t0 = time.perf_counter()
            transcript = await self.pipeline.transcribe(audio, req.language, req.itn)
            self.metrics.stage.labels("partial").observe(time.perf_counter() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s: partial decode failed", self.session_id, exc_info=True)
            return
        if utt.done or transcript.language == "nospeech":
            return
        stable = _stable_prefix(transcript.text)
        if len(stable) <= len(utt.sent) or not stable.startswith(utt.sent):
            return  # nothing new, or the decode revised what was sent: wait for more audio
        delta, utt.sent = stable[len(utt.sent):], stable
        message = {"mode": "2pass-online" if req.mode == "2pass" else "online", "wav_name": req.wav_name,
                   "text": delta, "is_final": False, "slice_type": 0 if utt.partials == 0 else 1,
                   "index": utt.index}
        utt.partials += 1
        try:
            await self._send(message)
        except ConnectionClosed:
            pass

    async def _finish_stream(self, req: RequestConfig) -> None:
        st = self._stream
        if st is not None:
            assert self._resampler is not None
            tail = self._resampler.push(b"", last=True)
            if len(tail):
                await self._stream_audio(tail)
            last = st.segmenter.flush()
            if isinstance(last, Utterance) and st.utterance is not None:
                await self._on_segment_event(req, st, last, end_of_stream=True)
                self._reset_stream(req)
                return
            if st.utterance is not None:
                self._end_utterance(st.utterance)
        mode = "2pass-offline" if req.mode == "2pass" else "online"
        await self._send({"mode": mode, "wav_name": req.wav_name, "text": "", "is_final": True,
                          **_result_fields(None)})
        self._reset_stream(req)

    def _reset_stream(self, req: RequestConfig) -> None:
        self._cancel_stream_tasks()
        self._resampler = PcmResampler(req.audio_fs)
        self._stream = None

    def _cancel_stream_tasks(self) -> None:
        st = self._stream
        if st is not None and st.utterance is not None:
            self._end_utterance(st.utterance)

    def _count(self, recs, req: RequestConfig) -> None:
        recs = [r for r in (recs or []) if r is not None and not r.is_empty]
        if not recs:
            return
        self.metrics.utterances.labels(PROTOCOL).inc(len(recs))
        bus = self.server.bus
        if bus is None:
            return
        now = time.time()
        for rec in recs:
            t = rec.transcript
            bus.publish(TranscriptEvent(
                text=t.text.strip(), language=t.language, emotion=t.emotion, event=t.event, speaker=rec.speaker,
                device_id=None, client_id=req.wav_name, session_id=self.session_id, protocol=PROTOCOL,
                audio_ms=rec.audio_ms, latency_ms=None, asr_ms=round(rec.asr_ms, 1),
                embed_ms=round(rec.embed_ms, 1) if rec.embed_ms is not None else None, timestamp=now))


class FunAsrServer:
    """Handshake checks and one `FunAsrConnection` per client."""

    def __init__(self, config: Config, pipeline: Pipeline, metrics: Metrics, bus: EventBus | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.metrics = metrics
        self.bus = bus
        self.keys = ApiKeys.from_config(config) if config.funasr.auth else ApiKeys(frozenset(), required=False)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = self.config.funasr.path
        if path != "/" and request.path.split("?", 1)[0].rstrip("/") != path.rstrip("/"):
            return connection.respond(HTTPStatus.NOT_FOUND, f"no FunASR endpoint at {request.path}; use {path}\n")
        if not self.keys.allows(bearer_token(request.headers.get("Authorization"))):
            self.metrics.errors.labels("auth").inc()
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid key "
                                                               "(send `Authorization: Bearer <key>`)\n")
        return None

    @staticmethod
    def select_subprotocol(connection: ServerConnection, subprotocols) -> str | None:
        """FunASR clients offer `binary`; take it when offered, and clients that offer nothing too."""
        return "binary" if "binary" in subprotocols else None

    async def handle(self, ws: ServerConnection) -> None:
        self.metrics.sessions_total.labels(PROTOCOL).inc()
        self.metrics.sessions.labels(PROTOCOL).inc()
        try:
            await FunAsrConnection(self, ws).run()
        finally:
            self.metrics.sessions.labels(PROTOCOL).dec()


def tls_context(cfg: FunAsrConfig) -> ssl.SSLContext | None:
    """The server TLS context for `funasr.ssl_certfile`, or None for plain ws://."""
    if cfg.ssl_certfile is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"invalid configuration: funasr.ssl_certfile/ssl_keyfile cannot be loaded: {e}") from None
    return ctx


async def serve_funasr(config: Config, pipeline: Pipeline, metrics: Metrics, bus: EventBus | None = None) -> Server:
    """Listen on `funasr.host:funasr.port` (0 picks a free port; `server.sockets` tells which)."""
    cfg = config.funasr
    handler = FunAsrServer(config, pipeline, metrics, bus)
    return await serve(handler.handle, cfg.host, cfg.port, process_request=handler.process_request,
                       select_subprotocol=handler.select_subprotocol, max_size=cfg.max_message_bytes,
                       ping_interval=cfg.ping_interval_s, compression=None, ssl=tls_context(cfg))
