"""The client distribution (clients/python, flushline_client): one copy of the code, shipped
alone or with the service, importing nothing of the service and needing only aiohttp."""

from __future__ import annotations

import ast
import filecmp
import pathlib
import subprocess
import sys
import tomllib

import flushline_client
import flushline_client.sse
import pytest

import app.client
import app.core.sse
from tests.support.process import ROOT, clean_env
from tests.support.registry import require_registry

CLIENT = ROOT / "clients" / "python"
PACKAGE = CLIENT / "flushline_client"


def imported_modules(path: pathlib.Path) -> set[str]:
    """The top-level names of every module ``path`` imports (anywhere in it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def pip_install(*args: str, cwd: pathlib.Path = ROOT) -> None:
    """``pip install --no-deps ARGS`` (the build fetches setuptools: skips without an index)."""
    require_registry("the build requirements (setuptools, wheel)")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output


class TestOneCopy:
    """The service uses the client's code, not a copy of it."""

    def test_app_client_re_exports_flushline_client(self) -> None:
        """Every name app.client offers is flushline_client's own object."""
        assert app.client.__all__
        for name in app.client.__all__:
            assert getattr(app.client, name) is getattr(flushline_client, name), name

    def test_the_sse_parser_is_the_clients(self) -> None:
        """app.core.sse's parser and message are flushline_client.sse's."""
        assert app.core.sse.SSEParser is flushline_client.sse.SSEParser
        assert app.core.sse.SSEMessage is flushline_client.sse.SSEMessage

    def test_the_service_imports_the_installed_client(self) -> None:
        """flushline_client is imported from clients/python (or an install of it), nowhere else."""
        source = PACKAGE / "__init__.py"
        installed = pathlib.Path(flushline_client.__file__)
        assert installed == source or filecmp.cmp(installed, source, shallow=False)


class TestStandsAlone:
    """The client needs aiohttp and the standard library, nothing of the service."""

    def test_no_module_imports_the_service_or_a_third_party_but_aiohttp(self) -> None:
        """Each module of flushline_client imports the standard library, aiohttp, itself."""
        allowed = set(sys.stdlib_module_names) | {"aiohttp", "flushline_client", "__future__"}
        modules = sorted(PACKAGE.glob("*.py"))
        assert len(modules) >= 6
        for module in modules:
            assert imported_modules(module) <= allowed, (module.name, imported_modules(module))

    def test_importing_it_loads_nothing_of_the_service(self) -> None:
        """In a fresh interpreter, importing flushline_client (all of it) loads no app module."""
        probe = (
            "import sys, flushline_client, flushline_client.sync, flushline_client.sse;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'app', 'strategies',"
            " 'attrs', 'orjson', 'structlog', 'redis'}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=CLIENT,
            capture_output=True,
            text=True,
            check=True,
            env=clean_env(),
        ).stdout
        assert out.strip() == "[]"

    def test_its_only_dependency_is_aiohttp(self) -> None:
        """clients/python/pyproject.toml: flushline-client, Python >= 3.11, aiohttp alone."""
        project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
        assert project["name"] == "flushline-client"
        assert project["requires-python"] == ">=3.11"
        assert [d.split(">")[0] for d in project["dependencies"]] == ["aiohttp"]


@pytest.mark.integration
class TestInstalls:
    """Both distributions install the same files: the service with the client, the client alone."""

    def test_the_service_ships_the_client(self, tmp_path: pathlib.Path) -> None:
        """`pip install .` puts flushline_client (py.typed included) beside app, byte for byte."""
        target = tmp_path / "service"
        pip_install(f"--target={target}", ".")
        assert (target / "app" / "client" / "__init__.py").is_file()
        for source in [*PACKAGE.glob("*.py"), PACKAGE / "py.typed"]:
            shipped = target / "flushline_client" / source.name
            assert shipped.is_file(), source.name
            assert filecmp.cmp(shipped, source, shallow=False), source.name

    def test_the_client_installs_alone(self, tmp_path: pathlib.Path) -> None:
        """`pip install ./clients/python` installs flushline_client and no app, strategies."""
        target = tmp_path / "client"
        pip_install(f"--target={target}", str(CLIENT))
        top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
        assert top == {"flushline_client"}, top
        assert (target / "flushline_client" / "py.typed").is_file()
