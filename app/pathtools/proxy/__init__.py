"""The buffering reverse proxy emulator behind ``flushline proxy``.

``release`` is the pure buffering policy, ``config`` its settings, ``headers`` the
header rules, ``server`` the proxy that moves bytes, ``command`` its command line.
"""

from app.pathtools.proxy.config import ProxyConfig
from app.pathtools.proxy.release import Release, ReleaseBuffer, ReleaseModel, ReleaseReason
from app.pathtools.proxy.server import BufferingProxy

__all__ = [
    "BufferingProxy",
    "ProxyConfig",
    "Release",
    "ReleaseBuffer",
    "ReleaseModel",
    "ReleaseReason",
]
