"""What a FunASR session sees of its server: its configuration, the pipeline, metrics, the event
bus, the server-wide budget for offline audio and the decoder processes offline files are decoded
in, and nothing else (no back-reference)."""

from __future__ import annotations

from dataclasses import dataclass

from ...audio.decode_pool import DecodePool
from ...config import FunAsrConfig
from ...core.archive import Archive
from ...core.events import EventBus
from ...core.metrics import Metrics
from ...core.pipeline import Pipeline


class BufferBudget:
    """Offline audio held in memory by all of a server's sessions together, against
    `funasr.max_buffered_mb`: twenty connections of 600 s each would otherwise hold 700+ MB."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held = 0

    def take(self, nbytes: int) -> bool:
        """Count `nbytes` more, or False (and nothing counted) when they do not fit."""
        if self.held + nbytes > self.limit_bytes:
            return False
        self.held += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.held -= nbytes


@dataclass(frozen=True, slots=True)
class FunAsrContext:
    """What a session uses of its server."""

    config: FunAsrConfig
    pipeline: Pipeline
    metrics: Metrics
    bus: EventBus | None
    buffers: BufferBudget
    decoder: DecodePool
    """Offline files (a `wav_format` other than pcm) are decoded here, never in the server process."""
    archive: Archive | None = None
    """Where final utterances are kept (`archive.enabled` and `archive.funasr`)."""
