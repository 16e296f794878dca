"""Optional exception reporting to Sentry with sentry-sdk or the legacy raven."""
from __future__ import annotations

import logging
from typing import Any

LOGGER = logging.getLogger(__name__)

_client: Any = None


def init(dsn: str | None, release: str) -> None:
    """Start reporting to ``dsn`` if a Sentry client library is installed."""
    global _client
    if not dsn:
        return
    try:
        import sentry_sdk
    except ImportError:
        pass
    else:
        sentry_sdk.init(dsn=dsn, release=release)
        _client = sentry_sdk
        return
    try:
        import raven
    except ImportError:
        LOGGER.warning('sentry_dsn is set but neither sentry-sdk nor raven is '
                       'installed; run pip install sentry-sdk to report errors')
        return
    _client = raven.Client(dsn, release=release)


def capture_exception() -> None:
    """Report the exception being handled, if reporting is on."""
    if _client is None:
        return
    try:
        _client.capture_exception() if hasattr(_client, 'capture_exception') \
            else _client.captureException()
    except Exception:  # reporting must never take the relay down
        LOGGER.debug('Sentry report failed', exc_info=True)
