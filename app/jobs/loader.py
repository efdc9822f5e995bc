"""Load user pipelines from ``package.module:attribute`` import paths (``FLUSHLINE_PIPELINES``).

The attribute is a pipeline (anything with ``name``, ``plan`` and ``result``), or a list
or tuple of them. Every failure is a :class:`PipelineLoadError` whose one-line message
names the import path and what is wrong with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from app.jobs.pipelines import Pipeline

__all__ = ["PipelineLoadError", "load_pipelines", "parse_pipeline_paths"]


class PipelineLoadError(ValueError):
    """An import path does not lead to a pipeline."""


def parse_pipeline_paths(raw: str) -> tuple[str, ...]:
    """Split a comma list of ``package.module:attribute``; ``ValueError`` on a bad one."""
    paths = tuple(item.strip() for item in raw.split(",") if item.strip())
    for path in paths:
        module, sep, attribute = path.partition(":")
        if (
            not sep
            or not all(part.isidentifier() for part in module.split("."))
            or not all(part.isidentifier() for part in attribute.split("."))
        ):
            raise ValueError(f"{path!r} is not of the form package.module:attribute")
    return paths


def _is_pipeline(value: object) -> bool:
    name = getattr(value, "name", None)
    return (
        isinstance(name, str)
        and bool(name)
        and callable(getattr(value, "plan", None))
        and callable(getattr(value, "result", None))
    )


def _load_one(path: str) -> list[Pipeline]:
    try:
        (path_checked,) = parse_pipeline_paths(path)
    except ValueError as exc:
        raise PipelineLoadError(str(exc)) from None
    module_name, _, attribute = path_checked.partition(":")
    try:
        value: object = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error while importing it
        raise PipelineLoadError(
            f"{path!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise PipelineLoadError(
                f"{path!r}: {module_name!r} has no attribute {part!r}"
            ) from None
    found = list(value) if isinstance(value, list | tuple) else [value]
    for item in found:
        if not _is_pipeline(item):
            raise PipelineLoadError(
                f"{path!r} is not a pipeline (or a list of them): {type(item).__name__} "
                "lacks a name, plan() or result()"
            )
    if not found:
        raise PipelineLoadError(f"{path!r} is an empty list")
    return found  # type: ignore[return-value]  # checked by _is_pipeline above


def load_pipelines(paths: Iterable[str]) -> tuple[Pipeline, ...]:
    """Import every path's pipelines, in order; two with one name are an error."""
    pipelines: list[Pipeline] = []
    origin: dict[str, str] = {}
    for path in paths:
        for pipeline in _load_one(path):
            if pipeline.name in origin:
                raise PipelineLoadError(
                    f"{path!r}: pipeline name {pipeline.name!r} is already taken by "
                    f"{origin[pipeline.name]!r}"
                )
            origin[pipeline.name] = path
            pipelines.append(pipeline)
    return tuple(pipelines)
