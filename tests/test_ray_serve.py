"""`inference.mode: ray`: the `inference` section's validation, the Kubernetes manifests, and (slow)
a device through a server whose recogniser and embedder are Ray Serve deployments on a local Ray
instance of 2 CPUs: the right text and speaker, and a replica killed under a request fails that
device's utterance only, with an `error`, while the next utterance works on the restarted replica."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from asr_server.config import ConfigError, load_config
from tests.support.audio import cer, clip, needs_audio
from tests.support.config import make_config

REPO = Path(__file__).resolve().parents[1]
PACE = 3.0
REPLY_S = 120.0  # the first request after a replica restart waits for the new replica to load
#: Each request waits this long in the replica for its batch: a window to kill the replica in.
BATCH_WAIT_S = 4.0


def _cfg(**inference):
    return load_config(None, env={}, overrides={"inference": inference})


# --- the config section ----------------------------------------------------------------------


def test_local_is_the_default_and_the_shipped_config_keeps_it():
    assert _cfg().inference.mode == "local"
    assert load_config(REPO / "config.yaml", env={}).inference == _cfg().inference


def test_the_section_from_the_environment():
    cfg = load_config(
        None,
        env={"ASR_SERVER__INFERENCE__MODE": "ray", "ASR_SERVER__INFERENCE__ASR__NUM_GPUS": "0.5"},
    )
    assert cfg.inference.mode == "ray" and cfg.inference.asr.num_gpus == 0.5
    assert cfg.inference.speaker.num_gpus == 0.0


@pytest.mark.parametrize(
    ("inference", "message"),
    [
        ({"mode": "remote"}, "inference.mode"),
        ({"asr": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) exceeds max_replicas (2)"),
        ({"asr": {"max_batch_size": 64, "max_ongoing_requests": 8}}, "a batch could never fill"),
        ({"speaker": {"target_ongoing_requests": 40}}, "target_ongoing_requests (40) exceeds max_ongoing_requests"),
        ({"asr": {"num_gpus": -1}}, "inference.asr.num_gpus"),
        ({"asr": {"batch_wait_timeout_s": -0.1}}, "inference.asr.batch_wait_timeout_s"),
        ({"max_in_flight": 0}, "inference.max_in_flight"),
        ({"address": "http://head:8265"}, "must be null, auto, host:port or ray://host:port"),
        ({"address": "head"}, "has no port"),
        ({"asr": {"replicas": 2}}, "inference.asr.replicas: unknown key"),
    ],
)
def test_bad_values_are_refused_naming_the_key(inference, message):
    with pytest.raises(ConfigError, match="inference") as e:
        _cfg(**inference)
    assert message in str(e.value)


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379", "ray://head.svc:10001"])
def test_addresses(address):
    assert _cfg(mode="ray", address=address).inference.address == address


def test_worker_processes_need_a_cluster_to_share():
    with pytest.raises(ConfigError, match="needs inference.address"):
        load_config(None, env={}, overrides={"workers": 2, "inference": {"mode": "ray"}})
    assert load_config(None, env={}, overrides={"workers": 2, "inference": {"mode": "ray", "address": "auto"}})


def test_local_mode_does_not_import_ray(tmp_path):
    """The normal server must not pay for Ray: nothing in local mode imports it."""
    import subprocess
    import sys

    code = "import sys, asr_server.app, asr_server.core.pipeline; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# --- the Kubernetes manifests ----------------------------------------------------------------


def test_the_kuberay_manifests_parse_and_hold_what_docs_ray_md_says():
    docs = (REPO / "docs" / "ray.md").read_text(encoding="utf-8")
    kinds = {}
    for name in ("ray-service.yaml", "ray-device-service.yaml"):
        assert f"docs/{name}" in docs or f"({name})" in docs, name
        for doc in yaml.safe_load_all((REPO / "docs" / name).read_text(encoding="utf-8")):
            kinds.setdefault(doc["kind"], []).append(doc)
    service = kinds["RayService"][0]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    imports = {app["import_path"] for app in serve_config["applications"]}
    assert imports == {"asr_server.core.ray_deployments:asr_app", "asr_server.core.ray_deployments:speaker_app"}
    ports = {p["port"] for s in kinds["Service"] for p in s["spec"]["ports"]}
    assert {8000, 8001, 10095} <= ports
    # The configuration both sides read is valid, and the front ends only connect.
    cfg = load_config(None, env={}, overrides=yaml.safe_load(kinds["ConfigMap"][0]["data"]["config.yaml"]))
    assert cfg.inference.mode == "ray" and cfg.inference.address == "auto" and not cfg.inference.deploy
    names = {app["name"] for app in serve_config["applications"]}
    assert names == {f"{cfg.inference.app_prefix}-asr", f"{cfg.inference.app_prefix}-speaker"}


# --- end to end on a local Ray instance -------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=2, namespace="asr-server-test", include_dashboard=False, log_to_driver=False)
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
async def ray_server(ray_instance, models_dir, tmp_path_factory):
    from asr_server.app import AsrServer

    deployment = {"num_cpus": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": BATCH_WAIT_S}
    cfg = make_config(
        models_dir,
        tmp_path_factory.mktemp("ray") / "voiceprints.sqlite",
        inference={"mode": "ray", "namespace": "asr-server-test", "asr": deployment, "speaker": deployment},
        asr={"deadline_ms": 0, "budget_ms": 0},
    )
    server = AsrServer(cfg)
    await server.start()
    yield server
    await server.stop()


def _device(server):
    from loadtest.device import Device, DeviceConfig

    return Device(DeviceConfig(url=server.endpoints.device_url))


async def _say(dev, path: Path) -> None:
    from loadtest.clips import load_clip

    await dev.listen("start", "manual")
    await dev.send_opus(load_clip(path).packets, PACE)
    await dev.listen("stop")


@pytest.mark.slow
async def test_the_deployments_answer_what_the_engines_in_this_process_answer(ray_server):
    """The same engine code in the replicas: a transcript and an embedding through Ray equal the
    local engines' for the same audio (runs without the shared clips too: a synthetic voice)."""
    import numpy as np

    from asr_server.core.loading import load_recognizer, load_speaker
    from asr_server.core.ray_deployments import replica_threads
    from tests.support.audio import voice

    cfg = ray_server.config
    audio = voice(2.5, 140.0, seed=3)
    local_asr = load_recognizer(cfg, replica_threads(cfg, cfg.inference.asr))
    local_spk = load_speaker(cfg, replica_threads(cfg, cfg.inference.speaker))
    assert local_spk is not None
    want = local_asr.transcribe_batch([audio], [cfg.asr.language], [cfg.asr.use_itn])[0]
    got = await ray_server.pipeline.transcribe(audio)
    assert got == want
    emb = await ray_server.pipeline.embed(audio)
    assert np.allclose(emb, local_spk.embed_batch([audio])[0], atol=1e-5)


@pytest.mark.slow
@needs_audio
async def test_a_device_gets_its_text_and_speaker_from_the_deployments(ray_server):
    from asr_server.audio.io import decode_audio
    from asr_server.core.ray_serve import RayEmbedder, RayRecognizer

    pipeline = ray_server.pipeline
    assert isinstance(pipeline.asr, RayRecognizer) and isinstance(pipeline.speaker, RayEmbedder)
    assert "Ray Serve" in pipeline.asr.info.name
    jfk, zh = clip("en_jfk"), clip("zh_aishell")
    assert pipeline.voiceprints is not None
    # Enrolment embeds through the speaker deployment too.
    pipeline.voiceprints.enroll("jfk", [await pipeline.embed(decode_audio(jfk.path.read_bytes()).samples)])
    async with _device(ray_server) as dev:
        await _say(dev, jfk.path)
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert cer(jfk.transcript, msg["text"]) <= 0.2, msg
        assert msg["speaker"] is not None and msg["speaker"]["name"] == "jfk", msg
        await _say(dev, zh.path)
        msg = (await dev.next_message("stt", REPLY_S)).data
        assert cer(zh.transcript, msg["text"]) <= 0.2, msg
        assert msg["language"] == "zh"
    # The front end batches nothing itself: each utterance was its own request to Ray.
    assert pipeline.asr_max_batch == 1


def _replicas(server, deployment: str = "AsrDeployment") -> list[dict]:
    """The live replica actors of one deployment: Serve names them SERVE_REPLICA::<app>#<deployment>#<id>."""
    from ray.util import list_named_actors

    app = server.config.inference.app_prefix + ("-asr" if deployment == "AsrDeployment" else "-speaker")
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a for a in list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


@pytest.mark.slow
@needs_audio
async def test_a_second_front_end_shares_the_running_replicas(ray_server, models_dir, tmp_path):
    """Another server with the same models connects to the deployed applications as they are
    (no redeploy, no replica restarted) and its device is answered by the same replicas."""
    from asr_server.app import AsrServer

    before = {a["name"] for a in _replicas(ray_server)} | {
        a["name"] for a in _replicas(ray_server, "SpeakerDeployment")
    }
    second = AsrServer(
        make_config(
            models_dir,
            tmp_path / "voiceprints.sqlite",
            inference=ray_server.config.inference.model_dump(),
            asr={"deadline_ms": 0, "budget_ms": 0},
        )
    )
    await second.start()
    try:
        after = {a["name"] for a in _replicas(second)} | {a["name"] for a in _replicas(second, "SpeakerDeployment")}
        assert after == before and len(before) == 2
        c = clip("en_jfk")
        async with _device(second) as dev:
            await _say(dev, c.path)
            msg = (await dev.next_message("stt", REPLY_S)).data
            assert cer(c.transcript, msg["text"]) <= 0.2, msg
    finally:
        await second.stop()


async def _wait_held(handle, count: int, timeout: float = 60.0) -> None:
    """Until the replica behind `handle` holds `count` requests (they wait there for their batch)."""
    for _ in range(int(timeout / 0.1)):
        if await handle.ongoing.remote() >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the replica never held {count} request(s)")


@pytest.mark.slow
@needs_audio
async def test_a_replica_killed_under_a_request_fails_that_utterance_only(ray_server, ray_instance):
    from ray import serve

    c = clip("zh_aishell")
    handle = serve.get_app_handle(ray_server.config.inference.app_prefix + "-asr")
    async with _device(ray_server) as dev:
        await _say(dev, c.path)
        await _wait_held(handle, 1)  # the utterance is in the replica, waiting BATCH_WAIT_S for its batch
        replicas = _replicas(ray_server)
        assert len(replicas) == 1, replicas
        ray_instance.kill(ray_instance.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
        msg = (await dev.next_message(("stt", "error"), REPLY_S)).data
        assert msg["type"] == "error", msg
        assert "utterance not recognised" in msg["message"] and "replica" in msg["message"], msg
        # Serve starts a new replica; the same device's next utterance is recognised on it.
        await _say(dev, c.path)
        msg = (await dev.next_message(("stt", "error"), REPLY_S)).data
        assert msg["type"] == "stt" and cer(c.transcript, msg["text"]) <= 0.2, msg
