"""Flushline: stream the live progress of long jobs to browsers over SSE, through any proxy.

The application factory is :func:`app.web.factory.init_app`; settings are
:class:`app.core.settings.Settings`.
"""

__version__ = "0.1.0"
