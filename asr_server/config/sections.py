"""The configuration's sections, every key with its default and, for every listener and queue,
its limit: a refusal names the key. `config.yaml` at the repository root documents them; the
package's `load_config` reads, overrides and validates them.

The section `server` is now `xiaozhi` (it configures the device socket only); the old name still
works, with a warning (`RENAMED_SECTIONS`). The `inference` section puts the recogniser and the
speaker embedder in this process (`local`, the default) or in Ray Serve deployments (`ray`,
docs/ray.md), each deployment with its batching, its per-replica resources and its autoscaling
bounds.
"""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator, model_validator

from ..constants import Language, Protocol


class _Section(BaseModel):
    """What every section shares: an unknown key is an error, and so is a bad assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: A batch size, or `auto` (chosen for the device: see `core.pipeline.batch_size`).
BatchSize = Annotated[int, Field(ge=1)] | Literal["auto"]


def _absolute_url(*schemes: str) -> AfterValidator:
    """A URL key's check: absolute, with one of `schemes`."""

    def check(url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"must be a {' or '.join(f'{s}://' for s in schemes)} URL, got {url!r}")
        return url

    return AfterValidator(check)


WsUrl = Annotated[str, _absolute_url("ws", "wss")]
HttpUrl = Annotated[str, _absolute_url("http", "https")]


class AuthConfig(_Section):
    enabled: bool = False
    tokens: list[str] = Field(
        default_factory=list, description="Device tokens: the device socket, and /v1/events for their own devices."
    )


class XiaozhiConfig(_Section):
    """The device WebSocket (xiaozhi firmware protocol)."""

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    path: str = "/xiaozhi/v1/"
    public_url: WsUrl | None = Field(
        None, description="The URL /xiaozhi/ota/ hands devices (behind NAT or a proxy); null: the OTA request's host."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    hello_timeout_s: float = Field(10.0, gt=0)
    idle_timeout_s: float = Field(120.0, gt=0)
    max_message_bytes: int = Field(64 * 1024, ge=1024)
    max_frames_per_s: int = Field(
        500, ge=10, description="Binary frames per second per device (real-time 2.5 ms Opus frames are 400)."
    )
    max_audio_rate: float = Field(3.0, ge=1.0, description="Audio seconds per second per device after a burst.")
    max_audio_burst_s: float = Field(10.0, gt=0, description="Audio a device may send ahead of real time at once.")
    send_timeout_s: float = Field(10.0, gt=0, description="A reply unread this long drops the connection.")
    drain_timeout_s: float = Field(
        8.0,
        ge=0,
        description="On SIGTERM, how long utterances already ended may take to be answered before the devices "
        "are closed (docker stop waits 10 s before SIGKILL).",
    )
    max_sessions: int = Field(2000, ge=1)
    ping_interval_s: float | None = Field(None, description="WebSocket pings; the firmware never needs them.")
    close_timeout_s: float = Field(
        2.0,
        gt=0,
        description=("How long a close waits for the client's answer (a flooding client has frames queued before it)."),
    )


#: `python -m benchmarks.trailing` (BENCHMARKS.md): SenseVoice's encoder looks ahead, so a last token
#: needs frames after it; 600 ms recovers all a pad can on the shared clips (400 does not).
TRAILING_PAD_MS = 600.0


class VadConfig(_Section):
    model: Path | None = Field(None, description="Silero ONNX file; null takes the one the silero-vad package ships.")
    threshold: float = Field(0.5, gt=0, lt=1)
    threshold_low: float = Field(0.3, gt=0, lt=1)
    min_silence_ms: int = Field(400, ge=0)
    min_speech_ms: int = Field(250, ge=0)
    pre_roll_ms: int = Field(300, ge=0)
    max_utterance_s: float = Field(30.0, gt=0)
    phrase_pause_ms: float = Field(
        160.0,
        ge=0,
        description="Device streams: a pause this long inside a long utterance ends a phrase, recognised while "
        "the speaker goes on, so the endpoint waits only for the last phrase (0: whole utterances only).",
    )
    phrase_min_s: float = Field(2.0, gt=0, description="Phrases are at least this long.")
    trailing_pad_ms: float = Field(
        TRAILING_PAD_MS,
        ge=0,
        description="Silence added after a VAD-cut utterance for the recogniser: its audio ends 96 ms after the "
        "last voiced window, too soon for SenseVoice to emit the last token (BENCHMARKS.md has the measurement).",
    )
    energy_gate_dbfs: float = Field(-60.0, le=0)
    max_batch: int = Field(64, ge=1)
    max_wait_ms: float = Field(2.0, ge=0)
    max_queue: int = Field(10000, ge=1, description="VAD windows waiting at most; beyond, a frame's VAD is refused.")

    @model_validator(mode="after")
    def _thresholds(self) -> VadConfig:
        if self.threshold_low > self.threshold:
            raise ValueError("threshold_low must not exceed threshold")
        return self


class AsrConfig(_Section):
    model_dir: Path = Path("models/SenseVoiceSmall")
    quantized: Literal["auto", "yes", "no"] = "auto"
    language: Language = "auto"
    use_itn: bool = True
    max_batch: BatchSize = Field(
        "auto",
        description=(
            "Utterances per call: auto = 1 on a CPU (a batch costs the sum of its items there, and every caller "
            "waits for all of it), 16 on CUDA; only utterances of similar length share a batch."
        ),
    )
    max_wait_ms: float = Field(10.0, ge=0)
    parallel: BatchSize = Field(
        "auto",
        description=(
            "Recognitions computed at the same time, each on engine.threads (0: the cores shared among them): "
            "auto = 1 on a GPU, on a CPU one per core below 4 cores, else one per 2 cores (BENCHMARKS.md)."
        ),
    )
    max_queue: int = Field(1000, ge=1, description="Utterances waiting at most; beyond, one is refused with an error.")
    deadline_ms: float = Field(
        1500.0,
        ge=0,
        description="An utterance that waited this long for the recogniser is shed (an error to its own client) "
        "instead of recognised late; 0: never.",
    )
    budget_ms: float = Field(
        800.0,
        ge=0,
        description="The end of speech → reply latency device replies should keep: the overload governor "
        "(core/governor.py) refuses new connections (503) only while answers would miss it, and sheds the newest "
        "devices while it stays missed; it must exceed vad.min_silence_ms (no reply comes sooner); 0: not watched.",
    )
    speculative: bool = True
    hotwords: list[str] = Field(
        default_factory=list,
        description="Words and phrases every utterance is biased towards (names, rooms, products), each 'word' "
        "or 'word weight'; merged with the device's list (HTTP API) and the request's (FunASR `hotwords`, the "
        "transcription form's `hotwords`). Utterances without any are decoded greedily, at no extra cost.",
    )
    hotword_weight: float = Field(
        1.5,
        gt=0,
        le=5,
        description="The bonus per sentencepiece piece of a hotword given without a weight (log-probability).",
    )
    corrections: list[str] = Field(
        default_factory=list,
        description="'wrong=>right' rules (FunASR's format) applied in order to every final text.",
    )


class SpeakerConfig(_Section):
    enabled: bool = True
    model_type: Literal["campplus", "ecapa"] = "campplus"
    model: Path = Path("models/campplus/campplus.onnx")
    db: Path = Path("data/voiceprints.sqlite")
    threshold: float = Field(0.35, ge=-1, le=1)
    min_audio_ms: int = Field(500, ge=0)
    max_batch: BatchSize = Field("auto", description="Utterances per call: auto = 1 on a CPU, 16 on CUDA.")
    max_wait_ms: float = Field(10.0, ge=0)
    max_queue: int = Field(
        1000, ge=1, description="Embeddings waiting at most; beyond, the utterance is answered with speaker null."
    )
    deadline_ms: float = Field(
        1000.0,
        ge=0,
        description="An utterance whose speaker is not known this long after it was queued (a device's: nor when "
        "waiting longer would answer it past asr.budget_ms after its end of speech) is answered with speaker null "
        "(its embedding is dropped, unrun if it still waits): identification never makes a reply late; 0: never.",
    )


class EngineConfig(_Section):
    backend: Literal["onnx", "torch"] = "onnx"
    device: str = "auto"
    precision: Literal["fp32", "fp16"] = Field(
        "fp32",
        description=(
            "Torch backend on CUDA: fp16 halves weights and runs under autocast; on CPU it falls back to fp32 "
            "with a warning. ONNX Runtime runs the file asr.quantized picks."
        ),
    )
    threads: int = Field(
        0, ge=0, description="Intra-op threads of the recogniser; 0 lets the runtime choose (the cores)."
    )
    speaker_threads: int = Field(
        1,
        ge=0,
        description="Intra-op threads of the speaker embedder, which runs beside the recogniser: on CPU a second "
        "thread does not make CAM++ faster but slows the recogniser it shares the cores with (BENCHMARKS.md).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, d: str) -> str:
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return d


class HttpConfig(_Section):
    """The HTTP API: OpenAI transcriptions, voiceprints, events stream, health and metrics."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8001, ge=0, le=65535)
    health_port: int | None = Field(
        8004,
        ge=0,
        le=65535,
        description="/healthz, /readyz and /metrics on a listener of their own, answering while slow clients "
        "fill the API port's max_connections (publish it to your health checker and scraper only; null: none).",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description=(
            "Admin keys: every endpoint, voiceprint enrol/list/delete included. With no api_keys and no "
            "read_keys the API is open to read and voiceprints are managed from loopback only; device "
            "tokens (xiaozhi.auth.tokens) are not API keys, they read their own devices' /v1/events."
        ),
    )
    read_keys: list[str] = Field(
        default_factory=list,
        description="Keys for transcription, identification and /v1/events, not voiceprint writes.",
    )
    max_upload_mb: float = Field(50.0, gt=0, description="Largest request body; larger uploads get 413.")
    max_audio_s: float = Field(
        3600.0,
        gt=0,
        description="Longest decoded upload; longer audio gets 413 (from the file's header where it has one).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins whose pages may call the API (e.g. https://chat.example.com, or * for any); "
        "none by default.",
    )
    max_connections: int = Field(1000, ge=1, description="Open connections beyond this get 503 and are closed.")
    max_connections_per_ip: int = Field(
        100,
        ge=0,
        description="Open connections from one client address beyond this get 503 and are closed, so one "
        "client's slow sockets cannot fill max_connections (per worker process; 0: no cap). Behind a reverse "
        "proxy in trusted_proxies it counts each forwarded client's requests in progress instead.",
    )
    trusted_addresses: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Client addresses or networks exempt from max_connections_per_ip (e.g. the chatbot server "
        "that sends every device's openai-ASR and voiceprint calls, 10.0.0.5 or 10.0.0.0/24).",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Reverse proxies (127.0.0.1 for nginx on this host) whose X-Forwarded-For is believed: the "
        "per-address caps count the client it names, and no one is voiceprint admin by being on loopback.",
    )
    header_timeout_s: float = Field(10.0, gt=0, description="A request's headers must arrive within this.")
    body_timeout_s: float = Field(120.0, gt=0, description="An upload's body must arrive within this (408 after).")
    keepalive_timeout_s: float = Field(75.0, gt=0, description="Idle keep-alive connections close after this.")
    max_decodes: int = Field(
        2,
        ge=1,
        description="Uploads decoded at once: the decoder processes (audio/decode_pool.py) that decode the HTTP "
        "uploads and the FunASR offline files, so that a decoder's crash costs one request (each may hold "
        "max_audio_s of 16 kHz audio, 230 MB at an hour); the others wait their turn.",
    )
    model_name: str = Field(
        "sensevoice-small",
        description="The model id /v1/models lists (another id is 404 there); any `model` is accepted in a request.",
    )
    console: bool = Field(
        True,
        description="Serve the browser console at / (talk, live sessions, health, voices); it calls the "
        "public API with the same keys. false: / answers 404 (the API stays).",
    )

    @field_validator("trusted_addresses", "trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        """A single address or a comma-separated string too (an environment variable), and a
        network written with host bits (10.0.0.5/24) as the network it lies in."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        out = []
        for item in items:
            try:
                out.append(str(ip_network(str(item).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return out


class FunAsrConfig(_Section):
    """The FunASR-runtime-compatible WebSocket (xiaozhi-esp32-server's FunASRServer provider)."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(10095, ge=0, le=65535)
    path: str = Field("/", description="Path clients connect to; '/' accepts any path, as FunASR does.")
    auth: bool = Field(
        False,
        description="Require an http.api_keys or http.read_keys key (sent as `Authorization: Bearer; <key>`).",
    )
    max_message_bytes: int = Field(
        24 * 1024 * 1024,
        ge=1024,
        description="Largest WebSocket message; at least max_audio_s of 16 kHz PCM, so a whole request sent "
        "as one message meets the audio-length limit, not this one.",
    )
    max_audio_s: float = Field(600.0, gt=0, description="Most audio buffered for one offline request.")
    text_tags: bool = Field(
        True,
        description="Finals carry SenseVoice's tags in `text` as FunASR's runtime sends them "
        "(`<|zh|><|NEUTRAL|><|Speech|> 打开灯`, parsed by xiaozhi-esp32-server's FunASRServer), with "
        "`clean_text` beside; false: clean text only.",
    )
    max_buffered_mb: float = Field(256.0, gt=0, description="Offline audio all connections may hold (then 1013).")
    partial_interval_ms: int = Field(600, ge=100, description="online/2pass: re-decode the utterance this often.")
    idle_timeout_s: float = Field(120.0, gt=0)
    send_timeout_s: float = Field(10.0, gt=0, description="A result unread this long drops the connection.")
    max_sessions: int = Field(500, ge=1, description="Connections beyond this are refused with HTTP 503.")
    ping_interval_s: float | None = Field(None, description="WebSocket pings; FunASR clients never need them.")
    close_timeout_s: float = Field(2.0, gt=0)
    tls: Literal["both", "on", "off"] = Field(
        "both",
        description="both: wss:// and ws:// on the one port (xiaozhi's FunASRServer defaults to is_ssl: true, "
        "FunASR's client to --ssl 1, others connect plain); on: wss:// only; off: ws:// only.",
    )
    ssl_certfile: Path | None = Field(None, description="The PEM for wss://; none: one made at self_signed_cert.")
    self_signed_cert: Path = Field(Path("data/funasr-selfsigned.pem"), description="The generated cert and key.")
    open_timeout_s: float = Field(10.0, gt=0, description="The TLS and WebSocket handshakes must end within this.")
    ssl_keyfile: Path | None = Field(None, description="The certificate's key, unless the certfile holds it.")

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_word(cls, v: Any) -> Any:
        """YAML reads a bare `on`/`off` as true/false: take those as the words they were."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _tls(self) -> FunAsrConfig:
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile")
        pcm = int(self.max_audio_s * 32000) + 1024
        if self.max_message_bytes < pcm:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) is smaller than max_audio_s of 16 kHz PCM "
                f"({pcm} bytes): raise it or lower max_audio_s"
            )
        return self


class UpstreamConfig(_Section):
    """The chatbot server each device session is relayed to (xiaozhi-esp32-server, or a port of it)."""

    url: WsUrl | None = Field(
        None,
        description="ws(s):// URL of the upstream's device endpoint, e.g. ws://chat:8000/xiaozhi/v1/; "
        "null: no relay (devices get our `stt` only).",
    )
    protocol_version: Literal[1, 2, 3] = Field(
        1,
        description="Binary framing the upstream speaks (xiaozhi-esp32-server: bare Opus, 1); re-framed for each device.",
    )
    open_timeout_s: float = Field(5.0, gt=0, description="Connecting and the WebSocket handshake.")
    hello_timeout_s: float = Field(10.0, gt=0, description="The upstream's hello after the device's.")
    send_timeout_s: float = Field(10.0, gt=0, description="A message the upstream does not take ends the relay.")
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    send_speaker: bool = Field(
        True, description='Add a known speaker to the turn\'s JSON as "speaker" (xiaozhi-esp32-server reads it).'
    )
    ota_url: HttpUrl | None = Field(
        None, description="The upstream's OTA: device checks go there, its answer comes back with our WebSocket."
    )
    ota_timeout_s: float = Field(5.0, gt=0, description="An upstream OTA slower than this: the device gets our answer.")


def _device_protocol_only() -> list[Protocol]:
    return ["xiaozhi"]


class EventsConfig(_Section):
    """Where final transcripts go: a webhook and the /v1/events WebSocket stream."""

    protocols: list[Protocol] = Field(
        default_factory=_device_protocol_only,
        description=("Protocols whose transcripts become events (xiaozhi, funasr, openai)."),
    )
    webhook_url: str | None = Field(None, description="POST each event as JSON here; null turns the webhook off.")
    webhook_headers: dict[str, str] = Field(default_factory=dict, description="Extra headers, e.g. Authorization.")
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_retries: int = Field(3, ge=0, description="Retries after the first attempt (timeouts, 5xx, 429).")
    webhook_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles per retry.")
    webhook_backoff_max_s: float = Field(10.0, ge=0)
    webhook_concurrency: int = Field(2, ge=1, description="Deliveries in flight at once.")
    queue_size: int = Field(1000, ge=1, description="Undelivered webhook events kept; the oldest is dropped beyond.")
    subscriber_queue_size: int = Field(256, ge=1, description="Events kept per slow /v1/events subscriber.")
    max_subscribers: int = Field(100, ge=1, description="/v1/events connections beyond this are refused with 503.")
    heartbeat_s: float = Field(30.0, gt=0, description="/v1/events WebSocket pings, to notice a vanished subscriber.")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"must be an http(s) URL, got {url!r}")
        return url


class RayDeploymentConfig(_Section):
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


class InferenceConfig(_Section):
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


class ArchiveConfig(_Section):
    """What was said, kept on disk (docs/archive.md): each final utterance's audio and a row in SQLite."""

    enabled: bool = Field(False, description="Keep final utterances; off by default (it stores people's speech).")
    dir: Path = Field(Path("data/archive"), description="Audio files and archive.sqlite go here.")
    max_days: float = Field(30.0, gt=0, description="Utterances older than this are removed.")
    max_gb: float = Field(10.0, gt=0, description="Beyond this much audio, the oldest utterances are removed.")
    xiaozhi: bool = Field(True, description="Keep devices' utterances (their Opus packets, as Ogg Opus).")
    funasr: bool = Field(True, description="Keep FunASR clients' utterances (as FLAC).")
    http: bool = Field(True, description="Keep the segments of /v1/audio/transcriptions uploads (as FLAC).")


#: Old key → new key, for sections that were renamed; the old name still works, with a warning.
RENAMED_SECTIONS = {"server": "xiaozhi"}

#: Keys the overload governor replaced with named constants or derived values (core/governor.py);
#: a configuration that still sets one starts, with a warning naming it.
RETIRED_KEYS = {
    "asr": ("admission_wait_ms", "late_share", "target_load"),
    "xiaozhi": ("shed_after_s", "shed_fraction", "max_input_delay_ms", "admit_increase_per_s", "admit_doubling_s"),
}


class Config(_Section):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Front-end processes sharing the ports (serve --workers): auto = one per core. Each holds its "
        "own sessions and engines on its share of the cores; limits, events, voiceprints and /metrics are the "
        "whole server's.",
    )
    xiaozhi: XiaozhiConfig = Field(default_factory=XiaozhiConfig)
    vad: VadConfig = Field(default_factory=VadConfig)
    asr: AsrConfig = Field(default_factory=AsrConfig)
    speaker: SpeakerConfig = Field(default_factory=SpeakerConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    funasr: FunAsrConfig = Field(default_factory=FunAsrConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    deprecations: list[str] = Field(
        default_factory=list,
        exclude=True,
        description=(
            "Renamed keys found in this configuration, as warnings the CLI logs at start (set by load_config)."
        ),
    )

    @property
    def server(self) -> XiaozhiConfig:
        """The device socket's section under its old name (renamed `xiaozhi`)."""
        return self.xiaozhi

    @model_validator(mode="after")
    def _keys(self) -> Config:
        if self.funasr.auth and not (self.http.api_keys or self.http.read_keys):
            # Authentication with no key to authenticate with would let everyone in (or no one).
            raise ValueError("funasr.auth is true but no key is configured: set http.api_keys or http.read_keys")
        if self.asr.budget_ms and self.asr.budget_ms <= self.vad.min_silence_ms:
            raise ValueError(
                f"asr.budget_ms ({self.asr.budget_ms:g}) must exceed vad.min_silence_ms ({self.vad.min_silence_ms}): "
                "no reply comes sooner than the silence that ends an utterance (0 turns the budget off)"
            )
        if self.xiaozhi.auth.enabled and not self.xiaozhi.auth.tokens:
            raise ValueError("xiaozhi.auth.enabled is true but xiaozhi.auth.tokens is empty")
        if self.inference.mode == "ray" and self.inference.address is None and self.workers != 1:
            # Each worker process would start a Ray instance of its own, each deploying its own replicas.
            raise ValueError(
                "inference.mode ray with workers above 1 needs inference.address (a cluster from "
                "`ray start --head`, then address: auto): each worker would start its own Ray instance"
            )
        return self
