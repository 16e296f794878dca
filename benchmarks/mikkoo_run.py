"""Run the real ``mikkoo`` command and measure its processes through /proc.

mikkoo runs as a controller process that forks one worker per queue. The
benchmark starts the controller in a process group of its own, finds the
worker among the controller's children and reads CPU time (utime + stime
in /proc/PID/stat) and peak resident memory (VmHWM in /proc/PID/status).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import interrupt
from benchmarks.services import (
    RABBITMQ_HOST, RABBITMQ_PASSWORD, RABBITMQ_PORT, RABBITMQ_USER, BrokerQueue)

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')
# Seconds mikkoo gets to stop after SIGTERM before its group is killed.
STOP_TIMEOUT = 60.0
# Seconds without a new message in the queue after which a run has failed.
STALL_TIMEOUT = 60.0
# Seconds between two polls of the queue and of /proc while mikkoo drains.
POLL_INTERVAL = 0.05


class RelayFailed(Exception):
    """Raised when mikkoo exits, stalls or times out during a measurement."""


@dataclasses.dataclass
class ProcessUsage:
    """The latest CPU time and peak RSS read for one process."""

    cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclasses.dataclass
class DrainResult:
    seconds: float                # process start to all messages in the queue
    first_message_seconds: float  # process start to the first message
    cpu_seconds: float            # controller and workers together
    worker_peak_rss_bytes: int
    worker_pids: list[int]


def read_usage(pid: int) -> ProcessUsage | None:
    """Return the CPU time and VmHWM of ``pid``, or None once it has gone."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
        status = Path(f'/proc/{pid}/status').read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in brackets may hold spaces, so fields count from ')'.
    fields = stat[stat.rindex(')') + 2:].split()
    ticks = int(fields[11]) + int(fields[12])   # utime, stime
    peak_kib = 0
    for line in status.splitlines():
        if line.startswith('VmHWM:'):
            peak_kib = int(line.split()[1])
    return ProcessUsage(ticks / CLOCK_TICKS, peak_kib * 1024)


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f'/proc/{pid}/task/{pid}/children').read_text()
    except FileNotFoundError:
        return []
    return [int(item) for item in text.split()]


def write_config(path: Path, queue: str, postgres_url: str, *, confirm: bool,
                 wait_duration: float = 1.0) -> None:
    """Write a mikkoo configuration that relays ``queue`` to the local RabbitMQ."""
    config: dict[str, Any] = {
        'Application': {
            'poll_interval': 60,
            'workers': {queue: {
                'postgres_url': postgres_url,
                'rabbitmq': {'host': RABBITMQ_HOST, 'port': RABBITMQ_PORT,
                             'username': RABBITMQ_USER, 'password': RABBITMQ_PASSWORD},
                'confirm': confirm,
                # The benchmark drops the queue itself; unregistering would
                # only add work to the measured shutdown.
                'unregister': False,
                'wait_duration': wait_duration,
            }},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class MikkooProcess:
    """One ``mikkoo -c CONFIG -f`` process group and the usage of its processes."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.usage: dict[int, ProcessUsage] = {}
        self.worker_pids: list[int] = []

    def start(self) -> None:
        """Start mikkoo in a new session, so that its whole group can be signalled.

        Raises RelayFailed when the ``mikkoo`` command is not installed.
        """
        # The console script beside this interpreter, not a version
        # manager's shim on PATH (pyenv's adds about 50 ms to every start).
        beside = Path(sys.executable).with_name('mikkoo')
        command = str(beside) if beside.exists() else shutil.which('mikkoo')
        if command is None:
            raise RelayFailed('the mikkoo command is not on PATH; install the '
                              'project with pip install -e . first')
        with open(self.log, 'ab') as log, interrupt.deferred():
            # Deferred, so that a stop signal cannot leave mikkoo running
            # before self.process names it for stop().
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                [command, '-c', str(self.config), '-f'], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def sample(self) -> None:
        """Read the usage of the controller and of every worker it has now."""
        for pid in [self.pid, *child_pids(self.pid)]:
            if pid != self.pid and pid not in self.worker_pids:
                self.worker_pids.append(pid)
            usage = read_usage(pid)
            if usage is not None:
                self.usage[pid] = usage

    @property
    def cpu_seconds(self) -> float:
        return sum(usage.cpu_seconds for usage in self.usage.values())

    @property
    def worker_peak_rss_bytes(self) -> int:
        return max((self.usage[pid].peak_rss_bytes for pid in self.worker_pids
                    if pid in self.usage), default=0)

    def check_running(self) -> None:
        assert self.process is not None
        status = self.process.poll()
        if status is not None:
            raise RelayFailed(f'mikkoo exited with status {status}\n{self.log_tail()}')

    def stop(self) -> int | None:
        """Send SIGTERM and wait, killing the group when it outlives STOP_TIMEOUT.

        Returns mikkoo's exit status, or None when the controller or a
        worker it left behind had to be killed.
        """
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)
            return None
        try:
            # Signal 0 only checks whether any process of the group is left.
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return status
        os.killpg(self.process.pid, signal.SIGKILL)
        return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors='replace')
        except FileNotFoundError:
            return '(no mikkoo log)'
        return '\n'.join(text.splitlines()[-lines:])


def wait_for_drain(mikkoo: MikkooProcess, queue: BrokerQueue, count: int,
                   timeout: float) -> DrainResult:
    """Poll until ``queue`` contains ``count`` messages, then return the run's figures.

    Raises RelayFailed when mikkoo exits, adds no message for STALL_TIMEOUT
    seconds, or ``timeout`` seconds pass.
    """
    first_message = None
    last_count, last_change = 0, time.monotonic()
    while True:
        messages = queue.message_count()
        mikkoo.sample()
        now = time.monotonic()
        if messages and first_message is None:
            first_message = now - mikkoo.started
        if messages >= count:
            return DrainResult(now - mikkoo.started, first_message or 0.0,
                               mikkoo.cpu_seconds, mikkoo.worker_peak_rss_bytes,
                               list(mikkoo.worker_pids))
        if messages != last_count:
            last_count, last_change = messages, now
        mikkoo.check_running()
        if now - last_change > STALL_TIMEOUT or now - mikkoo.started > timeout:
            raise RelayFailed(f'mikkoo relayed {messages} of {count} messages, the last '
                              f'{now - last_change:.0f} s ago\n{mikkoo.log_tail()}')
        time.sleep(POLL_INTERVAL)


def measure_idle(mikkoo: MikkooProcess, windows: int, seconds: float,
                 warmup: float = 3.0) -> list[tuple[float, float]]:
    """Return (worker, controller) CPU % of one core for each idle window.

    Waits ``warmup`` seconds first so that start-up work is left out.
    Raises RelayFailed when mikkoo exits or has no worker after the warmup.
    """
    time.sleep(warmup)
    mikkoo.check_running()
    mikkoo.sample()
    if not mikkoo.worker_pids:
        raise RelayFailed(f'mikkoo started no worker in {warmup:g} s\n{mikkoo.log_tail()}')
    worker = mikkoo.worker_pids[-1]
    results = []
    for _ in range(windows):
        before = _cpu_of(worker), _cpu_of(mikkoo.pid)
        started = time.monotonic()
        time.sleep(seconds)
        mikkoo.check_running()
        elapsed = time.monotonic() - started
        after = _cpu_of(worker), _cpu_of(mikkoo.pid)
        results.append((100 * (after[0] - before[0]) / elapsed,
                        100 * (after[1] - before[1]) / elapsed))
    return results


def _cpu_of(pid: int) -> float:
    usage = read_usage(pid)
    if usage is None:
        raise RelayFailed(f'mikkoo process {pid} exited while idle')
    return usage.cpu_seconds
