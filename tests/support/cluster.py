"""`asr-server serve --workers N` as a real subprocess on free loopback ports, for the worker tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
_READY = re.compile(r"(\d+) workers ready \(pids ([\d, ]+);.*devices (\S+), HTTP (\S+), FunASR (\S+)")


@dataclass
class Cluster:
    process: subprocess.Popen
    device_url: str
    http_url: str
    funasr_url: str
    pids: list[int]
    log: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {`name{labels}`: value} (the whole server's, whichever worker answers)."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def worker_sessions(self) -> dict[str, float]:
        """Open device sessions per worker index."""
        pat = re.compile(r'asr_worker_sessions_open\{(?=.*protocol="xiaozhi")(?=.*worker="(\d+)").*\}')
        return {m.group(1): v for k, v in self.metrics().items() if (m := pat.fullmatch(k))}

    def wait_log(self, pattern: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log):
                if re.search(pattern, line):
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no log line matching {pattern!r}; the log:\n" + "\n".join(self.log[-40:]))

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_cluster(tmp_path: Path, models_dir: Path, workers: int = 2, **sections) -> Cluster:
    """Start the server with `workers` processes; returns once every worker serves."""
    config = {
        "log_level": "INFO",
        "xiaozhi": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0, "health_port": 0},
        "funasr": {"host": "127.0.0.1", "port": 0, "self_signed_cert": str(tmp_path / "funasr.pem")},
        "asr": {"model_dir": str(models_dir / "SenseVoiceSmall")},
        "speaker": {"model": str(models_dir / "campplus" / "campplus.onnx"), "db": str(tmp_path / "vp.sqlite")},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_SERVER__")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "asr_server", "-c", str(path), "serve", "--workers", str(workers)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    log: list[str] = []
    ready: list[re.Match] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip())
            if not ready and (m := _READY.search(line)):
                ready.append(m)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while not ready:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start; its log:\n" + "\n".join(log[-40:]))
        time.sleep(0.1)
    m = ready[0]
    pids = [int(p) for p in m.group(2).split(",")]
    return Cluster(proc, m.group(3).rstrip(","), m.group(4).rstrip(","), m.group(5), pids, log)
