"""The shipped configuration files: they load, and the reference documents every variable."""

from __future__ import annotations

import pathlib
import re
from typing import Any

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


#: The variables a Cloud Run manifest takes from Secret Manager, and their secrets.
SECRETS = {
    "FLUSHLINE_API_TOKEN": "flushline-api-token",
    "FLUSHLINE_SECRET_KEY": "flushline-secret-key",
}


def _container_env(path: pathlib.Path) -> list[dict[str, Any]]:
    manifest = yaml.safe_load(path.read_text())
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    items: list[dict[str, Any]] = container["env"]
    return items


def _service_env(path: pathlib.Path) -> dict[str, object]:
    """The plain env of the Cloud Run manifest's one container (values not coerced).

    Variables from Secret Manager are left out (see :func:`_secret_env`).
    """
    env: dict[str, object] = {}
    for item in _container_env(path):
        if "valueFrom" in item:
            continue
        assert set(item) == {"name", "value"}, f"not a plain name/value pair: {item}"
        assert item["name"] not in env, f"{item['name']} set twice"
        env[item["name"]] = item["value"]
    return env


def _secret_env(path: pathlib.Path) -> dict[str, str]:
    """The manifest's variables from Secret Manager: name -> secret."""
    secrets = {}
    for item in _container_env(path):
        if "valueFrom" in item:
            assert set(item) == {"name", "valueFrom"}, item
            ref = item["valueFrom"]["secretKeyRef"]
            secrets[item["name"]] = ref["name"]
            assert ref["key"] == "latest", item
    return secrets


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


@pytest.mark.parametrize("name", ["service.yaml", "service-redis.yaml"])
def test_cloudrun_manifests_take_the_api_token_from_secret_manager(name: str) -> None:
    """Auth is on in production: the token and signing key come from Secret Manager."""
    path = CONFIG / "cloudrun" / name
    assert _secret_env(path) == SECRETS
    env = {n: str(v) for n, v in _service_env(path).items()}
    assert "FLUSHLINE_AUTH" not in env, "auth off has no place in a public deployment"
    # With the secrets in, the image's FLUSHLINE_HOST=0.0.0.0 is allowed to start.
    settings = Settings.from_environ(
        {**env, "FLUSHLINE_HOST": "0.0.0.0", **dict.fromkeys(SECRETS, "s" * 32)}
    )
    assert settings.exposure_error() is None
    exposed = Settings.from_environ({**env, "FLUSHLINE_HOST": "0.0.0.0"})
    assert exposed.exposure_error() is not None  # without them it would not start


def test_reference_documents_every_variable() -> None:
    """config/reference.md names every variable the settings loader reads, and no other."""
    # A name, not the bare prefix the unknown-variable check looks for.
    read = set(re.findall(r'"(FLUSHLINE_[A-Z][A-Z_]*|PORT)"', SETTINGS_SOURCE.read_text()))
    reference = (CONFIG / "reference.md").read_text()
    documented = set(re.findall(r"`(FLUSHLINE_[A-Z][A-Z_]*|PORT)`", reference))
    assert len(read) > 10, f"the loader seems to read almost nothing: {read}"
    assert read == documented


def _template(path: pathlib.Path) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(path.read_text())
    template: dict[str, Any] = manifest["spec"]["template"]
    return template


class TestCloudRunOnRedis:
    """config/cloudrun/service-redis.yaml: several instances on Memorystore."""

    REDIS = CONFIG / "cloudrun" / "service-redis.yaml"
    SINGLE = CONFIG / "cloudrun" / "service.yaml"

    def test_reaches_memorystore_through_a_vpc_connector(self) -> None:
        """A Serverless VPC Access connector carries the private ranges, where Redis is."""
        annotations = _template(self.REDIS)["metadata"]["annotations"]
        connector = annotations["run.googleapis.com/vpc-access-connector"]
        assert re.fullmatch(r"projects/[^/]+/locations/[^/]+/connectors/[^/]+", connector)
        assert annotations["run.googleapis.com/vpc-access-egress"] == "private-ranges-only"

    def test_runs_several_instances_with_cpu_always_allocated(self) -> None:
        """maxScale above one (the point of Redis), at least one warm, CPU not throttled."""
        annotations = _template(self.REDIS)["metadata"]["annotations"]
        assert int(annotations["autoscaling.knative.dev/maxScale"]) > 1
        assert int(annotations["autoscaling.knative.dev/minScale"]) >= 1
        assert annotations["run.googleapis.com/cpu-throttling"] == "false"

    def test_env_selects_redis_and_loads_into_valid_settings(self) -> None:
        """FLUSHLINE_BUS=redis with a Redis URL; the graces fit Cloud Run and the lease."""
        env = {name: str(value) for name, value in _service_env(self.REDIS).items()}
        assert "PORT" not in env, "Cloud Run reserves PORT and sets it itself"
        settings = Settings.from_environ(env)
        assert settings.bus == "redis"
        assert settings.redis_url == env["FLUSHLINE_REDIS_URL"]
        assert settings.redis_url.startswith("redis://")
        assert settings.shutdown_grace_s < 10, "Cloud Run sends SIGKILL 10 s after SIGTERM"
        assert settings.redis_grace_s < settings.runner_lease_s * 2 / 3

    def test_keeps_the_single_instance_settings(self) -> None:
        """Same env values, resources, concurrency and timeouts as service.yaml."""
        redis_env = _service_env(self.REDIS)
        single_env = _service_env(self.SINGLE)
        assert {name: redis_env.get(name) for name in single_env} == single_env
        redis_spec, single_spec = _template(self.REDIS)["spec"], _template(self.SINGLE)["spec"]
        for field in ("containerConcurrency", "timeoutSeconds"):
            assert redis_spec[field] == single_spec[field], field
        (redis_container,) = redis_spec["containers"]
        (single_container,) = single_spec["containers"]
        for field in ("ports", "resources", "livenessProbe"):
            assert redis_container[field] == single_container[field], field

    def test_starts_on_readyz_with_the_same_timing(self) -> None:
        """The startup probe asks /readyz (Redis reachable), with service.yaml's timing."""
        (redis_container,) = _template(self.REDIS)["spec"]["containers"]
        (single_container,) = _template(self.SINGLE)["spec"]["containers"]
        probe = dict(redis_container["startupProbe"])
        assert probe.pop("httpGet") == {"path": "/readyz"}
        single = dict(single_container["startupProbe"])
        single.pop("httpGet")
        assert probe == single
        assert redis_container["livenessProbe"]["httpGet"] == {"path": "/healthz"}
