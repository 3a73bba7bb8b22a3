"""The running server: one pipeline, the device socket, the HTTP API and the FunASR-compatible socket.

`AsrServer` is what `asr-server serve` runs and what the tests start on free ports; it checks
the model files before loading anything, so a missing model stops the start with a message
that names the files and the command that fetches them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from websockets.asyncio.server import Server

from .adapters.funasr.server import serve_funasr
from .adapters.http.app import build_app, build_health_app, start_http
from .adapters.http.console import ConsoleInfo
from .adapters.http.ota import PATH as OTA_PATH
from .adapters.xiaozhi.server import XiaozhiServer
from .audio.decode_pool import DecodePool
from .config import Config
from .core.archive import Archive
from .core.events import EventBus
from .core.live import SessionBoard
from .core.metrics import Metrics, watch_loop_lag
from .core.pipeline import Pipeline
from .errors import DecoderCrashed, StartupError
from .modelfiles.inspect import check_models, remedy
from .sharing import WorkerShare

log = logging.getLogger(__name__)


def check_model_files(config: Config) -> None:
    """Raise `StartupError` naming every missing or damaged model file and the command that fetches them.

    The cheap check (presence, sizes against the manifest, readable support files): a start
    never hashes a gigabyte of weights.
    """
    problems = check_models(config)
    if problems:
        files = "\n".join(f"  - {p}" for p in problems)
        raise StartupError(f"model files missing or damaged:\n{files}\n{remedy(config)}")


@dataclass(frozen=True, slots=True)
class Endpoints:
    device_url: str
    http_url: str | None
    funasr_url: str | None
    health_url: str | None = None  # /healthz, /readyz and /metrics on their own listener (http.health_port)


class AsrServer:
    """Starts and stops every listener around one shared pipeline."""

    def __init__(self, config: Config, pipeline: Pipeline | None = None, share: WorkerShare | None = None) -> None:
        self.config = config
        self.share = share  # one of several worker processes (serve --workers): what they share
        self.metrics = pipeline.metrics if pipeline is not None else Metrics(share.index if share else 0)
        self.pipeline = pipeline
        self._owns_pipeline = pipeline is None
        self.xiaozhi: XiaozhiServer | None = None
        self.bus: EventBus | None = None
        self.decoder: DecodePool | None = None
        self.board: SessionBoard | None = None
        self.archive: Archive | None = None
        self._ws: Server | None = None
        self._http: web.AppRunner | None = None
        self._health: web.AppRunner | None = None
        self._funasr: Server | None = None
        self._ready = False
        self._lag: asyncio.Task[None] | None = None
        self.endpoints: Endpoints | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> Endpoints:
        cfg = self.config
        if cfg.archive.enabled:  # its directory checked before the models load
            self.archive = await asyncio.to_thread(Archive, cfg.archive, self.metrics)
            log.info("archive: keeping final utterances in %s (%g days, %g GB)", cfg.archive.dir,
                     cfg.archive.max_days, cfg.archive.max_gb)  # fmt: skip
        if self.pipeline is None:
            check_model_files(cfg)
            t0 = time.perf_counter()
            self.pipeline = await asyncio.to_thread(Pipeline.load, cfg, self.metrics)
            await self.pipeline.warm_up()
            log.info("models loaded and warmed up in %.1f s", time.perf_counter() - t0)
        # uploads (HTTP, FunASR offline files) are decoded in processes of their own, started now
        # where a port takes uploads (a device-only server needs none)
        decoder = None
        if cfg.http.enabled or cfg.funasr.enabled:
            decoder = self.decoder = DecodePool(cfg.http.max_decodes, self.metrics.decodes.set)
            try:
                await asyncio.to_thread(decoder.warm)
            except DecoderCrashed as e:
                raise StartupError(f"cannot start the decoder processes: {e}") from None
        self.bus = EventBus(cfg, self.metrics, self.share)
        await self.bus.start()
        bus = self.bus
        self.board = SessionBoard(self.share)
        await self.board.start()
        self.xiaozhi = XiaozhiServer(cfg, self.pipeline, bus.publish, self.share, self.board, self.archive)
        try:
            self._ws = await self.xiaozhi.serve()
            device_port = self._ws.sockets[0].getsockname()[1]
            http_url = funasr_url = None
            if cfg.http.enabled:
                info = ConsoleInfo(
                    device_port,
                    self.share.count if self.share else 1,
                    self.share.index if self.share else 0,
                    time.time(),
                )
                app = build_app(
                    cfg,
                    self.pipeline,
                    self.bus,
                    self.metrics,
                    lambda: self._ready,
                    self.share,
                    self.board,
                    info,
                    decoder,
                    self.archive,
                )
                self._http = await start_http(app, cfg.http.host, cfg.http.port, reuse_port=self.share is not None)
                http_port = self._http.addresses[0][1]
                http_url = f"http://{_client_host(cfg.http.host)}:{http_port}"
                if cfg.http.health_port is not None:
                    self._health = await start_http(
                        build_health_app(app), cfg.http.host, cfg.http.health_port, reuse_port=self.share is not None
                    )
            if cfg.funasr.enabled:
                self._funasr = await serve_funasr(
                    cfg, self.pipeline, self.metrics, self.bus, self.share, self.board, decoder, self.archive
                )
                funasr_port = self._funasr.sockets[0].getsockname()[1]
                scheme = "wss" if cfg.funasr.tls == "on" else "ws"
                funasr_url = f"{scheme}://{_client_host(cfg.funasr.host)}:{funasr_port}/"
        except OSError as e:
            await self.stop()
            raise StartupError(f"cannot listen: {e}") from None
        health_url = (
            f"http://{_client_host(cfg.http.host)}:{self._health.addresses[0][1]}" if self._health is not None else None
        )
        self.endpoints = Endpoints(
            f"ws://{_client_host(cfg.xiaozhi.host)}:{device_port}{cfg.xiaozhi.path}", http_url, funasr_url, health_url
        )
        self._ready = True
        self._lag = asyncio.get_running_loop().create_task(watch_loop_lag(self.metrics), name="loop-lag")
        log.info("devices: %s", self.endpoints.device_url)
        if http_url:
            log.info("HTTP API: %s (/v1/audio/transcriptions, /voiceprint/*, /v1/events, /healthz, /metrics)", http_url)
            if self.endpoints.health_url:
                log.info("health and metrics: %s/healthz, /readyz, /metrics", self.endpoints.health_url)
            if cfg.http.console:
                log.info("browser console: %s/ (the microphone needs https or localhost)", http_url)
            log.info("device OTA URL (the firmware's OTA setting): %s%s", http_url, OTA_PATH)
        if funasr_url:
            both = " (wss:// on the same port)" if cfg.funasr.tls == "both" else ""
            log.info("FunASR-compatible WebSocket: %s%s", funasr_url, both)
        return self.endpoints

    async def stop(self, drain: bool = False) -> None:
        """Close every listener and connection and release the models. With `drain` (SIGTERM), first
        stop accepting devices and answer the utterances that already ended, for at most
        `xiaozhi.drain_timeout_s`, then close the devices with 1001."""
        self._ready = False
        if self._lag is not None:
            self._lag.cancel()
            self._lag = None
        if self._ws is not None:
            if drain and self.xiaozhi is not None:
                self._ws.close(close_connections=False)  # no new devices; connected ones go on
                await self.xiaozhi.drain(self.config.xiaozhi.drain_timeout_s)
            self._ws.close()
            await self._ws.wait_closed()
            self._ws = None
        if self.xiaozhi is not None:
            await self.xiaozhi.close()
        if self._funasr is not None:
            self._funasr.close()
            await self._funasr.wait_closed()
            self._funasr = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._health is not None:
            await self._health.cleanup()
            self._health = None
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close)
            self.decoder = None
        if self.board is not None:
            await self.board.close()
            self.board = None
        if self.archive is not None:  # after every session: their last utterances are written
            await asyncio.to_thread(self.archive.close)
            self.archive = None
        if self.pipeline is not None and self._owns_pipeline:
            await self.pipeline.close()
            self.pipeline = None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


async def serve_forever(
    config: Config, share: WorkerShare | None = None, on_ready: Callable[[Endpoints], None] | None = None
) -> None:
    """Run until SIGINT/SIGTERM, then close every connection and release the models. `on_ready`
    hears the endpoints once every listener is up (a worker tells its supervisor)."""
    server = AsrServer(config, share=share)
    endpoints = await server.start()
    if on_ready is not None:
        on_ready(endpoints)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: answering what is in flight (at most %g s)", config.xiaozhi.drain_timeout_s)
    await server.stop(drain=True)
