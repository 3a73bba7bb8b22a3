"""The MQTT+UDP device simulator's UDP packets, as `mqtt_protocol.cc` makes and takes them and as the
xiaozhi-mqtt-gateway (app.js `onUdpMessage`, `sendUdpMessage`) reads and writes them: the 16-byte
header is the AES-128-CTR counter block, the sequence rules are the firmware's."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

pytest.importorskip("paho.mqtt")  # in the test lock; the simulator's MQTT side

from loadtest.mqtt_device import Channel, open_udp_packet, udp_packet

KEY = bytes(range(16))
#: The gateway's nonce: its header with type 1, length 0, its connection id as ssrc, timestamp 0, sequence 0.
NONCE = bytes.fromhex("0100000034fb685b0000000000000000")


def channel() -> Channel:
    return Channel("127.0.0.1", 8884, KEY, NONCE, "s-1")


def gateway_decrypt(packet: bytes) -> bytes:
    """What the gateway does with a device packet: its header as the counter block."""
    header = packet[:16]
    size = struct.unpack_from(">H", header, 2)[0]
    crypt = Cipher(algorithms.AES(KEY), modes.CTR(header)).decryptor()
    return crypt.update(packet[16 : 16 + size]) + crypt.finalize()


def gateway_encrypt(opus: bytes, timestamp: int, sequence: int) -> bytes:
    header = struct.pack(">BBHIII", 1, 0, len(opus), 0x34FB685B, timestamp, sequence)
    crypt = Cipher(algorithms.AES(KEY), modes.CTR(header)).encryptor()
    return header + crypt.update(opus) + crypt.finalize()


def test_device_packets_carry_the_nonce_length_timestamp_and_a_rising_sequence():
    ch = channel()
    opus = [os.urandom(n) for n in (40, 120, 1)]
    packets = [udp_packet(ch, o, 60 * i) for i, o in enumerate(opus)]
    for i, (packet, o) in enumerate(zip(packets, opus, strict=True)):
        kind, flags, size, ssrc, timestamp, sequence = struct.unpack_from(">BBHIII", packet)
        assert (kind, flags, size, ssrc, timestamp, sequence) == (1, 0, len(o), 0x34FB685B, 60 * i, i + 1)
        assert packet[16:] != o and gateway_decrypt(packet) == o


def test_server_packets_follow_the_firmwares_sequence_rules():
    ch = channel()
    assert open_udp_packet(ch, gateway_encrypt(b"one", 0, 1)) == (0, b"one")
    assert open_udp_packet(ch, gateway_encrypt(b"three", 120, 3)) == (120, b"three")  # a gap: taken
    assert ch.out_of_order == 1
    assert open_udp_packet(ch, gateway_encrypt(b"two", 60, 2)) is None  # older than the last: dropped
    assert open_udp_packet(ch, b"\x02" + gateway_encrypt(b"x", 0, 9)[1:]) is None  # not audio
    assert open_udp_packet(ch, b"\x01" * 8) is None  # shorter than the header
    assert ch.dropped == 3 and ch.remote_sequence == 3
