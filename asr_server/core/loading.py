"""The recogniser and the speaker embedder a configuration names, loaded.

One code path for both places a model runs: `Pipeline.load` in this process, and each Ray Serve
replica (`core.ray_deployments`), so a deployment runs exactly the engine the local server would,
with the same files, runtime, precision and start-up report.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..engines.base import Embedder, Recognizer
from ..engines.contracts import ECAPA_DIR


def speaker_model_path(config: Config) -> Path:
    """The speaker model the configuration names: CAM++'s ONNX file, or the ECAPA folder."""
    if config.speaker.model_type == "ecapa":
        return Path(config.asr.model_dir).parent / ECAPA_DIR
    return Path(config.speaker.model)


def load_recognizer(config: Config, threads: int) -> Recognizer:
    """SenseVoice as `asr` and `engine` configure it, on `threads` intra-op threads (0: the runtime's choice)."""
    from ..engines.sensevoice import SenseVoice

    eng = config.engine
    return SenseVoice.load(
        config.asr.model_dir,
        quantized=config.asr.quantized,
        device=eng.device,
        threads=threads,
        backend=eng.backend,
        precision=eng.precision,
    )


def load_speaker(config: Config, threads: int | None = None) -> Embedder | None:
    """The speaker embedder `speaker` names (None when `speaker.enabled` is false), on `threads`
    intra-op threads (default `engine.speaker_threads`)."""
    if not config.speaker.enabled:
        return None
    from ..engines.speaker import load_embedder

    eng = config.engine
    return load_embedder(
        config.speaker.model_type,
        speaker_model_path(config),
        device=eng.device,
        threads=eng.speaker_threads if threads is None else threads,
        backend=eng.backend,
        precision=eng.precision,
    )
