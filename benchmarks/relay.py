"""Benchmark how fast mikkoo relays a PgQ backlog to RabbitMQ, against its limits.

Run from the repository root, with PostgreSQL (PgQ installed) and RabbitMQ
on 127.0.0.1::

    python3 -m benchmarks.relay              # about 10 minutes with defaults
    python3 -m benchmarks.relay --quick      # a smoke run of a few seconds

Each repetition measures, in this order: a pika publisher with confirms
on and off, plain and with joined writes, a plain PgQ reader, then mikkoo with ``confirm: true`` and
``confirm: false`` on a backlog of ``--events`` events. Then, once per
repetition, the pika publisher with confirms on and mikkoo with
``confirm: true`` each send ``--big-batch`` messages, mikkoo's in one
PgQ batch. Last comes an idle mikkoo. benchmarks/README.md explains each
figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ''):
    # Run as a file (python3 benchmarks/relay.py): make the package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pika.exceptions  # noqa: E402
import psycopg2  # noqa: E402

from benchmarks import interrupt, limits, report, services  # noqa: E402
from benchmarks.mikkoo_run import (  # noqa: E402
    DrainResult, MikkooProcess, RelayFailed, measure_idle, wait_for_drain, write_config)

LOGGER = logging.getLogger('benchmarks.relay')

EXIT_OK = 0
EXIT_FAILURE = 1          # a service was unreachable or a measurement failed
# argparse exits with status 2 on invalid arguments.

CONSUMER = 'mikkoo'       # the PgQ consumer name mikkoo uses by default
PGQ_CONSUMER = 'benchmark'
QUICK = {'events': 2000, 'repeat': 1, 'big_batch': 0, 'idle_seconds': 2.0}

LIMIT_CONFIRM = 'limit: pika publisher, confirm on'
LIMIT_NO_CONFIRM = 'limit: pika publisher, confirm off'
LIMIT_PGQ = 'limit: PgQ drain, no AMQP'
# The same publisher joining its queued frames before each send, as mikkoo
# does: a stricter bar, reported beside the targets' limits.
JOINED_CONFIRM = 'reference: pika publisher, joined writes, confirm on'
JOINED_NO_CONFIRM = 'reference: pika publisher, joined writes, confirm off'
PER_10K = 'CPU s/10k ev'
# Attempts of one measurement when RabbitMQ closes connections during it.
MEASURE_ATTEMPTS = 3

T = TypeVar('T')


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python3 -m benchmarks.relay',
        description='Measure mikkoo against a plain pika publisher and a plain PgQ '
                    'reader on the local PostgreSQL and RabbitMQ.')
    parser.add_argument('--events', type=int, default=100_000, metavar='N',
                        help='events per measured run (default: %(default)s)')
    parser.add_argument('--repeat', type=int, default=3, metavar='R',
                        help='repetitions of every figure (default: %(default)s)')
    parser.add_argument('--big-batch', type=int, default=1_000_000, metavar='N',
                        help='events in the one big batch mikkoo relays per '
                             'repetition; 0 skips it (default: %(default)s)')
    parser.add_argument('--window', type=int, default=5000, metavar='N',
                        help='unsettled messages of the limit publisher, at most '
                             '(default: %(default)s)')
    parser.add_argument('--idle-seconds', type=float, default=10.0, metavar='S',
                        help='length in seconds of each idle measurement '
                             '(default: %(default)s)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 2000 events, 1 repetition, no big batch, '
                             '2 s idle; overrides the options above')
    parser.add_argument('--json', type=Path, metavar='FILE',
                        help='also write every figure to FILE as JSON')
    parser.add_argument('--log-dir', type=Path, metavar='DIR',
                        help="keep mikkoo's configuration files and logs in DIR "
                             '(default: a temporary directory, deleted at the end)')

    arguments = parser.parse_args(argv)
    if arguments.quick:
        vars(arguments).update(QUICK)
    _check_arguments(parser, arguments)
    return arguments


def _check_arguments(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    if not 1 <= arguments.events <= services.MAX_EVENTS:
        parser.error(f'--events must be from 1 to {services.MAX_EVENTS}, '
                     f'got {arguments.events}')
    if not 0 <= arguments.big_batch <= services.MAX_EVENTS:
        parser.error(f'--big-batch must be from 0 to {services.MAX_EVENTS}, '
                     f'got {arguments.big_batch}')
    if arguments.repeat < 1:
        parser.error(f'--repeat must be 1 or more, got {arguments.repeat}')
    if arguments.window < 1:
        parser.error(f'--window must be 1 or more, got {arguments.window}')
    if not 0 < arguments.idle_seconds <= 600:
        parser.error(f'--idle-seconds must be above 0 and at most 600, '
                     f'got {arguments.idle_seconds}')
    if arguments.log_dir is not None:
        if arguments.log_dir.exists() and not arguments.log_dir.is_dir():
            parser.error(f'--log-dir {arguments.log_dir}: not a directory; name a '
                         'directory or a path to create one at')
        try:
            arguments.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f'--log-dir {arguments.log_dir}: cannot create the directory: '
                         f'{error.strerror}')
    if arguments.json is not None:
        # Checked now, so that a long run does not end in a failed write.
        folder = arguments.json.parent
        if arguments.json.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f'--json {arguments.json}: not a writable file path; name a '
                         'file in an existing, writable directory')


class Benchmark:
    """The services, figures and warnings of one benchmark run."""

    def __init__(self, arguments: argparse.Namespace, workdir: Path) -> None:
        self.arguments = arguments
        suffix = services.unique_suffix()
        self.workdir = workdir / f'benchmark_{suffix}'
        self.workdir.mkdir()
        self.database = services.Database(f'mikkoo_benchmark_{suffix}')
        self.broker = services.BrokerQueue(f'mikkoo.benchmark.{suffix}')
        self.figures = report.Figures()
        self.warnings: list[str] = []
        self.pgq_version = 'unknown'

    def set_up(self) -> None:
        self.database.create()
        self.pgq_version = self.database.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pgq'")
        self.broker.declare()

    def clean_up(self) -> None:
        """Delete the RabbitMQ queue and drop the database, logging what fails."""
        try:
            self.broker.delete()
        except pika.exceptions.AMQPError as error:
            LOGGER.error('cannot delete RabbitMQ queue %s, delete it by hand: %s',
                         self.broker.name, error)
        try:
            self.database.drop()
        except psycopg2.Error as error:
            LOGGER.error('cannot drop database %s, drop it by hand: %s',
                         self.database.name, error)

    def run(self) -> None:
        events, repeat = self.arguments.events, self.arguments.repeat
        for index in range(1, repeat + 1):
            LOGGER.info('repetition %d of %d, %d events', index, repeat, events)
            self.measure_limits(index)
            self.measure_mikkoo(f'r{index}', events, True, 'mikkoo confirm: true',
                                LIMIT_CONFIRM, JOINED_CONFIRM)
            self.measure_mikkoo(f'r{index}', events, False, 'mikkoo confirm: false',
                                LIMIT_NO_CONFIRM, JOINED_NO_CONFIRM)
        big_batch = self.arguments.big_batch
        if big_batch:
            # RabbitMQ's rate can change as its queue grows, so the big batch
            # has a limit of its own, measured with as many messages.
            limit_name = f'{LIMIT_CONFIRM}, {big_batch:,} messages'
            for index in range(1, repeat + 1):
                LOGGER.info('big batch %d of %d, %d events', index, repeat, big_batch)
                self.measure_publisher(limit_name, big_batch, confirm=True)
                self.measure_mikkoo(f'big{index}', big_batch, True, self._big_label(),
                                    limit_name, big_batch=True)
        self.measure_idle()

    def _big_label(self) -> str:
        return f'mikkoo big batch {self.arguments.big_batch:,}, confirm: true'

    # -- limits --------------------------------------------------------------

    def measure_limits(self, index: int) -> None:
        events = self.arguments.events
        self.measure_publisher(LIMIT_CONFIRM, events, confirm=True)
        self.measure_publisher(LIMIT_NO_CONFIRM, events, confirm=False)
        self.measure_publisher(JOINED_CONFIRM, events, confirm=True, join_writes=True)
        self.measure_publisher(JOINED_NO_CONFIRM, events, confirm=False, join_writes=True)

        queue = f'pgq_drain_{index}'
        self.database.create_queue(queue, PGQ_CONSUMER)
        try:
            self.database.insert_events(queue, events, self.broker.name)
            self.database.tick(queue)
            rate = limits.drain_pgq(self.database, queue, PGQ_CONSUMER, events,
                                    fetch_size=5000, timeout=60 + events / 1000)
        finally:
            self.database.drop_queue(queue)
        self.figures.add(LIMIT_PGQ, 'events/s', rate)
        LOGGER.info('%s: %.0f events/s', LIMIT_PGQ, rate)

    def measure_publisher(self, name: str, events: int, confirm: bool,
                          join_writes: bool = False) -> None:
        rate, cpu = self._undisturbed(
            name, lambda: self._publish(name, events, confirm, join_writes))
        self.figures.add(name, 'events/s', rate)
        self.figures.add(f'{name}, CPU', PER_10K, cpu / events * 10_000)
        LOGGER.info('%s: %.0f events/s', name, rate)

    def _publish(self, name: str, events: int, confirm: bool,
                 join_writes: bool) -> tuple[float, float]:
        """Run the pika publisher once; return its rate and its CPU seconds."""
        self._check_broker_empty()
        cpu_started = time.process_time()
        rate = limits.publish_limit(self.broker.name, events, confirm=confirm,
                                    window=self.arguments.window, join_writes=join_writes)
        cpu = time.process_time() - cpu_started
        self._check_delivered(name, events)
        self.broker.purge()
        return rate, cpu

    def _undisturbed(self, figure_name: str, measure: Callable[[], T]) -> T:
        """Run ``measure`` again while RabbitMQ closes connections during it.

        A broker shared with fault-injection tests may force every connection
        closed, which corrupts a figure. Raises RelayFailed after
        MEASURE_ATTEMPTS disturbed attempts.
        """
        for attempt in range(1, MEASURE_ATTEMPTS + 1):
            reconnects = self.broker.reconnects
            try:
                result = measure()
            except limits.ConnectionLost as error:
                reason = str(error)
            else:
                if self.broker.reconnects == reconnects:
                    return result
                reason = "RabbitMQ closed the benchmark's own connection"
            self._warn(f'{figure_name}: measurement {attempt} of {MEASURE_ATTEMPTS} discarded '
                       f'because {reason}')
            self.broker.purge()
        raise RelayFailed(f'{figure_name}: RabbitMQ closed connections during all '
                          f'{MEASURE_ATTEMPTS} attempts')

    # -- mikkoo --------------------------------------------------------------

    def measure_mikkoo(self, run_id: str, events: int, confirm: bool, label: str,
                       limit_name: str, reference_name: str | None = None,
                       big_batch: bool = False) -> None:
        """Relay a backlog of ``events`` events with mikkoo and record its figures.

        Its rate is compared with the latest value of the figure ``limit_name``,
        and of ``reference_name`` when given.
        """
        queue = f'relay_{run_id}_{"confirm" if confirm else "noconfirm"}'
        insert_seconds, result = self._undisturbed(
            label, lambda: self._relay(queue, events, confirm, label))
        if big_batch:
            self.figures.add(f'{label}, insert', 's', insert_seconds)
        self._record_drain(label, events, result, limit_name, reference_name)

    def _relay(self, queue: str, events: int, confirm: bool,
               label: str) -> tuple[float, DrainResult]:
        """Fill a new PgQ queue and relay it once; return the insert seconds and result."""
        self.database.create_queue(queue, CONSUMER)
        try:
            LOGGER.info('%s: inserting %d events into PgQ queue %s', label, events, queue)
            insert_seconds = self.database.insert_events(queue, events, self.broker.name)
            self.database.tick(queue)
            self._check_broker_empty()
            return insert_seconds, self._run_mikkoo(queue, events, confirm)
        finally:
            self.broker.purge()
            self.database.drop_queue(queue)

    def _run_mikkoo(self, queue: str, events: int, confirm: bool) -> DrainResult:
        config = self.workdir / f'{queue}.yml'
        write_config(config, queue, self.database.url, confirm=confirm)
        mikkoo = MikkooProcess(config, self.workdir / f'{queue}.log')
        try:
            mikkoo.start()
            result = wait_for_drain(mikkoo, self.broker, events, timeout=60 + events / 500)
            extra = self.broker.message_count() - events
        finally:
            with interrupt.shielded():
                status = mikkoo.stop()
        if status != 0:
            self._warn(f'queue {queue}: mikkoo exited with status {status} after '
                       f'SIGTERM (None: it or a leftover worker was killed)\n'
                       f'{mikkoo.log_tail(10)}')
        if len(result.worker_pids) > 1:
            self._warn(f'queue {queue}: mikkoo started {len(result.worker_pids)} '
                       f'workers, so it restarted a failed one')
        if extra > 0:
            self._warn(f'queue {queue}: RabbitMQ contains {extra} messages more than the '
                       f'{events} events (duplicates)')
        return result

    def _record_drain(self, label: str, events: int, result: DrainResult,
                      limit_name: str, reference_name: str | None) -> None:
        rate = events / result.seconds
        self.figures.add(label, 'events/s', rate)
        # The limit was measured just before, so that a busier machine slows
        # both sides of the ratio.
        self.figures.add(f'{label}, of limit', '%', self._percent_of(rate, limit_name))
        if reference_name is not None:
            self.figures.add(f'{label}, of joined-writes reference', '%',
                             self._percent_of(rate, reference_name))
        self.figures.add(f'{label}, CPU', PER_10K, result.cpu_seconds / events * 10_000)
        self.figures.add(f'{label}, worker peak RSS', 'MB',
                         result.worker_peak_rss_bytes / 1e6)
        self.figures.add(f'{label}, first message', 's', result.first_message_seconds)
        LOGGER.info('%s: %.0f events/s, first message after %.2f s', label, rate,
                    result.first_message_seconds)

    def _percent_of(self, rate: float, figure_name: str) -> float:
        """Return ``rate`` in percent of the latest value of ``figure_name``."""
        figure = self.figures.get(figure_name)
        assert figure is not None
        return 100 * rate / figure.values[-1]

    def measure_idle(self) -> None:
        queue = 'relay_idle'
        self.database.create_queue(queue, CONSUMER)
        config = self.workdir / f'{queue}.yml'
        write_config(config, queue, self.database.url, confirm=True, wait_duration=1.0)
        mikkoo = MikkooProcess(config, self.workdir / f'{queue}.log')
        LOGGER.info('idle: %d windows of %g s', self.arguments.repeat,
                    self.arguments.idle_seconds)
        try:
            mikkoo.start()
            windows = measure_idle(mikkoo, self.arguments.repeat,
                                   self.arguments.idle_seconds)
        finally:
            with interrupt.shielded():
                mikkoo.stop()
            self.database.drop_queue(queue)
        for worker, controller in windows:
            self.figures.add('idle mikkoo, worker CPU', '% of a core', worker)
            self.figures.add('idle mikkoo, controller CPU', '% of a core', controller)

    # -- checks --------------------------------------------------------------

    def _check_broker_empty(self) -> None:
        count = self.broker.message_count()
        if count:
            raise RelayFailed(f'RabbitMQ queue {self.broker.name} contains {count} messages '
                              'before a run; expected it empty after the purge')

    def _check_delivered(self, name: str, events: int) -> None:
        count = self.broker.message_count()
        if count != events:
            raise RelayFailed(f'{name}: RabbitMQ queue {self.broker.name} contains {count} '
                              f'messages after publishing {events}')

    def _warn(self, text: str) -> None:
        LOGGER.warning('%s', text)
        self.warnings.append(text)

    # -- report --------------------------------------------------------------

    def targets(self) -> list[report.Target]:
        big = self._big_label()
        return [
            self._rate_target('mikkoo confirm: true, median rate / median limit',
                              'mikkoo confirm: true', LIMIT_CONFIRM, 70),
            self._rate_target('mikkoo confirm: false, median rate / median limit',
                              'mikkoo confirm: false', LIMIT_NO_CONFIRM, 80),
            self._target('worker peak RSS, big batch, median', f'{big}, worker peak RSS',
                         '<=', 100, 'MB'),
            self._target('idle worker CPU, median', 'idle mikkoo, worker CPU', '<', 1,
                         '% of a core'),
        ]

    def comparisons(self) -> dict[str, float | None]:
        """Return mikkoo's median rates in percent of the joined-writes reference's."""
        return {
            'mikkoo confirm: true, median rate / median reference':
                self._percent_of_medians('mikkoo confirm: true', JOINED_CONFIRM),
            'mikkoo confirm: false, median rate / median reference':
                self._percent_of_medians('mikkoo confirm: false', JOINED_NO_CONFIRM),
        }

    def _rate_target(self, description: str, rate_name: str, limit_name: str,
                     threshold: float) -> report.Target:
        value = self._percent_of_medians(rate_name, limit_name)
        return report.Target(description, value, '>=', threshold, '%')

    def _percent_of_medians(self, rate_name: str, limit_name: str) -> float | None:
        # A ratio of medians, because one limit run slowed by other load on
        # the machine skews the ratios of its own repetition.
        rate, limit = self.figures.get(rate_name), self.figures.get(limit_name)
        if rate is None or limit is None:
            return None
        return 100 * rate.median / limit.median

    def _target(self, description: str, figure_name: str, comparison: str,
                threshold: float, unit: str) -> report.Target:
        figure = self.figures.get(figure_name)
        value = None if figure is None else figure.median
        return report.Target(description, value, comparison, threshold, unit)

    def summary(self) -> dict[str, Any]:
        arguments = {key: (str(value) if isinstance(value, Path) else value)
                     for key, value in vars(self.arguments).items()}
        return {
            'arguments': arguments,
            'machine': report.machine(),
            'versions': report.versions(services.postgres_version(), self.pgq_version,
                                        self.broker.server_version),
            'figures': [figure.as_dict() for figure in self.figures.by_name.values()],
            'targets': [target.as_dict() for target in self.targets()],
            'comparisons': self.comparisons(),
            'notes': self.notes(),
            'warnings': self.warnings,
        }

    def notes(self) -> list[str]:
        notes = []
        if self.arguments.quick:
            notes.append('A --quick run relays too few events for its rates to mean '
                         'anything: start-up takes most of each run.')
        if not self.arguments.big_batch:
            notes.append('The big batch was skipped (--big-batch 0), so its RSS target '
                         'is not measured.')
        return notes


def format_report(summary: dict[str, Any], benchmark: Benchmark) -> str:
    arguments = summary['arguments']
    settings = {'events per run': f'{arguments["events"]:,}',
                'repetitions': str(arguments['repeat']),
                'big batch': f'{arguments["big_batch"]:,}' if arguments['big_batch']
                             else 'skipped',
                'limit publisher window': f'{arguments["window"]:,}',
                'body size': f'{services.BODY_SIZE} bytes of JSON'}
    sections = [
        ('machine', report.format_pairs(summary['machine'])),
        ('versions', report.format_pairs(summary['versions'])),
        ('settings', report.format_pairs(settings)),
        ('results', report.format_table(benchmark.figures)),
        ('targets', report.format_targets(benchmark.targets())),
        ('compared with the joined-writes reference (no targets)',
         report.format_pairs({description: _percent(value) for description, value
                              in summary['comparisons'].items()})),
    ]
    if summary['notes']:
        sections.append(('notes', '\n'.join(summary['notes'])))
    if summary['warnings']:
        sections.append(('warnings', '\n'.join(summary['warnings'])))
    return '\n\n'.join(f'{title}\n{text}' for title, text in sections)


def _percent(value: float | None) -> str:
    return 'not measured' if value is None else f'{report.format_number(value)} %'


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    logging.getLogger('pika').setLevel(logging.WARNING)
    # A stop signal raised inside a log call is swallowed by logging, which
    # would print a traceback; interrupt raises the signal again later.
    logging.raiseExceptions = False
    # Unwinding on SIGTERM or Ctrl-C stops mikkoo and drops the database
    # and queue.
    interrupt.install()
    with tempfile.TemporaryDirectory(prefix='mikkoo-benchmark-') as temporary:
        workdir = arguments.log_dir or Path(temporary)
        benchmark = Benchmark(arguments, workdir)
        try:
            benchmark.set_up()
            benchmark.run()
            summary = benchmark.summary()
        except (RelayFailed, limits.PublishFailed, TimeoutError, interrupt.Interrupted,
                psycopg2.Error, pika.exceptions.AMQPError) as error:
            LOGGER.error('benchmark failed: %s: %s', type(error).__name__, error)
            return EXIT_FAILURE
        finally:
            with interrupt.shielded():
                benchmark.clean_up()
                interrupt.uninstall()
    if interrupt.received() is not None:
        # The signal was swallowed where it was raised; the run is still void.
        LOGGER.error('benchmark failed: stopped by %s', interrupt.received())
        return EXIT_FAILURE
    print(format_report(summary, benchmark))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(summary, indent=2) + '\n')
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
