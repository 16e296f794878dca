"""Relay one PgQ queue to RabbitMQ: the loop that runs in each worker process.

Each batch goes: read (PgQ cursor, in chunks) -> map -> publish (pipelined)
-> settle (ack, retry or discard) -> finish. ``pgq.finish_batch`` runs only
after every event of the batch is settled, in the same transaction as the
retries, so a crash at any point replays the batch instead of losing it.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from mikkoo import __version__, sentry
from mikkoo.backoff import Backoff
from mikkoo.config import QueueSettings, Settings
from mikkoo.mapping import Event, EventMapper, InvalidMessage
from mikkoo.pgq import BatchSource, PgQNotInstalled
from mikkoo.publisher import BrokerUnavailable, ExchangeNotFound, Publisher
from mikkoo.stats import Counters, StatsdClient
from mikkoo.tls import TLSConfigError

LOGGER = logging.getLogger(__name__)

# Worker exit statuses, read by the controller.
EXIT_OK = 0             # stopped on request
EXIT_FAILURE = 1        # an unexpected error; the controller restarts it

# Errors that make pika refuse to encode one message; they concern that
# event only.
ENCODING_ERRORS = (ValueError, TypeError, OverflowError, struct.error, UnicodeError)
# Warnings naming single failed events, at most, per batch; the rest is counted.
FAILURE_WARNINGS_PER_BATCH = 10


class StopRequested(Exception):
    """Raised inside a batch to abandon it because the worker must stop."""


class Worker:
    """The relay loop of one queue, given its batch source and its publisher."""

    def __init__(self, settings: QueueSettings, source: BatchSource, publisher: Publisher,
                 counters: Counters, *, poll_interval: float = 60.0,
                 statsd: StatsdClient | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.queue = settings.queue
        self.source = source
        self.publisher = publisher
        self.counters = counters
        self.poll_interval = poll_interval
        self.statsd = statsd
        self.should_stop = should_stop
        self.mapper = EventMapper(settings.queue)
        self.database_backoff = Backoff()
        self.broker_backoff = Backoff()
        self._failures: list[tuple[Event, str]] = []
        self._info_due = 0.0
        self._abandoned_batch: int | None = None

    def run(self) -> None:
        """Relay batches until a stop is requested, then shut down cleanly."""
        LOGGER.info('queue %s: worker started (pid %d)', self.queue, os.getpid())
        while not self.should_stop():
            if not self._connect():
                continue
            try:
                self._process_next_batch()
            except psycopg2.Error as error:
                self._on_database_error(error)
        self._shutdown()

    # -- connecting ----------------------------------------------------------

    def _connect(self) -> bool:
        """Connect whatever is disconnected; on failure wait and return False."""
        if not self.source.is_connected:
            try:
                self.source.connect()
            except (psycopg2.Error, PgQNotInstalled) as error:
                self._wait_to_retry('connect to PostgreSQL', error, self.database_backoff)
                return False
            self.database_backoff.reset()
            LOGGER.info('queue %s: connected to PostgreSQL', self.queue)
        if not self.publisher.is_connected:
            return self._connect_broker()
        return True

    def _connect_broker(self) -> bool:
        try:
            self.publisher.connect()
        except (BrokerUnavailable, TLSConfigError) as error:
            self._wait_to_retry('connect to RabbitMQ', error, self.broker_backoff)
            return False
        self.broker_backoff.reset()
        LOGGER.info('queue %s: connected to RabbitMQ at %s:%s', self.queue,
                    self.settings.rabbitmq.host, self.settings.rabbitmq.port)
        return True

    def _wait_to_retry(self, action: str, error: BaseException, backoff: Backoff) -> None:
        delay = backoff.next_delay()
        LOGGER.warning('queue %s: cannot %s (attempt %d): %s; retrying in %.1f s',
                       self.queue, action, backoff.attempts, _one_line(error), delay)
        self.publisher.sleep(delay)

    def _on_database_error(self, error: psycopg2.Error) -> None:
        # Whatever was in flight belongs to a batch that PgQ will hand out
        # again, so it is dropped here rather than settled twice.
        self.publisher.forget_pending()
        self._failures = []
        if self.source.is_connected and not isinstance(error, (psycopg2.OperationalError,
                                                                psycopg2.InterfaceError)):
            LOGGER.error('queue %s: database error, reconnecting: %s', self.queue,
                         _one_line(error))
            sentry.capture_exception()
        self.source.close()
        self._wait_to_retry('use PostgreSQL', error, self.database_backoff)

    # -- batches -------------------------------------------------------------

    def _process_next_batch(self) -> None:
        batch_id = self.source.next_batch()
        if batch_id is None:
            self._update_consumer_info()
            self.publisher.sleep(self.settings.wait_duration)
            return
        started = time.monotonic()
        try:
            delivered, failed, discarded = self._relay(batch_id)
        except StopRequested:
            self._abandon(batch_id)
            return
        self.source.finish(batch_id)
        self._count_batch(batch_id, delivered, failed, discarded, time.monotonic() - started)
        self._update_consumer_info()

    def _relay(self, batch_id: int) -> tuple[int, int, int]:
        """Publish and settle every event of the batch; return the counts.

        Raises StopRequested when the batch must be left unfinished.
        """
        self.publisher.delivered = 0
        failed = discarded = 0
        for chunk in self.source.events(batch_id):
            for event in chunk:
                self._check_stop()
                self._publish(event)
            retried, dropped = self._settle(batch_id)
            failed, discarded = failed + retried + dropped, discarded + dropped
        self._with_broker(self.publisher.wait_for_confirms)
        retried, dropped = self._settle(batch_id)
        return (self.publisher.delivered, failed + retried + dropped, discarded + dropped)

    def _publish(self, event: Event) -> None:
        try:
            message = self.mapper.map(event)
            self._with_broker(lambda: self.publisher.check_exchange(message.exchange))
            self._with_broker(lambda: self.publisher.publish(message, event))
        except (InvalidMessage, ExchangeNotFound) as error:
            self._failures.append((event, str(error)))
        except ENCODING_ERRORS as error:
            self._failures.append((event, f'cannot encode the message: {error}'))

    def _with_broker(self, action: Callable[[], Any]) -> Any:
        """Run ``action``, reconnecting to RabbitMQ as often as it takes.

        Deliveries in doubt after a lost connection are published again by
        the publisher once it reconnects. Raises StopRequested when a stop
        is requested while RabbitMQ is unreachable.
        """
        while True:
            try:
                return action()
            except BrokerUnavailable as error:
                LOGGER.warning('queue %s: lost the RabbitMQ connection: %s', self.queue,
                               _one_line(error))
            while not self._connect_broker():
                if self.should_stop():
                    raise StopRequested

    def _check_stop(self) -> None:
        # With unregister on, leaving the batch unfinished would lose it when
        # the consumer unregisters, so the batch is finished first.
        if self.should_stop() and not self.settings.unregister:
            raise StopRequested

    def _settle(self, batch_id: int) -> tuple[int, int]:
        """Retry or discard the failed events; return how many of each."""
        failures = self._failures + self.publisher.take_failures()
        self._failures = []
        retries: list[tuple[Event, int | None]] = []
        discarded = 0
        for event, reason in failures:
            attempts = event.retry or 0
            if attempts >= self.settings.max_failures:
                self._discard(event, reason, attempts)
                discarded += 1
            else:
                retries.append((event, attempts + 1))
        self.source.retry(retries, self.settings.retry_delay)
        self._warn_retries(batch_id, failures, retries)
        return len(retries), discarded

    def _discard(self, event: Event, reason: str, attempts: int) -> None:
        LOGGER.warning('queue %s: discarding event %s after %d retries (exchange %r, '
                       'routing key %r): %s', self.queue, event.id, attempts,
                       event.extra1 or '', event.type or '', reason)

    def _warn_retries(self, batch_id: int, failures: list[tuple[Event, str]],
                      retries: list[tuple[Event, int | None]]) -> None:
        reasons = {event.id: reason for event, reason in failures}
        for event, attempt in retries[:FAILURE_WARNINGS_PER_BATCH]:
            LOGGER.warning('queue %s batch %s: event %s failed (exchange %r, routing key '
                           '%r): %s; retry %d in %g s', self.queue, batch_id, event.id,
                           event.extra1 or '', event.type or '', reasons[event.id],
                           attempt, self.settings.retry_delay)
        if len(retries) > FAILURE_WARNINGS_PER_BATCH:
            LOGGER.warning('queue %s batch %s: %d more failed events will be retried',
                           self.queue, batch_id, len(retries) - FAILURE_WARNINGS_PER_BATCH)

    def _abandon(self, batch_id: int) -> None:
        LOGGER.info('queue %s: leaving batch %s unfinished; PgQ hands it out again '
                    'on the next start', self.queue, batch_id)
        self.publisher.forget_pending()
        self._failures = []
        self.source.abandon()
        self._abandoned_batch = batch_id

    # -- statistics ----------------------------------------------------------

    def _count_batch(self, batch_id: int, delivered: int, failed: int, discarded: int,
                     seconds: float) -> None:
        self.counters.add('processed', delivered)
        self.counters.add('failed', failed)
        self.counters.add('discarded', discarded)
        self.counters.add('batches')
        LOGGER.debug('queue %s batch %s: %d published, %d failed, %d discarded in %.3f s',
                     self.queue, batch_id, delivered, failed, discarded, seconds)
        if self.statsd is not None:
            self.statsd.incr(f'{self.queue}.processed', delivered)
            self.statsd.incr(f'{self.queue}.failed', failed)
            self.statsd.incr(f'{self.queue}.discarded', discarded)
            self.statsd.incr(f'{self.queue}.batches')

    def _update_consumer_info(self) -> None:
        now = time.monotonic()
        if now < self._info_due:
            return
        self._info_due = now + self.poll_interval
        info = self.source.consumer_info()
        self.counters.set('pending', info.pending_events)
        self.counters.set('lag_ms', int(info.lag_seconds * 1000))
        if self.statsd is not None:
            self.statsd.gauge(f'{self.queue}.pending', info.pending_events)
            self.statsd.gauge(f'{self.queue}.lag', info.lag_seconds)

    # -- shutdown ------------------------------------------------------------

    def _shutdown(self) -> None:
        # Unregistering drops the consumer's unfinished batch and retries, so
        # it happens only when nothing of the consumer's is left unsettled.
        if self.settings.unregister and self._abandoned_batch is not None:
            LOGGER.warning('queue %s: consumer %s stays registered because batch %s '
                           'is unfinished', self.queue, self.settings.consumer_name,
                           self._abandoned_batch)
        elif self.settings.unregister and self.source.is_connected:
            try:
                self.source.unregister()
            except psycopg2.Error as error:
                LOGGER.error('queue %s: cannot unregister consumer %s: %s', self.queue,
                             self.settings.consumer_name, _one_line(error))
        elif self.settings.unregister:
            LOGGER.warning('queue %s: consumer %s stays registered because PostgreSQL '
                           'is unreachable', self.queue, self.settings.consumer_name)
        self.publisher.close()
        self.source.close()
        LOGGER.info('queue %s: worker stopped', self.queue)


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split()) or type(error).__name__


class _StopFlag:
    """Record SIGTERM; the handler does nothing else."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, _signum: int, _frame: Any) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def main(settings: Settings, queue: str, counters: Counters) -> int:
    """Run the worker of ``queue`` in this (forked) process; return its exit status."""
    multiprocessing.current_process().name = f'worker[{queue}]'
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.handle)
    # The controller owns SIGINT and SIGHUP; it tells workers to stop with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    sentry.init(settings.sentry_dsn, __version__)

    queue_settings = settings.workers[queue]
    source = BatchSource(queue_settings.postgres_url, queue, queue_settings.consumer_name,
                         queue_settings.fetch_size)
    publisher = Publisher(queue_settings.rabbitmq, confirm=queue_settings.confirm,
                          max_unconfirmed=queue_settings.max_unconfirmed,
                          name=f'mikkoo {queue}', wakeup_fd=wakeup_read, should_stop=stop)
    statsd = None
    if settings.statsd.enabled:
        statsd = StatsdClient(settings.statsd.host, settings.statsd.port,
                              settings.statsd.prefix)
    worker = Worker(queue_settings, source, publisher, counters,
                    poll_interval=settings.poll_interval, statsd=statsd, should_stop=stop)
    try:
        worker.run()
    except Exception:
        LOGGER.exception('queue %s: worker failed', queue)
        sentry.capture_exception()
        return EXIT_FAILURE
    return EXIT_OK
