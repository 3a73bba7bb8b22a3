"""The dependency locks: they agree with pyproject.toml, an edit is caught, a broken install is named,
and the serving lock alone runs the server without torch."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.audio import AUDIO

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lock = _script("lock")
install_locked = _script("install_locked")


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """pyproject.toml and every lock, copied: what the check reads."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for lk in lock.LOCKS:
        (tmp_path / lk.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / lk.path, tmp_path / lk.path)
    return tmp_path


def test_the_locks_agree_with_pyproject():
    assert lock.check() == []


def test_every_lock_pins_every_package_with_hashes():
    for lk in lock.LOCKS:
        _, body = lock.split_lock((REPO / lk.path).read_text(encoding="utf-8"))
        entries = [line for line in body.splitlines() if line and not line.startswith((" ", "#"))]
        assert entries, lk.path
        for entry in entries:
            assert "==" in entry and entry.rstrip().endswith("\\"), f"{lk.path}: {entry}"
        assert body.count("--hash=sha256:") >= len(entries)


def test_serving_and_gpu_locks_hold_no_torch():
    for path in ("requirements.txt", "requirements/gpu.txt"):
        pins = lock.pins(lock.split_lock((REPO / path).read_text(encoding="utf-8"))[1])
        assert "torch" not in pins and "torchaudio" not in pins and "funasr" not in pins, path
        assert "silero-vad" in pins  # its ONNX file, without its torch dependency
    gpu = lock.pins(lock.split_lock((REPO / "requirements/gpu.txt").read_text(encoding="utf-8"))[1])
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu


def test_shared_packages_have_one_version_in_every_lock():
    versions: dict[str, set[str]] = {}
    for lk in lock.LOCKS:
        for name, version in lock.pins(lock.split_lock((REPO / lk.path).read_text(encoding="utf-8"))[1]).items():
            versions.setdefault(name, set()).add(version)
    assert {n: v for n, v in versions.items() if len(v) > 1} == {}


def test_a_lock_edited_by_hand_fails_the_check(repo_copy):
    path = repo_copy / "requirements.txt"
    text = path.read_text(encoding="utf-8")
    numpy_pin = next(line for line in text.splitlines() if line.startswith("numpy=="))
    path.write_text(text.replace(numpy_pin, numpy_pin.replace("numpy==", "numpy==1.", 1), 1), encoding="utf-8")
    problems = lock.check(repo_copy)
    assert any("requirements.txt was edited by hand" in p for p in problems)
    assert all("scripts/lock.py" in p for p in problems)


def test_a_range_changed_in_pyproject_without_regenerating_fails_the_check(repo_copy):
    path = repo_copy / "pyproject.toml"
    path.write_text(path.read_text(encoding="utf-8").replace('"websockets>=13"', '"websockets>=14"'), encoding="utf-8")
    problems = lock.check(repo_copy)
    assert {p.split(" ")[0] for p in problems if "out of date" in p} == {lk.path for lk in lock.LOCKS if not lk.build}


def test_a_missing_lock_and_a_lock_without_header_are_named(repo_copy):
    (repo_copy / "requirements/gpu.txt").unlink()
    torch_lock = repo_copy / "requirements/torch.txt"
    torch_lock.write_text(lock.split_lock(torch_lock.read_text(encoding="utf-8"))[1], encoding="utf-8")
    problems = lock.check(repo_copy)
    assert "requirements/gpu.txt is missing: run `python3 scripts/lock.py`" in problems
    assert any("requirements/torch.txt has no generation header" in p for p in problems)


def test_the_check_runs_as_a_command(repo_copy):
    ok = subprocess.run([sys.executable, str(REPO / "scripts/lock.py"), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_an_uninstallable_lock_stops_setup_with_the_package_and_what_to_do(tmp_path):
    """A pin the registry no longer serves (or has no wheel of for this Python), offline so it is certain."""
    bad = tmp_path / "bad.txt"
    bad.write_text("asr-server-no-such-package==1.0.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    named = "asr-server-no-such-package==1.0.0 is not on the package index"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}
    env.pop("PIP_INDEX_URL", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/install_locked.py"), str(bad)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert named in result.stderr
    assert "what to do:" in result.stderr and "setup-pip.log" in result.stderr
    assert len(result.stderr.splitlines()) <= 4  # no pip backtrace


def test_diagnose_names_a_hash_mismatch_and_an_unreachable_index():
    mismatch = install_locked.diagnose(
        "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. If you have updated the "
        "package versions, please update the hashes.\n    numpy==2.4.6 from https://files/numpy.whl:\n"
        "        Expected sha256 00\n             Got        11\n"
    )
    assert "numpy==2.4.6" in mismatch.summary and "hash" in mismatch.summary
    offline = install_locked.diagnose(
        "WARNING: Retrying ... Failed to establish a new connection: [Errno -3] Temporary failure in name "
        "resolution\nERROR: Could not find a version that satisfies the requirement numpy==2.4.6\n"
    )
    assert "cannot be reached" in offline.summary
    unpinned = install_locked.diagnose(
        "ERROR: In --require-hashes mode, all requirements must have their versions pinned with ==. These do "
        "not:\n    numpy>=1.26 from https://files/numpy.whl\n"
    )
    assert "unpinned requirement: numpy>=1.26" in unpinned.summary and "scripts/lock.py" in unpinned.advice


@pytest.mark.slow
def test_the_serving_lock_alone_runs_the_server_without_torch(tmp_path, models_dir):
    """A fresh venv given requirements.txt and the package: --help, transcribe and serve work; torch is absent."""
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    log = tmp_path / "pip.log"
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    subprocess.run(
        [str(py), str(REPO / "scripts/install_locked.py"), "requirements/build.txt", "requirements.txt"],
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
        check=True,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    cli = venv / "bin" / "asr-server"
    assert subprocess.run([str(cli), "--help"], capture_output=True, text=True, check=True).stdout.startswith("usage")

    config = tmp_path / "config.yaml"
    config.write_text(
        f"asr: {{model_dir: {models_dir / 'SenseVoiceSmall'}}}\n"
        f"speaker: {{model: {models_dir / 'campplus' / 'campplus.onnx'}, db: {tmp_path / 'vp.sqlite'}}}\n"
        "server: {host: 127.0.0.1, port: 0}\nhttp: {host: 127.0.0.1, port: 0, health_port: 0}\nfunasr: {host: 127.0.0.1, port: 0}\n"
    )
    clip = AUDIO / "en_tts_living_room_light_wyoming.wav"
    wav = clip if clip.is_file() else None
    if wav is None:
        import numpy as np
        import soundfile as sf

        wav = tmp_path / "tone.wav"
        sf.write(wav, (0.1 * np.sin(np.arange(16000) / 5)).astype("float32"), 16000)
    out = subprocess.run(
        [str(cli), "--config", str(config), "transcribe", "--json", str(wav)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert '"file"' in out.stdout
    if clip.is_file():
        assert "living room" in out.stdout.lower()

    serve = subprocess.Popen(
        [str(cli), "--config", str(config), "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert serve.stdout is not None
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if "devices: ws://" in line:
                break
        url = next((line.split("devices: ", 1)[1].strip() for line in lines if "devices: ws://" in line), None)
        assert url, "".join(lines)
        assert "torch" not in "".join(lines).lower()

        async def hello() -> dict:
            import json

            from websockets.asyncio.client import connect

            async with connect(url) as ws:
                await ws.send(
                    json.dumps(
                        {
                            "type": "hello",
                            "version": 1,
                            "transport": "websocket",
                            "audio_params": {
                                "format": "opus",
                                "sample_rate": 16000,
                                "channels": 1,
                                "frame_duration": 60,
                            },
                        }
                    )
                )
                return json.loads(await ws.recv())

        import asyncio

        assert asyncio.run(hello())["type"] == "hello"
    finally:
        serve.terminate()
        serve.wait(timeout=30)
