"""TLS and plain WebSocket on the FunASR port at once, as the clients' defaults need.

xiaozhi-esp32-server's `FunASRServer` provider defaults to `is_ssl: true` and FunASR's own client to
`--ssl 1`, while others connect with plain `ws://`. Each connection's first byte tells which it is
(0x16 opens a TLS handshake record; an HTTP upgrade starts with a letter), so it is peeked, not
read, and the connection goes on as TLS (`loop.start_tls`) or as it is. Without a configured
certificate one is generated once, self-signed, into the data folder (FunASR's server also ships
a self-signed one; its clients do not verify it).

A TLS handshake holds asyncio's TLS protocol (a 256 KB buffer), so the stage before the upgrade
is bounded: the TLS state is made only for a whole first record, the handshakes in progress are
capped in all and per address (`PendingHandshakes`), and everything before the upgrade has one
deadline from the accept.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection

from ...config import FunAsrConfig
from ...errors import ConfigError
from ...logs import Throttle

log = logging.getLogger(__name__)

_TLS_HANDSHAKE = b"\x16"
#: The longest TLS record (2^14 bytes of plaintext and the most a record may add to it).
_MAX_RECORD = 2**14 + 2048


def self_signed(path: Path) -> Path:
    """A PEM file (key and certificate) for `localhost`, made once at `path` and reused after."""
    if path.is_file():
        return path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asr-server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(pem)
    path.chmod(0o600)
    log.info("funasr: generated a self-signed certificate at %s (set funasr.ssl_certfile for your own)", path)
    return path


def tls_context(cfg: FunAsrConfig) -> ssl.SSLContext | None:
    """The server TLS context: `funasr.ssl_certfile`, else (tls: both or on) a self-signed one; None when off."""
    if cfg.tls == "off":
        return None
    certfile = cfg.ssl_certfile or self_signed(cfg.self_signed_cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, cfg.ssl_keyfile if cfg.ssl_certfile else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"invalid configuration: funasr.ssl_certfile/ssl_keyfile cannot be loaded: {e}") from None
    return ctx


#: TLS handshakes one worker process holds in progress at once. Each holds ~320 KB while it lasts
#: (asyncio's TLS protocol allocates a 256 KB read buffer up front) and the allocator keeps what
#: they took: 2,000 sockets that sent the one byte 0x16 grew the server from 143 to 768 MB. An
#: honest handshake is over in a round trip or two, so 64 at once is far more than clients keep
#: pending, and caps what they cost at ~40 MB (64 pending and 64 closing).
MAX_PENDING_HANDSHAKES = 64
#: ... of them from one client address; its others wait their turn, so that one address's flood
#: holds only its own share (a chatbot server's burst after a restart waits milliseconds).
MAX_PENDING_HANDSHAKES_PER_ADDRESS = 16
#: A pending handshake this old may be closed to make room for a newcomer: an honest one is over in
#: a round trip or two (milliseconds on a LAN, under a second across the world), so a younger one
#: never is, and a burst of honest clients waits its turn instead of closing each other.
EVICTABLE_AFTER_S = 1.0


class PendingHandshakes:
    """The TLS handshakes in progress: at most `limit` at once and `per_address` from one address.

    A connection past the per-address cap waits for its address's turn. Past the total cap, a
    newcomer closes the oldest pending handshake if that one has lasted `EVICTABLE_AFTER_S`, and
    takes its place once it has ended, as a SYN cache does: a client that has not finished by then
    is the likeliest never to, and a flood from many addresses then cannot keep newcomers out.
    Otherwise it waits for a place, looking again every `EVICTABLE_AFTER_S`. A waiting connection
    holds only its socket, and waits within its deadline."""

    def __init__(
        self,
        limit: int = MAX_PENDING_HANDSHAKES,
        per_address: int = MAX_PENDING_HANDSHAKES_PER_ADDRESS,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self.per_address = per_address
        self._on_evict = on_evict
        self._pending: dict[asyncio.Transport, tuple[str, float]] = {}  # address, start; oldest first
        self._heirs: dict[asyncio.Transport, _Waiter] = {}  # a closed handshake -> who takes its place
        self._by_address: Counter[str] = Counter()  # pending, and heirs from when a place is promised
        self._waiting: deque[_Waiter] = deque()
        self._throttle = Throttle()

    def __len__(self) -> int:
        return len(self._pending)

    async def enter(self, transport: asyncio.Transport, address: str) -> None:
        """Return when `transport` may handshake (it is then pending until `leave`)."""
        loop = asyncio.get_running_loop()
        while not self._room(address):
            me = _Waiter(transport, address, loop.create_future())
            victim = self._stale(loop.time()) if self._by_address[address] < self.per_address else None
            if victim is not None:
                self._heirs[victim] = me
                self._by_address[address] += 1
                self._evict(victim)
            else:
                self._waiting.append(me)
            try:
                async with asyncio.timeout(None if victim is not None else EVICTABLE_AFTER_S):
                    await me.turn  # `leave` made `transport` pending
                return
            except TimeoutError:  # no place yet: look for a stale handshake again
                if me.turn.done() and not me.turn.cancelled():
                    return  # given a place as the wait ended
                self._waiting.remove(me)
            except BaseException:  # past its deadline, or the server stops
                self._give_up(me, victim)
                raise
        self._add(transport, address, loop.time())

    def leave(self, transport: asyncio.Transport) -> None:
        """`transport`'s handshake ended (done, failed or closed): its heir, or the first waiter with
        room, takes its place."""
        entry = self._pending.pop(transport, None)
        if entry is None:
            return
        self._forget(entry[0])
        heir = self._heirs.pop(transport, None)
        if heir is not None:
            self._forget(heir.address)  # counted again as it is added
            if not heir.turn.done():
                self._grant(heir)
                return
        for waiter in self._waiting:
            if self._room(waiter.address) and not waiter.turn.done():
                self._waiting.remove(waiter)
                self._grant(waiter)
                return

    def _room(self, address: str) -> bool:
        """A place for one more from `address` (a closed one still pending counts: its place is its heir's)."""
        return len(self._pending) < self.limit and self._by_address[address] < self.per_address

    def _add(self, transport: asyncio.Transport, address: str, now: float) -> None:
        self._pending[transport] = (address, now)
        self._by_address[address] += 1

    def _grant(self, waiter: _Waiter) -> None:
        self._add(waiter.transport, waiter.address, asyncio.get_running_loop().time())
        waiter.turn.set_result(None)

    def _stale(self, now: float) -> asyncio.Transport | None:
        """The oldest pending handshake, if it has lasted `EVICTABLE_AFTER_S` and is not closing already."""
        for t, (_, started) in self._pending.items():
            if now - started < EVICTABLE_AFTER_S:
                return None
            if t not in self._heirs:
                return t
        return None

    def _evict(self, victim: asyncio.Transport) -> None:
        victim.abort()
        if self._on_evict is not None:
            self._on_evict()
        if self._throttle.allow():
            log.warning(
                "funasr: %d TLS connections pending (at most %d): closed the oldest, unfinished after %g s%s",
                len(self._pending),
                self.limit,
                EVICTABLE_AFTER_S,
                self._throttle.note(),
            )

    def _give_up(self, me: _Waiter, victim: asyncio.Transport | None) -> None:
        """`me` stops waiting: out of the queue, its promised place given back, or its place left."""
        if me in self._waiting:
            self._waiting.remove(me)
        elif victim is not None and self._heirs.get(victim) is me:
            del self._heirs[victim]
            self._forget(me.address)
        elif me.transport in self._pending:
            self.leave(me.transport)

    def _forget(self, address: str) -> None:
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]


@dataclass(eq=False, slots=True)
class _Waiter:
    """A connection waiting for a place to handshake."""

    transport: asyncio.Transport
    address: str
    turn: asyncio.Future[None]


def sniffing(ctx: ssl.SSLContext, timeout_s: float, pending: PendingHandshakes | None = None) -> type[ServerConnection]:
    """A websockets connection class that serves TLS or plain on one port (`serve(create_connection=...)`).

    From the accept, the first byte (for TLS, the whole first record: nothing TLS is made for less)
    and then the TLS handshake must come within `timeout_s` (`funasr.open_timeout_s`; the WebSocket
    upgrade has its own). A TLS connection counts in `pending` from its first record until its
    WebSocket upgrade is answered: until then it holds its TLS state and no `funasr.max_sessions` slot. A connection that ends before it is a WebSocket
    connection (idle, a failed or closed handshake) is closed with one log line at most, never a
    traceback."""
    handshakes = pending if pending is not None else PendingHandshakes()

    class Sniffing(ServerConnection):
        tls = False
        upgraded = False  # websockets' own connection_made ran: from then on it is websockets' connection
        _sniffer: asyncio.Task[None] | None = None
        _raw: asyncio.Transport | None = None  # the TCP transport under TLS, while it counts as pending

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # nothing is read until the first byte is known
            self._sniffer = self.loop.create_task(self._sniff(transport, self.loop.time() + timeout_s))

        def connection_lost(self, exc: Exception | None) -> None:
            if self.upgraded:
                super().connection_lost(exc)
            elif self._sniffer is not None:  # gone before the upgrade: nothing of websockets' to undo
                self._sniffer.cancel()

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            finally:
                if self._raw is not None:
                    handshakes.leave(self._raw)

        async def _sniff(self, transport: asyncio.Transport, deadline: float) -> None:
            raw = transport.get_extra_info("socket")
            sock = raw.dup() if raw is not None else None
            try:
                async with asyncio.timeout_at(deadline):
                    first = await _first_record(self.loop, sock) if sock else b""
            except (TimeoutError, OSError, NotTls) as e:
                if isinstance(e, NotTls):
                    log.info("funasr: closed a connection that is neither TLS nor HTTP: %s", e)
                transport.abort()
                return
            finally:
                if sock is not None:
                    sock.close()
            if first[:1] == _TLS_HANDSHAKE and len(first) < 5:
                transport.abort()  # closed within a TLS record's header
                return
            if first[:1] != _TLS_HANDSHAKE:
                self.upgraded = True
                super().connection_made(transport)
                transport.resume_reading()
                return
            peer = transport.get_extra_info("peername")
            try:
                async with asyncio.timeout_at(deadline):
                    await handshakes.enter(transport, str(peer[0]) if isinstance(peer, tuple) and peer else "")
            except TimeoutError:
                log.info("funasr: no turn for a TLS handshake within %g s (funasr.open_timeout_s)", timeout_s)
                transport.abort()
                return
            self._raw = transport  # pending from here until the upgrade is answered (`handshake`)
            tls = None
            try:
                tls = await self.loop.start_tls(
                    transport,
                    self,
                    ctx,
                    server_side=True,
                    ssl_handshake_timeout=max(0.001, deadline - self.loop.time()),
                )
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
                log.info("funasr: TLS handshake failed: %s", str(e) or type(e).__name__)
                # asyncio's frames in the traceback hold the TLS protocol (and its 256 KB buffer) in a
                # cycle with this exception: without this, each failed handshake waited for a full
                # garbage collection, and 500 clients gone mid-handshake grew the server by 130 MB.
                traceback.clear_frames(e.__traceback__)
                e.__traceback__ = None
            finally:
                if tls is None:  # failed, timed out, or closed to make room (then start_tls returns None)
                    handshakes.leave(transport)
                    transport.abort()
            if tls is not None:
                self.tls = True
                self.upgraded = True
                super().connection_made(tls)

    return Sniffing


async def _first_record(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """What the peer sent first, left in the socket for whoever reads it next: one byte, or when
    that byte opens a TLS handshake record, the whole record (its 5-byte header and its body); fewer
    bytes when the peer closed first. A record header that is not TLS's is `NotTls`."""
    first = await _peek(loop, sock, 1)
    if first != _TLS_HANDSHAKE:
        return first
    header = await _peek(loop, sock, 5)
    if len(header) < 5:
        return header
    length = int.from_bytes(header[3:5], "big")
    if header[1] != 3 or length > _MAX_RECORD:
        raise NotTls(f"a TLS record header that is not one: {header.hex()}")
    return await _peek(loop, sock, 5 + length)


class NotTls(Exception):
    """0x16 and then bytes that cannot be a TLS record."""


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """The first `n` bytes the peer sent (fewer once it closed), left in the socket. The socket reads
    as ready only once `n` bytes are there (SO_RCVLOWAT), so waiting for them costs no wake-ups."""
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    return sock.recv(n, socket.MSG_PEEK)


def transport_of(ws: Any) -> str:
    """ "wss" or "ws": how a FunASR connection came in (for the log)."""
    return "wss" if getattr(ws, "tls", False) or ws.transport.get_extra_info("sslcontext") else "ws"
