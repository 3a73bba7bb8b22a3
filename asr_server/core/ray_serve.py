"""The front end's side of `inference.mode: ray`: the recogniser and the embedder as Ray Serve handles.

`connect` joins (or starts) the Ray instance, deploys the two applications unless
`inference.deploy` is false, waits for them to run, and returns a `RayRecognizer` and a
`RayEmbedder`: the engines' remote protocols (`engines.base`), so the pipeline and its scheduler
are the same in both modes. The front end keeps the sockets, Opus and VAD, and sends Ray one
request per utterance: the scheduler runs `inference.max_in_flight` of them at once on the event
loop (no thread per request), its queue, deadlines and admission are unchanged, and the replicas
batch across every front end. A request therefore never ties a connection to a replica: a slow
replica delays only the utterances it holds.

Failures stay per request: a replica that dies fails the requests it held, each with an
`EngineFailed` that the session turns into an `error` to its own device, and Serve starts a new
replica that takes the next ones; a request unanswered within `inference.request_timeout_s` is
cancelled in Ray and fails the same way; Serve refusing for back-pressure is `EngineBusy`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import Config
from ..engines.base import ModelInfo
from ..errors import AsrServerError, EngineBusy, EngineFailed, StartupError
from ..types import Hotword, Transcript

log = logging.getLogger(__name__)


class _Remote:
    """Calls to one deployment: each one handle request with a deadline, its failures named."""

    def __init__(self, handle: Any, what: str, timeout_s: float, session: RaySession) -> None:
        self._handle = handle
        self._what = what
        self._timeout_s = timeout_s
        self._session = session

    async def _call(self, method: str, arg: Any) -> Any:
        from ray.exceptions import RayActorError, RayError, RayTaskError
        from ray.serve.exceptions import BackPressureError

        response = getattr(self._handle, method).remote(arg)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await response
        except TimeoutError:
            response.cancel()
            raise EngineFailed(
                f"the {self._what} did not answer within {self._timeout_s:g} s (inference.request_timeout_s)"
            ) from None
        except asyncio.CancelledError:
            response.cancel()  # nobody waits for it any more: free the replica's slot
            raise
        except BackPressureError as e:
            raise EngineBusy(f"the {self._what} is busy: {e}") from None
        except RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, AsrServerError):
                raise cause from None  # the engine refused this input (as a local one would)
            if isinstance(e.cause, RayActorError):
                raise EngineFailed(f"the {self._what} replica died under the request; Serve restarts it") from None
            raise EngineFailed(f"the {self._what} failed: {type(e.cause).__name__}: {e.cause}") from None
        except RayActorError:
            raise EngineFailed(f"the {self._what} replica died under the request; Serve restarts it") from None
        except RayError as e:
            raise EngineFailed(f"the {self._what} failed in Ray: {type(e).__name__}") from None

    def close(self) -> None:
        self._session.close()


class RayRecognizer(_Remote):
    """SenseVoice behind its Serve deployment (`engines.base.RemoteRecognizer`)."""

    def __init__(self, handle: Any, info: ModelInfo, timeout_s: float, session: RaySession) -> None:
        super().__init__(handle, "recogniser", timeout_s, session)
        self.info = info

    async def transcribe_batch_async(
        self,
        audios: Sequence[np.ndarray],
        languages: Sequence[str] | None = None,
        use_itn: Sequence[bool] | None = None,
        hotwords: Sequence[Sequence[Hotword]] | None = None,
    ) -> list[Transcript]:
        from .ray_deployments import AsrItem

        langs = list(languages) if languages is not None else ["auto"] * len(audios)
        itn = list(use_itn) if use_itn is not None else [True] * len(audios)
        words = [tuple(h) for h in hotwords] if hotwords is not None else [()] * len(audios)
        items = [
            AsrItem(np.asarray(a, np.float32), lang, i, h)
            for a, lang, i, h in zip(audios, langs, itn, words, strict=True)
        ]
        return list(await asyncio.gather(*(self._call("transcribe", item) for item in items)))


class RayEmbedder(_Remote):
    """The speaker embedder behind its Serve deployment (`engines.base.RemoteEmbedder`)."""

    def __init__(self, handle: Any, info: ModelInfo, dim: int, timeout_s: float, session: RaySession) -> None:
        super().__init__(handle, "speaker embedder", timeout_s, session)
        self.info = info
        self.dim = dim

    async def embed_batch_async(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        vectors = await asyncio.gather(*(self._call("embed", np.asarray(a, np.float32)) for a in audios))
        return np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32)


class RaySession:
    """This server's connection to Ray; a Ray instance it started itself stops with it."""

    def __init__(self, owns_instance: bool) -> None:
        self.owns_instance = owns_instance
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.owns_instance:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def _wait_running(names: list[str], timeout_s: float) -> None:
    """Until every application runs; a failed deployment stops the start with Serve's message."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n] for n in names if n in apps}
        failed = {n: a for n, a in states.items() if str(a.status).endswith("DEPLOY_FAILED")}
        if failed:
            why = "; ".join(f"{n}: {a.message}" for n, a in failed.items())
            raise StartupError(f"Ray Serve could not deploy the models: {why}")
        if len(states) == len(names) and all(str(a.status).endswith("RUNNING") for a in states.values()):
            return
        if time.monotonic() > deadline:
            seen = {n: str(states[n].status) if n in states else "not deployed" for n in names}
            raise StartupError(
                f"the Ray Serve applications are not running after {timeout_s:g} s (inference.start_timeout_s): {seen}"
            )
        time.sleep(0.5)


def _running_digest(name: str, timeout_s: float) -> str | None:
    """The configuration digest of the running application `name` (None when none runs)."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None or not str(app.status).endswith("RUNNING"):
        return None
    try:
        return serve.get_app_handle(name).digest.remote().result(timeout_s=timeout_s)
    except Exception as e:  # an application of another version, or one going away: deploy ours
        log.info("Ray Serve application %s gave no digest (%s): redeploying it", name, e)
        return None


def _remote_info(info: ModelInfo, app: str) -> ModelInfo:
    return replace(info, name=f"{info.name} (Ray Serve app {app})", backend=f"ray serve/{info.backend}")


def connect(config: Config) -> tuple[RayRecognizer, RayEmbedder | None]:
    """Join or start Ray, deploy (unless `inference.deploy` is false), and return the two engines.
    Blocking: call it off the event loop (`Pipeline.load` runs in a thread)."""
    try:
        import ray
        from ray import serve
        from ray.serve.config import ProxyLocation
    except ImportError:
        raise StartupError(
            "inference.mode is ray but Ray Serve is not installed: scripts/setup.sh ray "
            "(or pip install 'asr-server[ray]')"
        ) from None
    inf = config.inference
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=inf.address, namespace=inf.namespace, include_dashboard=False, log_to_driver=False)
        log.info("Ray: %s (namespace %s)", inf.address or "a local instance started by this server", inf.namespace)
    session = RaySession(owns and inf.address is None)
    try:
        names = [f"{inf.app_prefix}-asr"] + ([f"{inf.app_prefix}-speaker"] if config.speaker.enabled else [])
        if inf.deploy:
            from .ray_deployments import applications, deployment_digest

            serve.start(proxy_location=ProxyLocation.Disabled)  # devices reach the front ends, not Serve's HTTP
            for name, (model, app) in applications(config).items():
                if _running_digest(name, inf.start_timeout_s) == deployment_digest(config, model):
                    log.info("Ray Serve application %s already runs this configuration: not redeployed", name)
                    continue
                serve.run(app, name=name, route_prefix=None, blocking=False)
        _wait_running(names, inf.start_timeout_s)
        asr_handle = serve.get_app_handle(names[0])
        asr_info: ModelInfo = asr_handle.info.remote().result(timeout_s=inf.start_timeout_s)
        asr = RayRecognizer(asr_handle, _remote_info(asr_info, names[0]), inf.request_timeout_s, session)
        speaker = None
        if config.speaker.enabled:
            spk_handle = serve.get_app_handle(names[1])
            spk_info, dim = spk_handle.info.remote().result(timeout_s=inf.start_timeout_s)
            speaker = RayEmbedder(spk_handle, _remote_info(spk_info, names[1]), dim, inf.request_timeout_s, session)
    except BaseException:
        session.close()
        raise
    return asr, speaker
