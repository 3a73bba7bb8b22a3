"""Shared fixtures: the tiny stand-in models, one pipeline for the whole run, servers on free ports.

Helpers live in `tests/support/`; tests never import each other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from asr_server.config import Config
from tests.support.config import make_config

_WHOLE_MODULE_SLOW = "pytestmark = pytest.mark.slow"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With `-m "not slow"`, do not even import the modules marked slow as a whole: importing the
    torch stack they test costs seconds of its own."""
    if (
        config.option.markexpr.replace(" ", "") == "notslow"
        and collection_path.suffix == ".py"
        and collection_path.name.startswith("test_")
    ):
        try:
            if _WHOLE_MODULE_SLOW in collection_path.read_text(encoding="utf-8"):
                return True
        except OSError:
            return None
    return None


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from tests.support.models import tiny_models_dir

    return tiny_models_dir()


@pytest.fixture(scope="session")
def voiceprint_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("voiceprints") / "voiceprints.sqlite"


@pytest.fixture(scope="session")
def base_config(models_dir, voiceprint_db) -> Config:
    return make_config(models_dir, voiceprint_db)


@pytest.fixture(scope="session")
async def pipeline(base_config):
    from asr_server.core.pipeline import Pipeline

    p = Pipeline.load(base_config)
    yield p
    await p.close()


@pytest.fixture
async def start_server(pipeline, models_dir, voiceprint_db):
    """Start an `AsrServer` on free loopback ports around the shared pipeline; stopped after the test."""
    from asr_server.app import AsrServer
    from asr_server.core.governor import Governor

    started = []

    async def start(**sections):
        # the pipeline is the session's: replies another test left late must not refuse this one's devices
        cfg = pipeline.config
        pipeline.governor = Governor(cfg.asr.budget_ms, cfg.vad.min_silence_ms, pipeline._asr)
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
