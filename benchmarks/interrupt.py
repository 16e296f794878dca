"""Stop the benchmark cleanly on SIGTERM or Ctrl-C.

The handler raises Interrupted in the main thread, so that the cleanup in
``finally`` blocks stops mikkoo and drops the database and queue. Inside
pika's I/O loop an exception would be taken for a lost connection and the
measurement retried, so the code that runs pika delays the signal
with :func:`deferred` and checks :func:`pending` while it waits. A
signal stays pending until the run is over, so that one swallowed where
it was raised (by a logging handler, say) is raised again at the next
check. The cleanup runs inside :func:`shielded`, which no signal
interrupts.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Interrupted(Exception):
    """Raised when SIGTERM or SIGINT arrived, so that cleanup code runs."""


_received: str | None = None   # the name of the last stop signal
_deferring = 0
_shielded = False


def install() -> None:
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def uninstall() -> None:
    """Ignore stop signals from now on: the run is over and cleaned up.

    Python restores the default handlers while it exits, and a signal then
    would kill the process with a status of its own instead of 1.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def received() -> str | None:
    """Return the name of the last stop signal, or None."""
    return _received


def pending() -> bool:
    return _received is not None and not _shielded


def check() -> None:
    """Raise Interrupted when a stop signal has arrived, except in the cleanup."""
    if pending():
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


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Run the block to its end whatever signals arrive: for the cleanup."""
    global _shielded
    _shielded = True
    try:
        yield
    finally:
        _shielded = False


def _handle(signum: int, _frame: Any) -> None:
    global _received
    _received = signal.Signals(signum).name
    if not _deferring:
        check()
