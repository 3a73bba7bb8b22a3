"""The server's CPU time and resident memory, read from `/proc/<pid>` or a Prometheus endpoint.

Sampled once a second by the run, so a step reports average CPU (CPU seconds over wall seconds;
200 % is two cores busy) and peak RSS. A probe that fails is reported, never fatal.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_METRIC_CPU = "process_cpu_seconds_total"
_METRIC_RSS = "process_resident_memory_bytes"


class ProbeError(RuntimeError):
    """The server's process or metrics endpoint cannot be read."""


@dataclass(frozen=True, slots=True)
class ProbeSample:
    at: float  # time.monotonic()
    cpu_s: float  # user + system CPU seconds since the process started
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """What the server used during one step; None where nothing could be read."""

    source: str
    cpu_percent: float | None
    rss_peak_mb: float | None
    rss_end_mb: float | None
    error: str | None = None


def read_proc(pid: int, proc_root: Path = Path("/proc")) -> ProbeSample:
    """CPU and RSS of `pid` and its live child processes (a server's workers: `serve --workers N`
    runs them under a supervisor) from /proc/<pid>/stat and /proc/<pid>/statm."""
    cpu = 0.0
    rss = 0
    for p in [pid, *_children(pid, proc_root)]:
        base = proc_root / str(p)
        try:
            stat = (base / "stat").read_text()
            statm = (base / "statm").read_text()
        except OSError as e:
            if p != pid:
                continue  # a worker that ended between the listing and the read
            raise ProbeError(f"cannot read /proc for pid {pid}: {e.strerror or e}") from None
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
        rss += int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return ProbeSample(time.monotonic(), cpu, rss)


def _children(pid: int, proc_root: Path) -> list[int]:
    """The live children of `pid` (Linux's /proc/<pid>/task/<tid>/children), none where unreadable."""
    out: list[int] = []
    try:
        for task in (proc_root / str(pid) / "task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return out


def parse_metrics(text: str) -> tuple[float, int]:
    """`process_cpu_seconds_total` and `process_resident_memory_bytes` from Prometheus text."""
    cpu: float | None = None
    rss: float | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        if name == _METRIC_CPU:
            cpu = float(rest.split()[0])
        elif name == _METRIC_RSS:
            rss = float(rest.split()[0])
    if cpu is None or rss is None:
        missing = [m for m, v in ((_METRIC_CPU, cpu), (_METRIC_RSS, rss)) if v is None]
        raise ProbeError(f"metrics endpoint lacks {', '.join(missing)}")
    return cpu, int(rss)


def read_metrics(url: str, timeout_s: float = 2.0) -> ProbeSample:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read(4 << 20).decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        raise ProbeError(f"cannot read metrics from {url}: {e}") from None
    cpu, rss = parse_metrics(text)
    return ProbeSample(time.monotonic(), cpu, rss)


class ServerProbe:
    """Samples one server during a step: `start()`, then `stop()` gives its `ResourceUsage`."""

    def __init__(self, pid: int | None = None, metrics_url: str | None = None, interval_s: float = 1.0) -> None:
        if pid is None and metrics_url is None:
            raise ValueError("ServerProbe needs a pid or a metrics URL")
        self.pid = pid
        self.metrics_url = metrics_url
        self.interval_s = interval_s
        self.source = f"/proc/{pid}" if pid is not None else str(metrics_url)
        self._samples: list[ProbeSample] = []
        self._error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> ProbeSample:
        if self.pid is not None:
            return read_proc(self.pid)
        assert self.metrics_url is not None
        return await asyncio.to_thread(read_metrics, self.metrics_url)

    async def _take(self) -> None:
        try:
            self._samples.append(await self.sample())
        except ProbeError as e:
            self._error = str(e)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._take()

    async def start(self) -> None:
        self._samples.clear()
        self._error = None
        await self._take()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> ResourceUsage:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._take()
        s = self._samples
        if len(s) < 2:
            return ResourceUsage(self.source, None, None, None, self._error or "fewer than two samples")
        wall = s[-1].at - s[0].at
        cpu = (s[-1].cpu_s - s[0].cpu_s) / wall * 100.0 if wall > 0 else None
        mb = 1024.0 * 1024.0
        return ResourceUsage(self.source, cpu, max(x.rss_bytes for x in s) / mb, s[-1].rss_bytes / mb, self._error)


Series = dict[str, float]  # 'name{label="v",...}' -> value


def parse_series(text: str) -> Series:
    """Every sample of a Prometheus text exposition, keyed by its name and labels as written."""
    out: Series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def fetch_series(url: str, timeout_s: float = 2.0) -> Series:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse_series(resp.read(4 << 20).decode("utf-8", "replace"))
    except (OSError, ValueError) as e:
        raise ProbeError(f"cannot read metrics from {url}: {e}") from None


@dataclass(frozen=True, slots=True)
class ServerStages:
    """What the server's own metrics say about one step (differences between its start and end)."""

    loop_lag_p95_ms: float | None  # upper bound of the histogram bucket holding the 95th percentile
    loop_lag_max_bucket_ms: float | None
    discarded_compute_s: dict[str, float]  # per engine: compute whose result nobody took
    speculations: dict[str, float]  # per outcome: used, dropped, discarded
    busy_errors: float

    @staticmethod
    def between(before: Series, after: Series) -> ServerStages:
        def d(key: str) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        def by_label(name: str, label: str) -> dict[str, float]:
            out = {}
            for key in after:
                if key.startswith(name + "{") and f'{label}="' in key:
                    value = key.split(f'{label}="', 1)[1].split('"', 1)[0]
                    out[value] = round(d(key), 3)
            return out

        lag = sorted(
            (float(k.split('le="', 1)[1].split('"', 1)[0]), d(k))
            for k in after
            if k.startswith("asr_event_loop_lag_seconds_bucket{")
        )
        total = d("asr_event_loop_lag_seconds_count")
        p95 = top = None
        if total > 0:
            p95 = next((le * 1000 for le, n in lag if n >= 0.95 * total), None)
            below = [le for le, n in lag if n < total]
            top = (lag[len(below)][0] * 1000) if len(below) < len(lag) else None
        return ServerStages(
            p95,
            top,
            by_label("asr_discarded_compute_seconds_total", "engine"),
            by_label("asr_speculations_total", "outcome"),
            d('asr_errors_total{kind="busy"}'),
        )
