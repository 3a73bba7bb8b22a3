"""One FunASR client connection: configuration, audio, results, in the order the protocol needs
(the protocol itself: `wire`).

Offline requests are held whole (against the server's `BufferBudget`) and recognised as a
recording. Online and 2pass run the same `Turn` (core/turn.py) as a device, with its
speculation and promotion; this module adds what FunASR's protocol adds: the partial deltas of
the utterance in progress, and each final before anything the client sent after it.

Protocol errors close the socket with a code and a reason: 1007 malformed or ill-typed JSON and
PCM with an odd byte count, 1008 audio before the configuration, 1003 non-PCM audio in a
streaming mode, 1009 a message or request over the limits, 1011 an engine failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ...audio.resample import PcmResampler
from ...audio.segmenter import Dropped, Event, SpeechStarted, Utterance
from ...constants import FUNASR, SAMPLE_RATE, VAD_WINDOW, VAD_WINDOW_MS
from ...core.archive import UtteranceRecord, segment_audio
from ...core.recording import dominant, join_texts, recognize_recording
from ...core.scheduler import Priority
from ...core.turn import Ended, Turn
from ...errors import AudioDecodeError, DecoderCrashed, EngineBusy, EngineFailed, FunAsrProtocolError, PcmFormatError
from ...types import Hotword, Recognition, TranscriptEvent
from ..sending import close_reason, send_within
from .context import FunAsrContext
from .wire import (
    EndAck,
    Final,
    Partial,
    PartialText,
    RequestConfig,
    Result,
    boolean,
    delta,
    next_config,
    parse_message,
    result_fields,
    spaced_after,
    tagged,
    timestamps,
)

log = logging.getLogger(__name__)

PROTOCOL = FUNASR


def _spawn(coro) -> asyncio.Task:
    """A background task whose failure is logged by its awaiter or, if nobody awaits it, dropped quietly."""
    task = asyncio.create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


@dataclass(slots=True)
class _Utterance:
    """A streaming utterance in progress: its partial text so far."""

    index: int
    """Counted from 0 in the request (each request has a stream of its own, counting from 1)."""
    last_partial_chunk: int
    text: PartialText = field(default_factory=PartialText)
    partial_task: asyncio.Task | None = None
    done: bool = False


class FunAsrSession:
    """One client connection: configuration, audio, results, in the order the protocol needs."""

    def __init__(self, ctx: FunAsrContext, ws: ServerConnection) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.ws = ws
        self.pipeline = ctx.pipeline
        self.metrics = ctx.metrics
        self.session_id = f"funasr-{uuid.uuid4().hex[:12]}"
        self.request: RequestConfig | None = None
        self._offline_pcm: list[np.ndarray] = []
        self._offline_samples = 0
        self._offline_bytes: list[bytes] = []
        self._offline_nbytes = 0
        self._held = 0  # bytes of offline audio counted in the server's `BufferBudget`
        self._online_tail = ""  # the last `online` text sent (a space goes between English utterances)
        self._final_tail = ""  # the last 2pass final's text, for the same reason
        self._resampler: PcmResampler | None = None
        self._turn: Turn | None = None  # online/2pass: the request's stream and its recognitions
        self._utterance: _Utterance | None = None  # ... the one in progress
        # What the console's live view shows (`view`).
        self.opened_at = time.time()
        self.frames = 0
        self.utterances = 0
        self.last_text: str | None = None
        self.last_speaker: str | None = None

    @property
    def in_speech(self) -> bool:
        return self._turn is not None and self._turn.stream.in_speech

    # --- the message loop --------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
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
        current = self.request
        new = next_config(current, msg, self._has_audio())
        if new.restarts(current):
            self._resampler = PcmResampler(new.audio_fs)
            self._cancel_stream_tasks()
            self._turn = None
        if new.hotwords != (current.hotwords if current is not None else ()):
            log.info("%s: %d hotwords from the client: %s", self.session_id, len(new.hotwords), _shown(new.hotwords))
        self.request = new
        if "is_speaking" in msg and not boolean(msg, "is_speaking"):
            await self._finish(ack="is_end" in msg and boolean(msg, "is_end"))

    def _hold(self, nbytes: int) -> None:
        """Count offline audio held in memory against the server's `BufferBudget`."""
        if not self.ctx.buffers.take(nbytes):
            self.metrics.errors.labels("funasr_buffer_full").inc()
            raise FunAsrProtocolError(
                CloseCode.TRY_AGAIN_LATER,
                f"the server holds {self.ctx.buffers.held / 2**20:.0f} MB of offline audio "
                "(funasr.max_buffered_mb); send it again later",
            )
        self._held += nbytes

    def _release(self) -> None:
        self.ctx.buffers.give_back(self._held)
        self._held = 0

    def _texts(self, text: str, rec: Recognition | None, appended: bool = False) -> tuple[str, str | None]:
        """A final's `text` as FunASR sends it (tags first, `funasr.text_tags`), and its `clean_text`.
        `appended`: clients append it to the finals before (2pass: `text_print_2pass_offline += text`),
        so English after English gets a space first, as online texts do."""
        if self.config.text_tags:
            return tagged(text, rec), text
        if not appended:
            return text, None
        spaced = spaced_after(self._final_tail, text)
        self._final_tail = text or self._final_tail
        return spaced, None

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
            self._offline_pcm or self._offline_bytes or (self._turn is not None and self._turn.stream.windows_fed > 0)
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
            if self._offline_nbytes > self.config.max_message_bytes:
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
            if self._offline_samples > self.config.max_audio_s * SAMPLE_RATE:
                raise FunAsrProtocolError(
                    CloseCode.MESSAGE_TOO_BIG, f"audio longer than funasr.max_audio_s ({self.config.max_audio_s:g} s)"
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
            await self._send(EndAck(req.mode, req.wav_name))

    async def _send(self, message: Result) -> None:
        if not await send_within(self.ws, message.to_json(), self.config.send_timeout_s, self.session_id):
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
                audio = (await self.ctx.decoder.decode(data, self.config.max_audio_s)).samples
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
        if len(audio) == 0:
            await self._send(Final("offline", req.wav_name, "", True, **result_fields(None)))
            return
        segments = await self._recognize(
            recognize_recording(self.pipeline, audio, req.language, req.itn, hotwords=req.hotwords)
        )
        first = segments[0].recognition if segments else None
        tags = result_fields(first)
        if len(segments) > 1:
            tags["language"] = dominant([(s.recognition.transcript.language, s.end_s - s.start_s) for s in segments])
        text, clean = self._texts(join_texts([s.text for s in segments]), first)
        words = timestamps([w for s in segments for w in s.words()])
        await self._send(Final("offline", req.wav_name, text, True, clean, **tags, **words))
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self._count([(s.recognition, segment_audio(audio, s)) for s in segments], req)

    # --- online / 2pass ----------------------------------------------------------------

    async def _stream_audio(self, pcm: np.ndarray) -> None:
        req = self.request
        assert req is not None
        if self._turn is None:
            self._turn = Turn(self.pipeline, self.session_id)
        turn = self._turn
        turn.language, turn.itn, turn.hotwords = req.language, req.itn, req.hotwords
        for event in await self.pipeline.feed(turn.stream, pcm):
            await self._on_event(req, turn, event, end_of_stream=False)
        self._maybe_partial(req, turn)

    async def _on_event(self, req: RequestConfig, turn: Turn, event: Event, end_of_stream: bool) -> None:
        """A segmenter event: the turn's (speculation, recognition), then the protocol's (partials,
        the final, which the client gets before anything said after it)."""
        ended = turn.on_event(event)
        utt = self._utterance
        if isinstance(event, SpeechStarted):
            self._utterance = _Utterance(event.utterance_id - 1, turn.stream.windows_fed)
        elif isinstance(event, Dropped) and utt is not None:
            self._end_utterance(utt)
            self._utterance = None
        elif ended is not None:
            if utt is None:
                ended.cancel()
                return
            self._end_utterance(utt)
            await self._final(req, utt, ended, end_of_stream)
            self._utterance = None

    def _end_utterance(self, utt: _Utterance) -> None:
        utt.done = True
        if utt.partial_task is not None:
            utt.partial_task.cancel()

    async def _final(self, req: RequestConfig, utt: _Utterance, ended: Ended, end_of_stream: bool) -> None:
        t0 = time.perf_counter()
        rec = await self._recognize(ended.recognition())
        event = ended.utterance
        assert event is not None
        text = "" if rec.is_empty else rec.transcript.text.strip()
        start_ms = int(event.start_sample // VAD_WINDOW * VAD_WINDOW_MS)
        end_ms = start_ms + int(len(event.audio) * 1000 / SAMPLE_RATE)
        two_pass = req.mode == "2pass"
        text, clean = (
            self._texts(text, rec, appended=True)
            if two_pass
            else (self._spaced(not utt.text.sent, delta(utt.text.sent, text)), None)
        )
        message = Final(
            "2pass-offline" if two_pass else "online",
            req.wav_name,
            text,
            end_of_stream,
            clean,
            slice_type=2,
            index=utt.index,
            start_time=start_ms,
            end_time=end_ms,
            **result_fields(rec),
            **(timestamps(list(rec.transcript.words), start_ms, end_ms) if two_pass else {}),
        )
        await self._send(message)
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self._count([(rec, event.audio)], req)

    def _maybe_partial(self, req: RequestConfig, turn: Turn) -> None:
        utt = self._utterance
        if utt is None or utt.done or (utt.partial_task is not None and not utt.partial_task.done()):
            return
        interval = self.config.partial_interval_ms / VAD_WINDOW_MS
        fed = turn.stream.windows_fed
        if fed - utt.last_partial_chunk < interval:
            return
        utt.last_partial_chunk = fed
        utt.partial_task = _spawn(self._partial(req, utt, turn.stream.audio_so_far()))

    async def _partial(self, req: RequestConfig, utt: _Utterance, audio: np.ndarray) -> None:
        try:
            t0 = time.perf_counter()
            transcript = await self.pipeline.transcribe(
                audio, req.language, req.itn, Priority.PARTIAL, hotwords=req.hotwords
            )
            self.metrics.stage.labels("partial").observe(time.perf_counter() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s: partial decode failed", self.session_id, exc_info=True)
            return
        if utt.done or transcript.language == "nospeech":
            return
        first = not utt.text.sent
        new = utt.text.advance(transcript.text)
        if new is None:
            return
        online = req.mode == "online"
        text = self._spaced(first, new) if online else new
        message = Partial("online" if online else "2pass-online", req.wav_name, text, 0 if first else 1, utt.index)
        with contextlib.suppress(ConnectionClosed):
            await self._send(message)

    async def _finish_stream(self, req: RequestConfig) -> None:
        turn = self._turn
        if turn is not None:
            assert self._resampler is not None
            tail = self._resampler.push(b"", last=True)
            if len(tail):
                await self._stream_audio(tail)
            last = turn.stream.flush()
            if isinstance(last, Utterance) and self._utterance is not None:
                await self._on_event(req, turn, last, end_of_stream=True)
                self._reset_stream(req)
                return
        mode = "2pass-offline" if req.mode == "2pass" else "online"
        await self._send(Final(mode, req.wav_name, "", True, **result_fields(None)))
        self._reset_stream(req)

    def _reset_stream(self, req: RequestConfig) -> None:
        self._cancel_stream_tasks()
        self._resampler = PcmResampler(req.audio_fs)
        self._turn = None

    def _cancel_stream_tasks(self) -> None:
        if self._utterance is not None:
            self._end_utterance(self._utterance)
            self._utterance = None
        if self._turn is not None:
            self._turn.reset()  # its speculation, if one is still in flight

    def _count(self, results: list[tuple[Recognition, np.ndarray]], req: RequestConfig) -> None:
        """The request's final utterances, each with its audio: counted, published, archived."""
        results = [(r, audio) for r, audio in results if not r.is_empty]
        if not results:
            return
        recs = [r for r, _ in results]
        self.utterances += len(recs)
        self.last_text = recs[-1].transcript.text
        self.last_speaker = recs[-1].speaker.name if recs[-1].speaker is not None else None
        self.metrics.utterances.labels(PROTOCOL).inc(len(recs))
        bus, archive = self.ctx.bus, self.ctx.archive
        now = time.time()
        for rec, audio in results:
            if bus is not None:
                bus.publish(
                    TranscriptEvent.of(
                        rec, protocol=PROTOCOL, session_id=self.session_id, client_id=req.wav_name, timestamp=now
                    )
                )
            if archive is not None:
                archive.keep(
                    UtteranceRecord(
                        protocol=PROTOCOL,
                        session_id=self.session_id,
                        device_id=None,
                        recognition=rec,
                        latency_ms=None,
                        pcm=audio,
                    )
                )


def _shown(hotwords: tuple[Hotword, ...]) -> str:
    """The first few hotwords for a log line."""
    words = ", ".join(f"{h.text}:{h.weight:g}" if h.weight is not None else h.text for h in hotwords[:5])
    return words + (f" (+{len(hotwords) - 5})" if len(hotwords) > 5 else "")
