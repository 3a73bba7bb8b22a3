"""Configurations for tests: loopback, free ports, the tiny stand-in models."""

from __future__ import annotations

from pathlib import Path

from asr_server.config import Config, load_config


def make_config(models_dir: Path, db: Path, **sections) -> Config:
    """A config on loopback with free ports and the tiny models; `sections` override per test."""
    base = {
        "xiaozhi": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0, "health_port": 0},
        "funasr": {"host": "127.0.0.1", "port": 0, "self_signed_cert": str(db.parent / "funasr-selfsigned.pem")},
        "asr": {"model_dir": str(models_dir / "SenseVoiceSmall")},
        # deadline 0: who spoke must not depend on how busy the test machine is (the deadline has its own test)
        "speaker": {"model": str(models_dir / "campplus" / "campplus.onnx"), "db": str(db), "deadline_ms": 0},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_config(None, env={}, overrides=base)
