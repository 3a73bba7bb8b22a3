"""One device's connection to the upstream chatbot server (xiaozhi-esp32-server or a port of it).

The server is the device's edge: it consumes the device's audio (Opus, VAD, SenseVoice, speaker)
and relays everything else. The upstream sees a device that speaks in text turns: the device's
`hello` and JSON messages as they are, and each utterance as
`{"type": "listen", "state": "detect", "text": ...}` — which xiaozhi-esp32-server answers as the
user's turn (`listenMessageHandler` → `startToChat`) — with the JSON text its own FunASR path
hands `startToChat` (`{"content", "language", "emotion"}`, plus `"speaker"` when known). Everything the upstream sends
goes back to the device in order; binary TTS audio is re-framed for the device's protocol version
(xiaozhi-esp32-server sends bare Opus, protocol version 1, whatever the device speaks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode

from ...config import UpstreamConfig
from ...core.metrics import Metrics
from ...errors import FramingError, UpstreamError
from ...types import Transcript
from .wire import AbortSpeech, AudioFrame, TextTurn, pack_audio, unpack_audio

log = logging.getLogger(__name__)

ToDevice = Callable[[str | bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Ended:
    """Why the upstream's side of a session ended: `code` is the close code (None: it vanished or
    was dropped); a clean close (1000, 1001: its goodbye, its idle timeout) is passed on to the
    device as it is."""

    reason: str
    """Told to the device (unless clean) and logged."""
    code: int | None
    kind: str = "closed"
    """The `asr_upstream_failures_total` reason: closed, vanished, oversize (a message over
    `upstream.max_message_bytes`), stuck (it read nothing for `upstream.send_timeout_s`)."""

    @property
    def clean(self) -> bool:
        return self.code in (1000, 1001)


#: The device's upgrade fields passed on (header, or query parameter when the device used the query).
PASSED = ("Device-Id", "Client-Id", "Authorization")


#: SenseVoice's emotion as xiaozhi-esp32-server's FunASR path gives it to the LLM (`lang_tag_filter`
#: in core/providers/asr/utils.py maps the tag to this emoji; an unknown tag passes as it is).
EMOTION_EMOJI = {
    "HAPPY": "🙂",
    "SAD": "😔",
    "ANGRY": "😡",
    "NEUTRAL": "😶",
    "FEARFUL": "😰",
    "DISGUSTED": "🤢",
    "SURPRISED": "😲",
    "EMO_UNKNOWN": "😶",
}


def turn_text(transcript: Transcript, speaker: str | None) -> str:
    """The text of a turn as xiaozhi-esp32-server's own FunASR path hands it to `startToChat`.

    That path (`ASRProviderBase.handle_voice_stop`) sends `json.dumps(lang_tag_filter(result))`:
    `{"content", "language", "emotion"}`, with `"speaker"` added when its voiceprint provider named
    one. `startToChat` and `handle_user_intent` take `content` out (and `speaker`, when both are
    there); the LLM gets the JSON, so it can answer in the language said. Text without a language
    tag goes as it is (with the speaker: `{"speaker", "content"}`, as its plain-text path sends it).
    """
    text = transcript.text
    if transcript.language is None:
        return text if speaker is None else json.dumps({"speaker": speaker, "content": text}, ensure_ascii=False)
    emotion = transcript.emotion or "NEUTRAL"
    turn = {"content": text, "language": transcript.language, "emotion": EMOTION_EMOJI.get(emotion, emotion)}
    if speaker is not None:
        turn["speaker"] = speaker
    return json.dumps(turn, ensure_ascii=False)


class Upstream:
    """The upstream socket of one device session: open it, pump what it sends to the device, send turns."""

    def __init__(
        self, config: UpstreamConfig, device_version: int, to_device: ToDevice, metrics: Metrics, who: str
    ) -> None:
        assert config.url is not None
        self.config = config
        self.device_version = device_version
        self._to_device = to_device
        self._metrics = metrics
        self.who = who
        self.session_id: str | None = None
        self.speaking = False  # between the upstream's `tts start` and `tts stop`
        self._ws: ClientConnection | None = None
        self._pump: asyncio.Task[Ended] | None = None
        self._turn_at: float | None = None  # our endpoint of the last turn, until its first `tts`
        self._opened = False
        self._stuck: Ended | None = None  # set when a send timed out and the socket was dropped
        self._dropped = 0  # upstream frames the device's framing cannot carry (the first one is logged)

    def _url(self, fields: dict[str, str], in_query: bool) -> str:
        url = self.config.url or ""
        if not in_query:
            return url
        parts = urlsplit(url)
        query = "&".join(q for q in (parts.query, urlencode({k.lower(): v for k, v in fields.items()})) if q)
        return urlunsplit(parts._replace(query=query))

    async def open(self, fields: dict[str, str], in_query: bool, hello: str) -> dict[str, Any]:
        """Connect with the device's own `fields`, send its `hello`, return the upstream's hello."""
        cfg = self.config
        headers = {} if in_query else dict(fields)
        headers["Protocol-Version"] = str(cfg.protocol_version)
        try:
            self._ws = await connect(
                self._url(fields, in_query),
                additional_headers=headers,
                open_timeout=cfg.open_timeout_s,
                close_timeout=2,
                ping_interval=None,
                max_size=cfg.max_message_bytes,
                compression=None,
                proxy=None,
            )
        except InvalidStatus as e:
            raise self._failed("refused", f"the upstream refused the device: HTTP {e.response.status_code}") from None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise self._failed("unreachable", f"the upstream is unreachable ({type(e).__name__}: {e})") from None
        self._opened = True
        self._metrics.upstream_sessions.inc()
        try:
            await self._ws.send(hello)
            async with asyncio.timeout(cfg.hello_timeout_s):
                while True:
                    raw = await self._ws.recv()
                    msg = _json(raw)
                    if msg is not None and msg.get("type") == "hello":
                        break
        except TimeoutError:
            await self.close()
            raise self._failed(
                "hello_timeout", f"the upstream sent no hello within {cfg.hello_timeout_s:g} s"
            ) from None
        except ConnectionClosed as e:
            await self.close()
            raise self._failed(
                "closed", f"the upstream closed before its hello ({e.rcvd.code if e.rcvd else 'no close frame'})"
            ) from None
        sid = msg.get("session_id")
        self.session_id = sid if isinstance(sid, str) else None
        return msg

    def _failed(self, kind: str, message: str) -> UpstreamError:
        self._metrics.upstream_failures.labels(kind).inc()
        return UpstreamError(message)

    def start(self) -> asyncio.Task[Ended]:
        """Pump the upstream to the device; the task's result says why it ended."""
        self._pump = asyncio.get_running_loop().create_task(self._forward(), name=f"upstream-{self.who}")
        return self._pump

    async def _forward(self) -> Ended:
        assert self._ws is not None
        relayed, nbytes = self._metrics.relayed.labels("to_device"), self._metrics.relayed_bytes.labels("to_device")
        try:
            async for raw in self._ws:
                out: str | bytes
                if isinstance(raw, bytes):
                    framed = self._reframe(raw)
                    if framed is None:
                        continue
                    out = framed
                else:
                    self._observe(raw)
                    out = raw
                relayed.inc()
                nbytes.inc(len(out))
                await self._to_device(out)
        except ConnectionClosed as e:
            if self._stuck is not None:
                return self._stuck
            if e.sent is not None and e.sent.code == CloseCode.MESSAGE_TOO_BIG:
                # Its close seldom comes back: it is still sending the message, ahead of its reply.
                limit = self.config.max_message_bytes
                why = f"the upstream sent a message over upstream.max_message_bytes ({limit} bytes)"
                return Ended(why, CloseCode.MESSAGE_TOO_BIG, "oversize")
            if e.rcvd is None:
                return Ended("the upstream vanished", None, "vanished")
        ws = self._ws
        detail = f": {ws.close_reason}" if ws.close_reason else ""
        return Ended(f"the upstream closed ({ws.close_code}{detail})", ws.close_code)

    def end_reason(self) -> str | None:
        """Why the upstream's side ended, once its pump has (None while it goes on, or when the
        device left first and the pump was cancelled)."""
        pump = self._pump
        if pump is None or not pump.done() or pump.cancelled() or pump.exception() is not None:
            return None
        return pump.result().reason

    def _reframe(self, data: bytes) -> bytes | None:
        """Upstream TTS audio in the device's framing (the two may speak different versions)."""
        up, dev = self.config.protocol_version, self.device_version
        if up == dev:
            return data
        try:
            frame = unpack_audio(data, up)
            if not isinstance(frame, AudioFrame):  # v2 JSON in a binary frame
                return pack_audio(frame, dev) if dev != 1 else None
            return pack_audio(frame.payload, dev, frame.timestamp_ms or 0)
        except FramingError as e:  # malformed, or too long for v3's length: the session goes on without it
            self._dropped += 1
            if self._dropped == 1:
                log.warning("%s: upstream frame dropped: %s (further ones are not logged)", self.who, e)
            return None

    def _observe(self, raw: str) -> None:
        msg = _json(raw)
        if msg is None or msg.get("type") != "tts":
            return
        state = msg.get("state")
        if state == "start":
            self.speaking = True
            if self._turn_at is not None:
                self._metrics.upstream_first_tts.observe(time.perf_counter() - self._turn_at)
                self._turn_at = None
        elif state == "stop":
            self.speaking = False

    async def send(self, raw: str | bytes) -> None:
        """Forward one device message as it came; a gone or stuck upstream ends the relay: the pump
        sees it and says which (a stuck one is dropped here, its reason kept for the pump)."""
        if self._ws is None:
            return
        self._metrics.relayed.labels("to_upstream").inc()
        self._metrics.relayed_bytes.labels("to_upstream").inc(len(raw))
        timeout = self.config.send_timeout_s
        try:
            await asyncio.wait_for(self._ws.send(raw), timeout)
        except ConnectionClosed:
            pass
        except TimeoutError:
            self._stuck = Ended(f"the upstream read nothing for {timeout:g} s (upstream.send_timeout_s)", None, "stuck")
            self._ws.transport.abort()

    async def send_turn(self, transcript: Transcript, speaker: str | None, endpoint: float) -> None:
        """The user's turn: what the device said, as the text message the upstream answers."""
        self._turn_at = endpoint
        await self.send(TextTurn(turn_text(transcript, speaker), self.session_id).to_json())

    async def barge_in(self) -> None:
        """The user speaks over the answer (realtime mode): stop it, as the firmware's abort does."""
        self.speaking = False
        await self.send(AbortSpeech("wake_word_detected", self.session_id).to_json())

    async def close(self) -> None:
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._opened:
            self._opened = False
            self._metrics.upstream_sessions.dec()


def _json(raw: str | bytes) -> dict[str, Any] | None:
    if isinstance(raw, bytes):
        return None
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None
