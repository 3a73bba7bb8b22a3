"""`scripts/gpu-check.sh` runs here first (`--device cpu --small`), so a GPU slot never meets it untried."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.audio import needs_audio

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@needs_audio
def test_the_gpu_check_runs_every_step_on_a_cpu_and_writes_its_tables(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run(
        ["scripts/gpu-check.sh", "--device", "cpu", "--small", "--ramp", "2", "--duration", "6", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (out / "README.md").read_text()
    assert run.returncode == 0, run.stderr[-3000:] + summary
    for step in ("models", "bench_gpu", "capacity-torch", "capacity-onnx"):
        assert f"| {step} | `" in summary, summary
    assert "| SenseVoice | fp32 | 8 |" in (out / "bench_gpu.md").read_text()
    for backend in ("torch", "onnx"):
        assert "p95" in (out / f"capacity-{backend}" / "summary.md").read_text()
    assert "## capacity-onnx/summary.md" in summary
