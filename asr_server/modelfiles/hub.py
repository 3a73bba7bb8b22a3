"""`models pull`: fetch what is missing from ModelScope or Hugging Face, pre-exported ONNX first.

On the ONNX backend a model with no ONNX file yet comes from the hub's pre-exported repository when
it has one (checked against the engine's contract, a misfit moved aside and named), and only
otherwise from the PyTorch weights, which `export` turns into ONNX. Before downloading, each hub is
probed, so no network means an immediate, named failure with instructions to place the files by
hand. The hub clients are imported only here, and only when something must be fetched.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..engines import contracts
from ..engines.contracts import ModelContract, match_signature, one_line, read_signature
from ..engines.speaker.campplus import frontend_problems, onnx_metadata
from ..errors import DownloadError, HubUnreachableError, MissingDependencyError, ModelFileError, ModelsError
from .export import (
    TORCH_CONFIGURATION,
    TORCH_SETUP,
    Echo,
    export_models,
    export_sensevoice_files,
    exporter_missing,
    not_the_torch_configuration,
    record_exported,
    stderr,
)
from .inspect import FileStatus, check_vocab, token_count
from .layout import dir_files, model_dirs, sensevoice_onnx_ready
from .manifest import record_files
from .repos import (
    ECAPA_REPO,
    SENSEVOICE_ONNX_REPO,
    SENSEVOICE_REPO,
    WEIGHTS_OF,
    PullTarget,
    Source,
    hub_endpoint,
    manual_instructions,
    normalize_source,
    plan_pull,
    sensevoice_support_ready,
    target,
)

DEFAULT_PROBE_TIMEOUT_S = 5.0


def probe_endpoint(url: str, timeout: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
    """Raise `HubUnreachableError` unless `url` answers an HTTP request within `timeout` seconds.

    Any HTTP status counts as an answer. The request runs in a daemon thread bounded by the same
    deadline, so a hanging DNS lookup cannot stretch it either; proxies from the environment apply.
    """
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "asr-server-models-probe"})
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise HubUnreachableError(f"no answer from {url} within {timeout:g} s")
    err = outcome[0]
    if err is not None:
        reason = getattr(err, "reason", err)
        raise HubUnreachableError(f"{url} unreachable after {time.monotonic() - t0:.1f} s: {one_line(reason)}")


@dataclass(frozen=True, slots=True)
class PullResult:
    fetched: tuple[PullTarget, ...]
    exported: tuple[Path, ...]
    recorded: tuple[Path, ...]


def _probe_all(
    config: Config, targets: list[PullTarget], probe_timeout: float, weights_at: tuple[Source, str], echo: Echo
) -> list[PullTarget]:
    """Probe each hub the targets need; the targets to fetch. A pre-exported repository on a hub
    other than the one asked for (CAM++ on Hugging Face) that does not answer gives way to its
    PyTorch weights on that one, said in one line; any other silent hub stops the pull."""
    out = list(targets)
    probed: set[str] = set()
    while pending := [u for u in dict.fromkeys(t.endpoint for t in out) if u not in probed]:
        url = pending[0]
        probed.add(url)
        try:
            probe_endpoint(url, probe_timeout)
        except HubUnreachableError as e:
            here = [t for t in out if t.endpoint == url]
            swap = {
                id(t): target(WEIGHTS_OF[id(t.repo)], *weights_at, t.dest, fallback=True)
                for t in here
                if id(t.repo) in WEIGHTS_OF
            }
            if url != weights_at[1] and len(swap) == len(here) and all(swap.values()):
                echo(
                    f"{', '.join(t.repo_id for t in here)}: {e}; taking the PyTorch weights from "
                    f"{weights_at[1]} instead (set HF_ENDPOINT to a mirror to get the pre-exported ONNX)"
                )
                out = [swap.get(id(t)) or t for t in out]
                continue
            tried = "; ".join(f"{t.repo_id} ({t.url})" for t in here)
            hint = (
                "try `--source hf`, or `--endpoint URL` for a mirror, or "
                if out[0].source == "modelscope"
                else "try `--endpoint URL` for a mirror, or "
            )
            raise HubUnreachableError(
                f"cannot reach the model hub: {e}.\nTried to fetch: {tried}.\n"
                f"Nothing was downloaded. Check the network or proxy (HTTPS_PROXY), {hint}place the files by hand.\n"
                + manual_instructions(config, out)
            ) from None
    return out


def _fetch(config: Config, t: PullTarget, echo: Echo) -> list[Path]:
    """Download one target and record what came; `DownloadError` says how to resume."""
    echo(
        f"fetching {t.repo_id} from {t.endpoint} into {t.dest}/" + (f" (only {', '.join(t.allow)})" if t.allow else "")
    )
    try:
        _download(t)
    except ModelsError:
        raise
    except Exception as e:  # the hub clients' own error types differ by client and version
        raise DownloadError(
            f"downloading {t.repo_id} from {t.url} into {t.dest}/ failed: {one_line(e)}\n"
            "Run `asr-server models pull` again: finished files are kept and a partial "
            "file resumes where it stopped."
        ) from e
    fetched = [p for p in dir_files(t.dest) if any(fnmatch.fnmatch(p.name, pat) for pat in t.patterns)]
    return record_files(config, fetched, f"{t.source}:{t.repo_id}")


def _reject(path: Path, why: str, echo: Echo) -> None:
    """Move a file the engine cannot use out of its way (kept, for a look), and say why."""
    aside = path.with_name(path.name + ".rejected")
    os.replace(path, aside)
    echo(f"{path} does not fit the engine ({why}); moved to {aside.name}, not used")


def accept_pre_exported(config: Config, t: PullTarget, echo: Echo = stderr) -> bool:
    """Check what a pre-exported repository delivered against the engine's contract.

    Files that do not fit are moved aside with the mismatch named; True when the model is ready.
    """
    if t.repo is SENSEVOICE_ONNX_REPO:
        sv = t.dest
        pieces = None
        for name in (contracts.SENSEVOICE_BPE, contracts.SENSEVOICE_TOKENS):
            if (sv / name).is_file():
                pieces, problem = token_count(sv / name)
                if problem:
                    _reject(sv / name, problem, echo)
                break
        for name in (contracts.SENSEVOICE_INT8, contracts.SENSEVOICE_FP32):
            path = sv / name
            if not path.is_file():
                continue
            problems = _contract_problems(path, contracts.SENSEVOICE)
            if not problems and pieces is not None:
                st = check_vocab(
                    FileStatus(
                        path, "SenseVoice", True, True, signature=read_signature(path), contract=contracts.SENSEVOICE
                    ),
                    pieces,
                    sv / name,
                )
                problems = list(st.problems)
            if problems:
                _reject(path, "; ".join(problems), echo)
        return sensevoice_onnx_ready(config) and sensevoice_support_ready(sv)
    # CAM++: sherpa-onnx's file name differs from speaker.model; the first ONNX that fits becomes it.
    out = Path(config.speaker.model)
    for path in sorted(p for p in dir_files(t.dest) if p.suffix == ".onnx" and p != out):
        problems = _contract_problems(path, contracts.CAMPPLUS)
        if not problems:
            problems = frontend_problems(onnx_metadata(path))
        if problems:
            _reject(path, "; ".join(problems), echo)
        elif not out.is_file():
            os.replace(path, out)
            echo(f"{path.name} from {t.repo_id} fits the CAM++ engine: saved as {out}")
    return out.is_file()


def _contract_problems(path: Path, contract: ModelContract) -> list[str]:
    try:
        return match_signature(read_signature(path), contract)
    except ModelFileError as e:
        return [str(e).removeprefix(f"{path}: ")]


def pull_models(
    config: Config,
    source: str = "modelscope",
    *,
    endpoint: str | None = None,
    ecapa: bool = False,
    export: bool = True,
    quantize: bool = True,
    force: bool = False,
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT_S,
    echo: Echo = stderr,
) -> PullResult:
    """Fetch what is missing, export what has no ONNX yet, record everything in the manifest.

    Pre-exported ONNX files are preferred; only a model whose hub has none that fits falls back to
    its PyTorch weights and the export, which needs the torch lock (the error says how to install
    it before 900 MB of weights are fetched for nothing). Probes each hub first and raises
    `HubUnreachableError` at once when it does not answer, with what was tried and how to place
    the files by hand; nothing is downloaded then.
    """
    targets = plan_pull(config, source, endpoint=endpoint, ecapa=ecapa, force=force)
    src = normalize_source(source)
    weights_at = (src, hub_endpoint(src, endpoint))
    if targets:
        for t in targets:
            _require_client(t)
        targets = _probe_all(config, targets, probe_timeout, weights_at, echo)
    else:
        echo("all model files the configuration needs are present; nothing to download")
    recorded: list[Path] = []
    fetched: list[PullTarget] = []
    queue = list(targets)
    while queue:
        t = queue.pop(0)
        if (
            not t.repo.pre_exported
            and export
            and config.engine.backend != "torch"
            and t.repo.model != "ECAPA"
            and contracts.SENSEVOICE_WEIGHTS not in t.ignore
            and (why := exporter_missing())
        ):
            raise MissingDependencyError(
                f"{t.repo.model}: {'the pre-exported ONNX files do not fit' if t.fallback else 'no pre-exported ONNX on ' + t.source}"
                f", so it must be exported from its PyTorch weights ({t.repo_id}), which needs the torch lock ({why}). "
                f"Install it with `{TORCH_SETUP}`, then run `asr-server models pull` again."
            )
        if TORCH_CONFIGURATION in t.patterns and (why := not_the_torch_configuration(t.dest)):
            _reject(t.dest / TORCH_CONFIGURATION, why, echo)  # the hub client would keep it
        recorded += _fetch(config, t, echo)
        fetched.append(t)
        if t.repo.pre_exported and not accept_pre_exported(config, t, echo):
            fallback = target(WEIGHTS_OF[id(t.repo)], *weights_at, t.dest, fallback=True)
            if fallback is not None:
                echo(f"{t.repo.model}: nothing pre-exported fits; falling back to the PyTorch weights and the export")
                queue.insert(0, fallback)
        elif t.repo is SENSEVOICE_ONNX_REPO and not (t.dest / contracts.SENSEVOICE_BPE).is_file():
            # Decoding works from tokens.json; the sentencepiece model is what funasr itself decodes with.
            bpe = target(SENSEVOICE_REPO, t.source, t.endpoint, t.dest, allow=(contracts.SENSEVOICE_BPE,))
            if bpe is not None:
                try:
                    recorded += _fetch(config, bpe, echo)
                    fetched.append(bpe)
                except DownloadError as e:
                    echo(
                        f"{contracts.SENSEVOICE_BPE} not fetched ({one_line(e)}); decoding with {contracts.SENSEVOICE_TOKENS}"
                    )

    exported: list[Path] = []
    if export:
        exported = export_models(config, quantize=quantize, force=False, echo=echo, missing_only=True)
        if _wants_fp32(config) and not (Path(config.asr.model_dir) / contracts.SENSEVOICE_FP32).is_file():
            more, fetched_weights = _fp32_for_cuda(config, source, endpoint, echo)
            exported += more
            fetched += fetched_weights
        recorded += exported
    # Files placed by hand are recorded as found, so `verify` notices when they change later.
    for d in model_dirs(config):
        recorded += record_files(config, dir_files(d), "local", replace=False)
    return PullResult(tuple(fetched), tuple(exported), tuple(dict.fromkeys(recorded)))


def _wants_fp32(config: Config) -> bool:
    """On CUDA the int8 graph (dynamic quantisation) runs slowly: `auto` wants the fp32 file there."""
    return (
        config.engine.backend != "torch"
        and config.engine.device.startswith("cuda")
        and config.asr.quantized in ("auto", "no")
    )


def _fp32_for_cuda(
    config: Config, source: str, endpoint: str | None, echo: Echo
) -> tuple[list[Path], list[PullTarget]]:
    """Export `model.onnx` from the weights when a pre-exported repository brought only the int8 graph."""
    sv = Path(config.asr.model_dir)
    why = exporter_missing()
    if why:
        echo(
            f"SenseVoice: only {contracts.SENSEVOICE_INT8} is here, and int8 runs slowly on CUDA. For {contracts.SENSEVOICE_FP32}, "
            f"install the torch lock (`{TORCH_SETUP}`; {why}) and run `asr-server models pull` again."
        )
        return [], []
    fetched = []
    if not (sv / contracts.SENSEVOICE_WEIGHTS).is_file():
        src = normalize_source(source)
        t = target(SENSEVOICE_REPO, src, hub_endpoint(src, endpoint), sv)
        if t is None:
            return [], []
        _fetch(config, t, echo)
        fetched.append(t)
    echo(f"exporting {sv / contracts.SENSEVOICE_WEIGHTS} to {contracts.SENSEVOICE_FP32} for CUDA (opset 14, fp32)")
    produced = export_sensevoice_files(sv, quantize=False)
    record_exported(config, produced)
    return produced, fetched


_CLIENTS = {"modelscope": ("modelscope", "modelscope"), "huggingface": ("huggingface_hub", "huggingface_hub")}


def _require_client(t: PullTarget) -> None:
    module, package = ("speechbrain", "speechbrain") if t.repo is ECAPA_REPO else _CLIENTS[t.source]
    if importlib.util.find_spec(module) is None:
        setup = TORCH_SETUP if t.repo is ECAPA_REPO else "scripts/setup.sh"
        raise MissingDependencyError(
            f"fetching {t.repo_id} needs the {package} package: run `{setup}` (or pip install {package})"
        )


def _download(t: PullTarget) -> None:
    t.dest.mkdir(parents=True, exist_ok=True)
    if t.repo is ECAPA_REPO:
        from speechbrain.inference.speaker import EncoderClassifier
        from speechbrain.utils.fetching import LocalStrategy

        # Files go straight into the folder (no symlinks into a cache outside the models volume).
        EncoderClassifier.from_hparams(
            source=t.repo_id, savedir=str(t.dest), download_only=True, local_strategy=LocalStrategy.COPY_SKIP_CACHE
        )
        return
    allow = t.patterns
    if t.source == "modelscope":
        from modelscope.hub.snapshot_download import snapshot_download

        kwargs: dict[str, Any] = {"local_dir": str(t.dest), "allow_patterns": allow}
        params = inspect.signature(snapshot_download).parameters
        if "endpoint" in params:
            kwargs["endpoint"] = t.endpoint
        if "progress_callbacks" in params:
            from modelscope.hub.callback import TqdmCallback

            kwargs["progress_callbacks"] = [TqdmCallback]
        snapshot_download(t.repo_id, **kwargs)
    else:
        from huggingface_hub import snapshot_download as hf_snapshot_download

        hf_snapshot_download(t.repo_id, local_dir=str(t.dest), allow_patterns=allow, endpoint=t.endpoint)
