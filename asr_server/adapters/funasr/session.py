"""One FunASR client connection: configuration, audio, results, in the order the protocol needs.

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
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ...audio.resample import PcmResampler
from ...audio.segmenter import Dropped, Event, Speculate, SpeechResumed, SpeechStarted, Utterance
from ...constants import FUNASR, SAMPLE_RATE, VAD_WINDOW, VAD_WINDOW_MS
from ...core.pipeline import Recognizing
from ...core.recording import dominant, join_texts, recognize_recording
from ...core.scheduler import Priority
from ...core.streaming import SpeechStream
from ...errors import AudioDecodeError, DecoderCrashed, EngineBusy, EngineFailed, FunAsrProtocolError, PcmFormatError
from ...types import Recognition, TranscriptEvent
from ..sending import close_reason, send_within
from .wire import (
    RequestConfig,
    agreed,
    boolean,
    delta,
    parse_message,
    result_fields,
    spaced_after,
    stable_prefix,
    tagged,
    timestamps,
)

if TYPE_CHECKING:
    from .server import FunAsrServer

log = logging.getLogger(__name__)

PROTOCOL = FUNASR


def _spawn(coro) -> asyncio.Task:
    """A background task whose failure is logged by its awaiter or, if nobody awaits it, dropped quietly."""
    task = asyncio.create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


@dataclass(slots=True)
class _Utterance:
    """A streaming utterance in progress: its audio so far and the partial text already sent."""

    index: int
    start_chunk: int
    sent: str = ""
    last_stable: str = ""  # the previous partial decode's stable prefix (what the next must agree with)
    partials: int = 0
    last_partial_chunk: int = 0
    partial_task: asyncio.Task | None = None
    speculation: Recognizing | None = None
    done: bool = False


@dataclass(slots=True)
class _Stream:
    """Per-request streaming state (online/2pass): the speech stream, the utterance in progress."""

    speech: SpeechStream
    utterance: _Utterance | None = None
    next_index: int = 0


class FunAsrSession:
    """One client connection: configuration, audio, results, in the order the protocol needs."""

    def __init__(self, server: FunAsrServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.pipeline = server.pipeline
        self.metrics = server.metrics
        self.session_id = f"funasr-{uuid.uuid4().hex[:12]}"
        self.request: RequestConfig | None = None
        self._offline_pcm: list[np.ndarray] = []
        self._offline_samples = 0
        self._offline_bytes: list[bytes] = []
        self._offline_nbytes = 0
        self._held = 0  # bytes of offline audio counted in server.buffered_bytes
        self._online_tail = ""  # the last `online` text sent (a space goes between English utterances)
        self._final_tail = ""  # the last 2pass final's text, for the same reason
        self._resampler: PcmResampler | None = None
        self._stream: _Stream | None = None
        # What the console's live view shows (`view`).
        self.opened_at = time.time()
        self.frames = 0
        self.utterances = 0
        self.last_text: str | None = None
        self.last_speaker: str | None = None

    @property
    def in_speech(self) -> bool:
        return self._stream is not None and self._stream.speech.in_speech

    # --- the message loop --------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.server.config.funasr
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.recv(), cfg.idle_timeout_s)
                except TimeoutError:
                    await self.ws.close(CloseCode.NORMAL_CLOSURE, f"idle for {cfg.idle_timeout_s:g} s")
                    return
                if isinstance(message, str):
                    await self._on_text(message)
                else:
                    await self._on_audio(message)
        except FunAsrProtocolError as e:
            self.metrics.errors.labels("funasr_protocol").inc()
            log.info("%s: closing %d: %s", self.session_id, e.code, e.reason)
            await self.ws.close(e.code, close_reason(e.reason))
        except ConnectionClosed:
            pass
        finally:
            self._release()
            self._cancel_stream_tasks()

    async def _on_text(self, text: str) -> None:
        msg = parse_message(text)
        current = self.request or RequestConfig()
        new = current.update(msg)
        if self.request is not None and new.mode != self.request.mode and self._has_audio():
            raise FunAsrProtocolError(
                CloseCode.POLICY_VIOLATION, "mode cannot change while a request's audio is being sent"
            )
        if new.mode != "offline" and not new.is_pcm:
            raise FunAsrProtocolError(
                CloseCode.UNSUPPORTED_DATA,
                f"{new.mode} mode takes raw PCM only; wav_format {new.wav_format!r} needs mode offline",
            )
        if self.request is None or new.audio_fs != self.request.audio_fs or new.mode != self.request.mode:
            if self._has_audio():
                raise FunAsrProtocolError(
                    CloseCode.POLICY_VIOLATION, "audio_fs cannot change while a request's audio is being sent"
                )
            self._resampler = PcmResampler(new.audio_fs)
            self._stream = None
        if new.hotwords and new.hotwords != current.hotwords:
            log.debug("%s: hotwords ignored (SenseVoice has no hotword biasing)", self.session_id)
        self.request = new
        if "is_speaking" in msg and not boolean(msg, "is_speaking"):
            await self._finish(ack="is_end" in msg and boolean(msg, "is_end"))

    def _hold(self, nbytes: int) -> None:
        """Count offline audio held in memory against the server's budget (`funasr.max_buffered_mb`
        for all connections together): twenty connections of 600 s each would otherwise hold 700+ MB."""
        budget = self.server.config.funasr.max_buffered_mb * 2**20
        if self.server.buffered_bytes + nbytes > budget:
            self.metrics.errors.labels("funasr_buffer_full").inc()
            raise FunAsrProtocolError(
                CloseCode.TRY_AGAIN_LATER,
                f"the server holds {self.server.buffered_bytes / 2**20:.0f} MB of offline audio "
                "(funasr.max_buffered_mb); send it again later",
            )
        self.server.buffered_bytes += nbytes
        self._held += nbytes

    def _release(self) -> None:
        self.server.buffered_bytes -= self._held
        self._held = 0

    def _text_fields(self, text: str, rec: Recognition | None, appended: bool = False) -> dict[str, Any]:
        """A final's text as FunASR sends it (tags first, `funasr.text_tags`), and the clean text.
        `appended`: clients append it to the finals before (2pass: `text_print_2pass_offline += text`),
        so English after English gets a space first, as online texts do."""
        if not self.server.config.funasr.text_tags:
            if not appended:
                return {"text": text}
            spaced = spaced_after(self._final_tail, text)
            self._final_tail = text or self._final_tail
            return {"text": spaced}
        return {"text": tagged(text, rec), "clean_text": text}

    def _spaced(self, first: bool, text: str) -> str:
        """`online` texts are concatenated by clients: an English utterance after another starts with
        a space (`first`: nothing of this utterance was sent yet). Remembers what was sent last."""
        if first:
            text = spaced_after(self._online_tail, text)
        if text:
            self._online_tail = text
        return text

    def _has_audio(self) -> bool:
        return bool(
            self._offline_pcm
            or self._offline_bytes
            or (self._stream is not None and self._stream.speech.windows_fed > 0)
        )

    async def _on_audio(self, data: bytes) -> None:
        req = self.request
        if req is None:
            raise FunAsrProtocolError(CloseCode.POLICY_VIOLATION, "send the JSON configuration message before audio")
        if not data:
            return
        self.frames += 1
        if req.mode == "offline" and not req.is_pcm:
            self._offline_nbytes += len(data)
            if self._offline_nbytes > self.server.config.funasr.max_message_bytes:
                raise FunAsrProtocolError(CloseCode.MESSAGE_TOO_BIG, "audio file larger than funasr.max_message_bytes")
            self._hold(len(data))
            self._offline_bytes.append(data)
            return
        assert self._resampler is not None
        try:
            pcm = self._resampler.push(data)
        except PcmFormatError as e:
            raise FunAsrProtocolError(CloseCode.INVALID_DATA, str(e)) from None
        if req.mode == "offline":
            self._offline_samples += len(pcm)
            if self._offline_samples > self.server.config.funasr.max_audio_s * SAMPLE_RATE:
                raise FunAsrProtocolError(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"audio longer than funasr.max_audio_s ({self.server.config.funasr.max_audio_s:g} s)",
                )
            self._hold(pcm.nbytes)
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
        timeout = self.server.config.funasr.send_timeout_s
        if not await send_within(self.ws, json.dumps(message, ensure_ascii=False), timeout, self.session_id):
            raise ConnectionClosed(None, None)  # gone or not reading: end the session

    async def _recognize(self, coro):
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except EngineBusy as e:
            self.metrics.errors.labels("busy").inc()
            log.warning("%s: request refused: %s", self.session_id, e)
            raise FunAsrProtocolError(CloseCode.TRY_AGAIN_LATER, str(e)) from None
        except EngineFailed as e:  # a remote replica died or timed out: the client may retry
            self.metrics.errors.labels("engine_failed").inc()
            log.warning("%s: recognition failed: %s", self.session_id, e)
            raise FunAsrProtocolError(CloseCode.TRY_AGAIN_LATER, str(e)) from None
        except Exception as e:
            log.exception("%s: recognition failed", self.session_id)
            self.metrics.errors.labels("funasr_engine").inc()
            raise FunAsrProtocolError(CloseCode.INTERNAL_ERROR, f"recognition failed: {type(e).__name__}") from None

    # --- offline -----------------------------------------------------------------------

    async def _finish_offline(self, req: RequestConfig) -> None:
        t0 = time.perf_counter()
        if self._offline_bytes:
            data = b"".join(self._offline_bytes)
            try:
                audio = (await self.server.decoder.decode(data, self.server.config.funasr.max_audio_s)).samples
            except AudioDecodeError as e:  # DecoderCrashed included: a decoder process died on it
                if isinstance(e, DecoderCrashed):
                    self.metrics.errors.labels("decoder_crashed").inc()
                raise FunAsrProtocolError(CloseCode.INVALID_DATA, f"wav_format {req.wav_format!r}: {e}") from None
        else:
            assert self._resampler is not None
            tail = self._resampler.push(b"", last=True)
            audio = np.concatenate([*self._offline_pcm, tail]) if self._offline_pcm else tail
        self._offline_pcm, self._offline_bytes = [], []
        self._offline_samples = self._offline_nbytes = 0
        self._release()
        self._resampler = PcmResampler(req.audio_fs)
        message: dict[str, Any] = {"mode": "offline", "wav_name": req.wav_name, "text": "", "is_final": True}
        if len(audio) == 0:
            await self._send({**message, **result_fields(None)})
            return
        segments = await self._recognize(recognize_recording(self.pipeline, audio, req.language, req.itn))
        text = join_texts([s.text for s in segments])
        first = segments[0].recognition if segments else None
        message.update(self._text_fields(text, first), **result_fields(first))
        message.update(timestamps([w for s in segments for w in s.words()]))
        if len(segments) > 1:
            message["language"] = dominant([(s.recognition.transcript.language, s.end_s - s.start_s) for s in segments])
        await self._send(message)
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self._count(segments and [s.recognition for s in segments], req)

    # --- online / 2pass ----------------------------------------------------------------

    async def _stream_audio(self, pcm: np.ndarray) -> None:
        req = self.request
        assert req is not None
        if self._stream is None:
            self._stream = _Stream(self.pipeline.open_stream())
        st = self._stream
        for chunk, prob in await self.pipeline.probabilities(st.speech, pcm):
            for event in st.speech.push(chunk, prob):
                await self._on_segment_event(req, st, event, end_of_stream=False)
            self._maybe_partial(req, st)

    async def _on_segment_event(self, req: RequestConfig, st: _Stream, event: Event, end_of_stream: bool) -> None:
        utt = st.utterance
        if isinstance(event, SpeechStarted):
            st.utterance = _Utterance(
                st.next_index, event.start_sample // VAD_WINDOW, last_partial_chunk=st.speech.windows_fed
            )
            st.next_index += 1
        elif isinstance(event, Speculate) and utt is not None and self.server.config.asr.speculative:
            if utt.speculation is not None:
                utt.speculation.cancel()
            utt.speculation = self.pipeline.start_recognition(
                event.audio, req.language, req.itn, speculative=True, endpointed=True
            )
            utt.speculation.task.add_done_callback(lambda t: t.cancelled() or t.exception())
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
            utt.speculation.promote()
            try:
                rec = await utt.speculation.task
            except asyncio.CancelledError:
                rec = None
            except Exception:
                rec = None  # retried below, and an engine failure surfaces there
        if rec is None:
            rec = await self._recognize(
                self.pipeline.recognize(event.audio, req.language, req.itn, endpointed=event.reason == "silence")
            )
        text = "" if rec.is_empty else rec.transcript.text.strip()
        start_ms = int(utt.start_chunk * VAD_WINDOW_MS)
        end_ms = start_ms + int(len(event.audio) * 1000 / SAMPLE_RATE)
        online_text = "" if req.mode == "2pass" else self._spaced(not utt.sent, delta(utt.sent, text))
        message: dict[str, Any] = {
            "mode": "2pass-offline" if req.mode == "2pass" else "online",
            "wav_name": req.wav_name,
            **(self._text_fields(text, rec, appended=True) if req.mode == "2pass" else {"text": online_text}),
            "is_final": end_of_stream,
            "slice_type": 2,
            "index": utt.index,
            "start_time": start_ms,
            "end_time": end_ms,
            **result_fields(rec),
            **(timestamps(list(rec.transcript.words), start_ms, end_ms) if req.mode == "2pass" else {}),
        }
        await self._send(message)
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self._count([rec], req)

    def _maybe_partial(self, req: RequestConfig, st: _Stream) -> None:
        utt = st.utterance
        if utt is None or utt.done or (utt.partial_task is not None and not utt.partial_task.done()):
            return
        interval = self.server.config.funasr.partial_interval_ms / VAD_WINDOW_MS
        fed = st.speech.windows_fed
        if fed - utt.last_partial_chunk < interval:
            return
        utt.last_partial_chunk = fed
        audio = st.speech.audio_so_far()
        utt.partial_task = _spawn(self._partial(req, utt, audio))

    async def _partial(self, req: RequestConfig, utt: _Utterance, audio: np.ndarray) -> None:
        try:
            t0 = time.perf_counter()
            transcript = await self.pipeline.transcribe(audio, req.language, req.itn, Priority.PARTIAL)
            self.metrics.stage.labels("partial").observe(time.perf_counter() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s: partial decode failed", self.session_id, exc_info=True)
            return
        if utt.done or transcript.language == "nospeech":
            return
        stable = stable_prefix(transcript.text)
        previous, utt.last_stable = utt.last_stable, stable
        stable = agreed(previous, stable)  # committed only once two decodes agree on it
        if len(stable) <= len(utt.sent) or not stable.startswith(utt.sent):
            return  # nothing new, or the decode revised what was sent: wait for more audio
        first = not utt.sent
        delta, utt.sent = stable[len(utt.sent) :], stable
        message = {
            "mode": "2pass-online" if req.mode == "2pass" else "online",
            "wav_name": req.wav_name,
            "text": self._spaced(first, delta) if req.mode == "online" else delta,
            "is_final": False,
            "slice_type": 0 if utt.partials == 0 else 1,
            "index": utt.index,
        }
        utt.partials += 1
        with contextlib.suppress(ConnectionClosed):
            await self._send(message)

    async def _finish_stream(self, req: RequestConfig) -> None:
        st = self._stream
        if st is not None:
            assert self._resampler is not None
            tail = self._resampler.push(b"", last=True)
            if len(tail):
                await self._stream_audio(tail)
            last = st.speech.flush()
            if isinstance(last, Utterance) and st.utterance is not None:
                await self._on_segment_event(req, st, last, end_of_stream=True)
                self._reset_stream(req)
                return
            if st.utterance is not None:
                self._end_utterance(st.utterance)
        mode = "2pass-offline" if req.mode == "2pass" else "online"
        await self._send({"mode": mode, "wav_name": req.wav_name, "text": "", "is_final": True, **result_fields(None)})
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
        self.utterances += len(recs)
        self.last_text = recs[-1].transcript.text
        self.last_speaker = recs[-1].speaker.name if recs[-1].speaker is not None else None
        self.metrics.utterances.labels(PROTOCOL).inc(len(recs))
        bus = self.server.bus
        if bus is None:
            return
        now = time.time()
        for rec in recs:
            bus.publish(
                TranscriptEvent.of(
                    rec, protocol=PROTOCOL, session_id=self.session_id, client_id=req.wav_name, timestamp=now
                )
            )
