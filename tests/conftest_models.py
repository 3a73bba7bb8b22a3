"""Stand-in models and clips for the tests (imported by conftest.py and by test modules).

The tiny models are built once by `asr_server.random_models` into `build/test-models/<key>/`,
where the key hashes the sources that decide their content, so editing the builder, the
frontend or the export path rebuilds them and nothing else does. When the shared clips exist
(`<repo>/../shared/audio`), the tiny SenseVoice is trained on them and transcribes them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AUDIO_DIR = REPO.parent / "shared" / "audio"
TEST_MODELS = REPO / "build" / "test-models"
_SOURCES = ("asr_server/random_models.py", "asr_server/engines/features.py", "asr_server/export.py")


def clips_dir() -> Path | None:
    """The shared clip directory, or None where this checkout has none (CI)."""
    return AUDIO_DIR if (AUDIO_DIR / "MANIFEST.tsv").is_file() else None


def models_key() -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update((REPO / rel).read_bytes())
    h.update(b"clips" if clips_dir() is not None else b"no-clips")
    return h.hexdigest()[:12]


def tiny_models_dir() -> Path:
    """Directory holding `SenseVoiceSmall/` and `campplus/campplus.onnx` of the tiny stand-ins."""
    from asr_server.random_models import build_models

    out = TEST_MODELS / models_key()
    build_models(out, size="tiny", audio_dir=clips_dir(), seed=0)
    return out


def sensevoice_dir() -> Path:
    return tiny_models_dir() / "SenseVoiceSmall"


def campplus_path() -> Path:
    return tiny_models_dir() / "campplus" / "campplus.onnx"


def load_clips() -> list:
    """The MANIFEST clips as `random_models.Clip` (16 kHz mono float32); empty without clips."""
    from asr_server.random_models import load_clips as _load

    d = clips_dir()
    return _load(d) if d is not None else []


def voice(seconds: float, f0: float, seed: int) -> np.ndarray:
    """A synthetic voiced sound (harmonics of a wobbling f0, light noise): speakers differ by f0."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / 16000
    x = sum(np.sin(k * phase) / k ** 1.5 for k in range(1, 25))
    return (0.2 * x / np.abs(x).max() + 0.005 * rng.standard_normal(t.size)).astype(np.float32)
