"""``ProxyConfig``: the validated settings of one emulated buffering proxy."""

from __future__ import annotations

import attrs
from yarl import URL

from app.pathtools.proxy.release import (
    ReleaseModel,
    check_max_hold,
    check_threshold,
    to_release_model,
)

__all__ = ["ProxyConfig"]


def _check_upstream(_instance: object, _attribute: object, value: str) -> None:
    try:
        url = URL(value)
    except (TypeError, ValueError):
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"--upstream must be an http:// or https:// URL with a host, got {value!r}"
        )


@attrs.frozen
class ProxyConfig:
    """Settings of one emulated buffering proxy; invalid values raise ValueError."""

    upstream: str = attrs.field(validator=_check_upstream)
    threshold_bytes: int = attrs.field(default=4096, validator=check_threshold)
    release: ReleaseModel = attrs.field(default=ReleaseModel.ALL, converter=to_release_model)
    gzip: bool = False
    max_hold_s: float | None = attrs.field(default=None, validator=check_max_hold)
