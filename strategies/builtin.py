"""The four classic strategies: ``none``, ``padding``, ``frequency`` and ``combined``."""

from __future__ import annotations

from typing import ClassVar

import attrs

from app.sse import padding_comment
from strategies.base import Cadence, Tuning

__all__ = [
    "CombinedStrategy",
    "FrequencyStrategy",
    "NoneStrategy",
    "PaddedShaper",
    "PaddingStrategy",
    "PassThroughShaper",
]

DEFAULT_PADDING_BYTES = 2048


@attrs.frozen
class PassThroughShaper:
    """Writes frames as they are, adding nothing."""

    def start(self, prefix: bytes, now: float, frames: bytes = b"") -> bytes:
        return prefix + frames

    def write(self, frames: bytes, now: float) -> bytes:
        return frames

    def deadline(self) -> float | None:
        return None

    def poll(self, now: float) -> bytes:
        return b""


@attrs.frozen
class PaddedShaper:
    """Follows the stream start and every write with a fixed block of comment bytes."""

    padding: bytes

    def start(self, prefix: bytes, now: float, frames: bytes = b"") -> bytes:
        return prefix + self.padding + (self.write(frames, now) if frames else b"")

    def write(self, frames: bytes, now: float) -> bytes:
        return frames + self.padding

    def deadline(self) -> float | None:
        return None

    def poll(self, now: float) -> bytes:
        return b""


@attrs.frozen
class NoneStrategy:
    """No shaping: events are written as they are, 500 chars / 1.2 s chunks."""

    name: ClassVar[str] = "none"
    cadence: Cadence

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> NoneStrategy:
        return cls(Cadence.from_tuning(tuning, chunk_chars=500, chunk_interval_s=1.2))

    def shaper(self) -> PassThroughShaper:
        return PassThroughShaper()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **attrs.asdict(self.cadence)}


@attrs.frozen
class FrequencyStrategy:
    """No padding; emits small chunks often (100 chars / 0.3 s)."""

    name: ClassVar[str] = "frequency"
    cadence: Cadence

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> FrequencyStrategy:
        return cls(Cadence.from_tuning(tuning, chunk_chars=100, chunk_interval_s=0.3))

    def shaper(self) -> PassThroughShaper:
        return PassThroughShaper()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **attrs.asdict(self.cadence)}


@attrs.frozen
class PaddingStrategy:
    """A fixed block of comment padding (2048 bytes) after each event and at stream start."""

    name: ClassVar[str] = "padding"
    cadence: Cadence
    padding_bytes: int = DEFAULT_PADDING_BYTES

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> PaddingStrategy:
        return cls(
            Cadence.from_tuning(tuning, chunk_chars=500, chunk_interval_s=1.2),
            _padding_bytes(tuning),
        )

    def shaper(self) -> PaddedShaper | PassThroughShaper:
        return _padded(self.padding_bytes)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "padding_bytes": self.padding_bytes,
            **attrs.asdict(self.cadence),
        }


@attrs.frozen
class CombinedStrategy:
    """``padding`` and ``frequency`` together: 2048 bytes after each of many small events."""

    name: ClassVar[str] = "combined"
    cadence: Cadence
    padding_bytes: int = DEFAULT_PADDING_BYTES

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> CombinedStrategy:
        return cls(
            Cadence.from_tuning(tuning, chunk_chars=100, chunk_interval_s=0.3),
            _padding_bytes(tuning),
        )

    def shaper(self) -> PaddedShaper | PassThroughShaper:
        return _padded(self.padding_bytes)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "padding_bytes": self.padding_bytes,
            **attrs.asdict(self.cadence),
        }


def _padding_bytes(tuning: Tuning) -> int:
    size = DEFAULT_PADDING_BYTES if tuning.padding_bytes is None else tuning.padding_bytes
    return 2 if size == 1 else size  # the shortest comment line is 2 bytes


def _padded(size: int) -> PaddedShaper | PassThroughShaper:
    return PaddedShaper(padding_comment(size)) if size else PassThroughShaper()
