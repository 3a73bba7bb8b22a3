"""One device connection: protocol state, Opus decoder, and the turn its audio feeds.

The server feeds each message in order; the session decodes the device's frames into its `Turn`
(core/turn.py: speech stream, speculation, phrases, ordered replies) and translates what comes
back: each recognition is an `stt` to the device, or a text turn to the upstream when relayed.
Nothing here blocks the event loop: model calls are awaited on the pipeline's batchers.

Text messages wait for the audio before them (the turn's feed catches up first), so
`listen stop` still ends the utterance after its last frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ...audio.ogg_opus import PacketLog
from ...audio.opus import OpusStreamDecoder
from ...config import Config
from ...constants import SAMPLE_RATE, XIAOZHI
from ...core.archive import Archive
from ...core.finals import Finals, Publish
from ...core.live import SessionView
from ...core.pipeline import Pipeline
from ...core.turn import Heard, Turn
from ...errors import EngineBusy, EngineFailed, OpusDecodeError
from ...types import ClientInfo
from .upstream import Upstream
from .wire import Abort, AudioFrame, Error, Hello, Listen, Other, ServerMessage, Stt, Vad, parse_message, unpack_audio

log = logging.getLogger(__name__)

PROTOCOL = XIAOZHI

Send = Callable[[ServerMessage], Awaitable[None]]

#: Packets are kept this much longer than the longest utterance: its pre-roll, and the audio that
#: arrives while its end is found.
PACKETS_MARGIN_S = 5.0


class Session:
    """State of one xiaozhi connection after `hello`."""

    def __init__(
        self,
        session_id: str,
        client: ClientInfo,
        config: Config,
        pipeline: Pipeline,
        send: Send,
        publish: Publish | None = None,
        upstream: Upstream | None = None,
        vad_meter: bool = False,
        archive: Archive | None = None,
    ) -> None:
        self.session_id = session_id  # ours: the key of the server's sessions, its logs and events
        self.upstream = upstream  # relay mode: turns go to the chatbot server, its answers come back
        self.client = client
        self.config = config
        self.pipeline = pipeline
        self._send = send
        self._metrics = pipeline.metrics
        self._decoder = OpusStreamDecoder()
        archive = archive if config.archive.xiaozhi else None
        self.finals = Finals(
            PROTOCOL,
            session_id,
            self._metrics,
            publish,
            archive,
            device_id=client.device_id,
            client_id=client.client_id,
            scope=client.scope,
        )
        packets = PacketLog(config.vad.max_utterance_s + PACKETS_MARGIN_S) if archive is not None else None
        self.turn = Turn(
            pipeline,
            session_id,
            phrases=True,
            observe_delay=self._metrics.input_delay.labels(PROTOCOL).observe,
            meter=self._meter if vad_meter else None,
            on_speech=self._on_speech,
            packets=packets,
        )
        self.turn.device_id = client.device_id  # its hotword list (HTTP API) biases each utterance
        self._replier = asyncio.ensure_future(self._reply_all())
        self._barge_ins: set[asyncio.Task[None]] = set()
        self.listening = False
        self.mode = "auto"
        self._corrupt_logged = False
        self.frames = 0
        self.last_active = 0.0  # loop time of the last message (the server's idle sweep reads it)
        self.idle_closed = False
        self.shed = False  # closed by the server because the recogniser stayed behind
        self.opened_at = time.time()
        self._observe_decode = self._metrics.stage.labels("decode").observe

    @property
    def device_session_id(self) -> str:
        """The session id the device knows: the upstream's when relayed (its hello gave it)."""
        return (self.upstream.session_id if self.upstream is not None else None) or self.session_id

    async def send_error(self, message: str) -> None:
        await self._send(Error(message, self.device_session_id))

    def view(self, worker: int = 0) -> SessionView:
        """What the console's live view shows of this session."""
        return SessionView(
            session_id=self.session_id,
            protocol=PROTOCOL,
            device_id=self.client.device_id,
            client_id=self.client.client_id,
            version=self.client.protocol_version,
            mode=self.mode,
            state="idle" if not self.listening else "speech" if self.turn.in_speech else "listening",
            frames=self.frames,
            utterances=self.finals.count,
            last_text=self.finals.last_text,
            speaker=self.finals.last_speaker,
            opened_at=self.opened_at,
            remote=self.client.remote,
            worker=worker,
            upstream_session_id=self.upstream.session_id if self.upstream is not None else None,
        )

    async def _meter(self, prob: float, speech: bool) -> None:
        await self._send(Vad(prob, speech))

    def _on_speech(self) -> None:
        if self.upstream is not None and self.upstream.speaking and self.mode == "realtime":
            task = asyncio.ensure_future(self.upstream.barge_in())  # the user talks over the answer: stop it
            self._barge_ins.add(task)
            task.add_done_callback(self._barge_ins.discard)

    # --- input ------------------------------------------------------------------------------

    async def on_text(self, text: str | bytes) -> None:
        msg = parse_message(text)
        await self.turn.feed.caught_up()  # the audio before this message first (listen stop ends after it)
        if self.upstream is not None and not isinstance(msg, Hello):
            # Relayed as it came (listen, abort, mcp, goodbye...): the upstream keeps the device's state too.
            await self.upstream.send(text if isinstance(text, str) else text.decode("utf-8", "replace"))
        if isinstance(msg, Listen):
            self._on_listen(msg)
        elif isinstance(msg, Abort):
            log.info("session %s: abort (%s)", self.session_id, msg.reason or "no reason")
            self.turn.abort()
        elif isinstance(msg, Hello):
            log.debug("session %s: repeated hello ignored", self.session_id)
        elif isinstance(msg, Other):
            log.debug("session %s: %s message ignored", self.session_id, msg.type)

    async def on_binary(self, data: bytes) -> float:
        """Take one binary frame; returns the seconds of audio it held (the server's rate limit)."""
        frame = unpack_audio(data, self.client.protocol_version)
        if not isinstance(frame, AudioFrame):  # protocol v2 carries JSON in binary frames too
            await self.on_text(frame)
            return 0.0
        t0 = time.perf_counter()
        try:
            pcm = self._decoder.decode(frame.payload)
        except OpusDecodeError as e:
            self._metrics.errors.labels("opus").inc()
            if not self._corrupt_logged:
                self._corrupt_logged = True
                log.warning(
                    "session %s (device %s): %s; dropping such frames", self.session_id, self.client.device_id, e
                )
                await self.send_error(f"{e}; frame dropped")
            return 0.0
        self._observe_decode(time.perf_counter() - t0)
        self.frames += 1
        seconds = len(pcm) / SAMPLE_RATE
        spoken = self.turn.clock.note(t0, seconds)  # the latency clock starts when the speech was spoken
        if not self.listening:
            return seconds  # wake-word audio before `listen start`: decoded to keep the decoder in step, then dropped
        if self.mode == "manual":
            self._log_packet(frame.payload, len(pcm))
            await self.turn.hold(pcm)
        elif self.upstream is None or not self.upstream.speaking or self.mode != "auto":
            self._log_packet(frame.payload, len(pcm))
            await self.turn.feed.push(
                pcm, spoken
            )  # (auto mode takes no turn while the answer plays: the firmware's rule)
        return seconds

    def _log_packet(self, payload: bytes, samples: int) -> None:
        """The packet whose audio goes into the turn now, for the archive (its sample position)."""
        if self.turn.packets is not None:
            self.turn.packets.add(bytes(payload), samples)

    def input_delay(self, now: float, within_s: float = 2.0) -> float | None:
        """How late this device's live audio reaches the VAD (`LiveFeed.input_delay`)."""
        return self.turn.feed.input_delay(now, within_s)

    def unheard(self, within_s: float) -> bool:
        """Opened less than `within_s` ago and not answered yet: its user is likely still saying
        the first utterance, whose load the recogniser has not seen."""
        return not self.finals.count and not self.turn.pending and time.time() - self.opened_at < within_s

    @property
    def turn_in_flight(self) -> bool:
        """Waiting for a reply, speaking, or listening for its first: shedding it would cut its user off."""
        return bool(self.turn.pending) or self.listening and (not self.finals.count or self.turn.in_speech)

    def _on_listen(self, msg: Listen) -> None:
        if msg.state == "start":
            mode = msg.mode or self.mode
            log.info("session %s: listen start (%s)", self.session_id, mode)
            if self.listening and self.mode == "manual":
                self.turn.release()
            self.mode = mode
            self.listening = True
            self.turn.reset()
        elif msg.state == "stop":
            log.info("session %s: listen stop", self.session_id)
            if self.mode == "manual":
                self.turn.release()
            else:
                self.turn.stop()
            self.listening = False
        else:  # detect: the wake word the device heard; it recognised it itself
            log.info("session %s: wake word detected: %r", self.session_id, msg.text)

    # --- replies ------------------------------------------------------------------------------

    async def _reply_all(self) -> None:
        async for heard in self.turn.heard():
            try:
                await self._reply(heard)
            except Exception:  # one reply's failure must not silence the session's later ones
                self._metrics.errors.labels("internal").inc()
                log.exception("session %s: reply failed", self.session_id)

    async def _reply(self, heard: Heard) -> None:
        """Send one utterance's `stt` (its phrases joined), or relay it as the user's turn."""
        ended, rec = heard.ended, heard.recognition
        speech_end = ended.endpoint if ended.speech_end is None else ended.speech_end
        if rec is None:
            error = heard.error
            if isinstance(error, EngineBusy):
                self._metrics.errors.labels("busy").inc()
                self.pipeline.note_reply(None, age_ms=(time.perf_counter() - speech_end) * 1000)
                log.warning("session %s: utterance refused: %s", self.session_id, error)
                await self.send_error(f"utterance not recognised: {error}")
            elif isinstance(error, EngineFailed):  # a remote replica died or timed out: this utterance only
                self._metrics.errors.labels("engine_failed").inc()
                log.warning("session %s: utterance lost: %s", self.session_id, error)
                await self.send_error(f"utterance not recognised: {error}")
            else:
                self._metrics.errors.labels("recognition").inc()
                log.error("session %s: recognition failed: %s", self.session_id, error)
                await self.send_error("recognition failed")
            return
        if rec.is_empty:
            log.debug("session %s: empty or no-speech utterance (%d ms), no reply", self.session_id, rec.audio_ms)
            return
        now = time.perf_counter()
        latency_ms, processing_ms = (now - speech_end) * 1000, (now - ended.endpoint) * 1000
        if self.upstream is not None:
            # The upstream answers the turn and sends the device its own `stt` (one bubble, not two).
            speaker = rec.speaker.name if rec.speaker is not None and self.config.upstream.send_speaker else None
            await self.upstream.send_turn(rec.transcript, speaker, speech_end)
        else:
            await self._send(Stt.of(rec, self.session_id, latency_ms, processing_ms, ended.speculated, ended.phrases))
        self._metrics.reply_latency.labels(PROTOCOL).observe(latency_ms / 1000)
        self.pipeline.note_reply(latency_ms)
        self._metrics.processing.labels(PROTOCOL).observe(processing_ms / 1000)
        log.info(
            "session %s: stt %r (%s, %d ms audio, %.0f ms after the end of speech, %.0f after the endpoint)",
            self.session_id,
            rec.transcript.text,
            rec.transcript.language,
            rec.audio_ms,
            latency_ms,
            processing_ms,
        )
        self.finals.add(rec, latency_ms=latency_ms, opus=ended.opus)

    # --- control ------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Shutdown: take no more audio, send the replies of utterances already ended (within
        `timeout_s`); returns how many were still pending when it began."""
        self.listening = False
        return await self.turn.drain(timeout_s)

    async def close(self) -> None:
        """The connection is gone: cancel pending work so nothing outlives the session."""
        await self.turn.close()
        tasks = [self._replier, *self._barge_ins]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
