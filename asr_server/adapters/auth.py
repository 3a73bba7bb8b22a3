"""Bearer keys for the HTTP API and the FunASR-compatible socket.

One rule for every backend-facing endpoint: the keys in `http.api_keys`, plus the device tokens
(`server.auth.tokens`) when device authentication is on. With neither configured the API is
open, as a LAN-only ASR box usually is.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class ApiKeys:
    keys: frozenset[str]
    required: bool

    @classmethod
    def from_config(cls, config: Config) -> ApiKeys:
        keys = set(config.http.api_keys)
        if config.xiaozhi.auth.enabled:
            keys |= set(config.xiaozhi.auth.tokens)
        return cls(frozenset(keys), required=config.xiaozhi.auth.enabled or bool(config.http.api_keys))

    def allows(self, token: str | None) -> bool:
        """True when no key is required or `token` is one of the keys (compared in constant time)."""
        if not self.required:
            return True
        if not token:
            return False
        given = token.encode()
        return any(hmac.compare_digest(given, k.encode()) for k in self.keys)
