"""Bearer keys for the HTTP API and the FunASR-compatible socket.

Keys are scoped: admin keys (`http.api_keys`) may do everything, read keys (`http.read_keys`)
everything but voiceprint writes, and a device token (`xiaozhi.auth.tokens`) only reads the
transcripts of the sessions that authenticated with it. With no API key configured the API is open
to read, as a LAN-only ASR box usually is, but voiceprints are managed from loopback only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import Config


def header_or_query(request: Any, name: str) -> str | None:
    """A header value, or the query parameter of the same name (dashes or underscores, any case):
    devices send headers, browsers (which cannot) the same names in the query string."""
    value = request.headers.get(name)
    if value:
        return value
    query = parse_qs(urlsplit(request.path).query)
    for key in (name.lower(), name.lower().replace("-", "_")):
        if query.get(key):
            return query[key][0]
    return None


def bearer_token(value: str | None) -> str | None:
    """The key from `Bearer <key>`, `Bearer; <key>` (xiaozhi's FunASR provider) or a bare key."""
    if not value:
        return None
    value = value.strip()
    if value[:6].lower() == "bearer":
        value = value[6:].lstrip(" ;:")
    return value or None


class Role(enum.IntEnum):
    """What a key may do; each role includes the ones below it."""

    DEVICE = 1  # a device token: its own sessions' transcripts on /v1/events, nothing else
    READ = 2  # transcribe, identify, subscribe to every device's transcripts
    ADMIN = 3  # also enrol, list and delete voiceprints (biometric data)


def fingerprint(token: str) -> str:
    """A device token's stand-in in events and logs (the token itself is a secret)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _matches(token: str, keys: frozenset[str]) -> bool:
    given = token.encode("utf-8", "surrogateescape")  # a non-ASCII header is a wrong key, not a crash
    return any(hmac.compare_digest(given, k.encode()) for k in keys)


@dataclass(frozen=True, slots=True)
class Grant:
    role: Role
    scope: str | None = None  # a device token's fingerprint
    keyed: bool = False  # given by an API key (admin or read), not by an open API or the client's address


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Who may call the HTTP API and the FunASR socket.

    `http.api_keys` are admin keys, `http.read_keys` read keys; device tokens (`xiaozhi.auth.tokens`)
    are not API keys: they only read their own devices' events. With no API key configured the API
    is open to read, and admin (voiceprint write, delete, list) only from loopback clients.
    """

    admin: frozenset[str]
    read: frozenset[str]
    devices: frozenset[str]

    @classmethod
    def from_config(cls, config: Config) -> ApiKeys:
        devices = frozenset(config.xiaozhi.auth.tokens) if config.xiaozhi.auth.enabled else frozenset()
        return cls(frozenset(config.http.api_keys), frozenset(config.http.read_keys), devices)

    def grant(self, token: str | None, loopback: bool = False) -> Grant | None:
        """The rights `token` gives (None: none); without configured API keys, reading is open and
        a loopback client is an admin."""
        if token:
            if _matches(token, self.admin):
                return Grant(Role.ADMIN, keyed=True)
            if _matches(token, self.read):
                return Grant(Role.READ, keyed=True)
            if _matches(token, self.devices):
                return Grant(Role.DEVICE, fingerprint(token))
        if not (self.admin or self.read):
            if loopback:
                return Grant(Role.ADMIN)
            if not self.devices:
                return Grant(Role.READ)
        return None

    def allows(self, token: str | None, role: Role = Role.READ) -> bool:
        """True when `token` (or an open API) has `role`; the FunASR socket's check."""
        grant = self.grant(token)
        return grant is not None and grant.role >= role
