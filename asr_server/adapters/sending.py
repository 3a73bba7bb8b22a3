"""Sends with a deadline: a client that stops reading must not hold its session (and its buffered
replies) forever. websockets blocks a send once its write buffer is over the high-water mark; past
`timeout_s` the connection is dropped (TCP abort), which ends the session's read loop too."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)


async def send_within(ws: Any, data: str | bytes, timeout_s: float, who: str) -> bool:
    """Send `data` on the websockets connection `ws`; False when the peer is gone or too slow (then
    the connection is aborted)."""
    try:
        await asyncio.wait_for(ws.send(data), timeout_s)
        return True
    except ConnectionClosed:
        return False
    except TimeoutError:
        log.warning("%s: the client read nothing for %.0f s; dropping the connection", who, timeout_s)
        ws.transport.abort()
        return False


def close_reason(text: str) -> str:
    """`text` cut to fit a WebSocket close frame (123 bytes of UTF-8), on a character boundary: a
    client's wav_name of emoji in a reason cut by characters would fail the close itself."""
    data = text.encode("utf-8", "replace")
    return data[:123].decode("utf-8", "ignore") if len(data) > 123 else text
