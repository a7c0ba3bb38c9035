from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runtime.config import ConfigError, Settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_home(tmp_path: Path) -> None:
    s = Settings.load(env={"HONE_HOME": str(tmp_path)})
    assert s.home == tmp_path and s.db_path == tmp_path / "hone.db"
    assert s.model_path == tmp_path / "models" / "smollm2-135m-instruct"
    assert not s.auth_enabled and s.host == "127.0.0.1"


def test_env_beats_toml_and_types_are_coerced(tmp_path: Path) -> None:
    (tmp_path / "hone.toml").write_text('[hone]\nport = 9000\nmax_steps = 4\ntemperature = 0.5\n')
    s = Settings.load(env={"HONE_HOME": str(tmp_path), "HONE_PORT": "9100",
                           "HONE_API_TOKENS": "alice:tok-alice-1, bob:tok-bob-22"})
    assert s.port == 9100 and s.max_steps == 4 and s.temperature == 0.5
    assert s.api_tokens == {"alice": "tok-alice-1", "bob": "tok-bob-22"} and s.auth_enabled


@pytest.mark.parametrize("env, fragment", [
    ({"HONE_PORT": "eighty"}, "HONE_PORT"),
    ({"HONE_MAX_STEPS": "0"}, "max_steps"),
    ({"HONE_API_TOKENS": "justatoken"}, "name:token"),
    ({"HONE_API_TOKENS": "a:short"}, "at least 8"),
    ({"HONE_TEMPERATURE": "7"}, "temperature"),
    ({"HONE_CONFIG": "/nonexistent/hone.toml"}, "not a file"),
    ({"HONE_API_TOKENS": "admin:tok-admin-1"}, "reserved"),
    ({"HONE_LOG_LEVEL": "verbose"}, "log_level"),
    ({"HONE_PORT": "70000"}, "port"),
    ({"HONE_DPO_DEVICE": "tpu"}, "dpo_device must be auto, cpu or cuda"),
    ({"HONE_DPO_REFERENCE": "self"}, "dpo_reference must be base or parent"),
    ({"HONE_PAIRS_ON_DRIFT": "keep"}, "pairs_on_drift must be trim or exclude"),
    ({"HONE_GATE_CANDIDATES": "3"}, r"gate_candidates \(3\) exceeds dpo_epochs \(2\)"),
    ({"HONE_GATE_MAX_P": "0"}, r"gate_max_p must be in \(0, 1\], got 0.0"),
    ({"HONE_GATE_MAX_P": "1.5"}, r"gate_max_p must be in \(0, 1\]"),
])
def test_bad_settings_name_the_setting(tmp_path: Path, env: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.load(env={"HONE_HOME": str(tmp_path), **env})


def test_an_out_of_range_value_names_where_it_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_steps must be > 0, got 0 \(set by environment variable HONE_MAX_STEPS\)"):
        Settings.load(env={"HONE_HOME": str(tmp_path), "HONE_MAX_STEPS": "0"})
    (tmp_path / "hone.toml").write_text("lora_rank = 64\n")
    with pytest.raises(ConfigError, match=r"exceeds vllm_max_lora_rank \(16\).*\(set by .*hone.toml key 'lora_rank'\)$"):
        Settings.load(env={"HONE_HOME": str(tmp_path)})


def test_unknown_toml_key_and_bad_toml(tmp_path: Path) -> None:
    (tmp_path / "hone.toml").write_text("max_stepz = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_stepz'"):
        Settings.load(env={"HONE_HOME": str(tmp_path)})
    (tmp_path / "hone.toml").write_text("port = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        Settings.load(env={"HONE_HOME": str(tmp_path)})


def test_home_cannot_come_from_a_config_file(tmp_path: Path) -> None:
    """Else HONE_CONFIG with `home = ...` would send `hone bench loop`'s fresh home, or a test's,
    to the user's real data directory."""
    cfg = tmp_path / "x.toml"
    cfg.write_text(f'home = "{tmp_path / "elsewhere"}"\n')
    with pytest.raises(ConfigError, match="'home' cannot be set in a config file; set HONE_HOME"):
        Settings.load(env={"HONE_HOME": str(tmp_path / "a"), "HONE_CONFIG": str(cfg)})


def test_every_setting_is_documented() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"`{f.name}`" not in doc]
    assert missing == []

