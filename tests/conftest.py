"""Shared fixtures: the tiny stand-in models, one pipeline for the whole run, servers on free ports."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from asr_server.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO.parent / "shared" / "audio"
HAVE_AUDIO = (AUDIO / "MANIFEST.tsv").is_file()
needs_audio = pytest.mark.skipif(not HAVE_AUDIO, reason="../shared/audio absent")


@dataclass(frozen=True)
class ManifestClip:
    file: str
    language: str
    transcript: str
    duration_s: float

    @property
    def path(self) -> Path:
        return AUDIO / self.file


def manifest() -> list[ManifestClip]:
    if not HAVE_AUDIO:
        return []
    with open(AUDIO / "MANIFEST.tsv", encoding="utf-8") as f:
        return [ManifestClip(r["file"], r["language"].split()[0], r["transcript"], float(r["duration_s"]))
                for r in csv.DictReader(f, delimiter="\t")]


def clip(name_prefix: str) -> ManifestClip:
    for c in manifest():
        if c.file.startswith(name_prefix):
            return c
    pytest.skip(f"no clip {name_prefix}* in ../shared/audio")


def cer(ref: str, hyp: str) -> float:
    """Character error rate, ignoring case, spaces and punctuation."""
    norm = lambda s: [c for c in s.lower() if c.isalnum()]  # noqa: E731
    r, h = norm(ref), norm(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / max(1, len(r))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from tests.conftest_models import tiny_models_dir

    return tiny_models_dir()


def make_config(models_dir: Path, db: Path, **sections) -> Config:
    """A config on loopback with free ports and the tiny models; `sections` override per test."""
    base = {
        "server": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0},
        "funasr": {"host": "127.0.0.1", "port": 0},
        "asr": {"model_dir": str(models_dir / "SenseVoiceSmall")},
        "speaker": {"model": str(models_dir / "campplus" / "campplus.onnx"), "db": str(db)},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_config(None, env={}, overrides=base)


@pytest.fixture(scope="session")
def voiceprint_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("voiceprints") / "voiceprints.sqlite"


@pytest.fixture(scope="session")
def base_config(models_dir, voiceprint_db) -> Config:
    return make_config(models_dir, voiceprint_db)


@pytest.fixture(scope="session")
async def pipeline(base_config):
    from asr_server.pipeline import Pipeline

    p = Pipeline.load(base_config)
    yield p
    await p.close()


@pytest.fixture
async def start_server(pipeline, models_dir, voiceprint_db):
    """Start an `AsrServer` on free loopback ports around the shared pipeline; stopped after the test."""
    from asr_server.server import AsrServer

    started = []

    async def start(**sections):
        server = AsrServer(make_config(models_dir, voiceprint_db, **sections), pipeline)
        await server.start()
        started.append(server)
        return server

    yield start
    for s in started:
        await s.stop()


@pytest.fixture
async def server(start_server):
    return await start_server()
