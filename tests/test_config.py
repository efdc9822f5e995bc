"""The shipped configuration files: they load, and the reference documents every variable."""

from __future__ import annotations

import pathlib
import re

import pytest

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


def _yaml_env(path: pathlib.Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        match = re.match(r'^([A-Z_]+):\s*"(.*)"\s*$', line)
        if match:
            env[match.group(1)] = match.group(2)
    return env


@pytest.mark.parametrize("name", ["local.env", "cloudrun.env"])
def test_env_files_load_into_valid_settings(name: str) -> None:
    """Each example env file builds a Settings object without error."""
    env = _env_file(CONFIG / name)
    assert env, f"{name} sets nothing"
    settings = Settings.from_environ(env)
    assert settings.strategy == env["FLUSHLINE_STRATEGY"]


def test_cloudrun_yaml_matches_cloudrun_env() -> None:
    """The Cloud Run YAML env file holds the same values as cloudrun.env."""
    assert _yaml_env(CONFIG / "cloudrun.yaml") == _env_file(CONFIG / "cloudrun.env")


def test_reference_documents_every_variable() -> None:
    """config/reference.md names every variable the settings loader reads, and no other."""
    read = set(re.findall(r'"((?:FLUSHLINE_|PORT)[A-Z_]*)"', SETTINGS_SOURCE.read_text()))
    reference = (CONFIG / "reference.md").read_text()
    documented = set(re.findall(r"`((?:FLUSHLINE_|PORT)[A-Z_]*)`", reference))
    assert len(read) > 10, f"the loader seems to read almost nothing: {read}"
    assert read == documented
