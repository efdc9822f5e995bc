"""Write ``docs/configuration.md`` from the settings loader, so the page cannot drift.

Run it from anywhere after adding or changing a setting::

    python -m scripts.config_reference            # rewrite the page (from the repository root)
    python -m scripts.config_reference --check    # exit 1 if the page is not what it would write

The names, defaults and allowed values come from running the loader
(:func:`app.core.settings.variables`), the per-strategy defaults of the tuning variables
from the strategies themselves; only the prose is written by hand, beside this script in
``config_descriptions.toml``. A variable the loader reads without a description there (or
described there but no longer read) stops the script with :class:`ReferenceDrift`, and
``tests/test_docs.py`` fails.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tomllib

import attrs

from app.core.settings import Variable, variables
from strategies import STRATEGIES, Tuning, build_strategy

__all__ = [
    "DESCRIPTIONS",
    "PAGE",
    "Doc",
    "ReferenceDrift",
    "Section",
    "load_sections",
    "main",
    "render",
]

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The generated page.
PAGE = ROOT / "docs" / "configuration.md"
#: What each variable does, in page order: the only hand-written part of the page.
DESCRIPTIONS = pathlib.Path(__file__).with_name("config_descriptions.toml")


class ReferenceDrift(Exception):
    """The loader and the descriptions here name different variables."""


@attrs.frozen
class Doc:
    """One variable's prose: what it does and, without a default in the loader, what unset means."""

    name: str
    meaning: str
    unset: str | None = None


@attrs.frozen
class Section:
    """A table of the page: a heading, an optional paragraph, and its variables."""

    title: str
    docs: tuple[Doc, ...]
    intro: str = ""


SECONDS = "Durations are seconds (a trailing `s` is accepted) unless the name says `_MS`."


def load_sections(path: pathlib.Path = DESCRIPTIONS) -> tuple[Section, ...]:
    """The sections of ``path``: TOML, ``[[section]]`` tables of ``[[section.variable]]``."""
    data = tomllib.loads(path.read_text())
    return tuple(
        Section(
            title=section["title"],
            intro=section.get("intro", ""),
            docs=tuple(
                Doc(name=item["name"], meaning=item["meaning"], unset=item.get("unset"))
                for item in section["variable"]
            ),
        )
        for section in data["section"]
    )


#: The tuning variables and the key of each in a strategy's ``describe()``.
TUNING_KEYS: tuple[tuple[str, str], ...] = (
    ("FLUSHLINE_PADDING_BYTES", "padding_bytes"),
    ("FLUSHLINE_CHUNK_CHARS", "chunk_chars"),
    ("FLUSHLINE_CHUNK_INTERVAL", "chunk_interval_s"),
    ("FLUSHLINE_PROGRESS_INTERVAL", "progress_interval_s"),
    ("FLUSHLINE_HEARTBEAT_INTERVAL", "heartbeat_interval_s"),
    ("FLUSHLINE_PROXY_BUFFER_BYTES", "block_bytes"),
    ("FLUSHLINE_MAX_DELAY_MS", "max_delay_ms"),
)


def _default_cell(variable: Variable, doc: Doc) -> str:
    """The loader's default as the environment would spell it, or what unset means."""
    if variable.default is None:
        if doc.unset is None:
            raise ReferenceDrift(f"{variable.name} has no default: say what unset means")
        return doc.unset
    if doc.unset is not None:
        raise ReferenceDrift(f"{variable.name} has a default ({variable.default!r}): drop `unset`")
    if variable.default == "":
        return "empty"
    cell = f"`{variable.default}`"
    if variable.name.endswith("_BYTES") and variable.default.isdigit():
        cell += _binary_size(int(variable.default))
    return cell


def _binary_size(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size and count % size == 0:
            return f" ({count // size} {unit})"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def strategy_table() -> list[str]:
    """Each strategy's own value of each tuning variable (``-``: the strategy has none)."""
    rows = [
        ("`aligned`, `FLUSHLINE_PROXY_BUFFER_BYTES=0`", Tuning(proxy_buffer_bytes=0), "aligned"),
    ]
    columns = [name for name, _ in TUNING_KEYS]
    lines = [
        "| strategy | "
        + " | ".join(f"`{name.removeprefix('FLUSHLINE_')}`" for name in columns)
        + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    named = [(f"`{name}`", Tuning(), name) for name in STRATEGIES]
    for label, tuning, name in [*named, *rows]:
        described = build_strategy(name, tuning).describe()
        cells = [_number(described[key]) if key in described else "-" for _, key in TUNING_KEYS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render(sections: tuple[Section, ...] | None = None) -> str:
    """The page, from the loader's variables and ``sections`` (default: the TOML file's)."""
    sections = load_sections() if sections is None else sections
    loaded = {variable.name: variable for variable in variables()}
    described = [doc.name for section in sections for doc in section.docs]
    missing = sorted(set(loaded) - set(described))
    stale = sorted(set(described) - set(loaded))
    twice = sorted({name for name in described if described.count(name) > 1})
    if missing or stale or twice:
        raise ReferenceDrift(
            f"describe in {DESCRIPTIONS.name}: {missing}; no longer read: {stale}; "
            f"described twice: {twice}"
        )
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by scripts/config_reference.py from the settings loader "
        "(app/core/settings.py). Do not edit: change the loader or the descriptions there, then "
        "run `python -m scripts.config_reference`. -->",
        "",
        "Every setting is an environment variable, read once at start-up into one validated "
        "`Settings` object (`app/core/settings.py`). A bad value stops start-up with one line "
        "naming the variable, the value and what is allowed, and exit status 2:",
        "",
        "```",
        "flushline: invalid FLUSHLINE_STRATEGY='fast': allowed: none, padding, frequency, "
        "combined, aligned",
        "```",
        "",
        f"Empty values count as unset. {SECONDS} A `FLUSHLINE_*` variable nothing reads is logged "
        "at start-up as a warning naming the closest known one. Examples: `config/local.env`, "
        "`config/cloudrun/cloudrun.env`.",
    ]
    for section in sections:
        lines += ["", f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        lines += ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
        for doc in section.docs:
            variable = loaded[doc.name]
            cells = (
                f"`{doc.name}`",
                _default_cell(variable, doc),
                _cell(variable.allowed),
                _cell(doc.meaning),
            )
            lines.append("| " + " | ".join(cells) + " |")
        if section.title == "Flush strategy":
            lines += ["", "Each strategy's own values (seconds and bytes):", "", *strategy_table()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with ``--check`` say whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python -m scripts.config_reference")
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
