"""Where each model lives on each hub, and which repositories a configuration still needs (`plan_pull`).

On the ONNX backend a model with no ONNX file yet is planned from the hub's pre-exported
repository when it has one, from the PyTorch weights (to export) otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import Config
from ..engines import contracts
from ..errors import ModelsError
from .export import TORCH_CONFIGURATION, exporter_missing, find_campplus_weights, not_the_torch_configuration
from .layout import ecapa_dir, models_root, sensevoice_onnx_ready

DEFAULT_PROBE_TIMEOUT_S = 5.0
Source = Literal["modelscope", "huggingface"]


@dataclass(frozen=True, slots=True)
class HubRepo:
    """One model as each hub names it, and which of its files to fetch.

    `pre_exported` repositories hold ONNX files ready for the engines; the others hold the PyTorch
    weights the hubs publish, which `export` turns into ONNX (and which the torch backend reads).
    A hub that does not offer a repository has None for it.
    """

    model: str
    modelscope: str | None
    huggingface: str | None
    allow: tuple[str, ...]
    pre_exported: bool = False

    def repo_id(self, source: Source) -> str | None:
        return self.modelscope if source == "modelscope" else self.huggingface


SENSEVOICE_REPO = HubRepo(
    "SenseVoice",
    "iic/SenseVoiceSmall",
    "FunAudioLLM/SenseVoiceSmall",
    (
        contracts.SENSEVOICE_WEIGHTS,
        contracts.SENSEVOICE_CMVN,
        contracts.SENSEVOICE_BPE,
        contracts.SENSEVOICE_CONFIG,
        TORCH_CONFIGURATION,
    ),
)
#: FunASR's own ONNX runtime model (what its C++ and Python runtimes load): the int8 graph, the
#: frontend files and `tokens.json`, but no sentencepiece model (fetched alone from SENSEVOICE_REPO).
#: Its `configuration.json` is left there: it is not the torch model's, whose `file_path_metas`
#: funasr's hub loader reads beside model.pt (export and the torch backend would break on it).
SENSEVOICE_ONNX_REPO = HubRepo(
    "SenseVoice",
    "iic/SenseVoiceSmall-onnx",
    None,
    (
        contracts.SENSEVOICE_INT8,
        contracts.SENSEVOICE_FP32,
        contracts.SENSEVOICE_CMVN,
        contracts.SENSEVOICE_CONFIG,
        contracts.SENSEVOICE_TOKENS,
    ),
    pre_exported=True,
)
# funasr's own hub map (funasr/download/name_maps_from_hub.py) gives the HF mirror of CAM++. The
# ModelScope repository holds only `campplus_cn_common.bin` and `configuration.json`: no ONNX.
CAMPPLUS_REPO = HubRepo(
    "CAM++", "iic/speech_campplus_sv_zh-cn_16k-common", "funasr/campplus", ("*.bin", "*.pt", "*.yaml", "*.json")
)
#: sherpa-onnx's export of that same network (its scripts/3dspeaker/export-onnx.py loads the
#: ModelScope weights): input `x` [N,T,80], output `embedding`, metadata `normalize_samples=1`,
#: `feature_normalize_type=global-mean`, as the CAM++ engine reads it. Published on Hugging Face
#: (and as a GitHub release asset, tag `speaker-recongition-models`); fetched from Hugging Face
#: whatever --source says (at $HF_ENDPOINT when set, e.g. a mirror), since ModelScope has no ONNX.
CAMPPLUS_SHERPA_ONNX = "3dspeaker_speech_campplus_sv_zh-cn_16k-common.onnx"
CAMPPLUS_SHERPA_RELEASE = (
    f"https://github.com/k2-fsa/sherpa-onnx/releases/download/speaker-recongition-models/{CAMPPLUS_SHERPA_ONNX}"
)
CAMPPLUS_ONNX_REPO = HubRepo(
    "CAM++", None, "csukuangfj/speaker-embedding-models", (CAMPPLUS_SHERPA_ONNX,), pre_exported=True
)
ECAPA_REPO = HubRepo("ECAPA", None, "speechbrain/spkrec-ecapa-voxceleb", contracts.ECAPA_FILES)
#: A pre-exported repository's fallback: the weights to export when its ONNX does not fit.
WEIGHTS_OF = {id(SENSEVOICE_ONNX_REPO): SENSEVOICE_REPO, id(CAMPPLUS_ONNX_REPO): CAMPPLUS_REPO}

MODELSCOPE_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
HUGGINGFACE_DEFAULT_ENDPOINT = "https://huggingface.co"


def normalize_source(source: str) -> Source:
    s = source.lower()
    if s in ("ms", "modelscope"):
        return "modelscope"
    if s in ("hf", "huggingface"):
        return "huggingface"
    raise ModelsError(f"unknown model source {source!r}: use modelscope (ms) or huggingface (hf)")


def hub_endpoint(source: Source, endpoint: str | None = None) -> str:
    """The hub URL: `endpoint`, else the hub client's own environment variable, else the public hub."""
    if endpoint:
        url = endpoint
    elif source == "modelscope":
        url = (
            os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or MODELSCOPE_DEFAULT_ENDPOINT
        )
    else:
        url = os.environ.get("HF_ENDPOINT") or HUGGINGFACE_DEFAULT_ENDPOINT
    url = url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else "https://" + url


@dataclass(frozen=True, slots=True)
class PullTarget:
    """One repository to fetch into one folder."""

    repo: HubRepo
    source: Source
    repo_id: str
    endpoint: str
    dest: Path
    ignore: tuple[str, ...] = ()
    allow: tuple[str, ...] | None = None  # a subset of `repo.allow` (one file of a repository)
    fallback: bool = False  # the weights fetched because the pre-exported files did not fit

    @property
    def url(self) -> str:
        return (
            f"{self.endpoint}/models/{self.repo_id}"
            if self.source == "modelscope"
            else f"{self.endpoint}/{self.repo_id}"
        )

    @property
    def patterns(self) -> list[str]:
        return [p for p in (self.allow or self.repo.allow) if p not in self.ignore]


def target(repo: HubRepo, source: Source, endpoint: str, dest: Path, **kw: Any) -> PullTarget | None:
    repo_id = repo.repo_id(source)
    return PullTarget(repo, source, repo_id, endpoint, dest, **kw) if repo_id else None


def missing_support(sv: Path, weights: bool = False) -> tuple[str, ...]:
    """The small files beside the SenseVoice graph or weights that `sv` lacks (an xiaozhi-esp32-server
    user's folder has no am.mvn), as names to fetch alone from the PyTorch repository. With
    `weights` (funasr will load model.pt), also a `configuration.json` that is not the torch model's."""
    missing = tuple(n for n in (contracts.SENSEVOICE_CMVN, contracts.SENSEVOICE_CONFIG) if not (sv / n).is_file())
    if not (sv / contracts.SENSEVOICE_BPE).is_file() and not (sv / contracts.SENSEVOICE_TOKENS).is_file():
        missing += (contracts.SENSEVOICE_BPE,)
    if weights and not_the_torch_configuration(sv):
        missing += (TORCH_CONFIGURATION,)
    return missing


def sensevoice_support_ready(sv: Path) -> bool:
    return not missing_support(sv)


def plan_pull(
    config: Config, source: str = "modelscope", *, endpoint: str | None = None, ecapa: bool = False, force: bool = False
) -> list[PullTarget]:
    """The repositories whose files are missing (all of them with `force`).

    On the ONNX backend a model with no ONNX file yet comes from the hub's pre-exported repository
    when it has one, and from the PyTorch weights (to export) otherwise.
    """
    src = normalize_source(source)
    url = hub_endpoint(src, endpoint)
    sv = Path(config.asr.model_dir)
    onnx_backend = config.engine.backend != "torch"
    targets: list[PullTarget | None] = []

    sv_onnx = sensevoice_onnx_ready(config)
    weights_here = (sv / contracts.SENSEVOICE_WEIGHTS).is_file()
    if not onnx_backend:
        if force or not weights_here:
            targets.append(target(SENSEVOICE_REPO, src, url, sv))
        elif missing := missing_support(sv, weights=True):
            targets.append(target(SENSEVOICE_REPO, src, url, sv, allow=missing))
    elif force or not sv_onnx:
        pre = target(SENSEVOICE_ONNX_REPO, src, url, sv)
        # A folder with the PyTorch weights (an xiaozhi-esp32-server user's) is exported where the
        # torch lock is installed; without it, the pre-exported graph spares installing torch.
        export_here = weights_here and not force and exporter_missing() is None
        if pre is not None and not export_here:
            targets.append(pre)
        elif force or not weights_here:
            targets.append(target(SENSEVOICE_REPO, src, url, sv))
        elif missing := missing_support(sv, weights=True):
            targets.append(target(SENSEVOICE_REPO, src, url, sv, allow=missing))
    elif missing := missing_support(sv):
        # ONNX is here: the 900 MB of PyTorch weights are not needed, only the small files missing beside them.
        targets.append(target(SENSEVOICE_REPO, src, url, sv, allow=missing))

    kind = config.speaker.model_type
    if config.speaker.enabled and kind == "campplus":
        onnx_path = Path(config.speaker.model)
        weights = find_campplus_weights(onnx_path.parent)
        if not onnx_backend:
            if force or weights is None:
                targets.append(target(CAMPPLUS_REPO, src, url, onnx_path.parent))
        elif force or (not onnx_path.is_file() and (weights is None or exporter_missing() is not None)):
            hf = url if src == "huggingface" else hub_endpoint("huggingface")
            targets.append(target(CAMPPLUS_ONNX_REPO, "huggingface", hf, onnx_path.parent))

    if ecapa or (config.speaker.enabled and kind == "ecapa"):
        d = ecapa_dir(config)
        if force or not all((d / n).is_file() for n in contracts.ECAPA_FILES):
            # speechbrain fetches from Hugging Face whatever --source says, at $HF_ENDPOINT if set.
            targets.append(target(ECAPA_REPO, "huggingface", hub_endpoint("huggingface"), d))
    return [t for t in targets if t is not None]


def manual_instructions(config: Config, targets: list[PullTarget]) -> str:
    """Which files to copy where, for a machine that cannot reach the hubs."""
    lines = [
        (
            "To place the files by hand, download them on a machine that can reach the hub "
            "(or copy them from another server) and put them here:"
        )
    ]
    for t in targets:
        if t.repo.model == "SenseVoice":
            lines.append(
                f"  {t.dest}/: {contracts.SENSEVOICE_FP32} and/or {contracts.SENSEVOICE_INT8} (or {contracts.SENSEVOICE_WEIGHTS}, then run "
                f"`asr-server models export`), {contracts.SENSEVOICE_CMVN}, {contracts.SENSEVOICE_BPE} (or {contracts.SENSEVOICE_TOKENS}), "
                f"{contracts.SENSEVOICE_CONFIG}  [from {t.url}]"
            )
        elif t.repo.model == "CAM++":
            hf = (
                t.url
                if t.repo is CAMPPLUS_ONNX_REPO
                else f"{hub_endpoint('huggingface')}/{CAMPPLUS_ONNX_REPO.huggingface}"
            )
            weights = f"{MODELSCOPE_DEFAULT_ENDPOINT}/models/{CAMPPLUS_REPO.modelscope}"
            lines.append(
                f"  {Path(config.speaker.model)}: sherpa-onnx's {CAMPPLUS_SHERPA_ONNX}, renamed  "
                f"[from {hf} or {CAMPPLUS_SHERPA_RELEASE}]\n"
                f"    (or {contracts.CAMPPLUS_WEIGHTS} in {t.dest}/, then run `asr-server models export`)  [from {weights}]"
            )
        else:
            lines.append(f"  {t.dest}/: {', '.join(contracts.ECAPA_FILES)}  [from {t.url}]")
    lines.append("Then run `asr-server models verify`." + models_readme(config))
    return "\n".join(lines)


#: The checkout's models/README.md: the models folder of a configuration may lie elsewhere, without it.
CHECKOUT_MODELS_README = Path(__file__).resolve().parents[2] / "models" / "README.md"


def models_readme(config: Config) -> str:
    """A pointer to a README that exists: the models folder's, else the checkout's, else none."""
    for readme in (models_root(config) / "README.md", CHECKOUT_MODELS_README):
        if readme.is_file():
            return f" {readme} has the details."
    return ""
