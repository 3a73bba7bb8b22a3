"""One FunASR client connection: configuration, audio, results, in the order the protocol needs
(the protocol itself: `wire`).

Offline requests are held whole (`OfflineAudio`) and recognised as a recording. Online and 2pass
run the same `Turn` (core/turn.py) as a device, with its speculation, promotion and partials;
this module translates: each partial into the delta the client appends, and each final before
anything the client sent after it. What becomes of a final is `core.finals`'.

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

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ...audio.resample import PcmResampler
from ...audio.segmenter import Event, SpeechStarted, Utterance
from ...constants import FUNASR, SAMPLE_RATE, VAD_WINDOW, VAD_WINDOW_MS
from ...core.finals import Finals
from ...core.recording import dominant, join_texts, recognize_recording
from ...core.turn import Ended, Turn
from ...errors import EngineBusy, EngineFailed, FunAsrProtocolError, PcmFormatError
from ...types import Hotword, Recognition
from ..sending import close_reason, send_within
from .context import FunAsrContext
from .offline import OfflineAudio
from .wire import (
    Appended,
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
    tagged,
    timestamps,
)

log = logging.getLogger(__name__)

PROTOCOL = FUNASR


class FunAsrSession:
    """One client connection: configuration, audio, results, in the order the protocol needs."""

    def __init__(self, ctx: FunAsrContext, ws: ServerConnection) -> None:
        self.config = ctx.config
        self.ws = ws
        self.pipeline = ctx.pipeline
        self.metrics = ctx.metrics
        self.session_id = f"funasr-{uuid.uuid4().hex[:12]}"
        publish = ctx.bus.publish if ctx.bus is not None else None
        self.finals = Finals(PROTOCOL, self.session_id, self.metrics, publish, ctx.archive)
        self.request: RequestConfig | None = None
        self._offline = OfflineAudio(ctx)
        self._resampler: PcmResampler | None = None
        self._turn: Turn | None = None  # online/2pass: the request's stream and its recognitions
        self._said = PartialText()  # ... what the partials of its utterance in progress sent
        self._online = Appended()  # `online` texts as the client concatenates them
        self._2pass = Appended()  # 2pass finals, likewise
        # What the console's live view shows (`view`).
        self.opened_at = time.time()
        self.frames = 0

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
            self._offline.release()
            self._end_stream()

    async def _on_text(self, text: str) -> None:
        msg = parse_message(text)
        current = self.request
        streamed = self._turn is not None and self._turn.stream.windows_fed > 0
        new = next_config(current, msg, bool(self._offline) or streamed)
        if new.restarts(current):
            self._resampler = PcmResampler(new.audio_fs)
            self._end_stream()
        if new.hotwords != (current.hotwords if current is not None else ()):
            log.info("%s: %d hotwords from the client: %s", self.session_id, len(new.hotwords), _shown(new.hotwords))
        self.request = new
        self.finals.client_id = new.wav_name
        if "is_speaking" in msg and not boolean(msg, "is_speaking"):
            await self._finish(ack="is_end" in msg and boolean(msg, "is_end"))

    async def _on_audio(self, data: bytes) -> None:
        req = self.request
        if req is None:
            raise FunAsrProtocolError(CloseCode.POLICY_VIOLATION, "send the JSON configuration message before audio")
        if not data:
            return
        self.frames += 1
        if req.mode == "offline" and not req.is_pcm:
            self._offline.add_file(data)
            return
        assert self._resampler is not None
        try:
            pcm = self._resampler.push(data)
        except PcmFormatError as e:
            raise FunAsrProtocolError(CloseCode.INVALID_DATA, str(e)) from None
        if req.mode == "offline":
            self._offline.add_pcm(pcm)
        else:
            await self._stream_audio(req, pcm)

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

    def _texts(self, text: str, rec: Recognition | None, appended: bool = False) -> tuple[str, str | None]:
        """A final's `text` as FunASR sends it (tags first, `funasr.text_tags`), and its `clean_text`.
        `appended`: clients append it to the finals before (2pass: `text_print_2pass_offline += text`)."""
        if self.config.text_tags:
            return tagged(text, rec), text
        return (self._2pass.next(text) if appended else text), None

    # --- offline -----------------------------------------------------------------------

    async def _finish_offline(self, req: RequestConfig) -> None:
        t0 = time.perf_counter()
        assert self._resampler is not None
        audio = await self._offline.take(req.wav_format, self._resampler)
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
        self.finals.add_recording(segments, audio)

    # --- online / 2pass ----------------------------------------------------------------

    async def _stream_audio(self, req: RequestConfig, pcm: np.ndarray) -> None:
        if self._turn is None:
            self._turn = Turn(
                self.pipeline,
                self.session_id,
                on_partial=self._partial,
                partial_interval_ms=self.config.partial_interval_ms,
            )
        turn = self._turn
        turn.language, turn.itn, turn.hotwords = req.language, req.itn, req.hotwords
        for event in await self.pipeline.feed(turn.stream, pcm):
            await self._on_event(req, turn, event, end_of_stream=False)
        turn.start_partial()

    async def _on_event(self, req: RequestConfig, turn: Turn, event: Event, end_of_stream: bool) -> None:
        """A segmenter event: the turn's (speculation, partials, recognition), then the protocol's
        (the final, which the client gets before anything said after it)."""
        ended = turn.on_event(event)
        if isinstance(event, SpeechStarted):
            self._said = PartialText()
        elif ended is not None:
            await self._final(req, ended, end_of_stream)

    async def _partial(self, utterance_id: int, text: str) -> None:
        """The turn's text so far of the utterance in progress: its newly agreed part, as a delta."""
        req = self.request
        assert req is not None
        first = not self._said.sent
        new = self._said.advance(text)
        if new is None:
            return
        online = req.mode == "online"
        text = self._online.next(new, spaced=first) if online else new
        message = Partial(
            "online" if online else "2pass-online", req.wav_name, text, 0 if first else 1, utterance_id - 1
        )
        with contextlib.suppress(ConnectionClosed):
            await self._send(message)

    async def _final(self, req: RequestConfig, ended: Ended, end_of_stream: bool) -> None:
        t0 = time.perf_counter()
        rec = await self._recognize(ended.recognition())
        event = ended.utterance
        assert event is not None
        text = "" if rec.is_empty else rec.transcript.text.strip()
        start_ms = int(event.start_sample // VAD_WINDOW * VAD_WINDOW_MS)
        end_ms = start_ms + int(len(event.audio) * 1000 / SAMPLE_RATE)
        two_pass = req.mode == "2pass"
        said = self._said.sent
        text, clean = (
            self._texts(text, rec, appended=True)
            if two_pass
            else (self._online.next(delta(said, text), spaced=not said), None)
        )
        message = Final(
            "2pass-offline" if two_pass else "online",
            req.wav_name,
            text,
            end_of_stream,
            clean,
            slice_type=2,
            index=event.utterance_id - 1,
            start_time=start_ms,
            end_time=end_ms,
            **result_fields(rec),
            **(timestamps(list(rec.transcript.words), start_ms, end_ms) if two_pass else {}),
        )
        await self._send(message)
        self.metrics.reply_latency.labels(PROTOCOL).observe(time.perf_counter() - t0)
        self.finals.add(rec, pcm=event.audio)

    async def _finish_stream(self, req: RequestConfig) -> None:
        turn = self._turn
        if turn is not None:
            assert self._resampler is not None
            tail = self._resampler.push(b"", last=True)
            if len(tail):
                await self._stream_audio(req, tail)
            last = turn.stream.flush()
            if isinstance(last, Utterance):
                await self._on_event(req, turn, last, end_of_stream=True)
                self._restart_stream(req)
                return
        mode = "2pass-offline" if req.mode == "2pass" else "online"
        await self._send(Final(mode, req.wav_name, "", True, **result_fields(None)))
        self._restart_stream(req)

    def _restart_stream(self, req: RequestConfig) -> None:
        self._end_stream()
        self._resampler = PcmResampler(req.audio_fs)

    def _end_stream(self) -> None:
        if self._turn is not None:
            self._turn.reset()  # its speculation and partial, if still in flight
        self._turn = None


def _shown(hotwords: tuple[Hotword, ...]) -> str:
    """The first few hotwords for a log line."""
    words = ", ".join(f"{h.text}:{h.weight:g}" if h.weight is not None else h.text for h in hotwords[:5])
    return words + (f" (+{len(hotwords) - 5})" if len(hotwords) > 5 else "")
