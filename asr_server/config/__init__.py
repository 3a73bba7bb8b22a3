"""Typed configuration: `config.yaml` validated at start, overridden by environment variables.

Every key has a default (`sections`); `config.yaml` at the repository root documents them. An
unknown or ill-typed key stops the start with a `ConfigError` that names the key and why.
Environment variables named `ASR_SERVER__SECTION__KEY` (double underscores between levels)
override keys; their values are parsed as YAML scalars, so `ASR_SERVER__VAD__THRESHOLD=0.6` gives
a float. Renamed keys keep working under their old names, and keys the overload governor replaced
(`RETIRED_KEYS`) are ignored, each with a line in `Config.deprecations` that the CLI logs at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .sections import (
    RENAMED_SECTIONS,
    RETIRED_KEYS,
    ArchiveConfig,
    AsrConfig,
    AuthConfig,
    Config,
    EngineConfig,
    EventsConfig,
    FunAsrConfig,
    HttpConfig,
    InferenceConfig,
    RayDeploymentConfig,
    SpeakerConfig,
    UpstreamConfig,
    VadConfig,
    XiaozhiConfig,
)

__all__ = [
    "ArchiveConfig",
    "AsrConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "EngineConfig",
    "EventsConfig",
    "FunAsrConfig",
    "HttpConfig",
    "InferenceConfig",
    "RayDeploymentConfig",
    "SpeakerConfig",
    "UpstreamConfig",
    "VadConfig",
    "XiaozhiConfig",
    "load_config",
]

ENV_PREFIX = "ASR_SERVER__"


def _rename_sections(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Move renamed sections to their new names; what moved, as deprecation lines."""
    notes = []
    for old, new in RENAMED_SECTIONS.items():
        if old in data:
            value = data.pop(old)
            if isinstance(value, dict) and isinstance(data.get(new), dict):
                value = _merge(value, data[new])
            data[new] = value
            notes.append(
                f"the section {old!r} ({source}) is now called {new!r}; {old!r} still works, "
                f"rename it before it is removed"
            )
    return data, notes


def _retire_keys(data: dict[str, Any], source: str) -> list[str]:
    """Drop the keys the overload governor replaced (`RETIRED_KEYS`) from `data` (its sections are
    copied, not changed in place: they may be the caller's); what was dropped, as warnings."""
    notes = []
    for section, keys in RETIRED_KEYS.items():
        values = data.get(section)
        if not isinstance(values, dict) or not (found := [k for k in keys if k in values]):
            continue
        data[section] = {k: v for k, v in values.items() if k not in found}
        notes += [
            f"{section}.{key} ({source}) is no longer read: the overload governor derives it from asr.budget_ms "
            "(core/governor.py); remove it"
            for key in found
        ]
    return notes


def _format_errors(err: ValidationError, source: str, renamed: frozenset[str] | set[str] = frozenset()) -> str:
    """One line per bad key; a key under a renamed section is named as the user wrote it."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        for old in renamed:
            new = RENAMED_SECTIONS[old]
            if key == new or key.startswith(new + "."):
                key = f"{old}{key[len(new) :]} (now {key})"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid configuration (environment): {name} conflicts with another variable")
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            node[path[-1]] = raw
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Read `path` (if given and present), apply environment and explicit overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
        source = str(p)
    data, notes = _rename_sections(data, source)
    env_tree, env_notes = _rename_sections(_env_overrides(os.environ if env is None else env), "environment")
    notes += _retire_keys(data, source)
    env_notes += _retire_keys(env_tree, "environment")
    data = _merge(data, env_tree)
    if overrides:
        over, over_notes = _rename_sections(dict(overrides), "overrides")
        notes += over_notes + _retire_keys(over, "overrides")
        data = _merge(data, over)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        renamed = {old for old in RENAMED_SECTIONS if any(f"{old!r}" in n for n in notes + env_notes)}
        raise ConfigError(_format_errors(e, source + " + environment", renamed)) from None
    config.deprecations = notes + env_notes
    return config
