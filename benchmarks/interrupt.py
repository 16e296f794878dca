"""Stop the benchmark cleanly on SIGTERM or Ctrl-C.

The handler raises Interrupted in the main thread, so that the cleanup in
``finally`` blocks stops mikkoo and drops the database and queue. Inside
pika's I/O loop an exception would be taken for a lost connection and the
measurement retried, so the code that runs pika delays the signal
with :func:`deferred` and checks :func:`pending` while it waits. A signal
is raised once: the cleanup that follows runs undisturbed unless another
signal arrives.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Interrupted(Exception):
    """Raised when SIGTERM or SIGINT arrived, so that cleanup code runs."""


_received: str | None = None   # the name of the last stop signal
_pending = False               # a stop signal arrived and was not raised yet
_deferring = 0


def install() -> None:
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def pending() -> bool:
    return _pending


def check() -> None:
    """Raise Interrupted when a stop signal has arrived since the last raise."""
    global _pending
    if _pending:
        _pending = False
        raise Interrupted(f'stopped by {_received}')


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Delay a stop signal until the block ends, then raise Interrupted."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        check()


def _handle(signum: int, _frame: Any) -> None:
    global _received, _pending
    _received = signal.Signals(signum).name
    _pending = True
    if not _deferring:
        check()
