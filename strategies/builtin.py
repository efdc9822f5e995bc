"""The four classic strategies: ``none``, ``padding``, ``frequency`` and ``combined``."""

from __future__ import annotations

from typing import ClassVar, Self

import attrs

from strategies.base import Cadence, Tuning
from strategies.padding import padding_comment

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
class _ClassicStrategy:
    """Shared shape of the four classic strategies: a fixed cadence, optional padding.

    Subclasses only set their class-level defaults.
    """

    name: ClassVar[str]
    default_chunk_chars: ClassVar[int]
    default_chunk_interval_s: ClassVar[float]
    padded: ClassVar[bool] = False
    cadence: Cadence
    padding_bytes: int = 0

    @classmethod
    def from_tuning(cls, tuning: Tuning) -> Self:
        cadence = Cadence.from_tuning(
            tuning,
            chunk_chars=cls.default_chunk_chars,
            chunk_interval_s=cls.default_chunk_interval_s,
        )
        return cls(cadence, _padding_bytes(tuning) if cls.padded else 0)

    def shaper(self) -> PaddedShaper | PassThroughShaper:
        return (
            PaddedShaper(padding_comment(self.padding_bytes))
            if self.padding_bytes
            else PassThroughShaper()
        )

    def describe(self) -> dict[str, object]:
        padding = {"padding_bytes": self.padding_bytes} if self.padded else {}
        return {"name": self.name, **padding, **attrs.asdict(self.cadence)}


@attrs.frozen
class NoneStrategy(_ClassicStrategy):
    """No shaping: events are written as they are, 500 chars / 1.2 s chunks."""

    name: ClassVar[str] = "none"
    default_chunk_chars: ClassVar[int] = 500
    default_chunk_interval_s: ClassVar[float] = 1.2


@attrs.frozen
class FrequencyStrategy(_ClassicStrategy):
    """No padding; emits small chunks often (100 chars / 0.3 s)."""

    name: ClassVar[str] = "frequency"
    default_chunk_chars: ClassVar[int] = 100
    default_chunk_interval_s: ClassVar[float] = 0.3


@attrs.frozen
class PaddingStrategy(_ClassicStrategy):
    """A fixed block of comment padding (2048 bytes) after each write and at stream start."""

    name: ClassVar[str] = "padding"
    default_chunk_chars: ClassVar[int] = 500
    default_chunk_interval_s: ClassVar[float] = 1.2
    padded: ClassVar[bool] = True


@attrs.frozen
class CombinedStrategy(_ClassicStrategy):
    """``padding`` and ``frequency`` together: 2048 bytes after each of many small writes."""

    name: ClassVar[str] = "combined"
    default_chunk_chars: ClassVar[int] = 100
    default_chunk_interval_s: ClassVar[float] = 0.3
    padded: ClassVar[bool] = True


def _padding_bytes(tuning: Tuning) -> int:
    size = DEFAULT_PADDING_BYTES if tuning.padding_bytes is None else tuning.padding_bytes
    return 2 if size == 1 else size  # the shortest comment line is 2 bytes
