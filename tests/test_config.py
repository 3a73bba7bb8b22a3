from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from asr_server.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = load_config(None, env={})
    assert cfg.server.port == 8000
    assert cfg.server.path == "/xiaozhi/v1/"
    assert cfg.vad.threshold == 0.5 and cfg.vad.threshold_low == 0.3


def test_shipped_config_yaml_matches_defaults():
    """config.yaml documents every key with its default: loading it must equal the built-in defaults."""
    cfg = load_config(REPO / "config.yaml", env={})
    assert cfg == Config()


def schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key an operator can set, sections' keys under theirs (fields kept out of dumps are internal)."""
    keys = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= schema_keys(field.annotation, f"{prefix}{name}.")
    return keys


def file_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= file_keys(v, f"{prefix}{k}.")
    return keys


def test_config_yaml_shows_every_key_the_schema_has():
    """config.yaml says every key is shown with its default: a key added to the schema must be added there."""
    shown = file_keys(yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8")))
    schema = schema_keys(Config)
    assert sorted(schema - shown) == [] and sorted(shown - schema) == []


def test_env_overrides_nested_key_with_yaml_typing():
    cfg = load_config(
        None,
        env={
            "ASR_SERVER__VAD__THRESHOLD": "0.6",
            "ASR_SERVER__SERVER__AUTH__ENABLED": "true",
            "ASR_SERVER__SERVER__AUTH__TOKENS": "[a, b]",
            "UNRELATED": "x",
        },
    )
    assert cfg.vad.threshold == 0.6
    assert cfg.server.auth.enabled is True
    assert cfg.server.auth.tokens == ["a", "b"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("vad:\n  treshold: 0.4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    assert "vad.treshold: unknown key" in str(e.value)


def test_bad_value_is_named_with_reason():
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"ASR_SERVER__SERVER__PORT": "seventy"})
    assert "server.port" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"ASR_SERVER__VAD__THRESHOLD_LOW": "0.9"})
    assert "threshold_low must not exceed threshold" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"ASR_SERVER__ENGINE__DEVICE": "tpu"})
    assert "engine.device" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})
    p = tmp_path / "bad.yaml"
    p.write_text("vad: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, env={})
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p, env={})


def test_funasr_tls_words_survive_yaml(tmp_path):
    """YAML 1.1 reads a bare `off`/`on` as a boolean: `tls: off` still means the word."""
    for word in ("off", "on", "both"):
        (tmp_path / "c.yaml").write_text(f"funasr:\n  tls: {word}\n")
        assert load_config(tmp_path / "c.yaml", env={}).funasr.tls == word
    assert load_config(None, env={"ASR_SERVER__FUNASR__TLS": "off"}).funasr.tls == "off"
