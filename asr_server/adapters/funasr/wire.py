"""FunASR's runtime WebSocket protocol as data: the client's configuration, its validation, and the
result messages (`Partial`, `Final`, `EndAck`, each with `to_dict()` and `to_json()`). Pure
functions, no I/O; every malformed input is a `FunAsrProtocolError` whose `code` is the close code
that says how (see `session` for the conversation).

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
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from websockets.frames import CloseCode

from ...constants import LANGUAGES, SAMPLE_RATE
from ...core.hotwords import hotword_list, parse_hotwords
from ...errors import FunAsrProtocolError
from ...types import Hotword, Recognition, Word, unspaced

log = logging.getLogger(__name__)

MODES = ("offline", "online", "2pass")


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
    hotwords: tuple[Hotword, ...] = ()  # FunASR's `hotwords`: JSON {"word": weight} or "w1,w2" (core.hotwords)

    @property
    def is_pcm(self) -> bool:
        return self.wav_format.lower() in ("pcm", "")

    def update(self, msg: dict[str, Any]) -> RequestConfig:
        """A new configuration with the keys of `msg` applied; `FunAsrProtocolError` on a bad value."""
        changes: dict[str, Any] = {}
        if "mode" in msg:
            if msg["mode"] not in MODES:
                raise FunAsrProtocolError(
                    CloseCode.INVALID_DATA, f"unsupported mode {ascii(msg['mode'])[:40]}; use offline, online or 2pass"
                )
            changes["mode"] = msg["mode"]
        if "wav_name" in msg:
            changes["wav_name"] = _string(msg, "wav_name")[:256]
        if "wav_format" in msg:
            changes["wav_format"] = _string(msg, "wav_format")[:32]
        if "audio_fs" in msg:
            fs = _integer(msg, "audio_fs")
            if not 4000 <= fs <= 192000:
                raise FunAsrProtocolError(CloseCode.INVALID_DATA, f"audio_fs {fs} is outside 4000..192000")
            changes["audio_fs"] = fs
        for key in ("itn", "svs_itn"):
            if key in msg:
                changes["itn"] = boolean(msg, key)
        if "svs_lang" in msg:
            lang = _string(msg, "svs_lang").lower()
            if lang not in LANGUAGES:
                raise FunAsrProtocolError(
                    CloseCode.INVALID_DATA, f"svs_lang {lang!r} is not one of {', '.join(LANGUAGES)}"
                )
            changes["language"] = None if lang == "auto" else lang
        if "chunk_size" in msg:
            changes["chunk_size"] = _chunk_size(msg["chunk_size"])
        if "chunk_interval" in msg:
            changes["chunk_interval"] = _integer(msg, "chunk_interval")
        if "hotwords" in msg:
            # FunASR's clients send a JSON string of {"word": weight} or words joined by commas; a
            # bad list costs its words (a log line each), never the request.
            hw = msg["hotwords"]
            if isinstance(hw, dict):
                changes["hotwords"] = hotword_list(hw.items(), "FunASR hotwords", strict=False)
            elif isinstance(hw, str):
                changes["hotwords"] = parse_hotwords(hw, "FunASR hotwords", strict=False)
            elif hw is not None:
                log.info("FunASR hotwords ignored: %s, not a string or a JSON object", type(hw).__name__)
        return replace(self, **changes) if changes else self

    def restarts(self, previous: RequestConfig | None) -> bool:
        """The audio starts over with this configuration: the first, or a new rate or mode."""
        return previous is None or (self.audio_fs, self.mode) != (previous.audio_fs, previous.mode)


def next_config(current: RequestConfig | None, msg: dict[str, Any], has_audio: bool) -> RequestConfig:
    """The configuration after the client's message `msg`; what cannot change while a request's
    audio is being sent (`has_audio`), or cannot stream, is a `FunAsrProtocolError`."""
    new = (current or RequestConfig()).update(msg)
    if current is not None and new.mode != current.mode and has_audio:
        raise FunAsrProtocolError(
            CloseCode.POLICY_VIOLATION, "mode cannot change while a request's audio is being sent"
        )
    if new.mode != "offline" and not new.is_pcm:
        raise FunAsrProtocolError(
            CloseCode.UNSUPPORTED_DATA,
            f"{new.mode} mode takes raw PCM only; wav_format {new.wav_format!r} needs mode offline",
        )
    if new.restarts(current) and has_audio:
        raise FunAsrProtocolError(
            CloseCode.POLICY_VIOLATION, "audio_fs cannot change while a request's audio is being sent"
        )
    return new


#: Largest integer any config key takes (sample rates, chunk sizes); bigger ones are refused, not parsed.
_MAX_INT = 10**7
_DIGITS = re.compile(r"[0-9]{1,8}")


def _bad_type(key: str, want: str, value: Any) -> FunAsrProtocolError:
    try:
        shown = json.dumps(value)[:40]
    except (ValueError, RecursionError):
        shown = type(value).__name__
    return FunAsrProtocolError(CloseCode.INVALID_DATA, f"config key {key!r} must be {want}, got {ascii(shown)[1:-1]}")


def _sendable(text: str) -> str:
    """`text` with lone surrogates (valid in JSON, not in UTF-8) replaced: echoed back in results,
    one would fail every send."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _string(msg: dict, key: str) -> str:
    v = msg[key]
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return _sendable(str(v))
    raise _bad_type(key, "a string", v)


def _as_int(v: Any) -> int | None:
    """`v` as a non-negative integer up to `_MAX_INT` (JSON number or ASCII digits), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if 0 <= v <= _MAX_INT else None
    if isinstance(v, float) and v.is_integer() and 0 <= v <= _MAX_INT:  # inf and nan are not integers
        return int(v)
    if isinstance(v, str) and _DIGITS.fullmatch(v.strip()):  # not str.isdigit: it accepts "²"
        n = int(v.strip())
        return n if n <= _MAX_INT else None
    return None


def _integer(msg: dict, key: str) -> int:
    n = _as_int(msg[key])
    if n is None:
        raise _bad_type(key, f"an integer from 0 to {_MAX_INT}", msg[key])
    return n


def boolean(msg: dict, key: str) -> bool:
    v = msg[key]
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise _bad_type(key, "true or false", v)


def _chunk_size(v: Any) -> tuple[int, ...]:
    items = [x.strip() for x in v[:100].split(",")] if isinstance(v, str) else v
    numbers = [_as_int(x) for x in items] if isinstance(items, list) and len(items) == 3 else []
    if len(numbers) != 3 or any(n is None for n in numbers):
        raise _bad_type("chunk_size", "three integers such as [5, 10, 5]", v)
    return tuple(n for n in numbers if n is not None)


def parse_message(text: str) -> dict[str, Any]:
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise FunAsrProtocolError(CloseCode.INVALID_DATA, f"malformed JSON config: {e.msg} at char {e.pos}") from None
    except ValueError:  # an integer of more than 4300 digits
        raise FunAsrProtocolError(CloseCode.INVALID_DATA, "malformed JSON config: a number too long") from None
    except RecursionError:
        raise FunAsrProtocolError(CloseCode.INVALID_DATA, "malformed JSON config: nested too deeply") from None
    if not isinstance(msg, dict):
        raise FunAsrProtocolError(CloseCode.INVALID_DATA, "the JSON config must be an object")
    if "is_speaking" in msg and not isinstance(msg["is_speaking"], bool):
        boolean(msg, "is_speaking")
    return msg


def agreed(previous: str, current: str) -> str:
    """The units two consecutive partial decodes agree on, from the start: only these are sent in
    `online` mode (a word one decode gives and the next revises is not committed yet)."""
    out = []
    for a, b in zip(units(previous), units(current), strict=False):
        if a != b:
            break
        out.append(b)
    return "".join(out)


def stable_prefix(text: str) -> str:
    """A partial's text without its last unit (word or character), which the next decode may still change."""
    text = text.rstrip()
    if not text:
        return ""
    if text[-1].isascii():
        cut = text.rfind(" ")
        return text[: cut + 1] if cut >= 0 else ""
    return text[:-1]


_UNIT = re.compile(r"\s*[\x21-\x7e]+|\s*[^\x00-\x7f]|\s+$")


@dataclass(slots=True)
class PartialText:
    """What one utterance's partial decodes have committed: a unit is sent once two consecutive
    decodes agree on it (`agreed`), and never taken back."""

    sent: str = ""
    last_stable: str = ""  # the previous decode's stable prefix (what the next must agree with)

    def advance(self, text: str) -> str | None:
        """The delta to send for the decode `text`; None when nothing new is agreed, or when the
        decode revised what was sent (wait for more audio)."""
        stable = stable_prefix(text)
        previous, self.last_stable = self.last_stable, stable
        stable = agreed(previous, stable)
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return None
        new, self.sent = stable[len(self.sent) :], stable
        return new


def units(text: str) -> list[str]:
    """Words (ASCII runs, with their leading space) and single CJK characters: what a revision replaces."""
    return _UNIT.findall(text)


def delta(sent: str, text: str) -> str:
    """What to send so that `sent` + it reads as `text`. When the final revised words already sent,
    those stay as sent (a client cannot take them back): the rest of `text` follows from the unit
    that best aligns with the end of `sent`, so words are neither split nor repeated."""
    if text.startswith(sent):
        return text[len(sent) :]
    a, b = [u for u in units(sent) if u.strip()], units(text)
    keys_a, keys_b = [u.strip().lower() for u in a], [u.strip().lower() for u in b]
    best_k, best_cost = 0, None
    for k in range(max(0, len(a) - 3), min(len(b), len(a) + 3) + 1):
        cost = _distance(keys_a, keys_b[:k])
        if best_cost is None or cost <= best_cost:  # ties: the longer match (a revised word, not an insertion)
            best_k, best_cost = k, cost
    rest = "".join(b[best_k:])
    if rest and sent and not sent[-1].isspace() and rest[0].isascii() and not rest[0].isspace() and rest[0].isalnum():
        rest = " " + rest  # an English word after a sent word: keep them apart
    return rest


def _distance(a: list[str], b: list[str]) -> int:
    """Edit distance between two unit lists (a few dozen units: the plain dynamic programme)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def spaced_after(tail: str, text: str) -> str:
    """`text` as a client appends it to what it got before (ending in `tail`): with a space first when
    both sides are words of a spaced script (English after English), else as it is."""
    last = tail[-1:]
    if text and last.strip() and not unspaced(last) and text[0].isalnum() and not unspaced(text[0]):
        return " " + text
    return text


@dataclass(slots=True)
class Appended:
    """Texts a client appends one to another (FunASR clients concatenate `online` texts, and
    2pass finals): remembers the last one sent, so that English after English gets its space."""

    tail: str = ""

    def next(self, text: str, spaced: bool = True) -> str:
        """`text` as sent after the others; `spaced`: it may need a space first."""
        if spaced:
            text = spaced_after(self.tail, text)
        if text:
            self.tail = text
        return text


def tagged(text: str, rec: Recognition | None) -> str:
    """`text` as FunASR's runtime returns SenseVoice results: language, emotion and event tags first
    (`<|zh|><|NEUTRAL|><|Speech|> 打开灯`, runtime/onnxruntime/src/sensevoice-small.cpp), which
    xiaozhi-esp32-server's FunASRServer provider parses (`lang_tag_filter`) into language and emotion."""
    t = rec.transcript if rec is not None else None
    if t is None or not text or t.language is None:
        return text
    return f"<|{t.language}|><|{t.emotion or 'EMO_UNKNOWN'}|><|{t.event or 'Speech'}|> {text}"


def timestamps(words: list[Word], offset_ms: int = 0, end_ms: int | None = None) -> dict[str, Any]:
    """FunASR's timestamp fields for a final: `timestamp`, [[start_ms, end_ms], ...] per word (as its
    Python server sends `rec["timestamp"]`), and `stamp_sents`, one entry per result as its C++
    runtime sends them; empty when the words carry no times. No time passes `end_ms`, the end of
    the audio (the recogniser may have heard added silence after it)."""
    if not words:
        return {}
    last = end_ms if end_ms is not None else 2**62
    ts = [[min(last, offset_ms + round(w.start_s * 1000)), min(last, offset_ms + round(w.end_s * 1000))] for w in words]
    text = "".join(w.text if unspaced(w.text[:1]) else " " + w.text for w in words).strip()
    return {
        "timestamp": ts,
        "stamp_sents": [{"text_seg": text, "punc": "", "start": ts[0][0], "end": ts[-1][1], "ts_list": ts}],
    }


def result_fields(rec: Recognition | None) -> dict[str, Any]:
    t = rec.transcript if rec is not None else None
    speaker = rec.speaker if rec is not None else None
    return {
        "language": t.language if t else None,
        "emotion": t.emotion if t else None,
        "event": t.event if t else None,
        "spk_name": speaker.name if speaker else "unknown",
        "spk_score": round(speaker.score, 4) if speaker else 0.0,
    }


# --- what the server sends ------------------------------------------------------------------


class _Result:
    """A result message: `to_dict()` is its JSON object, `to_json()` the text frame (UTF-8 kept)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Partial(_Result):
    """Streaming text of the utterance in progress (`online`, `2pass-online`): a delta that extends
    the partials already sent for the same `index`."""

    mode: str
    wav_name: str
    text: str
    slice_type: int
    """0 for the utterance's first partial, 1 for the rest."""
    index: int
    """The utterance's number in the request."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "wav_name": self.wav_name,
            "text": self.text,
            "is_final": False,
            "slice_type": self.slice_type,
            "index": self.index,
        }


@dataclass(frozen=True, slots=True)
class Final(_Result):
    """A recognised utterance (`online`, `2pass-offline`) or request (`offline`), with SenseVoice's
    tags and the speaker as FunASR's Python server names them (`result_fields`)."""

    mode: str
    wav_name: str
    text: str
    is_final: bool
    """True on the one message that answers `is_speaking: false`."""
    clean_text: str | None = None
    """The text without tags, when `text` carries them (`funasr.text_tags`)."""
    slice_type: int | None = None
    """2 for a streaming utterance's final; None (left out) for a whole request's."""
    index: int | None = None
    start_time: int | None = None
    """Milliseconds from the stream's start (streaming finals only)."""
    end_time: int | None = None
    language: str | None = None
    emotion: str | None = None
    event: str | None = None
    spk_name: str = "unknown"
    spk_score: float = 0.0
    timestamp: list[list[int]] | None = None
    """[[start_ms, end_ms], ...] per word (`timestamps`), when the words carry times."""
    stamp_sents: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "wav_name": self.wav_name, "text": self.text}
        if self.clean_text is not None:
            out["clean_text"] = self.clean_text
        out["is_final"] = self.is_final
        if self.slice_type is not None:
            out.update(slice_type=self.slice_type, index=self.index, start_time=self.start_time, end_time=self.end_time)
        out.update(
            language=self.language,
            emotion=self.emotion,
            event=self.event,
            spk_name=self.spk_name,
            spk_score=self.spk_score,
        )
        if self.timestamp is not None:
            out.update(timestamp=self.timestamp, stamp_sents=self.stamp_sents)
        return out


@dataclass(frozen=True, slots=True)
class EndAck(_Result):
    """The answer to `is_end: true` with `is_speaking: false`: the request is over."""

    mode: str
    wav_name: str

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "wav_name": self.wav_name, "is_final": True, "is_end": True}


Result = Partial | Final | EndAck
