"""The shipped configuration files: they load, and the reference documents every variable."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from app.core.settings import Settings

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "config"
SETTINGS_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "app" / "core" / "settings.py"


def _env_file(path: pathlib.Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def _service_env(path: pathlib.Path) -> dict[str, object]:
    """The env of the Cloud Run manifest's one container, as written (values not coerced)."""
    manifest = yaml.safe_load(path.read_text())
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    env: dict[str, object] = {}
    for item in container["env"]:
        assert set(item) == {"name", "value"}, f"not a plain name/value pair: {item}"
        assert item["name"] not in env, f"{item['name']} set twice"
        env[item["name"]] = item["value"]
    return env


@pytest.mark.parametrize("name", ["local.env", "cloudrun/cloudrun.env"])
def test_env_files_load_into_valid_settings(name: str) -> None:
    """Each example env file builds a Settings object without error."""
    env = _env_file(CONFIG / name)
    assert env, f"{name} sets nothing"
    settings = Settings.from_environ(env)
    assert settings.strategy == env["FLUSHLINE_STRATEGY"]


def test_cloudrun_service_env_matches_cloudrun_env() -> None:
    """The Cloud Run manifest sets the same variables, as strings, as cloudrun.env."""
    env = _service_env(CONFIG / "cloudrun" / "service.yaml")
    assert env == _env_file(CONFIG / "cloudrun" / "cloudrun.env")
    assert all(isinstance(value, str) for value in env.values()), env


def test_cloudrun_service_env_loads_into_valid_settings() -> None:
    """The manifest's env builds a Settings object, and leaves PORT to Cloud Run."""
    env = {
        name: str(value)
        for name, value in _service_env(CONFIG / "cloudrun" / "service.yaml").items()
    }
    assert "PORT" not in env, "Cloud Run reserves PORT and sets it itself"
    settings = Settings.from_environ(env)
    assert settings.log_format == "json"
    assert settings.strategy == env["FLUSHLINE_STRATEGY"]


def test_reference_documents_every_variable() -> None:
    """config/reference.md names every variable the settings loader reads, and no other."""
    # A name, not the bare prefix the unknown-variable check looks for.
    read = set(re.findall(r'"(FLUSHLINE_[A-Z][A-Z_]*|PORT)"', SETTINGS_SOURCE.read_text()))
    reference = (CONFIG / "reference.md").read_text()
    documented = set(re.findall(r"`(FLUSHLINE_[A-Z][A-Z_]*|PORT)`", reference))
    assert len(read) > 10, f"the loader seems to read almost nothing: {read}"
    assert read == documented
