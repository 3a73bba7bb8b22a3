"""The xiaozhi device protocol: binary framing (versions 1, 2, 3) and the JSON messages.

Pure functions and dataclasses, no I/O: the session feeds wire messages in and gets typed
messages out; the load-test device uses the same `pack_audio` to build its frames. Every
malformed input raises a `ProtocolError` subclass whose message is fit to send to the client.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import FramingError, MessageError, ProtocolError

__all__ = [
    "Abort",
    "AudioFrame",
    "ClientMessage",
    "FramingError",
    "Hello",
    "Listen",
    "MessageError",
    "Other",
    "ProtocolError",
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
        if ver != 2:
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


def server_hello(session_id: str, audio_params: dict[str, Any]) -> dict[str, Any]:
    """The server's hello: `transport` is mandatory or some firmware crashes."""
    return {"type": "hello", "transport": "websocket", "session_id": session_id, "audio_params": audio_params}


def error_message(message: str, session_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "message": message}
    if session_id:
        out["session_id"] = session_id
    return out


def dumps(message: dict[str, Any]) -> str:
    """A server message as the text frame the firmware reads (compact, UTF-8 kept; a lone surrogate
    from a client's text, which UTF-8 cannot carry, becomes U+FFFD instead of failing the send)."""
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text
