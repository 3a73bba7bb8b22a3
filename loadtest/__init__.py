"""Load-test harness for xiaozhi-protocol ASR servers: hundreds of simulated ESP32 devices
sending real Opus speech at real-time pace, with an end-of-speech -> stt latency report.

    python -m loadtest --url ws://127.0.0.1:8000/xiaozhi/v1/ --clients 50 --duration 60

Programmatic use: `report = await run_load(LoadOptions(url=..., clients=(10,), duration_s=5))`;
the wake shape (devices that connect when woken and never retry) is `run_wake`.
`Device` is the simulated device alone, for end-to-end tests; `loadtest.sink.Sink` a server
that only receives.
"""

from .clips import Clip, ClipError, load_clips, make_clip
from .device import (
    ConnectError,
    ConnectTimeout,
    Device,
    DeviceClosed,
    DeviceConfig,
    DeviceError,
    HelloRejected,
    HelloTimeout,
    ReplyTimeout,
    ServerMessage,
)
from .report import LoadReport, StepReport, StepStats, UtteranceSample
from .run import LoadOptions, OptionsError, run_load, run_step
from .stats import Percentiles
from .wake import WakeSample, run_wake

__all__ = [
    "Clip",
    "ClipError",
    "ConnectError",
    "ConnectTimeout",
    "Device",
    "DeviceClosed",
    "DeviceConfig",
    "DeviceError",
    "HelloRejected",
    "HelloTimeout",
    "LoadOptions",
    "LoadReport",
    "OptionsError",
    "Percentiles",
    "ReplyTimeout",
    "ServerMessage",
    "StepReport",
    "StepStats",
    "UtteranceSample",
    "WakeSample",
    "load_clips",
    "make_clip",
    "run_load",
    "run_step",
    "run_wake",
]
