"""The `inference` section: the recogniser and the speaker embedder in this process (`local`, the
default) or as Ray Serve deployments (`ray`, docs/ray.md), each deployment with its batching, its
per-replica resources and its autoscaling bounds."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from .base import Section


class RayDeploymentConfig(Section):
    """One model's Ray Serve deployment: how its replicas batch, what each holds, how many run."""

    max_batch_size: int = Field(
        16, ge=1, description="Requests (utterances, from any front end) one replica call takes (@serve.batch)."
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a replica waits for more requests once one came, before it runs."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica (its engine's threads on a CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (a fraction shares one); > 0 runs on CUDA.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor (0 lets Serve stop every replica when idle).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests in flight per replica that Serve's autoscaler aims at."
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one replica holds at most; the others wait in the callers' handles."
    )

    @model_validator(mode="after")
    def _limits(self) -> RayDeploymentConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            # A replica never holds a full batch: max_batch_size could not be reached.
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                f"({self.max_batch_size}): a batch could never fill"
            )
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"target_ongoing_requests ({self.target_ongoing_requests:g}) exceeds max_ongoing_requests "
                f"({self.max_ongoing_requests}): the autoscaler would aim at a load a replica refuses"
            )
        return self


class InferenceConfig(Section):
    """Where the recogniser and the speaker embedder run: in this process, or as Ray Serve deployments
    (docs/ray.md). VAD, Opus and the sockets stay in the front end either way."""

    mode: Literal["local", "ray"] = Field(
        "local", description="local: the engines in this process; ray: Ray Serve deployments (pip extra `ray`)."
    )
    address: str | None = Field(
        None,
        description="The Ray cluster: null starts a local Ray instance for this server; auto joins the one "
        "`ray start` runs on this machine; host:port or ray://host:10001 a remote head.",
    )
    namespace: str = Field("asr-server", min_length=1, description="Ray namespace of the Serve applications.")
    deploy: bool = Field(
        True,
        description="Deploy (or update) the Serve applications at start; false: only connect to the ones "
        "already deployed (front ends of a cluster where one process, or `serve deploy`, deploys).",
    )
    app_prefix: str = Field(
        "asr-server", min_length=1, description="The applications are named <prefix>-asr and <prefix>-speaker."
    )
    max_in_flight: int = Field(
        64, ge=1, description="Requests this front end has in Ray at once; the rest wait in its own queue."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request Ray has not answered in this long fails (an error to its client)."
    )
    start_timeout_s: float = Field(
        300.0, gt=0, description="How long the start waits for the applications to be running."
    )
    asr: RayDeploymentConfig = Field(default_factory=RayDeploymentConfig)
    speaker: RayDeploymentConfig = Field(default_factory=RayDeploymentConfig)

    @field_validator("address")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is None or address == "auto":
            return address
        parts = urlsplit(address if "://" in address else f"ray://{address}")
        if parts.scheme not in ("ray", "rays") or not parts.hostname:
            raise ValueError(f"must be null, auto, host:port or ray://host:port, got {address!r}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            raise ValueError(f"{address!r} has no port (the head's GCS port 6379, or 10001 for ray://)")
        return address
