"""The event bus: the seam between the jobs that publish events and the streams that send them.

``base`` holds the protocols; ``memory`` the in-process implementation.
"""

from app.bus.base import Batch, EventBus, Subscription
from app.bus.memory import MemoryEventBus

__all__ = ["Batch", "EventBus", "MemoryEventBus", "Subscription"]
