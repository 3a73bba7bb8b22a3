"""TLS and plain WebSocket on the FunASR port at once, as the clients' defaults need.

xiaozhi-esp32-server's `FunASRServer` provider defaults to `is_ssl: true` and FunASR's own client to
`--ssl 1`, while others connect with plain `ws://`. Each connection's first byte tells which it is
(0x16 opens a TLS handshake record; an HTTP upgrade starts with a letter), so it is peeked, not
read, and the connection goes on as TLS (`loop.start_tls`) or as it is. Without a configured
certificate one is generated once, self-signed, into the data folder (FunASR's server also ships
a self-signed one; its clients do not verify it).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection

from ...config import FunAsrConfig
from ...errors import ConfigError

log = logging.getLogger(__name__)

_TLS_HANDSHAKE = b"\x16"


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


def sniffing(ctx: ssl.SSLContext, timeout_s: float) -> type[ServerConnection]:
    """A websockets connection class that serves TLS or plain on one port (`serve(create_connection=...)`)."""

    class Sniffing(ServerConnection):
        tls = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # nothing is read until the first byte is known
            self.loop.create_task(self._sniff(transport))

        async def _sniff(self, transport: asyncio.Transport) -> None:
            raw = transport.get_extra_info("socket")
            sock = raw.dup() if raw is not None else None
            try:
                first = await asyncio.wait_for(_peek(self.loop, sock), timeout_s) if sock else b""
            except (TimeoutError, OSError):
                transport.abort()
                return
            finally:
                if sock is not None:
                    sock.close()
            if first == _TLS_HANDSHAKE:
                try:
                    tls = await self.loop.start_tls(
                        transport, self, ctx, server_side=True, ssl_handshake_timeout=timeout_s
                    )
                except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
                    log.info("funasr: TLS handshake failed: %s", e)
                    transport.abort()
                    return
                if tls is None:
                    transport.abort()
                    return
                self.tls = True
                super().connection_made(tls)
            else:
                super().connection_made(transport)
                transport.resume_reading()

    return Sniffing


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first byte the peer sent, left in the socket for whoever reads it next."""
    sock.setblocking(False)
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
    return sock.recv(1, socket.MSG_PEEK)


def transport_of(ws: Any) -> str:
    """ "wss" or "ws": how a FunASR connection came in (for the log)."""
    return "wss" if getattr(ws, "tls", False) or ws.transport.get_extra_info("sslcontext") else "ws"
