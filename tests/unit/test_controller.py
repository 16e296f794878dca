"""Unit tests for mikkoo.controller: worker slots, restarts and shutdown.

The controller is driven through its step methods with a fake ProcessOps,
so nothing forks, no signal handler is installed and the clock only moves
when a test moves it.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mikkoo import config
from mikkoo import controller as controller_module
from mikkoo.config import QueueSettings, RabbitMQSettings, Settings
from mikkoo.controller import STABLE_SECONDS, Controller, ProcessOps, SlotState

QUEUES = ('orders', 'refunds')
SHUTDOWN_TIMEOUT = 30.0


def exit_status(code: int) -> int:
    """Return the wait status of a child that exited with ``code``."""
    return code << 8


def signal_status(signum: int) -> int:
    """Return the wait status of a child killed by ``signum``."""
    return signum


class FakeProcessOps(ProcessOps):
    """Records spawns and kills, returns scripted exits, and keeps a manual clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.last_pid = 4000
        self.spawned: list[int] = []
        self.targets: list[Callable[[], int]] = []
        self.kills: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []

    def spawn(self, target: Callable[[], int]) -> int:
        # The target would run worker.main; it is kept but never called.
        self.last_pid += 1
        self.spawned.append(self.last_pid)
        self.targets.append(target)
        return self.last_pid

    def kill(self, pid: int, signum: int) -> None:
        self.kills.append((pid, signum))

    def reap(self) -> list[tuple[int, int]]:
        exits, self.exits = self.exits, []
        return exits

    def monotonic(self) -> float:
        return self.now


def make_settings() -> Settings:
    workers = {queue: QueueSettings(queue=queue,
                                    postgres_url='postgresql://db.example.com/shop',
                                    rabbitmq=RabbitMQSettings())
               for queue in QUEUES}
    return Settings(path='mikkoo.yml', workers=workers,
                    shutdown_timeout=SHUTDOWN_TIMEOUT)


@pytest.fixture
def ops() -> FakeProcessOps:
    return FakeProcessOps()


@pytest.fixture
def controller(ops: FakeProcessOps) -> Controller:
    controller = Controller(make_settings(), ops)
    for slot in controller.slots.values():
        # A random fraction of 0.5 removes the jitter, so delays are exact.
        slot.backoff.random_fraction = lambda: 0.5
    return controller


def started(controller: Controller) -> Controller:
    controller._start_due_workers()
    return controller


def die(controller: Controller, ops: FakeProcessOps, queue: str,
        status: int = exit_status(1)) -> None:
    """Make the worker of ``queue`` exit and let the controller reap it."""
    pid = controller.slots[queue].pid
    assert pid is not None
    ops.exits.append((pid, status))
    controller._reap()


def kills_with(ops: FakeProcessOps, signum: int) -> list[int]:
    return [pid for pid, sent in ops.kills if sent == signum]


def worker_pids(controller: Controller) -> list[int]:
    """Return the sorted pids of every slot that has a worker process."""
    return sorted(slot.pid for slot in controller.slots.values() if slot.pid is not None)


# -- starting ---------------------------------------------------------------

def test_slots_wait_before_start(controller: Controller, ops: FakeProcessOps) -> None:
    assert set(controller.slots) == set(QUEUES)
    assert all(slot.state is SlotState.BACKOFF for slot in controller.slots.values())
    assert ops.spawned == []


def test_worker_starts_per_queue(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)

    assert len(ops.spawned) == len(QUEUES)
    for queue in QUEUES:
        slot = controller.slots[queue]
        assert slot.state is SlotState.RUNNING, queue
        assert slot.pid in ops.spawned, queue
        assert slot.started_at == ops.now, queue


def test_running_workers_not_restarted(controller: Controller,
                                       ops: FakeProcessOps) -> None:
    started(controller)
    ops.now += 100

    controller._start_due_workers()

    assert len(ops.spawned) == len(QUEUES)


def test_start_logs_queue_and_pid(controller: Controller, ops: FakeProcessOps,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=controller_module.LOGGER.name)

    started(controller)
    pid = controller.slots['orders'].pid

    assert f'started worker for queue orders (pid {pid})' in caplog.messages


# -- restarting -------------------------------------------------------------

def test_dead_worker_waits_in_backoff(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    ops.now += 1

    die(controller, ops, 'orders')
    slot = controller.slots['orders']

    assert slot.state is SlotState.BACKOFF
    assert slot.pid is None
    assert slot.start_at == ops.now + 1.0


def test_other_workers_keep_running(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)

    die(controller, ops, 'orders')

    assert controller.slots['refunds'].state is SlotState.RUNNING


def test_restart_waits_for_start_at(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    die(controller, ops, 'orders')
    start_at = controller.slots['orders'].start_at

    ops.now = start_at - 0.001
    controller._start_due_workers()

    assert controller.slots['orders'].state is SlotState.BACKOFF
    assert len(ops.spawned) == len(QUEUES)


def test_restart_at_start_at(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    old_pid = controller.slots['orders'].pid
    die(controller, ops, 'orders')

    ops.now = controller.slots['orders'].start_at
    controller._start_due_workers()
    slot = controller.slots['orders']

    assert slot.state is SlotState.RUNNING
    assert slot.pid == ops.spawned[-1]
    assert slot.pid != old_pid


def test_restart_delay_grows(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    delays = []

    for _ in range(5):
        die(controller, ops, 'orders')
        slot = controller.slots['orders']
        delays.append(slot.start_at - ops.now)
        ops.now = slot.start_at
        controller._start_due_workers()

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_restart_delay_capped(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    slot = controller.slots['orders']

    for _ in range(10):
        die(controller, ops, 'orders')
        ops.now = slot.start_at
        controller._start_due_workers()
    die(controller, ops, 'orders')

    assert slot.start_at - ops.now == 60.0


def test_backoff_resets_after_stable_run(controller: Controller,
                                         ops: FakeProcessOps) -> None:
    started(controller)
    slot = controller.slots['orders']
    for _ in range(3):
        die(controller, ops, 'orders')
        ops.now = slot.start_at
        controller._start_due_workers()

    ops.now += STABLE_SECONDS
    die(controller, ops, 'orders')

    assert slot.start_at - ops.now == 1.0
    assert slot.backoff.attempts == 1


def test_backoff_kept_before_stable(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    slot = controller.slots['orders']
    for _ in range(3):
        die(controller, ops, 'orders')
        ops.now = slot.start_at
        controller._start_due_workers()

    ops.now += STABLE_SECONDS - 0.5
    die(controller, ops, 'orders')

    assert slot.start_at - ops.now == 8.0


def test_worker_exit_logged_as_error(controller: Controller, ops: FakeProcessOps,
                                     caplog: pytest.LogCaptureFixture) -> None:
    started(controller)

    die(controller, ops, 'orders', exit_status(1))
    errors = [record.getMessage() for record in caplog.records
              if record.levelno == logging.ERROR]

    assert len(errors) == 1
    assert 'orders' in errors[0]
    assert 'exited with status 1' in errors[0]
    assert 'restarting it in 1.0 s' in errors[0]


def test_killed_worker_names_signal(controller: Controller, ops: FakeProcessOps,
                                    caplog: pytest.LogCaptureFixture) -> None:
    started(controller)

    die(controller, ops, 'orders', signal_status(signal.SIGSEGV))
    errors = [record.getMessage() for record in caplog.records
              if record.levelno == logging.ERROR]

    assert len(errors) == 1
    assert 'killed by SIGSEGV' in errors[0]


def test_unknown_pid_ignored(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    ops.exits.append((99999, exit_status(1)))

    controller._reap()

    assert all(slot.state is SlotState.RUNNING for slot in controller.slots.values())


# -- stopping ---------------------------------------------------------------

def test_stop_sends_sigterm(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    pids = worker_pids(controller)

    controller.request_stop()

    assert sorted(kills_with(ops, signal.SIGTERM)) == pids
    assert kills_with(ops, signal.SIGKILL) == []
    assert all(slot.state is SlotState.STOPPING for slot in controller.slots.values())


def test_stop_sets_deadline(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)

    controller.request_stop()

    assert controller.stopping
    assert controller.stop_deadline == ops.now + SHUTDOWN_TIMEOUT


def test_stop_ends_waiting_slot(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    die(controller, ops, 'orders')

    controller.request_stop()

    assert controller.slots['orders'].state is SlotState.EXITED
    assert len(ops.kills) == 1


def test_no_restart_while_stopping(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    die(controller, ops, 'orders')
    controller.request_stop()

    ops.now += 3600
    controller._start_due_workers()

    assert len(ops.spawned) == len(QUEUES)


def test_stop_completes_when_workers_exit(controller: Controller,
                                          ops: FakeProcessOps) -> None:
    started(controller)
    controller.request_stop()

    for queue in QUEUES:
        die(controller, ops, queue, exit_status(0))

    assert all(slot.state is SlotState.EXITED for slot in controller.slots.values())
    assert all(slot.pid is None for slot in controller.slots.values())
    # run() loops while stopping is false or a slot is still active.
    assert controller._active_slots() == []


def test_stop_waits_for_every_worker(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.request_stop()

    die(controller, ops, 'orders', exit_status(0))

    assert controller._active_slots() == [controller.slots['refunds']]


def test_clean_stop_logged_as_info(controller: Controller, ops: FakeProcessOps,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=controller_module.LOGGER.name)
    started(controller)
    controller.request_stop()

    die(controller, ops, 'orders', exit_status(0))
    records = [record for record in caplog.records
               if record.getMessage() == 'worker for queue orders stopped']

    assert len(records) == 1
    assert records[0].levelno == logging.INFO


def test_failed_stop_logged_as_error(controller: Controller, ops: FakeProcessOps,
                                     caplog: pytest.LogCaptureFixture) -> None:
    started(controller)
    controller.request_stop()

    die(controller, ops, 'orders', signal_status(signal.SIGKILL))
    errors = [record.getMessage() for record in caplog.records
              if record.levelno == logging.ERROR]

    assert len(errors) == 1
    assert 'killed by SIGKILL' in errors[0]


def test_no_kill_before_deadline(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.request_stop()

    ops.now = controller.stop_deadline - 0.001
    controller._enforce_stop_deadline()

    assert kills_with(ops, signal.SIGKILL) == []


def test_deadline_kills_remaining(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.request_stop()
    die(controller, ops, 'orders', exit_status(0))
    remaining = controller.slots['refunds'].pid

    ops.now = controller.stop_deadline
    controller._enforce_stop_deadline()

    assert kills_with(ops, signal.SIGKILL) == [remaining]


def test_deadline_kill_logged(controller: Controller, ops: FakeProcessOps,
                              caplog: pytest.LogCaptureFixture) -> None:
    started(controller)
    controller.request_stop()

    ops.now = controller.stop_deadline
    controller._enforce_stop_deadline()
    errors = [record.getMessage() for record in caplog.records
              if record.levelno == logging.ERROR]

    assert errors == [f'workers did not stop within {SHUTDOWN_TIMEOUT:g} s; killing them']


def test_deadline_after_all_exited(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.request_stop()
    for queue in QUEUES:
        die(controller, ops, queue, exit_status(0))

    ops.now = controller.stop_deadline + 1
    controller._enforce_stop_deadline()

    assert kills_with(ops, signal.SIGKILL) == []


def test_killed_workers_reaped(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.request_stop()
    ops.now = controller.stop_deadline
    controller._enforce_stop_deadline()

    for queue in QUEUES:
        die(controller, ops, queue, signal_status(signal.SIGKILL))

    assert controller._active_slots() == []


# -- signals ----------------------------------------------------------------

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops(controller: Controller, ops: FakeProcessOps,
                           signum: int) -> None:
    started(controller)

    controller._signals.append(signum)
    controller._handle_signals()

    assert controller.stopping
    assert len(kills_with(ops, signal.SIGTERM)) == len(QUEUES)
    assert kills_with(ops, signal.SIGKILL) == []


@pytest.mark.parametrize(('first', 'second'), [
    (signal.SIGTERM, signal.SIGTERM),
    (signal.SIGTERM, signal.SIGINT),
    (signal.SIGINT, signal.SIGTERM),
])
def test_second_stop_signal_kills(controller: Controller, ops: FakeProcessOps,
                                  first: int, second: int) -> None:
    started(controller)
    pids = worker_pids(controller)
    controller._signals.append(first)
    controller._handle_signals()

    controller._signals.append(second)
    controller._handle_signals()

    assert sorted(kills_with(ops, signal.SIGKILL)) == pids
    assert ops.now < controller.stop_deadline


def test_signals_handled_once(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller._signals.append(signal.SIGTERM)
    controller._handle_signals()

    controller._handle_signals()

    assert controller._signals == []
    assert kills_with(ops, signal.SIGKILL) == []


def test_sigchld_only_wakes(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)

    controller._signals.append(signal.SIGCHLD)
    controller._handle_signals()

    assert not controller.stopping
    assert ops.kills == []


# -- waiting ----------------------------------------------------------------

def test_wait_until_next_restart(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.next_stats = ops.now + 3600
    die(controller, ops, 'orders')

    assert controller._seconds_until_next_event() == 1.0


def test_wait_until_stop_deadline(controller: Controller, ops: FakeProcessOps) -> None:
    started(controller)
    controller.next_stats = ops.now + 3600
    controller.request_stop()

    assert controller._seconds_until_next_event() == SHUTDOWN_TIMEOUT


# -- reloading on SIGHUP ----------------------------------------------------

POSTGRES_URL = 'postgresql://db.example.com/shop'


def queue_options(**options: Any) -> dict[str, Any]:
    return {'postgres_url': POSTGRES_URL, **options}


def write_config(path: Path, workers: dict[str, Any], **application: Any) -> None:
    document = {'Application': {'shutdown_timeout': SHUTDOWN_TIMEOUT,
                                'workers': workers, **application}}
    path.write_text(yaml.safe_dump(document), encoding='utf-8')


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / 'mikkoo.yml'
    write_config(path, {queue: queue_options() for queue in QUEUES})
    return path


@pytest.fixture
def reloadable(config_path: Path, ops: FakeProcessOps) -> Controller:
    """Return a controller whose workers run, loaded from ``config_path``."""
    controller = Controller(config.load(str(config_path)), ops)
    controller._start_due_workers()
    return controller


def send_sighup(controller: Controller) -> None:
    controller._signals.append(signal.SIGHUP)
    controller._handle_signals()


def test_sighup_invalid_file_kept(reloadable: Controller, ops: FakeProcessOps,
                                  config_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    before = reloadable.settings
    config_path.write_text('Application: {workers: {}}\n', encoding='utf-8')

    send_sighup(reloadable)
    errors = [record.getMessage() for record in caplog.records
              if record.levelno == logging.ERROR]

    assert reloadable.settings is before
    assert not reloadable.stopping
    assert ops.kills == []
    assert len(errors) == 1
    assert errors[0].startswith('configuration not reloaded:')


def test_sighup_unchanged_file(reloadable: Controller, ops: FakeProcessOps) -> None:
    send_sighup(reloadable)

    assert ops.kills == []
    assert all(slot.state is SlotState.RUNNING for slot in reloadable.slots.values())


def test_sighup_restarts_changed_queue(reloadable: Controller, ops: FakeProcessOps,
                                       config_path: Path) -> None:
    old_pid = reloadable.slots['orders'].pid
    write_config(config_path, {'orders': queue_options(fetch_size=10),
                               'refunds': queue_options()})

    send_sighup(reloadable)

    assert ops.kills == [(old_pid, signal.SIGUSR1)]
    assert reloadable.slots['orders'].state is SlotState.STOPPING
    assert reloadable.slots['refunds'].state is SlotState.RUNNING
    assert reloadable.settings.workers['orders'].fetch_size == 10


def test_changed_queue_starts_after_exit(reloadable: Controller, ops: FakeProcessOps,
                                         config_path: Path) -> None:
    write_config(config_path, {'orders': queue_options(fetch_size=10),
                               'refunds': queue_options()})
    send_sighup(reloadable)

    die(reloadable, ops, 'orders', exit_status(0))
    reloadable._start_due_workers()

    assert reloadable.slots['orders'].state is SlotState.RUNNING
    assert reloadable.slots['orders'].pid == ops.spawned[-1]
    assert len(ops.spawned) == len(QUEUES) + 1


def test_sighup_stops_removed_queue(reloadable: Controller, ops: FakeProcessOps,
                                    config_path: Path) -> None:
    old_pid = reloadable.slots['orders'].pid
    write_config(config_path, {'refunds': queue_options()})

    send_sighup(reloadable)
    die(reloadable, ops, 'orders', exit_status(0))

    assert ops.kills == [(old_pid, signal.SIGTERM)]
    assert set(reloadable.slots) == {'refunds'}


def test_sighup_starts_added_queue(reloadable: Controller, ops: FakeProcessOps,
                                   config_path: Path) -> None:
    write_config(config_path, {**{queue: queue_options() for queue in QUEUES},
                               'invoices': queue_options()})

    send_sighup(reloadable)
    reloadable._start_due_workers()

    assert reloadable.slots['invoices'].state is SlotState.RUNNING
    assert ops.kills == []


def test_sighup_global_change_restarts_all(reloadable: Controller, ops: FakeProcessOps,
                                           config_path: Path) -> None:
    pids = worker_pids(reloadable)
    write_config(config_path, {queue: queue_options() for queue in QUEUES},
                 poll_interval=5)

    send_sighup(reloadable)

    assert sorted(kills_with(ops, signal.SIGUSR1)) == pids


def test_sighup_ignored_while_stopping(reloadable: Controller, ops: FakeProcessOps,
                                       config_path: Path) -> None:
    reloadable.request_stop()
    before = reloadable.settings
    write_config(config_path, {'invoices': queue_options()})

    send_sighup(reloadable)

    assert reloadable.settings is before
    assert set(reloadable.slots) == set(QUEUES)


def test_readded_queue_keeps_old_worker(reloadable: Controller, ops: FakeProcessOps,
                                        config_path: Path) -> None:
    old_pid = reloadable.slots['orders'].pid
    write_config(config_path, {'refunds': queue_options()})
    send_sighup(reloadable)
    write_config(config_path, {queue: queue_options() for queue in QUEUES})
    send_sighup(reloadable)
    reloadable._start_due_workers()

    reloadable.request_stop()
    ops.now = reloadable.stop_deadline
    reloadable._enforce_stop_deadline()

    assert old_pid in kills_with(ops, signal.SIGKILL)
