"""The FunASR port's TLS stage (`adapters/funasr/tls.py`): sockets that never become WebSocket
connections — idle, half a handshake, garbage after 0x16, gone mid-handshake — cost a bounded
amount of memory and never a traceback, while real clients still get in."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
from asyncio.sslproto import SSLProtocol
from pathlib import Path

import websockets

from asr_server.adapters.funasr.server import serve_funasr
from asr_server.adapters.funasr.tls import MAX_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES_PER_ADDRESS
from asr_server.config import load_config
from tests.support.fakes import fake_pipeline


@contextlib.asynccontextmanager
async def funasr_port(tmp_path: Path, **funasr):
    """A FunASR server (`tls: both`) on a free loopback port: (port, metrics)."""
    cfg = load_config(
        None,
        env={},
        overrides={
            "funasr": {"host": "127.0.0.1", "port": 0, "self_signed_cert": str(tmp_path / "cert.pem"), **funasr},
            "speaker": {"db": str(tmp_path / "vp.sqlite")},
        },
    )
    pipeline = fake_pipeline(cfg, tmp_path / "vp.sqlite")
    server = await serve_funasr(cfg, pipeline, pipeline.metrics)
    try:
        yield server.sockets[0].getsockname()[1], pipeline.metrics
    finally:
        server.close()
        await server.wait_closed()
        await pipeline.close()


async def _open(port: int, source: str, first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def _wss(port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    async with websockets.connect(f"wss://127.0.0.1:{port}/", ssl=ctx, open_timeout=5):
        pass


def _tls_states() -> int:
    """asyncio TLS protocols alive in this process (each holds a 256 KB buffer)."""
    gc.collect()
    return sum(isinstance(o, SSLProtocol) for o in gc.get_objects())


async def _until(check, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)


def _client_hello() -> bytes:
    """A real client's first flight (its ClientHello record), as a client that then stalls sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ctx.wrap_bio(incoming, outgoing).do_handshake()
    return outgoing.read()


async def test_half_handshakes_hold_no_tls_state_and_stalled_ones_are_bounded(tmp_path, monkeypatch):
    """Each socket that sent only 0x16 held a TLS state (~320 KB) until its deadline, with no limit
    (2,000 of them: +625 MB). Now a TLS state is made only for a whole first record, at most
    MAX_PENDING_HANDSHAKES of them at once (the others wait, holding their socket only), and a
    newcomer closes the oldest once it has lasted EVICTABLE_AFTER_S."""
    from asr_server.adapters.funasr import tls

    monkeypatch.setattr(tls, "EVICTABLE_AFTER_S", 60.0, raising=False)  # none is stale while the flood comes in
    per = MAX_PENDING_HANDSHAKES_PER_ADDRESS
    addresses = [f"127.0.0.{i}" for i in range(3, 3 + MAX_PENDING_HANDSHAKES // per)]
    hello = _client_hello()
    async with funasr_port(tmp_path, open_timeout_s=60) as (port, metrics):  # none ends by its deadline here
        before = _tls_states()
        halves = [await _open(port, "127.0.0.9", b"\x16") for _ in range(20)]
        await asyncio.sleep(0.3)  # the server has peeked them
        assert _tls_states() == before
        stalled = [await _open(port, "127.0.0.2", hello) for _ in range(per + 4)]  # past one address's cap
        stalled += [await _open(port, a, hello) for a in addresses for _ in range(per)]  # and past the total
        await _until(lambda: _tls_states() - before >= MAX_PENDING_HANDSHAKES, 5.0)
        await asyncio.sleep(0.3)  # the rest of them reach the server
        assert _tls_states() - before <= MAX_PENDING_HANDSHAKES
        monkeypatch.setattr(tls, "EVICTABLE_AFTER_S", 0.0, raising=False)  # now they are stale (waiters look in 60 s)
        await _wss(port)  # from another address: it closes the oldest and takes its place
        value = metrics.registry.get_sample_value("asr_errors_total", {"kind": "funasr_tls_evicted"})
        assert value == 1
        for _, writer in halves + stalled:
            writer.close()


class _Transport:
    """What `PendingHandshakes` needs of a transport."""

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


async def test_pending_handshakes_wait_their_turn_per_address_and_close_only_stale_ones(monkeypatch):
    from asr_server.adapters.funasr import tls

    pending = tls.PendingHandshakes(limit=2, per_address=1)
    a1, a2, b1, c1, d1 = (_Transport() for _ in range(5))
    await pending.enter(a1, "a")
    second_a = asyncio.create_task(pending.enter(a2, "a"))  # past a's cap: waits
    await pending.enter(b1, "b")
    c = asyncio.create_task(pending.enter(c1, "c"))  # past the total; the oldest is young: waits
    await asyncio.sleep(0)
    assert not second_a.done() and not c.done() and len(pending) == 2
    pending.leave(a1)  # the first waiter with room goes: a's own
    await second_a
    assert not c.done() and not any(t.aborted for t in (a1, a2, b1))
    monkeypatch.setattr(tls, "EVICTABLE_AFTER_S", 0.0)  # now every pending one counts as stale
    d = asyncio.create_task(pending.enter(d1, "d"))
    await asyncio.sleep(0)
    assert b1.aborted and not a2.aborted  # the oldest (b1) is closed for the newcomer...
    pending.leave(b1)
    await d  # ...who takes its place once it has ended
    assert len(pending) == 2
    c.cancel()
    pending.leave(a2)
    pending.leave(d1)
    assert len(pending) == 0


async def test_a_connection_that_dies_before_its_upgrade_logs_no_traceback(tmp_path, caplog):
    """Idle sockets cut at the deadline, failed and abandoned handshakes used to log `Exception in
    callback ... 'Sniffing' object has no attribute 'recv_messages'` with a traceback each."""
    caplog.set_level(logging.INFO)
    async with funasr_port(tmp_path, open_timeout_s=0.3) as (port, _):
        socks = [
            await _open(port, "127.0.0.1", b""),  # idle: closed at the deadline
            await _open(port, "127.0.0.1", b"\x16"),  # half a handshake: closed at the deadline
            await _open(port, "127.0.0.1", b"\x16\x03\x01\x00\x05hello"),  # garbage after 0x16: closed at once
            await _open(port, "127.0.0.1", b"\x16\x03\x01\x02\x00\x01"),  # a ClientHello cut short, then gone
        ]
        socks[3][1].transport.abort()
        for reader, _ in socks[:3]:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.sleep(0.4)  # the abandoned one's deadline too
        await _wss(port)
        for _, writer in socks:
            writer.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)
