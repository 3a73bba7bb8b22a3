"""The command line: every error a user can cause is one line naming its cause, exit 2, no traceback;
a renamed config key still works, with a deprecation line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asr_server", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_a_bad_webhook_url_stops_serve_with_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("events:\n  webhook_url: not-a-url\n")
    out = run("serve", cwd=tmp_path)
    assert out.returncode == 2
    assert "events.webhook_url" in out.stderr and "http(s) URL" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_models_stop_serve_naming_the_files_and_the_fix(tmp_path):
    (tmp_path / "config.yaml").write_text(f"asr: {{model_dir: {tmp_path / 'models' / 'SenseVoiceSmall'}}}\n")
    out = run("serve", cwd=tmp_path)
    assert out.returncode == 2
    assert "model files missing or damaged" in out.stderr and "asr-server models pull" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unknown_key_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("asr:\n  quantised: yes\n")
    out = run("models", "list", cwd=tmp_path)
    assert out.returncode == 2 and "asr.quantised: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_old_section_name_works_with_a_deprecation_line(tmp_path):
    (tmp_path / "config.yaml").write_text("server:\n  port: 9123\n  max_sessions: 7\n")
    out = run("models", "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "the section 'server'" in out.stderr and "now called 'xiaozhi'" in out.stderr
    from asr_server.config import load_config

    cfg = load_config(tmp_path / "config.yaml", env={})
    assert (cfg.xiaozhi.port, cfg.xiaozhi.max_sessions) == (9123, 7)


def test_config_is_accepted_after_the_command_too(tmp_path):
    (tmp_path / "other.yaml").write_text("asr:\n  quantised: yes\n")  # a bad key shows which file was read
    for args in (("--config", "other.yaml", "serve"), ("serve", "--config", "other.yaml")):
        out = run(*args, cwd=tmp_path)
        assert out.returncode == 2 and "asr.quantised: unknown key" in out.stderr, (args, out.stderr)


def test_a_speaker_db_whose_folder_cannot_be_made_stops_serve_with_one_line(tmp_path, models_dir):
    """It was a 47-line traceback from deep in the pipeline's start."""
    (tmp_path / "file").write_text("a file where the db's folder should be\n")
    (tmp_path / "config.yaml").write_text(
        f"asr: {{model_dir: {models_dir / 'SenseVoiceSmall'}}}\n"
        f"speaker: {{model: {models_dir / 'campplus' / 'campplus.onnx'}, db: {tmp_path / 'file' / 'vp.sqlite'}}}\n"
        "xiaozhi: {host: 127.0.0.1, port: 0}\nhttp: {enabled: false}\nfunasr: {enabled: false}\n"
    )
    out = run("serve", cwd=tmp_path)
    assert out.returncode == 2
    assert "speaker.db" in out.stderr and "cannot be opened" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
