"""Relay one PgQ queue to RabbitMQ: the loop that runs in each worker process.

Each batch goes: read (PgQ cursor, in chunks) -> map -> publish (pipelined)
-> settle (ack, retry or discard) -> finish. ``pgq.finish_batch`` runs only
after every event of the batch is settled, in the same transaction as the
retries, so a crash at any point replays the batch instead of losing it.
"""
from __future__ import annotations

import dataclasses
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
from mikkoo.mapping import Event, EventMapper, InvalidMessage, Message
from mikkoo.pgq import BatchSource, ConsumerBusy, PgQNotInstalled
from mikkoo.publisher import BrokerUnavailable, ExchangeNotFound, Interrupted, Publisher
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


# Events whose ev_extra3 and ev_extra4 together are longer than this many
# characters get their encoded properties measured against frame_max
# (4,096 bytes at the least), which would cost every event too much.
FRAME_CHECK_THRESHOLD = 2048


@dataclasses.dataclass
class BatchResult:
    """Counts and out-of-retry events of one batch."""

    delivered: int = 0
    failed: int = 0
    retried: int = 0
    discarded: int = 0
    exhausted: list[tuple[Event, str]] = dataclasses.field(default_factory=list)


def dead_letter(event: Event, reason: str, exchange: str, queue: str) -> Message:
    """Return the message that reports ``event`` as undeliverable to ``exchange``.

    The body is the event's data. The headers name where it was meant to go
    and why it failed, so that the event can be inspected and replayed.
    """
    headers = {
        'x-mikkoo-queue': queue,
        'x-mikkoo-event-id': event.id,
        'x-mikkoo-exchange': event.extra1 or '',
        'x-mikkoo-routing-key': event.type or '',
        'x-mikkoo-failures': (event.retry or 0) + 1,
        'x-mikkoo-reason': reason[:1000],
        'x-mikkoo-event-time': event.time,
    }
    properties: dict[str, Any] = {'app_id': 'mikkoo', 'headers': headers,
                                  'delivery_mode': 2, 'timestamp': event.epoch}
    if event.extra2 and len(event.extra2.encode('utf-8')) <= 255:
        properties['content_type'] = event.extra2
    routing_key = event.type or ''
    if len(routing_key.encode('utf-8')) > 255:
        routing_key = ''
    body = event.data.encode('utf-8') if event.data is not None else b''
    return Message(exchange, routing_key, body, properties)


class StopRequested(Exception):
    """Raised inside a batch to abandon it because the worker must stop."""


class Worker:
    """The relay loop of one queue, given its batch source and its publisher."""

    def __init__(self, settings: QueueSettings, source: BatchSource, publisher: Publisher,
                 counters: Counters, *, poll_interval: float = 60.0,
                 statsd: StatsdClient | None = None,
                 should_stop: Callable[[], bool] = lambda: False,
                 keep_registered: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.queue = settings.queue
        self.source = source
        self.publisher = publisher
        self.counters = counters
        self.poll_interval = poll_interval
        self.statsd = statsd
        self.should_stop = should_stop
        self.keep_registered = keep_registered
        # Waits for the broker end early only when the batch may be abandoned.
        publisher.should_interrupt = self.may_abandon
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
            except (psycopg2.Error, PgQNotInstalled, ConsumerBusy) as error:
                self.source.close()
                self._wait_to_retry('start consuming from PostgreSQL', error,
                                    self.database_backoff)
                return False
            LOGGER.info('queue %s: connected to PostgreSQL', self.queue)
        if not self.publisher.is_connected:
            return self._connect_broker()
        return True

    def _connect_broker(self) -> bool:
        try:
            self.publisher.connect()
        except Interrupted:
            return False
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
            # The database backoff ends only with progress: a failure that
            # recurs in every batch must not retry at the first delay forever.
            self.database_backoff.reset()
            self._update_consumer_info()
            self.publisher.sleep(self.settings.wait_duration)
            return
        started = time.monotonic()
        try:
            result = self._relay(batch_id)
        except StopRequested:
            self._abandon(batch_id)
            return
        self.source.finish(batch_id)
        self.database_backoff.reset()
        self._count_batch(batch_id, result, time.monotonic() - started)
        self._update_consumer_info()

    def _relay(self, batch_id: int) -> BatchResult:
        """Publish and settle every event of the batch.

        Raises StopRequested when the batch must be left unfinished.
        """
        result = BatchResult()
        self.publisher.delivered = 0
        for chunk in self.source.events(batch_id):
            # A stop is honoured between chunks (fetch_size events), and
            # waits for the broker within a chunk end early on their own.
            self._check_stop()
            for event in chunk:
                self._publish(event)
            # Settling per chunk keeps only the failures of one chunk in memory.
            self._settle(batch_id, result)
        self._with_broker(self.publisher.wait_for_confirms)
        self._settle(batch_id, result)
        result.delivered = self.publisher.delivered
        self._dispose(batch_id, result)
        return result

    def _publish(self, event: Event) -> None:
        try:
            message = self.mapper.map(event)
            if len(event.extra3 or '') + len(event.extra4 or '') > FRAME_CHECK_THRESHOLD:
                self._with_broker(lambda: self.publisher.check_frame_size(message))
            if message.exchange:
                self._with_broker(lambda: self.publisher.check_exchange(message.exchange))
            try:
                self.publisher.publish(message, event)
            except (BrokerUnavailable, Interrupted):
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
            except Interrupted:
                raise StopRequested from None
            except BrokerUnavailable as error:
                LOGGER.warning('queue %s: lost the RabbitMQ connection: %s', self.queue,
                               _one_line(error))
            while not self._connect_broker():
                if self.should_stop():
                    raise StopRequested

    def _check_stop(self) -> None:
        if self.may_abandon():
            raise StopRequested

    def may_abandon(self) -> bool:
        """Return whether a stop was requested and the batch may be left unfinished.

        A worker that will unregister its consumer finishes the batch
        first, because PgQ drops an unregistered consumer's batch. (The
        consumer stays registered when the batch cannot be finished.)
        """
        return self.should_stop() and (not self.settings.unregister
                                       or self.keep_registered())

    def _settle(self, batch_id: int, result: BatchResult) -> None:
        """Retry the failed events, setting aside those out of retries."""
        failures = self._failures + self.publisher.take_failures()
        self._failures = []
        retries: list[tuple[Event, int | None]] = []
        for event, reason in failures:
            attempts = event.retry or 0
            if attempts >= self.settings.max_failures:
                result.exhausted.append((event, reason))
            else:
                retries.append((event, attempts + 1))
        self.source.retry(retries, self.settings.retry_delay)
        result.failed += len(failures)
        result.retried += len(retries)
        self._warn_retries(batch_id, failures, retries)

    def _dispose(self, batch_id: int, result: BatchResult) -> None:
        """Dead-letter or discard the events that ran out of retries."""
        if not result.exhausted:
            return
        exchange = self.settings.dead_letter_exchange
        if exchange is None:
            for event, reason in result.exhausted:
                self._log_disposal(event, reason, 'discarding')
            result.discarded = len(result.exhausted)
            return

        delivered_before = self.publisher.delivered
        for event, reason in result.exhausted:
            self._publish_dead_letter(event, reason, exchange)
        self._with_broker(self.publisher.wait_for_confirms)
        undelivered = self._failures + self.publisher.take_failures()
        self._failures = []
        result.discarded = self.publisher.delivered - delivered_before

        # An event whose dead letter was refused is retried with its count
        # unchanged, so that the next attempt dead-letters it again.
        lost = {event.id for event, _reason in undelivered}
        for event, reason in result.exhausted:
            if event.id not in lost:
                self._log_disposal(event, reason, f'dead-lettered to {exchange!r}')
        for event, reason in undelivered:
            LOGGER.warning('queue %s batch %s: cannot dead-letter event %s to %r: %s; '
                           'retrying it in %g s', self.queue, batch_id, event.id, exchange,
                           reason, self.settings.retry_delay)
        self.source.retry([(event, event.retry) for event, _reason in undelivered],
                          self.settings.retry_delay)

    def _publish_dead_letter(self, event: Event, reason: str, exchange: str) -> None:
        message = dead_letter(event, reason, exchange, self.queue)
        try:
            self._with_broker(lambda: self.publisher.check_exchange(exchange))
            self._with_broker(lambda: self.publisher.publish(message, event))
        except (InvalidMessage, ExchangeNotFound) as error:
            self._failures.append((event, str(error)))
        except ENCODING_ERRORS as error:
            self._failures.append((event, f'cannot encode the dead letter: {error}'))

    def _log_disposal(self, event: Event, reason: str, action: str) -> None:
        LOGGER.warning('queue %s: %s event %s after %d failed deliveries (exchange %r, '
                       'routing key %r): %s', self.queue, action, event.id,
                       (event.retry or 0) + 1, event.extra1 or '', event.type or '', reason)

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

    def _count_batch(self, batch_id: int, result: BatchResult, seconds: float) -> None:
        counts = {'processed': result.delivered, 'failed': result.failed,
                  'discarded': result.discarded, 'batches': 1}
        for name, amount in counts.items():
            self.counters.add(name, amount)
            if self.statsd is not None:
                self.statsd.incr(f'{self.queue}.{name}', amount)
        LOGGER.debug('queue %s batch %s: %d published, %d failed, %d retried, '
                     '%d out of retries in %.3f s', self.queue, batch_id, result.delivered,
                     result.failed, result.retried, len(result.exhausted), seconds)

    def _unregister(self) -> None:
        """Unregister the consumer unless that would drop events.

        PgQ drops an unregistered consumer's unfinished batch, its retries and
        its pending events, so the consumer stays registered, with a warning,
        while any of them exist or cannot be counted.
        """
        consumer = self.settings.consumer_name
        if self._abandoned_batch is not None:
            reason = f'batch {self._abandoned_batch} is unfinished'
        elif not self.source.is_connected:
            reason = 'PostgreSQL is unreachable'
        else:
            try:
                backlog = self.source.backlog()
                if backlog == 0:
                    self.source.unregister()
                    return
                reason = f'{backlog} events still wait for it'
            except psycopg2.Error as error:
                reason = f'PostgreSQL failed: {_one_line(error)}'
        LOGGER.warning('queue %s: consumer %s stays registered because %s; unregistering '
                       'now would lose them', self.queue, consumer, reason)

    def _update_consumer_info(self) -> None:
        now = time.monotonic()
        if now < self._info_due:
            return
        self._info_due = now + self.poll_interval
        info = self.source.consumer_info()
        self.counters.set('pending', info.pending_events)
        self.counters.set('lag_ms', int(info.lag_seconds * 1000))
        if info.ticker_lag_seconds > self.settings.ticker_warning:
            LOGGER.warning('queue %s: no new tick for %.0f s; events wait until the '
                           'ticker runs: is pgqd running for this database?',
                           self.queue, info.ticker_lag_seconds)
        if self.statsd is not None:
            self.statsd.gauge(f'{self.queue}.pending', info.pending_events)
            self.statsd.gauge(f'{self.queue}.lag', info.lag_seconds)

    # -- shutdown ------------------------------------------------------------

    def _shutdown(self) -> None:
        if self.settings.unregister and not self.keep_registered():
            self._unregister()
        self.publisher.close()
        self.source.close()
        LOGGER.info('queue %s: worker stopped', self.queue)


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split()) or type(error).__name__


class _StopFlag:
    """Record the stop signals; the handlers do nothing else.

    SIGTERM stops the worker. SIGUSR1 stops it for a restart, which keeps
    the consumer registered whatever ``unregister`` is set to, and so does
    the death of the controller.
    """

    # Seconds between checks that the controller is still alive.
    PARENT_CHECK_INTERVAL = 1.0

    def __init__(self) -> None:
        self.requested = False
        self.restart = False
        self.controller = os.getppid()
        self._next_parent_check = 0.0

    def handle_stop(self, _signum: int, _frame: Any) -> None:
        self.requested = True

    def handle_restart(self, _signum: int, _frame: Any) -> None:
        self.requested = self.restart = True

    def __call__(self) -> bool:
        if self.requested:
            return True
        now = time.monotonic()
        if now >= self._next_parent_check:
            self._next_parent_check = now + self.PARENT_CHECK_INTERVAL
            if os.getppid() != self.controller:
                LOGGER.error('the controller (pid %d) is gone; stopping', self.controller)
                self.requested = self.restart = True
        return self.requested

    def keep_registered(self) -> bool:
        return self.restart


def main(settings: Settings, queue: str, counters: Counters) -> int:
    """Run the worker of ``queue`` in this (forked) process; return its exit status."""
    multiprocessing.current_process().name = f'worker[{queue}]'
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.handle_stop)
    signal.signal(signal.SIGUSR1, stop.handle_restart)
    # The controller handles SIGINT and SIGHUP and stops workers with SIGTERM.
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
                    poll_interval=settings.poll_interval, statsd=statsd, should_stop=stop,
                    keep_registered=stop.keep_registered)
    try:
        worker.run()
    except Exception:
        LOGGER.exception('queue %s: worker failed', queue)
        sentry.capture_exception()
        return EXIT_FAILURE
    return EXIT_OK
