"""The deployment, as far as it can be checked without Docker or Cloud Run.

The Dockerfile is read instruction by instruction (what it copies exists and reaches the
build context, dependencies come before the code, no wheels, a non-root user, a health
check that works when run), the pinned constraints cover ``setup.py`` and, in one
integration test, install from PyPI into a fresh venv exactly as the image does and serve
``/healthz``; ``config/cloudrun/service.yaml`` is parsed and every setting checked.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.request
from typing import Any

import aiohttp
import attrs
import pytest
import yaml
from packaging.requirements import Requirement

from scripts.refresh_constraints import (
    CONSTRAINTS,
    IMAGE_PYTHON,
    SOURCES,
    copy_sources,
    installed,
    make_venv,
    normalize,
    pip,
    read_pins,
    render,
)
from tests.conftest import require_integration
from tests.support.process import (
    ROOT,
    clean_env,
    free_port,
    json_lines,
    read_log,
    server_process,
    wait_accepting,
)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICE = ROOT / "config" / "cloudrun" / "service.yaml"
#: What makes up the app (as opposed to its dependencies) in the build context.
APP_SOURCES = frozenset(SOURCES)


# --------------------------------------------------------------------------- Dockerfile


@attrs.frozen
class Instruction:
    """One Dockerfile instruction: keyword (upper case), ``--flag=value`` options, the rest."""

    keyword: str
    flags: dict[str, str]
    args: str

    def words(self) -> list[str]:
        """The arguments, in JSON (exec) form or split on whitespace."""
        if self.args.startswith("["):
            words: list[str] = json.loads(self.args)
            return words
        return self.args.split()


@attrs.frozen
class Stage:
    """A build stage: ``FROM base AS name`` and its instructions."""

    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def named(self, keyword: str) -> list[Instruction]:
        """This stage's instructions with ``keyword``."""
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    """Lines with continuations joined and comment lines dropped, as Docker reads them."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return lines


def _instruction(line: str) -> Instruction:
    keyword, _, rest = line.partition(" ")
    flags: dict[str, str] = {}
    rest = rest.strip()
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    return Instruction(keyword.upper(), flags, rest)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ``ARG`` defaults and the stages, with ``${ARG}`` in ``FROM`` expanded."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for line in _logical_lines(text):
        instruction = _instruction(line)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            current = []
            stages.append(Stage(base, name, ()))
        elif current is None:
            assert instruction.keyword == "ARG", f"{line!r} before the first FROM"
            name, _, default = instruction.args.partition("=")
            global_args[name] = default
            continue
        else:
            current.append(instruction)
        stages[-1] = attrs.evolve(stages[-1], instructions=tuple(current))
    return global_args, stages


def _stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def _stage(stages: list[Stage], name: str) -> Stage:
    (stage,) = [s for s in stages if s.name == name]
    return stage


def _context_copies(stage: Stage) -> list[tuple[Instruction, list[str]]]:
    """The stage's COPY instructions from the build context, each with its sources."""
    return [(i, i.words()[:-1]) for i in stage.named("COPY") if "from" not in i.flags]


def _installs_constraints(instruction: Instruction, stage: Stage) -> bool:
    """Whether ``instruction`` is a pip install of the requirements the stage copied in."""
    copied = {
        sources[0]: i.words()[-1]
        for i, sources in _context_copies(stage)
        if sources == ["requirements/constraints.txt"]
    }
    words = instruction.words()
    return (
        instruction.keyword == "RUN"
        and "pip" in words
        and "install" in words
        and any(f"-r {target}" in instruction.args for target in copied.values())
    )


# --------------------------------------------------------------------------- .dockerignore


def _go_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (moby/patternmatcher: ``**``, ``*``, ``?``, ``[]``)."""
    regex = ""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            regex += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            regex += "[^/]*"
        elif ch == "?":
            regex += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            regex += pattern[i : end + 1]
            i = end
        else:
            regex += re.escape(ch)
        i += 1
    return re.compile(f"^{regex}$")


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip().lstrip("/"))
        rules.append((keep, _go_pattern(pattern)))
    return rules


def excluded(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, ``/``-separated) out of the context.

    As Docker decides: the last rule matching the path or one of its parent folders wins.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for keep, pattern in _ignore_rules():
        if any(pattern.match(candidate) for candidate in candidates):
            verdict = not keep
    return verdict


def _context_files(source: str) -> list[str]:
    """Files under ``source`` that git tracks (a file: itself)."""
    listed = subprocess.run(
        ["git", "ls-files", "--", source], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    return listed


class TestDockerfile:
    """The image's recipe, read as Docker reads it."""

    def test_every_copied_path_exists_and_reaches_the_build_context(self) -> None:
        """Each COPY source is in the repository, tracked, and let through .dockerignore."""
        copies = [c for stage in _stages() for c in _context_copies(stage)]
        assert copies, "the Dockerfile copies nothing from the build context"
        for instruction, sources in copies:
            assert sources, f"COPY without a source: {instruction}"
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repo"
                files = _context_files(source)
                assert files, f"COPY {source}: nothing under it is tracked by git"
                left_out = [f for f in files if excluded(f)]
                assert not left_out, f"COPY {source}: .dockerignore leaves out {left_out}"

    @pytest.mark.parametrize(
        "path",
        [
            ".git/HEAD",
            "tests/test_deploy.py",
            "bench/paths.py",
            "config/cloudrun/service.yaml",
            "README.md",
            ".env",
            ".venv/bin/python",
            "app/__pycache__/cli.cpython-311.pyc",
            "strategies/__pycache__/aligned.cpython-311.pyc",
            ".pytest_cache/v/cache/nodeids",
            ".mypy_cache/3.11/app.json",
            "flushline.egg-info/PKG-INFO",
            "build/lib/app/cli.py",
        ],
    )
    def test_build_context_leaves_out(self, path: str) -> None:
        """Tests, .git, bench, caches, bytecode and local leftovers stay out of the context."""
        assert excluded(path)

    def test_dependencies_install_before_the_app_is_copied(self) -> None:
        """Pinned dependencies get a layer that no app file can invalidate, below the app's."""
        stages = _stages()
        deps = [s for s in stages if any(_installs_constraints(i, s) for i in s.instructions)]
        assert len(deps) == 1, "exactly one stage should install requirements/constraints.txt"
        (dep_stage,) = deps
        assert dep_stage.name is not None
        assert dep_stage.base not in {s.name for s in stages}, "it should start from the base"
        # Nothing but the constraints reaches that stage from the context.
        for _, sources in _context_copies(dep_stage):
            assert sources == ["requirements/constraints.txt"], sources
        (install,) = [i for i in dep_stage.instructions if _installs_constraints(i, dep_stage)]
        assert "--no-deps" in install.words(), "the pins and nothing else"

        final = stages[-1]
        copies_from = [i.flags.get("from") for i in final.named("COPY")]
        assert dep_stage.name in copies_from, "the image does not take the dependency venv"
        app_stages = {
            s.name for s in stages if any(set(src) & APP_SOURCES for _, src in _context_copies(s))
        }
        assert app_stages, "no stage copies the app"
        assert not _context_copies(final), "the final stage copies from the context"
        first_app = min(n for n, name in enumerate(copies_from) if name in app_stages)
        assert copies_from.index(dep_stage.name) < first_app
        # The app layer installs the app alone (it never resolves dependencies again), then
        # `pip check` fails the build if the pins lack anything the app or a pin requires.
        for stage in stages:
            if stage.name in app_stages:
                runs = " && ".join(i.args for i in stage.named("RUN"))
                assert "install" in runs, f"stage {stage.name} copies the app, installs nothing"
                assert "--no-deps" in runs, runs
                assert re.search(r"pip .*\bcheck\b", runs), runs

    def test_no_wheel_or_pip_cache_in_any_layer(self) -> None:
        """pip never keeps a cache or wheels, and no wheel is copied anywhere."""
        for stage in _stages():
            for instruction in stage.instructions:
                assert ".whl" not in instruction.args, instruction
                assert "wheels" not in instruction.args, instruction
                words = instruction.words()
                if instruction.keyword == "RUN" and "pip" in words:
                    assert "wheel" not in words, instruction
                    assert "download" not in words, instruction
                    if "install" in words:
                        assert "--no-cache-dir" in words, instruction

    def test_image_runs_as_a_non_root_user(self) -> None:
        """The final stage switches to a numeric, non-zero user and group before the command."""
        final = _stages()[-1]
        users = final.named("USER")
        assert users, "the image runs as root"
        user, _, group = users[-1].args.partition(":")
        assert user.isdigit(), f"{users[-1]}: a name cannot be checked against root"
        assert int(user) != 0, users[-1]
        assert not group or (group.isdigit() and int(group) != 0), users[-1]
        keywords = [i.keyword for i in final.instructions]
        assert keywords.index("USER") < keywords.index("CMD")
        assert "RUN" not in keywords[keywords.index("USER") :], "RUN after USER"

    def test_command_serves_on_port_with_json_logs(self) -> None:
        """`flushline serve` in exec form (it gets SIGTERM), PORT left to the platform, JSON."""
        final = _stages()[-1]
        (cmd,) = final.named("CMD")
        assert cmd.args.startswith("["), "shell form: SIGTERM would go to /bin/sh"
        assert cmd.words() == ["flushline", "serve"]
        env = " ".join(i.args for i in final.named("ENV"))
        assert "FLUSHLINE_LOG_FORMAT=json" in env.split()
        # Reached from outside the container: every address, hence a token (or an
        # explicit FLUSHLINE_AUTH=off) from whoever runs it, never baked in.
        assert "FLUSHLINE_HOST=0.0.0.0" in env.split()
        assert "FLUSHLINE_AUTH" not in env
        assert "FLUSHLINE_API_TOKEN" not in env
        assert not re.search(r"(^|\s)(PORT|FLUSHLINE_PORT)=", env), "the port is the platform's"
        assert 'console_scripts": ["flushline=' in (ROOT / "setup.py").read_text()
        (expose,) = final.named("EXPOSE")
        assert expose.args == str(_container()["ports"][0]["containerPort"])

    def test_python_version_matches_the_constraints(self) -> None:
        """Base image, site-packages path and the pinned set are all for the same Python."""
        version = ".".join(map(str, IMAGE_PYTHON))
        global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
        assert {s.base for s in stages if s.base.startswith("python:")} == {
            global_args["PYTHON_IMAGE"]
        }
        assert global_args["PYTHON_IMAGE"].startswith(f"python:{version}-slim")
        mentioned = set(re.findall(r"python(\d+\.\d+)", DOCKERFILE.read_text()))
        assert mentioned <= {version}, mentioned
        assert f"under Python {version}." in CONSTRAINTS.read_text()

    def test_app_stage_copies_what_the_constraints_script_builds_from(self) -> None:
        """The files the image builds the app from are the ones the lock and the venv test use."""
        copied = {src for s in _stages() for _, srcs in _context_copies(s) for src in srcs}
        assert copied - {"requirements/constraints.txt"} == APP_SOURCES

    async def test_healthcheck_command_reports_the_service_state(
        self, tmp_path: pathlib.Path
    ) -> None:
        """The HEALTHCHECK command exits 0 against the running service on $PORT, 1 without it."""
        final = _stages()[-1]
        (check,) = final.named("HEALTHCHECK")
        assert "timeout" in check.flags, "a hung service must fail the check, not hang it"
        assert check.args.startswith("CMD ["), check.args
        argv = json.loads(check.args.removeprefix("CMD "))
        assert argv[:2] == ["python", "-c"], "python from the venv: slim images have no curl"
        assert "/healthz" in argv[2]
        argv[0] = sys.executable

        async def run_check(**env: str) -> int:
            proc = await asyncio.create_subprocess_exec(*argv, env=clean_env(**env))
            return await asyncio.wait_for(proc.wait(), 15)

        port = free_port()
        env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="json")
        async with server_process([sys.executable, "-m", "app"], env, tmp_path / "log") as proc:
            await wait_accepting(proc, port)
            assert await run_check(PORT=str(port)) == 0, read_log(tmp_path / "log")
            assert await run_check(FLUSHLINE_PORT=str(port)) == 0
            assert await run_check(PORT=str(free_port())) == 1
        assert "/healthz" in read_log(tmp_path / "log")


# --------------------------------------------------------------------------- constraints


def _setup_argument(name: str) -> Any:
    """The literal value of ``setup(name=...)`` in setup.py, read from its source."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py does not pass {name}")


def _install_requires() -> list[Requirement]:
    """``install_requires`` of setup.py."""
    return [Requirement(r) for r in _setup_argument("install_requires")]


class TestConstraints:
    """requirements/constraints.txt: the exact versions the image installs."""

    def test_pins_cover_install_requires(self) -> None:
        """Every dependency in setup.py is pinned, at a version its specifier allows."""
        pins = read_pins(CONSTRAINTS.read_text())
        requires = _install_requires()
        assert requires
        for requirement in requires:
            name = normalize(requirement.name)
            assert name in pins, f"{name} is not pinned: python scripts/refresh_constraints.py"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{name}=={pins[name]} does not satisfy {requirement}"
            )
        assert "flushline" not in pins

    def test_file_is_as_the_script_writes_it(self) -> None:
        """The file is exact pins, sorted and headed as the refresh script renders them."""
        text = CONSTRAINTS.read_text()
        assert render(read_pins(text)) == text

    @pytest.mark.integration
    async def test_pins_install_into_a_fresh_venv_that_serves(self, tmp_path: pathlib.Path) -> None:
        """As the image: pins from PyPI, the app without deps, pip check, `flushline serve`."""
        unreachable = await asyncio.to_thread(_pypi_unreachable)
        if unreachable:
            reason = f"PyPI is not reachable ({unreachable}); installing the pins needs it"
            if require_integration():
                pytest.fail(f"{reason} (required because FLUSHLINE_REQUIRE_INTEGRATION=1)")
            pytest.skip(reason)
        python = await asyncio.to_thread(_install_like_the_image, tmp_path)
        pins = read_pins(CONSTRAINTS.read_text())
        version = _setup_argument("version")
        assert await asyncio.to_thread(installed, python) == {**pins, "flushline": version}

        port = free_port()
        env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="json")
        env.pop("PYTHONPATH", None)
        log = tmp_path / "serve.log"
        script = str(python.parent / "flushline")
        async with server_process([script, "serve"], env, log) as proc:
            await wait_accepting(proc, port)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                assert response.status == 200
                body: dict[str, Any] = await response.json()
            assert body == {"status": "ok", "active_jobs": 0}
        assert json_lines(read_log(log)), "the service wrote nothing"


def _pypi_unreachable() -> str | None:
    """Why PyPI cannot be reached, or None when it can."""
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15):
            return None
    except OSError as exc:
        return str(exc)


def _pip(python: pathlib.Path, *args: str) -> None:
    """``pip ARGS`` on the venv of ``python``; a failure shows pip's output."""
    try:
        pip(python, *args)
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"pip {' '.join(args)} failed:\n{exc.stdout}{exc.stderr}") from None


def _install_like_the_image(tmp_path: pathlib.Path) -> pathlib.Path:
    """Build the image's venv under ``tmp_path`` with the Dockerfile's pip commands."""
    python = make_venv(tmp_path / "venv")
    _pip(
        python,
        "install",
        "--no-cache-dir",
        "--no-deps",
        "--only-binary=:all:",
        "-r",
        str(CONSTRAINTS),
    )
    source = copy_sources(tmp_path / "src")
    prefix = tmp_path / "install"
    _pip(python, "install", "--no-cache-dir", "--no-deps", f"--prefix={prefix}", str(source))
    shutil.copytree(prefix, tmp_path / "venv", dirs_exist_ok=True)
    _pip(python, "check")
    where = subprocess.run(
        [str(python), "-c", "import app; print(app.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in clean_env().items() if k != "PYTHONPATH"},
    ).stdout
    assert pathlib.Path(where.strip()).is_relative_to(tmp_path / "venv"), where
    return python


# --------------------------------------------------------------------------- Cloud Run


def _manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(SERVICE.read_text())
    return manifest


def _container() -> dict[str, Any]:
    (container,) = _manifest()["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


class TestCloudRunService:
    """config/cloudrun/service.yaml, for `gcloud run services replace`."""

    def test_is_a_knative_service(self) -> None:
        """A serving.knative.dev/v1 Service named flushline, all traffic on the latest revision."""
        manifest = _manifest()
        assert manifest["apiVersion"] == "serving.knative.dev/v1"
        assert manifest["kind"] == "Service"
        assert manifest["metadata"]["name"] == "flushline"
        assert manifest["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]

    def test_requests_and_streams_live_an_hour(self) -> None:
        """Request timeout 3600 s (Cloud Run's maximum), 1000 concurrent requests per instance."""
        spec = _manifest()["spec"]["template"]["spec"]
        assert spec["timeoutSeconds"] == 3600
        assert spec["containerConcurrency"] == 1000

    def test_one_instance_always_on_with_cpu_always_allocated(self) -> None:
        """maxScale 1 (the bus is in memory), minScale 1, CPU not throttled outside requests."""
        annotations = _manifest()["spec"]["template"]["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/maxScale"] == "1"
        assert annotations["autoscaling.knative.dev/minScale"] == "1"
        assert annotations["run.googleapis.com/cpu-throttling"] == "false"
        assert all(isinstance(v, str) for v in annotations.values()), annotations

    def test_max_scale_comment_points_at_the_redis_bus(self) -> None:
        """The comment right above maxScale says how to run more instances."""
        lines = SERVICE.read_text().splitlines()
        at = next(n for n, line in enumerate(lines) if "maxScale" in line)
        comment = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.append(line)
        assert "FLUSHLINE_BUS=redis" in " ".join(comment), comment

    def test_probes_hit_healthz_on_the_serving_port(self) -> None:
        """Startup and liveness probes GET /healthz, within Cloud Run's limits."""
        container = _container()
        (port,) = container["ports"]
        assert port == {"name": "http1", "containerPort": 8080}
        for kind in ("startupProbe", "livenessProbe"):
            probe = container[kind]
            assert probe["httpGet"]["path"] == "/healthz", kind
            assert probe["httpGet"].get("port", 8080) == port["containerPort"], kind
            assert probe["timeoutSeconds"] <= probe["periodSeconds"], kind
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] <= 240

    def test_image_is_a_placeholder_on_one_line(self) -> None:
        """The image is an obvious placeholder, on the one `image:` line the README replaces."""
        image = _container()["image"]
        assert "PROJECT_ID" in image, image
        assert image != image.lower(), "image references are lower case: this one cannot deploy"
        image_lines = [line for line in SERVICE.read_text().splitlines() if "image:" in line]
        assert [line.strip() for line in image_lines] == [f"image: {image}"]
