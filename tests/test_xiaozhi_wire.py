import struct

import pytest

from asr_server.adapters.xiaozhi.wire import (
    Abort,
    AudioFrame,
    FramingError,
    Hello,
    Listen,
    MessageError,
    Other,
    ProtocolError,
    pack_audio,
    parse_message,
    parse_protocol_version,
    server_hello,
    unpack_audio,
)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_pack_unpack_round_trip(version):
    payload = bytes(range(100))
    frame = unpack_audio(pack_audio(payload, version, timestamp_ms=1234), version)
    assert isinstance(frame, AudioFrame)
    assert frame.payload == payload
    assert frame.timestamp_ms == (1234 if version == 2 else None)


def test_v2_and_v3_layouts_are_big_endian():
    assert pack_audio(b"ab", 2, 7) == struct.pack(">HHIII", 2, 0, 0, 7, 2) + b"ab"
    assert pack_audio(b"ab", 3) == bytes([0, 0, 0, 2]) + b"ab"


def test_a_packet_too_long_for_v3s_16_bit_length_is_a_framing_error_not_a_struct_error():
    """The firmware reads v3's `payload_size` as a u16: 65,535 bytes is the most it can say. (No Opus
    packet is longer: 48 frames of 1,275 bytes at most.) v2's length is 32 bits."""
    assert len(pack_audio(bytes(65_535), 3)) == 65_539
    with pytest.raises(FramingError, match="65,536 bytes .* protocol v3"):
        pack_audio(bytes(65_536), 3)
    assert len(pack_audio(bytes(70_000), 2)) == 70_016


def test_size_mismatch_and_short_headers_are_framing_errors():
    good = pack_audio(b"abcd", 2)
    with pytest.raises(FramingError, match="says 4 payload bytes, message has 3"):
        unpack_audio(good[:-1], 2)
    with pytest.raises(FramingError, match="shorter than"):
        unpack_audio(b"\x00\x02", 2)
    with pytest.raises(FramingError, match="says 4 payload bytes, message has 5"):
        unpack_audio(pack_audio(b"abcd", 3) + b"x", 3)
    with pytest.raises(FramingError, match="unknown type"):
        unpack_audio(bytes([9, 0, 0, 1]) + b"x", 3)
    with pytest.raises(FramingError, match="empty"):
        unpack_audio(b"", 1)


def test_v2_json_type_returns_the_json_bytes():
    body = b'{"type":"abort"}'
    msg = struct.pack(">HHIII", 2, 1, 0, 0, len(body)) + body
    assert unpack_audio(msg, 2) == body


def test_protocol_version_header():
    assert parse_protocol_version(None) == 1
    assert parse_protocol_version("3") == 3
    for bad in ("4", "x", "0"):
        with pytest.raises(ProtocolError, match="Protocol-Version"):
            parse_protocol_version(bad)


def test_parse_messages():
    h = parse_message(
        '{"type":"hello","version":1,"features":{"mcp":true},"transport":"websocket",'
        '"audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}'
    )
    assert isinstance(h, Hello) and h.audio_params["frame_duration"] == 60 and h.features == {"mcp": True}
    assert parse_message('{"session_id":"x","type":"listen","state":"start","mode":"manual"}') == Listen(
        "start", "manual"
    )
    assert parse_message('{"type":"listen","state":"detect","text":"你好小智"}') == Listen("detect", None, "你好小智")
    assert parse_message('{"type":"abort","reason":"wake_word_detected"}') == Abort("wake_word_detected")
    assert isinstance(parse_message('{"type":"mcp","payload":{}}'), Other)


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "malformed JSON"),
        ("[1,2]", "JSON object"),
        ('{"state":"start"}', "'type'"),
        ('{"type":"dance"}', "unknown message type 'dance'"),
        ('{"type":"listen","state":"pause"}', "unknown state"),
        ('{"type":"listen","state":"start","mode":"turbo"}', "unknown mode"),
    ],
)
def test_malformed_messages(text, match):
    with pytest.raises(MessageError, match=match):
        parse_message(text)


def test_server_hello_has_transport():
    h = server_hello("sid", {"format": "opus"})
    assert h["type"] == "hello" and h["transport"] == "websocket" and h["session_id"] == "sid"
