"""`scripts/gpu-check.sh` runs here first (`--device cpu --small`), so a GPU slot never meets it untried."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.audio import needs_audio

REPO = Path(__file__).resolve().parents[1]
STEPS = ("models", "shapes", "capacity-shared", "capacity-onnx", "capacity-torch", "bench_gpu")


def gpu_check(out: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, str]:
    run = subprocess.run(
        ["scripts/gpu-check.sh", "--device", "cpu", "--small", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return run, (out / "README.md").read_text()


@pytest.mark.slow
@needs_audio
def test_the_gpu_check_runs_every_shape_on_a_cpu_and_writes_its_tables(tmp_path):
    out = tmp_path / "check"
    run, summary = gpu_check(out, "--ramp", "2", "--duration", "6")
    assert run.returncode == 0, run.stderr[-3000:] + summary
    for step in STEPS:
        assert f"| {step} | `" in summary, summary
    shapes = (out / "shapes.md").read_text()
    assert "| onnxruntime " in shapes and "CPUExecutionProvider | 4 |" in shapes, shapes
    assert "| torch " in shapes and "no CUDA graphs on a CPU" in shapes, shapes
    assert "| SenseVoice | fp32 | 8 |" in (out / "bench_gpu.md").read_text()
    for step in ("capacity-shared", "capacity-onnx", "capacity-torch"):
        assert "p95" in (out / step / "summary.md").read_text(), step
    assert "## capacity-shared/summary.md" in summary and "## shapes.md" in summary


def test_a_spent_deadline_skips_the_remaining_steps_and_fails_the_run(tmp_path):
    run, summary = gpu_check(tmp_path / "check", "--deadline", "5", timeout=120)
    assert run.returncode == 1, run.stderr[-3000:]
    for step in ("models", "shapes", "capacity-torch", "bench_gpu"):
        assert f"| {step} | skipped: " in summary and "of --deadline 5 |" in summary, summary
