"""What every HTTP handler shares: the application's keys, the authorisation rule, the error shapes."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from aiohttp import web

from ...audio.decode_pool import DecodePool
from ...config import Config
from ...core.archive import Archive
from ...core.events import EventBus
from ...core.metrics import Metrics
from ...core.pipeline import Pipeline
from ...errors import ApiError
from ..auth import ApiKeys, Grant, Role, bearer_token
from .guard import ConnectionGuard, in_networks

CONFIG = web.AppKey("config", Config)
PIPELINE = web.AppKey("pipeline", Pipeline)
BUS = web.AppKey("bus", EventBus)
METRICS = web.AppKey("metrics", Metrics)
READY: web.AppKey[Callable[[], bool]] = web.AppKey("ready")
KEYS = web.AppKey("keys", ApiKeys)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")
DECODER = web.AppKey("decoder", DecodePool)
GUARD = web.AppKey("guard", ConnectionGuard)
ARCHIVE: web.AppKey[Archive | None] = web.AppKey("archive")
_LOOPBACK = ("127.0.0.1", "::1")


def client_address(request: web.Request) -> str:
    """Who sent `request`: its peer, or behind a trusted proxy (`http.trusted_proxies`) the last
    `X-Forwarded-For` address that is not a trusted proxy itself (each proxy appends the address it
    got the request from, so the ones before a client's own proxy are the client's to forge)."""
    peer = request.remote or ""
    proxies = request.app[GUARD].proxies
    if not proxies or not in_networks(peer, proxies):  # no proxy configured (the default): no parsing
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
    for hop in reversed(hops):
        if not hop or not _is_address(hop):
            return peer  # a hop no proxy of ours would write: the last trusted one is all that is known
        if not in_networks(hop, proxies):
            return hop
    return peer


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def authorize(request: web.Request, *query_names: str, role: Role = Role.READ) -> Grant:
    """The caller's rights; 401 without a key that has `role` (403 when the key is valid but has
    less). `query_names` may carry the key for browsers, which cannot set headers."""
    keys = request.app[KEYS]
    token = bearer_token(request.headers.get("Authorization"))
    for name in query_names:
        token = token or request.query.get(name)
    # Behind a proxy every client arrives from it (loopback for one on this host): no one is admin by address.
    loopback = not request.app[GUARD].proxies and request.remote in _LOOPBACK
    grant = keys.grant(token, loopback=loopback)
    if grant is None:
        raise ApiError(401, "missing API key" if not token else "invalid API key", code="invalid_api_key")
    if grant.role < role:
        what = "an admin key (http.api_keys)" if role == Role.ADMIN else "an API key (http.api_keys or http.read_keys)"
        if not (keys.admin or keys.read) and grant.role == Role.READ:
            what += (
                "; with none configured, only loopback clients may manage voiceprints"
                if not request.app[GUARD].proxies
                else "; behind a proxy (http.trusted_proxies) voiceprints need an admin key"
            )
        raise ApiError(403, f"this needs {what}", code="insufficient_permissions")
    return grant


def error_response(request: web.Request, err: ApiError) -> web.Response:
    if request.path.startswith("/v1/"):
        kind = (
            "authentication_error"
            if err.status == 401
            else "invalid_request_error"
            if err.status < 500
            else "server_error"
        )
        body: dict[str, Any] = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    else:
        body = {"detail": err.message}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return web.json_response(body, status=err.status, headers=headers)


def too_large_message(config: Config) -> str:
    return f"upload larger than the {config.http.max_upload_mb:g} MB limit (http.max_upload_mb)"
