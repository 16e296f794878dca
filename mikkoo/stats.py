"""Per-queue counters shared between a worker and the controller, and StatsD."""
from __future__ import annotations

import logging
import multiprocessing.sharedctypes
import socket

LOGGER = logging.getLogger(__name__)

FIELDS = ('processed', 'failed', 'discarded', 'batches', 'pending', 'lag_ms')


class Counters:
    """Integer counters in shared memory, written by one worker at a time.

    The memory is allocated before the worker forks, so the controller reads
    what the worker writes without any message passing. Counts survive a
    worker restart because the slot keeps its Counters.
    """

    def __init__(self) -> None:
        self._values = multiprocessing.sharedctypes.RawArray('q', len(FIELDS))
        self._index = {name: position for position, name in enumerate(FIELDS)}

    def add(self, name: str, amount: int = 1) -> None:
        self._values[self._index[name]] += amount

    def set(self, name: str, value: int) -> None:
        self._values[self._index[name]] = value

    def snapshot(self) -> dict[str, int]:
        return dict(zip(FIELDS, self._values))


class StatsdClient:
    """Send counters and gauges over UDP; a lost datagram is never an error."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.address = (host, port)
        self.prefix = prefix
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def incr(self, name: str, amount: int = 1) -> None:
        self._send(f'{self.prefix}.{name}:{amount}|c')

    def gauge(self, name: str, value: float) -> None:
        self._send(f'{self.prefix}.{name}:{value}|g')

    def _send(self, line: str) -> None:
        try:
            self._socket.sendto(line.encode('utf-8'), self.address)
        except OSError as error:
            LOGGER.debug('statsd %s:%s unreachable: %s', *self.address, error)
