"""The README and the contract document stay true to the code."""

from __future__ import annotations

import pathlib
import re

from app.core.settings import Settings
from app.web.factory import init_app

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONTRACT = (ROOT / "docs" / "contract.md").read_text()


def _routes() -> set[str]:
    app = init_app(Settings())
    paths = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        assert isinstance(path, str)
        paths.add(path.replace("{job_id}", "{id}"))
    return paths


def test_readme_api_table_names_every_route() -> None:
    """Every route the app serves is in the README's API table."""
    api = README[README.index("## API") : README.index("## Strategies")]
    missing = [path for path in _routes() if f" {path}" not in api and f"`{path}" not in api]
    assert not missing, missing


def test_contract_names_every_job_route() -> None:
    """Every job route the app serves is named in docs/contract.md."""
    job_routes = [path for path in _routes() if path.startswith("/api/jobs")]
    assert len(job_routes) >= 5
    for path in job_routes:
        assert path in CONTRACT, path


def test_readme_links_stay_inside_the_repository() -> None:
    """The README links no page outside the repository (URLs in commands are not links)."""
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    targets = re.findall(r"\]\(([^)]+)\)", prose) + re.findall(r"<(https?://[^>]+)>", prose)
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            host = re.sub(r"^https?://", "", target).split("/")[0].split(":")[0]
            assert host in {"localhost", "127.0.0.1"}, target
        elif not target.startswith("#"):
            assert (ROOT / target).exists(), target


def test_first_screen_commands() -> None:
    """The first screen gives the command that starts the service and the one that tests it."""
    first_screen = "\n".join(README.splitlines()[:30])
    assert "flushline serve" in first_screen
    assert "python -m pytest" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest\n" in ci
