"""The Ray Serve side: one deployment per model, each replica running the engine the local server runs.

Each replica loads its model with `core.loading` (the code `Pipeline.load` uses) from the front
end's configuration, and batches the requests of every front end that reaches it with
`@serve.batch` (`inference.<model>.max_batch_size`, `batch_wait_timeout_s`). A batch is computed in
the replica's one engine thread (an engine is not thread-safe), so the replica's event loop keeps
taking requests for the next batch meanwhile. Ray places the replicas (`num_cpus`/`num_gpus`) and
Serve scales them on ongoing requests and restarts one that dies.

Imported only in `inference.mode: ray` (it imports ray).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from ray import serve

from ..config import Config, RayDeploymentConfig
from ..engines.base import ModelInfo
from ..types import Hotword, Transcript
from .loading import load_recognizer, load_speaker

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class AsrItem:
    """One utterance for the recogniser, as a front end sends it."""

    audio: np.ndarray
    language: str
    use_itn: bool
    hotwords: tuple[Hotword, ...] = ()


def deployment_digest(config: Config, model: str) -> str:
    """What one deployment's replicas are made of: the model files, the engine and its Serve options.
    Equal digests mean a running application already is what this configuration asks for, so a
    front end that starts does not redeploy (and restart) it; keys only front ends use (ports,
    voiceprint file, thresholds, queues) differ freely between them."""
    parts = {
        "model": model,
        "files": [
            str(config.asr.model_dir.resolve()),
            config.asr.quantized,
            config.speaker.model_type,
            str(config.speaker.model.resolve()),
        ],
        "engine": config.engine.model_dump(mode="json"),
        "deployment": getattr(config.inference, model).model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def replica_threads(config: Config, deployment: RayDeploymentConfig) -> int:
    """An engine's intra-op threads in a replica: `engine.threads`, else the CPUs Ray reserved for it."""
    return config.engine.threads or max(1, math.ceil(deployment.num_cpus))


class _Replica:
    """What both deployments share: the configuration, one engine thread, the requests held now."""

    def __init__(self, config: dict[str, Any], deployment: str) -> None:
        self.config = Config.model_validate(config)
        self.deployment: RayDeploymentConfig = getattr(self.config.inference, deployment)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"replica-{deployment}")
        self._held = 0
        self._digest = deployment_digest(self.config, deployment)

    def digest(self) -> str:
        """The `deployment_digest` of the configuration this replica was made from."""
        return self._digest

    def ongoing(self) -> int:
        """Requests this replica holds now (waiting for their batch or computing)."""
        return self._held

    def _batching(self, batched: Any) -> None:
        """The configured batch size and wait on this replica's `@serve.batch` method."""
        batched.set_max_batch_size(self.deployment.max_batch_size)
        batched.set_batch_wait_timeout_s(self.deployment.batch_wait_timeout_s)

    async def _holding(self, request: Awaitable[R]) -> R:
        """Await one caller's request, counted in `ongoing` while it waits for its batch or computes."""
        self._held += 1
        try:
            return await request
        finally:
            self._held -= 1

    async def _compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


@serve.deployment
class AsrDeployment(_Replica):
    """SenseVoice: `transcribe(AsrItem)` → `Transcript`, batched across callers."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config, "asr")
        self.engine = load_recognizer(self.config, replica_threads(self.config, self.deployment))
        self._batching(self._batch)

    def info(self) -> ModelInfo:
        return self.engine.info

    async def transcribe(self, item: AsrItem) -> Transcript:
        return await self._holding(self._batch(item))

    @serve.batch
    async def _batch(self, items: list[AsrItem]) -> list[Transcript]:
        return await self._compute(
            self.engine.transcribe_batch,
            [i.audio for i in items],
            [i.language for i in items],
            [i.use_itn for i in items],
            [i.hotwords for i in items],
        )


@serve.deployment
class SpeakerDeployment(_Replica):
    """The speaker embedder: `embed(audio)` → a unit-length vector, batched across callers."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config, "speaker")
        engine = load_speaker(self.config, replica_threads(self.config, self.deployment))
        if engine is None:
            raise ValueError("the speaker deployment needs speaker.enabled: true")
        self.engine = engine
        self._batching(self._batch)

    def info(self) -> tuple[ModelInfo, int]:
        return self.engine.info, self.engine.dim

    async def embed(self, audio: np.ndarray) -> np.ndarray:
        return await self._holding(self._batch(audio))

    @serve.batch
    async def _batch(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        return list(await self._compute(self.engine.embed_batch, audios))


def _options(deployment: RayDeploymentConfig) -> dict[str, Any]:
    """Serve's options for one deployment: resources per replica, autoscaling bounds, the request cap."""
    return {
        "ray_actor_options": {"num_cpus": deployment.num_cpus, "num_gpus": deployment.num_gpus},
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": deployment.min_replicas,
            "initial_replicas": max(1, deployment.min_replicas),
            "max_replicas": deployment.max_replicas,
            "target_ongoing_requests": deployment.target_ongoing_requests,
        },
    }


def applications(config: Config) -> dict[str, tuple[str, Any]]:
    """App name → (its model's section name, the bound Serve application) for this configuration."""
    inf = config.inference
    wire = config.model_dump(mode="json")
    # Model paths as this front end resolves them: on a cluster the GPU nodes hold the models at the
    # same absolute path (one image, or a shared volume: docs/ray.md).
    wire["asr"]["model_dir"] = str(config.asr.model_dir.resolve())
    wire["speaker"]["model"] = str(config.speaker.model.resolve())
    asr: Any = AsrDeployment  # a serve.Deployment (the decorator's type is not visible to mypy)
    speaker: Any = SpeakerDeployment
    apps = {f"{inf.app_prefix}-asr": ("asr", asr.options(**_options(inf.asr)).bind(wire))}
    if config.speaker.enabled:
        apps[f"{inf.app_prefix}-speaker"] = ("speaker", speaker.options(**_options(inf.speaker)).bind(wire))
    return apps


def _config_from(args: dict[str, Any]) -> Config:
    from ..config import load_config

    return load_config(args.get("config"), overrides=args.get("overrides"))


def asr_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve deploy` and KubeRay's RayService (`import_path:
    asr_server.core.ray_deployments:asr_app`, `args: {config: /path/config.yaml}`): the recogniser's
    application from that file plus the `ASR_SERVER__…` environment, as `connect` would deploy it."""
    config = _config_from(args)
    return applications(config)[f"{config.inference.app_prefix}-asr"][1]


def speaker_app(args: dict[str, Any]) -> Any:
    """The speaker embedder's application builder (see `asr_app`)."""
    config = _config_from(args)
    return applications(config)[f"{config.inference.app_prefix}-speaker"][1]
