"""What aiohttp's server lacks to face the internet: a cap on open connections per port and per
client address, and a deadline for each request's headers.

Without them, 19,990 slowloris sockets (headers sent a byte at a time) held every file
descriptor of the process and every port stopped answering. The guard wraps aiohttp's protocol
factory: past `limit` open connections (or `per_ip` from one address, so that one attacker's slow
sockets cannot hold every slot) a new one gets a 503 and is closed at once; a connection
that starts a request must finish its headers within `header_timeout_s` (the request then
belongs to its handler, whose body reads have their own timeout); idle keep-alive connections
are aiohttp's `keepalive_timeout`.

Behind a reverse proxy (`http.trusted_proxies`) a connection carries many clients' requests, so
the proxy's connections are not capped per address; each forwarded client's requests in progress
are (`forwarded_client`, from the middleware, where `X-Forwarded-For` has been read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from aiohttp import web

from ...sharing import Tally
from ..admission import RETRY_AFTER_S

log = logging.getLogger(__name__)

_FULL = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: {retry}\r\n"
    "Connection: close\r\nContent-Length: {n}\r\n\r\n{body}"
)


class ConnectionGuard:
    """Counts a port's connections and arms the header deadline; the middleware marks requests."""

    def __init__(
        self,
        limit: int,
        header_timeout_s: float,
        key: str,
        on_event: Callable[[str], None] | None = None,
        tally: Tally | None = None,
        per_ip: int = 0,
        trusted: Sequence[IPv4Network | IPv6Network] = (),
        proxies: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.limit = limit
        self.per_ip = per_ip  # 0: no per-address cap; counted in this process (each worker its own)
        self.trusted = tuple(trusted)  # exempt from per_ip (a chatbot server speaking for all its devices)
        self.proxies = tuple(proxies)  # their connections carry many clients: per_ip counts those instead
        self._by_ip: dict[str, int] = {}
        self._by_client: dict[str, int] = {}  # forwarded clients' requests in progress
        self.header_timeout_s = header_timeout_s
        self.key = key
        self.tally = tally if tally is not None else Tally()  # the whole server's, with workers
        self._on_event = on_event or (lambda _: None)
        self._connections: dict[Any, _Guarded] = {}

    def factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(inner(), self)

    def request_started(self, transport: Any) -> None:
        conn = self._connections.get(transport)
        if conn is not None:
            conn.disarm()

    def request_done(self, transport: Any) -> None:
        conn = self._connections.get(transport)
        if conn is not None:
            conn.idle = True

    def _event(self, kind: str) -> None:
        self._on_event(kind)

    def _admit(self, ip: str) -> str | None:
        """Take a slot for a connection from `ip`, or say why it is refused."""
        held = self._by_ip.get(ip, 0)
        if self.per_ip and held >= self.per_ip and not in_networks(ip, self.trusted + self.proxies):
            self._event("http_address_full")
            return f"too many connections from {ip} ({held} open, http.max_connections_per_ip = {self.per_ip})"
        if not self.tally.take(self.limit):
            self._event("http_connections_full")
            return f"server full: {self.tally.total} connections open ({self.key} = {self.limit})"
        self._by_ip[ip] = held + 1
        return None

    def _trusted(self, ip: str) -> bool:
        return in_networks(ip, self.trusted)

    @contextlib.contextmanager
    def forwarded_client(self, client: str) -> Iterator[None]:
        """A request a trusted proxy forwarded for `client` is in progress; `Refused` past `per_ip`."""
        held = self._by_client.get(client, 0)
        if self.per_ip and held >= self.per_ip and not self._trusted(client):
            self._event("http_address_full")
            raise Refused(
                f"too many requests in progress from {client} ({held}, http.max_connections_per_ip = {self.per_ip})"
            )
        self._by_client[client] = held + 1
        try:
            yield
        finally:
            give_back(self._by_client, client)

    def _release(self, ip: str) -> None:
        self.tally.give()
        give_back(self._by_ip, ip)


class Refused(Exception):
    """A request over a per-address cap; the message says which."""


def give_back(counts: dict[str, int], key: str) -> None:
    """One fewer held by `key`; a key holding none is dropped (the maps stay as small as the holders)."""
    left = counts.pop(key, 1) - 1
    if left:
        counts[key] = left


def in_networks(ip: str, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether address `ip` lies in one of `networks` (an IPv4 client of a dual-stack `::` listener too)."""
    try:
        address = ip_address(ip)
    except ValueError:  # no peer address (a Unix socket), or not an address: nothing to match
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's checks (every call is forwarded)."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.ip = ""
        self.idle = True  # no request in progress: the next byte starts one
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        g = self.guard
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        why = g._admit(self.ip)
        if why is not None:
            self.refused = True
            body = f"{why}, try again later\n"
            transport.write(_FULL.format(retry=RETRY_AFTER_S, n=len(body), body=body).encode())
            transport.close()
            return
        g._connections[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.idle:
            self.idle = False
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.disarm()
        self.guard._release(self.ip)
        self.guard._connections.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()

    def _arm(self) -> None:
        self.disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.guard.header_timeout_s, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self.guard._event("http_header_timeout")
        log.info("closing an HTTP connection: no complete request headers within %g s", self.guard.header_timeout_s)
        if self.transport is not None:
            self.transport.abort()


class GuardedSite(web.TCPSite):
    """`web.TCPSite` whose connections go through a `ConnectionGuard`."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, reuse_port: bool = False
    ) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner (TCPSite.start would listen unguarded)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.factory(server),
            self._host,
            self._port,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
