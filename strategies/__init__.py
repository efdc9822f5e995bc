"""Flush strategies, picked by name from :data:`STRATEGIES`.

See ``strategies.base`` for the protocol and the README for each one's trade-off.
"""

from __future__ import annotations

from typing import Protocol

from strategies.aligned import AlignedStrategy
from strategies.base import Cadence, FlushStrategy, FrameShaper, Tuning
from strategies.builtin import CombinedStrategy, FrequencyStrategy, NoneStrategy, PaddingStrategy

__all__ = [
    "STRATEGIES",
    "Cadence",
    "FlushStrategy",
    "FrameShaper",
    "Tuning",
    "build_strategy",
]


class StrategyClass(Protocol):
    """What a registry entry offers: a constructor from the operator's tuning."""

    def from_tuning(self, tuning: Tuning, /) -> FlushStrategy: ...


STRATEGIES: dict[str, StrategyClass] = {
    "none": NoneStrategy,
    "padding": PaddingStrategy,
    "frequency": FrequencyStrategy,
    "combined": CombinedStrategy,
    "aligned": AlignedStrategy,
}


def build_strategy(name: str, tuning: Tuning | None = None) -> FlushStrategy:
    """The strategy called ``name`` with ``tuning`` applied; ``KeyError`` if unknown."""
    return STRATEGIES[name].from_tuning(tuning or Tuning())
