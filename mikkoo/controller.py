"""Start one worker process per queue, restart the ones that die, stop them all.

The controller is a single-threaded loop. Signal handlers only record the
signal and wake the loop through a pipe; the loop then acts on it. Every
fork, kill, wait and clock call goes through :class:`ProcessOps`, so a test
can drive the state machine without real processes.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from mikkoo import config, worker
from mikkoo.backoff import Backoff
from mikkoo.config import ConfigError, Settings
from mikkoo.stats import Counters

LOGGER = logging.getLogger(__name__)

# A worker that stayed up this long before dying restarts without delay
# growth: its failure is not part of a crash loop.
STABLE_SECONDS = 60.0


class SlotState(enum.Enum):
    BACKOFF = 'backoff'      # waiting for the next start
    RUNNING = 'running'
    STOPPING = 'stopping'    # asked to stop with SIGTERM
    EXITED = 'exited'        # stopped for good


class ProcessOps:
    """The operating-system calls the controller makes."""

    def spawn(self, target: Callable[[], int]) -> int:
        """Fork a child that runs ``target`` and exits with its return value."""
        pid = os.fork()
        if pid:
            return pid
        status = worker.EXIT_FAILURE
        try:
            status = target()
        finally:
            # os._exit skips atexit handlers inherited from the controller,
            # such as the daemon's pidfile removal.
            logging.shutdown()
            os._exit(status)

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def reap(self) -> list[tuple[int, int]]:
        """Return (pid, wait status) of every child that has exited."""
        exited: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return exited
            if pid == 0:
                return exited
            exited.append((pid, status))

    def monotonic(self) -> float:
        return time.monotonic()


class Slot:
    """One queue's worker process and its restart history."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.state = SlotState.BACKOFF
        self.pid: int | None = None
        self.started_at = 0.0
        self.start_at = 0.0
        self.backoff = Backoff(initial=1.0, maximum=60.0)
        self.counters = Counters()
        self.logged: dict[str, int] = self.counters.snapshot()
        # What happens when a worker stopped by a reload exits.
        self.restart_after_exit = False
        self.remove_after_exit = False


class Controller:
    """Supervise the workers of every configured queue."""

    def __init__(self, settings: Settings, ops: ProcessOps | None = None,
                 apply_logging: Callable[[Settings], None] | None = None) -> None:
        self.settings = settings
        self.ops = ops or ProcessOps()
        self.apply_logging = apply_logging
        self.slots = {queue: Slot(queue) for queue in settings.workers}
        self.stopping = False
        self.killed = False
        self.stop_deadline = 0.0
        self.next_stats = 0.0
        self._signals: list[int] = []
        self._wakeup_read = self._wakeup_write = -1

    def run(self) -> int:
        """Run until every worker has stopped; return the exit status."""
        self._install_signal_handlers()
        self.next_stats = self.ops.monotonic() + self.settings.poll_interval
        LOGGER.info('mikkoo controller started (pid %d) with %d workers',
                    os.getpid(), len(self.slots))
        while not self.stopping or self._active_slots():
            self._wait(self._seconds_until_next_event())
            self._handle_signals()
            self._reap()
            self._start_due_workers()
            self._enforce_stop_deadline()
            self._log_stats_when_due()
        LOGGER.info('mikkoo controller stopped')
        return 0

    # -- signals -------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        # Workers take SIGUSR1 as a request to stop for a restart; the
        # controller has no use for it and must not die of it.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def _record_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _wait(self, timeout: float) -> None:
        if self._wakeup_read < 0:
            return
        try:
            select.select([self._wakeup_read], [], [], max(timeout, 0))
            while os.read(self._wakeup_read, 512):
                pass
        except BlockingIOError:
            pass
        except OSError as error:
            if error.errno != errno.EINTR:
                raise

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop_signal(signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self.stopping:
                self.reload()

    def _on_stop_signal(self, name: str) -> None:
        if not self.stopping:
            LOGGER.info('%s received; stopping the workers (deadline %g s)',
                        name, self.settings.shutdown_timeout)
            self.request_stop()
            return
        LOGGER.warning('%s received again; killing the workers now', name)
        self._kill_workers()

    # -- reload --------------------------------------------------------------

    def reload(self) -> None:
        """Read the configuration file again and apply it.

        Workers whose queue settings changed are stopped like at shutdown
        and started again with the new settings; removed queues are stopped,
        added ones started. A file with errors is rejected as a whole and
        the running configuration stays.
        """
        try:
            new = config.load(self.settings.path)
            if self.apply_logging is not None:
                self.apply_logging(new)
        except ConfigError as error:
            for problem in error.problems:
                LOGGER.error('configuration not reloaded: %s: %s', error.path, problem)
            return
        except Exception:
            # The controller must outlive any file it is asked to reload.
            LOGGER.exception('configuration not reloaded: unexpected error reading %s',
                             self.settings.path)
            return
        old, self.settings = self.settings, new
        if new.daemon != old.daemon:
            LOGGER.warning('Daemon settings change only when mikkoo restarts')
        # Any change outside the workers (statsd, poll_interval, ...) reaches
        # a worker only when it starts, so every worker restarts then.
        global_change = dataclasses.replace(new, workers={}, daemon=old.daemon, logging=None) \
            != dataclasses.replace(old, workers={}, logging=None)
        for queue in sorted(set(old.workers) | set(new.workers)):
            if queue not in new.workers:
                self._retire(queue)
            elif queue not in old.workers:
                self._add(queue)
            elif global_change or new.workers[queue] != old.workers[queue]:
                self._restart(self.slots[queue])
        LOGGER.info('configuration reloaded from %s', new.path)

    def _add(self, queue: str) -> None:
        LOGGER.info('queue %s added by the reload', queue)
        slot = self.slots.get(queue)
        if slot is None:
            self.slots[queue] = Slot(queue)
            return
        # The queue was removed by an earlier reload and its worker is
        # still stopping: start the new one once the old one has exited.
        slot.remove_after_exit = False
        slot.restart_after_exit = True

    def _retire(self, queue: str) -> None:
        slot = self.slots[queue]
        LOGGER.info('queue %s removed by the reload; stopping its worker', queue)
        if slot.state is SlotState.BACKOFF:
            del self.slots[queue]
            return
        slot.remove_after_exit = True
        self._stop_slot(slot)

    def _restart(self, slot: Slot) -> None:
        LOGGER.info('queue %s: settings changed; restarting its worker', slot.queue)
        if slot.state is SlotState.BACKOFF:
            slot.start_at = self.ops.monotonic()
            return
        slot.restart_after_exit = True
        # SIGUSR1 stops the worker without unregistering its consumer, so
        # that no event is dropped between the old worker and the new one.
        self._stop_slot(slot, signal.SIGUSR1)

    def _stop_slot(self, slot: Slot, signum: int = signal.SIGTERM) -> None:
        if slot.state is SlotState.RUNNING and slot.pid is not None:
            self.ops.kill(slot.pid, signum)
            slot.state = SlotState.STOPPING

    # -- shutdown ------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask every worker to settle its batch and exit.

        The order matters. No worker is started any more, and running
        workers get SIGTERM and settle the batch in hand. Workers still
        alive at the deadline are killed. PgQ hands their unfinished batch
        out again on the next start, so its events are repeated, not lost.
        """
        self.stopping = True
        self.stop_deadline = self.ops.monotonic() + self.settings.shutdown_timeout
        for slot in self.slots.values():
            if slot.state is SlotState.RUNNING:
                self._stop_slot(slot)
            elif slot.state is SlotState.BACKOFF:
                slot.state = SlotState.EXITED

    def _enforce_stop_deadline(self) -> None:
        if self.stopping and not self.killed and self.ops.monotonic() >= self.stop_deadline \
                and self._active_slots():
            LOGGER.error('workers did not stop within %g s; killing them',
                         self.settings.shutdown_timeout)
            self._kill_workers()

    def _kill_workers(self) -> None:
        self.stopping = self.killed = True
        for slot in self._active_slots():
            if slot.pid is not None:
                self.ops.kill(slot.pid, signal.SIGKILL)

    def _active_slots(self) -> list[Slot]:
        return [slot for slot in self.slots.values()
                if slot.state in (SlotState.RUNNING, SlotState.STOPPING)]

    # -- workers -------------------------------------------------------------

    def _start_due_workers(self) -> None:
        if self.stopping:
            return
        now = self.ops.monotonic()
        for slot in self.slots.values():
            if slot.state is SlotState.BACKOFF and now >= slot.start_at:
                self._start(slot)

    def _start(self, slot: Slot) -> None:
        queue, counters = slot.queue, slot.counters
        slot.pid = self.ops.spawn(lambda: worker.main(self.settings, queue, counters))
        slot.state = SlotState.RUNNING
        slot.started_at = self.ops.monotonic()
        LOGGER.info('started worker for queue %s (pid %d)', slot.queue, slot.pid)

    def _reap(self) -> None:
        by_pid = {slot.pid: slot for slot in list(self.slots.values()) if slot.pid is not None}
        for pid, status in self.ops.reap():
            slot = by_pid.get(pid)
            if slot is not None:
                self._on_worker_exit(slot, status)

    def _on_worker_exit(self, slot: Slot, status: int) -> None:
        slot.pid = None
        description = _describe_status(status)
        if slot.state is SlotState.STOPPING or self.stopping:
            slot.state = SlotState.EXITED
            level = logging.INFO if status == 0 else logging.ERROR
            LOGGER.log(level, 'worker for queue %s %s', slot.queue, description)
            self._after_requested_exit(slot)
            return
        now = self.ops.monotonic()
        if now - slot.started_at >= STABLE_SECONDS:
            slot.backoff.reset()
        delay = slot.backoff.next_delay()
        slot.state = SlotState.BACKOFF
        slot.start_at = now + delay
        LOGGER.error('worker for queue %s %s; restarting it in %.1f s (restart %d)',
                     slot.queue, description, delay, slot.backoff.attempts)

    def _after_requested_exit(self, slot: Slot) -> None:
        if self.stopping:
            return
        if slot.remove_after_exit:
            del self.slots[slot.queue]
        elif slot.restart_after_exit:
            slot.restart_after_exit = False
            slot.state = SlotState.BACKOFF
            slot.start_at = self.ops.monotonic()

    # -- statistics ----------------------------------------------------------

    def _seconds_until_next_event(self) -> float:
        now = self.ops.monotonic()
        deadlines = [self.next_stats]
        if self.stopping and not self.killed:
            deadlines.append(self.stop_deadline)
        else:
            deadlines.extend(slot.start_at for slot in self.slots.values()
                             if slot.state is SlotState.BACKOFF)
        return max(0.0, min(deadlines) - now)

    def _log_stats_when_due(self) -> None:
        now = self.ops.monotonic()
        if now < self.next_stats:
            return
        self.next_stats = now + self.settings.poll_interval
        for slot in self.slots.values():
            current = slot.counters.snapshot()
            processed = current['processed'] - slot.logged['processed']
            LOGGER.info('queue %s: %d events processed (%.1f/s), %d failed, '
                        '%d discarded, %d batches; %d pending, consumer lag %.1f s [%s]',
                        slot.queue, current['processed'],
                        processed / self.settings.poll_interval, current['failed'],
                        current['discarded'], current['batches'], current['pending'],
                        current['lag_ms'] / 1000, slot.state.value)
            slot.logged = current


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f'was killed by {signal.Signals(os.WTERMSIG(status)).name}'
    code = os.WEXITSTATUS(status)
    return 'stopped' if code == 0 else f'exited with status {code}'
