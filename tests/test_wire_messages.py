"""The server's outgoing messages as typed dataclasses: the exact text each sends, as the
hand-built dicts before them sent it (real clients read these fields)."""

from __future__ import annotations

import json

from asr_server.adapters.funasr.wire import EndAck, Final, Partial, result_fields, timestamps
from asr_server.adapters.xiaozhi.wire import AbortSpeech, Error, ServerHello, Stt, TextTurn, Vad
from asr_server.types import Recognition, SpeakerMatch, Transcript, Word

REC = Recognition(
    Transcript("打开灯", "zh", "NEUTRAL", "Speech", words=(Word("打开", 0.1, 0.4), Word("灯", 0.4, 0.6))),
    SpeakerMatch("ana", 0.81234567),
    1200,
    80.0,
    asr_queue_ms=3.04,
    asr_compute_ms=40.06,
)


def test_xiaozhi_messages_are_compact_json_in_the_firmwares_field_order():
    assert ServerHello("s1", {"format": "opus", "sample_rate": 16000}).to_json() == (
        '{"type":"hello","transport":"websocket","session_id":"s1","audio_params":{"format":"opus","sample_rate":16000}}'
    )
    assert Error("bad frame").to_json() == '{"type":"error","message":"bad frame"}'
    assert Error("bad frame", "s1").to_json() == '{"type":"error","message":"bad frame","session_id":"s1"}'
    assert Vad(0.123456, True).to_json() == '{"type":"vad","prob":0.123,"speech":true}'
    stt = Stt.of(REC, "s1", latency_ms=512.345, processing_ms=101.06, speculated=True, phrases=1)
    assert json.loads(stt.to_json()) == stt.to_dict()
    assert stt.to_json() == (
        '{"type":"stt","text":"打开灯","session_id":"s1","language":"zh","emotion":"NEUTRAL","event":"Speech",'
        '"speaker":' + json.dumps(REC.speaker.as_dict(), separators=(",", ":")) + ',"audio_ms":1200,'
        '"latency_ms":512.3,"processing_ms":101.1,"timings":{"asr_queue_ms":3.0,"asr_ms":40.1,'
        '"embed_queue_ms":null,"embed_ms":null,"speculated":true,"phrases":1}}'
    )
    assert Error("lone \ud800").to_json().encode("utf-8")  # a client's lone surrogate cannot fail the send


def test_the_relays_messages_upstream_carry_its_session_when_it_gave_one():
    assert TextTurn("hi").to_json() == '{"type":"listen","state":"detect","text":"hi"}'
    assert TextTurn("hi", "up-1").to_json() == '{"type":"listen","state":"detect","text":"hi","session_id":"up-1"}'
    assert AbortSpeech("wake_word_detected", "up-1").to_json() == (
        '{"type":"abort","reason":"wake_word_detected","session_id":"up-1"}'
    )


def test_funasr_results_keep_funasrs_fields():
    partial = Partial("2pass-online", "mic", "打开", 0, 3)
    assert partial.to_json() == (
        '{"mode": "2pass-online", "wav_name": "mic", "text": "打开", "is_final": false, "slice_type": 0, "index": 3}'
    )
    final = Final(
        "2pass-offline",
        "mic",
        "<|zh|> 打开灯",
        False,
        "打开灯",
        slice_type=2,
        index=3,
        start_time=960,
        end_time=2160,
        **result_fields(REC),
        **timestamps(list(REC.transcript.words), 960),
    )
    assert list(final.to_dict()) == [
        "mode", "wav_name", "text", "clean_text", "is_final", "slice_type", "index", "start_time", "end_time",
        "language", "emotion", "event", "spk_name", "spk_score", "timestamp", "stamp_sents",
    ]  # fmt: skip
    assert final.to_dict()["spk_score"] == 0.8123 and final.to_dict()["timestamp"] == [[1060, 1360], [1360, 1560]]
    empty = Final("offline", "mic", "", True, **result_fields(None))
    assert empty.to_json() == (
        '{"mode": "offline", "wav_name": "mic", "text": "", "is_final": true, "language": null, "emotion": null, '
        '"event": null, "spk_name": "unknown", "spk_score": 0.0}'
    )
    assert (
        EndAck("online", "mic").to_json() == '{"mode": "online", "wav_name": "mic", "is_final": true, "is_end": true}'
    )
