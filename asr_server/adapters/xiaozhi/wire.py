"""The xiaozhi device protocol: binary framing (versions 1, 2, 3) and the JSON messages.

Pure functions and dataclasses, no I/O: the session feeds wire messages in and gets typed
messages out, and sends typed messages back (`ServerHello`, `Stt`, `Vad`, `Error`; the relay's
`TextTurn` and `AbortSpeech` to the upstream), each with `to_dict()` and `to_json()`; the
load-test device uses the same `pack_audio` to build its frames. Every malformed input raises a
`ProtocolError` subclass whose message is fit to send to the client.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import FramingError, MessageError, ProtocolError
from ...types import Recognition

__all__ = [
    "Abort",
    "AbortSpeech",
    "AudioFrame",
    "ClientMessage",
    "Error",
    "FramingError",
    "Hello",
    "Listen",
    "MessageError",
    "Other",
    "ProtocolError",
    "ServerHello",
    "ServerMessage",
    "Stt",
    "TextTurn",
    "Vad",
    "dumps",
    "error_message",
    "pack_audio",
    "parse_message",
    "parse_protocol_version",
    "server_hello",
    "unpack_audio",
]

PROTOCOL_VERSIONS = (1, 2, 3)
LISTEN_MODES = ("auto", "manual", "realtime")

_V2 = struct.Struct(">HHIII")  # version, type, reserved, timestamp_ms, payload_size
#: The firmware writes 2; the xiaozhi-mqtt-gateway (`WebSocketBridge.sendAudio`, Protocol-Version 2
#: on its `?from=mqtt_gateway` sockets) writes only the timestamp and the size into a zeroed header.
_V2_VERSIONS = (0, 2)
_V3 = struct.Struct(">BBH")  # type, reserved, payload_size

FRAME_OPUS = 0
FRAME_JSON = 1


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One Opus packet from the device; `timestamp_ms` only in protocol version 2."""

    payload: bytes
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Hello:
    version: int | None
    transport: str | None
    audio_params: dict[str, Any]
    features: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Listen:
    state: Literal["start", "stop", "detect"]
    mode: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Other:
    """A known-but-ignored message type (mcp, iot, goodbye...)."""

    type: str
    body: dict[str, Any] = field(default_factory=dict)


ClientMessage = Hello | Listen | Abort | Other

_IGNORED_TYPES = {"mcp", "iot", "goodbye", "ping"}


def parse_protocol_version(raw: str | None) -> int:
    """Parse the `Protocol-Version` header; absent means 1."""
    if raw is None or raw.strip() == "":
        return 1
    try:
        v = int(raw.strip())
    except ValueError:
        raise ProtocolError(f"unsupported Protocol-Version {raw!r}: expected 1, 2 or 3") from None
    if v not in PROTOCOL_VERSIONS:
        raise ProtocolError(f"unsupported Protocol-Version {v}: expected 1, 2 or 3")
    return v


def unpack_audio(data: bytes, version: int) -> AudioFrame | bytes:
    """Split one binary WebSocket message into an Opus frame (or, for v2 type 1, JSON bytes)."""
    if version == 1:
        if not data:
            raise FramingError("empty binary message")
        return AudioFrame(bytes(data))
    if version == 2:
        if len(data) < _V2.size:
            raise FramingError(f"protocol v2 frame shorter than its {_V2.size}-byte header ({len(data)} bytes)")
        ver, typ, _reserved, ts, size = _V2.unpack_from(data)
        if ver not in _V2_VERSIONS:
            raise FramingError(f"protocol v2 frame carries version {ver}")
        payload = data[_V2.size :]
        if size != len(payload):
            raise FramingError(f"protocol v2 header says {size} payload bytes, message has {len(payload)}")
        if typ == FRAME_JSON:
            return bytes(payload)
        if typ != FRAME_OPUS:
            raise FramingError(f"protocol v2 frame of unknown type {typ}")
        if not payload:
            raise FramingError("protocol v2 frame with empty payload")
        return AudioFrame(bytes(payload), ts)
    if version == 3:
        if len(data) < _V3.size:
            raise FramingError(f"protocol v3 frame shorter than its {_V3.size}-byte header ({len(data)} bytes)")
        typ, _reserved, size = _V3.unpack_from(data)
        payload = data[_V3.size :]
        if size != len(payload):
            raise FramingError(f"protocol v3 header says {size} payload bytes, message has {len(payload)}")
        if typ != FRAME_OPUS:
            raise FramingError(f"protocol v3 frame of unknown type {typ}")
        if not payload:
            raise FramingError("protocol v3 frame with empty payload")
        return AudioFrame(bytes(payload))
    raise FramingError(f"unsupported protocol version {version}")


V3_MAX_PAYLOAD = 0xFFFF  # v3's u16 length; no Opus packet is longer (48 frames of 1,275 bytes at most)


def pack_audio(payload: bytes, version: int, timestamp_ms: int = 0) -> bytes:
    """Frame one Opus packet the way the firmware does for `version`. A packet over v3's 16-bit
    length is a `FramingError`: an Opus packet cannot be split, and the firmware would read a
    wrapped length as a shorter, corrupt packet."""
    if version == 1:
        return payload
    if version == 2:
        return _V2.pack(2, FRAME_OPUS, 0, timestamp_ms & 0xFFFFFFFF, len(payload)) + payload
    if version == 3:
        if len(payload) > V3_MAX_PAYLOAD:
            raise FramingError(
                f"a frame of {len(payload):,} bytes is over protocol v3's 16-bit length ({V3_MAX_PAYLOAD:,} bytes)"
            )
        return _V3.pack(FRAME_OPUS, 0, len(payload)) + payload
    raise ValueError(f"unsupported protocol version {version}")


def _short(value: Any) -> str:
    """A client value for an error message: ASCII (no lone surrogates), at most 40 characters."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_message(text: str | bytes) -> ClientMessage:
    """Parse one JSON text message from the device."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, non-UTF-8 bytes, ints over 4300 digits
        raise MessageError(f"malformed JSON: {_short(str(e))}") from None
    except RecursionError:
        raise MessageError("malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise MessageError("a message must be a JSON object")
    typ = obj.get("type")
    if not isinstance(typ, str):
        raise MessageError("message has no string field 'type'")
    if typ == "hello":
        ap = obj.get("audio_params") or {}
        if not isinstance(ap, dict):
            raise MessageError("hello: 'audio_params' must be an object")
        feats = obj.get("features") or {}
        version = obj.get("version")
        return Hello(
            version if isinstance(version, int) else None,
            obj.get("transport"),
            ap,
            feats if isinstance(feats, dict) else {},
        )
    if typ == "listen":
        state = obj.get("state")
        if state not in ("start", "stop", "detect"):
            raise MessageError(f"listen: unknown state {_short(state)} (expected start, stop or detect)")
        mode = obj.get("mode")
        if mode is not None and mode not in LISTEN_MODES:
            raise MessageError(f"listen: unknown mode {_short(mode)} (expected auto, manual or realtime)")
        text_field = obj.get("text")
        return Listen(state, mode, text_field if isinstance(text_field, str) else None)
    if typ == "abort":
        reason = obj.get("reason")
        return Abort(reason if isinstance(reason, str) else None)
    if typ in _IGNORED_TYPES:
        return Other(typ, obj)
    raise MessageError(f"unknown message type {_short(typ)}")


# --- what the server sends ------------------------------------------------------------------


class _Outgoing:
    """A server message: `to_dict()` is its JSON object, `to_json()` the text frame that carries it."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class ServerHello(_Outgoing):
    """The server's answer to the device's hello."""

    session_id: str
    audio_params: dict[str, Any]
    """What the server sends back of the device's: format, sample rate, channels, frame duration."""

    def to_dict(self) -> dict[str, Any]:
        # `transport` is mandatory or some firmware crashes.
        return {
            "type": "hello",
            "transport": "websocket",
            "session_id": self.session_id,
            "audio_params": self.audio_params,
        }


@dataclass(frozen=True, slots=True)
class Error(_Outgoing):
    """Something the device sent was refused or lost; the session goes on unless a close follows."""

    message: str
    session_id: str | None = None
    """Left out when empty (before the hello there is none)."""

    def to_dict(self) -> dict[str, Any]:
        return _in_session({"type": "error", "message": self.message}, self.session_id)


@dataclass(frozen=True, slots=True)
class Vad(_Outgoing):
    """The VAD meter's reading of one frame, for a client whose hello asked (`features.vad_meter`)."""

    prob: float
    """The frame's highest speech probability, to three decimals."""
    speech: bool
    """The stream is in speech."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "vad", "prob": round(self.prob, 3), "speech": self.speech}


@dataclass(frozen=True, slots=True)
class Stt(_Outgoing):
    """One utterance's text, tags, speaker and timings: what the device shows (and a load test reads)."""

    text: str
    session_id: str
    language: str | None
    emotion: str | None
    event: str | None
    speaker: dict[str, Any] | None
    """`SpeakerMatch.as_dict()`, or None when nobody was identified."""
    audio_ms: int
    latency_ms: float
    """From the end of speech."""
    processing_ms: float
    """From the endpoint decision (`vad.min_silence_ms` after the end of speech)."""
    timings: dict[str, Any]
    """`timings()`: where the time went."""

    @classmethod
    def of(
        cls,
        rec: Recognition,
        session_id: str,
        latency_ms: float,
        processing_ms: float,
        speculated: bool,
        phrases: int,
    ) -> Stt:
        t = rec.transcript
        return cls(
            t.text,
            session_id,
            t.language,
            t.emotion,
            t.event,
            rec.speaker.as_dict() if rec.speaker is not None else None,
            rec.audio_ms,
            round(latency_ms, 1),
            round(processing_ms, 1),
            timings(rec, speculated, phrases),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "stt",
            "text": self.text,
            "session_id": self.session_id,
            "language": self.language,
            "emotion": self.emotion,
            "event": self.event,
            "speaker": self.speaker,
            "audio_ms": self.audio_ms,
            "latency_ms": self.latency_ms,
            "processing_ms": self.processing_ms,
            "timings": self.timings,
        }


def timings(rec: Recognition, speculated: bool, phrases: int) -> dict[str, Any]:
    """Where the utterance's time went (milliseconds): the wait for each engine and its compute (of
    the last piece, when it came in phrases), whether a speculation started before the endpoint
    supplied the result, and how many phrases were recognised before the last piece. Load tests read it."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {
        "asr_queue_ms": ms(rec.asr_queue_ms),
        "asr_ms": ms(rec.asr_compute_ms),
        "embed_queue_ms": ms(rec.embed_queue_ms),
        "embed_ms": ms(rec.embed_compute_ms),
        "speculated": speculated,
        "phrases": phrases,
    }


@dataclass(frozen=True, slots=True)
class TextTurn(_Outgoing):
    """The user's turn as the relay sends it upstream: a wake-word `listen detect` whose text
    xiaozhi-esp32-server answers as what the user said (`upstream.turn_text`)."""

    text: str
    session_id: str | None = None
    """The upstream's session, as the firmware sends it; left out when it gave none."""

    def to_dict(self) -> dict[str, Any]:
        return _in_session({"type": "listen", "state": "detect", "text": self.text}, self.session_id)


@dataclass(frozen=True, slots=True)
class AbortSpeech(_Outgoing):
    """Stop the answer being spoken, as the firmware's abort does (the relay's barge-in)."""

    reason: str
    session_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _in_session({"type": "abort", "reason": self.reason}, self.session_id)


ServerMessage = ServerHello | Error | Vad | Stt


def _in_session(message: dict[str, Any], session_id: str | None) -> dict[str, Any]:
    """`message` with its `session_id` last, or without one when there is none."""
    return {**message, "session_id": session_id} if session_id else message


def server_hello(session_id: str, audio_params: dict[str, Any]) -> dict[str, Any]:
    """The server's hello as a JSON object (a stand-in server sends it)."""
    return ServerHello(session_id, audio_params).to_dict()


def error_message(message: str, session_id: str | None = None) -> dict[str, Any]:
    return Error(message, session_id).to_dict()


def dumps(message: dict[str, Any]) -> str:
    """A server message as the text frame the firmware reads (compact, UTF-8 kept; a lone surrogate
    from a client's text, which UTF-8 cannot carry, becomes U+FFFD instead of failing the send)."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text
