"""The event bus: the seam between the jobs that publish events and the streams that send them.

``base`` holds the protocols; ``memory`` the in-process implementation; ``redis`` the one
shared by several instances (``FLUSHLINE_BUS=redis``), imported from ``app.bus.redis`` so
that a memory-bus service never loads the Redis client.
"""

from app.bus.base import Batch, EventBus, Subscription
from app.bus.memory import MemoryEventBus

__all__ = ["Batch", "EventBus", "MemoryEventBus", "Subscription"]
