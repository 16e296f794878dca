"""Measure the rates a relay is compared with: a plain pika publisher and a plain PgQ reader.

:class:`PipelinedPublisher` publishes the same kind of messages mikkoo
sends (same body size, properties and headers, so the same frame sizes) with a window of
unsettled messages, so it sets the rate that one Python process with pika
can reach on this broker. :func:`drain_pgq` reads and finishes batches
with psycopg2 and nothing else, which sets the rate PgQ can hand out events.
"""
from __future__ import annotations

import datetime
import socket
import time
import uuid
from typing import Any

import pika
import pika.channel
import pika.frame

from benchmarks import interrupt
from benchmarks.services import CONTENT_TYPE, Database, event_body, rabbitmq_parameters
from mikkoo.publisher import FLUSH_EVERY, SEND_CHUNK_BYTES, coalesce, send_buffers

PGQ_CURSOR = 'benchmark_batch'
# Seconds between two checks for SIGTERM or Ctrl-C while the publisher runs.
INTERRUPT_CHECK_SECONDS = 0.1
# The pgq_queue header of the limit's messages: as long as the name of a
# PgQ queue mikkoo relays in the benchmark.
PGQ_QUEUE_NAME = 'relay_r1_confirm'


class PublishFailed(Exception):
    """Raised when the broker rejected a message or the run timed out."""


class ConnectionLost(PublishFailed):
    """Raised when the connection could not open or closed before the run ended."""


class PipelinedPublisher:
    """Publish ``count`` messages to ``queue`` over one SelectConnection.

    With ``confirm`` on, at most ``window`` messages wait for their ack, and
    acks with ``multiple`` set settle every tag up to theirs. With it off, a
    Basic.Qos round trip follows every quarter window of messages. At most
    ``window`` messages are sent but not yet proven routed by its reply.
    The run ends when a passive queue declare counts all ``count`` messages
    in the queue. With ``join_writes`` it writes as mikkoo does: the loop
    turns after every ``FLUSH_EVERY`` publishes, and the frames queued
    since the last turn are joined before pika sends them.
    """

    def __init__(self, queue: str, count: int, *, confirm: bool, window: int,
                 timeout: float, join_writes: bool = False) -> None:
        self.queue = queue
        self.count = count
        self.confirm = confirm
        self.window = window
        self.join_writes = join_writes
        self.timeout = timeout
        self.sync_every = max(window // 4, 1)
        self.origin = socket.getfqdn()

        self.published = 0
        self.settled = 0           # acked, or proven to have reached the queue
        self._unacked: set[int] = set()
        self._lowest_unacked = 1   # delivery tags count from 1 on a channel
        self._started = 0.0
        self._finished = 0.0
        self._error: str | None = None
        self._connection_lost = False
        self._connection: pika.SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None

    def run(self) -> float:
        """Connect, publish every message and return the seconds from first publish to last.

        Blocks while the I/O loop runs. Raises ConnectionLost, or
        PublishFailed for a nack or a timeout.
        """
        self._connection = pika.SelectConnection(
            rabbitmq_parameters(), on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed)
        self._connection.ioloop.call_later(self.timeout, self._on_timeout)
        self._connection.ioloop.call_later(INTERRUPT_CHECK_SECONDS, self._check_interrupt)
        with interrupt.deferred():
            self._connection.ioloop.start()
        if self._connection_lost:
            raise ConnectionLost(self._error)
        if self._error is not None:
            raise PublishFailed(self._error)
        return self._finished - self._started

    # -- connection and channel ----------------------------------------------

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        self._error = f'cannot connect to RabbitMQ: {error}'
        self._connection_lost = True
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_closed(self, _connection: Any, reason: BaseException) -> None:
        if self._finished == 0.0 and self._error is None:
            self._error = f'RabbitMQ closed the connection: {reason}'
            self._connection_lost = True
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        if self.confirm:
            channel.confirm_delivery(self._on_confirmation, callback=self._start)
        else:
            self._start(None)

    def _on_timeout(self) -> None:
        if self._finished == 0.0:
            self._stop(f'timed out after {self.timeout:g} s with {self.settled} of '
                       f'{self.count} messages settled')

    def _check_interrupt(self) -> None:
        assert self._connection is not None
        if not interrupt.pending():
            self._connection.ioloop.call_later(INTERRUPT_CHECK_SECONDS,
                                               self._check_interrupt)
        elif self._connection.is_open:
            # _on_closed stops the loop, then interrupt.deferred raises.
            self._stop('interrupted')
        else:
            self._connection.ioloop.stop()

    def _stop(self, error: str | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        assert self._connection is not None
        if self._connection.is_open:
            self._connection.close()

    # -- publishing ----------------------------------------------------------

    def _start(self, _frame: Any) -> None:
        self._started = time.perf_counter()
        self._fill_window()

    def _fill_window(self) -> None:
        assert self._channel is not None and self._connection is not None
        if not self._channel.is_open:
            # The connection is closing, and replies that still arrive
            # must not publish more.
            return
        burst = 0
        while self.published < self.count and self.published - self.settled < self.window:
            if self.join_writes and burst == FLUSH_EVERY:
                # The loop sends what is queued, then calls this again.
                self._connection.ioloop.call_later(0, self._fill_window)
                break
            burst += 1
            self.published += 1
            self._channel.basic_publish('', self.queue, event_body(self.published),
                                        self._properties(self.published))
            if self.confirm:
                self._unacked.add(self.published)
            elif self.published % self.sync_every == 0 or self.published == self.count:
                self._request_sync(self.published)
        buffers = send_buffers(self._connection) if self.join_writes else None
        if buffers is not None:
            coalesce(buffers, SEND_CHUNK_BYTES)

    def _properties(self, number: int) -> pika.BasicProperties:
        # The properties and headers mikkoo sets on a message.
        now = time.time()
        return pika.BasicProperties(
            app_id='mikkoo', correlation_id=str(uuid.uuid4()), timestamp=int(now),
            content_type=CONTENT_TYPE,
            headers={'origin': self.origin, 'sequence': time.time_ns() // 1000,
                     'timestamp': datetime.datetime.fromtimestamp(
                         now, datetime.timezone.utc).isoformat(),
                     'txid': 1_000_000 + number,
                     'pgq_queue': PGQ_QUEUE_NAME, 'pgq_event_id': number})

    def _on_confirmation(self, frame: pika.frame.Method) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._stop(f'the broker rejected message {method.delivery_tag} (nack)')
            return
        if method.multiple:
            for tag in range(self._lowest_unacked, method.delivery_tag + 1):
                self._unacked.discard(tag)
            self._lowest_unacked = method.delivery_tag + 1
        else:
            self._unacked.discard(method.delivery_tag)
        self.settled = self.published - len(self._unacked)
        self._after_settle()

    def _request_sync(self, published: int) -> None:
        # Basic.Qos stays inside the broker's channel process, so its reply
        # proves that every earlier publish has been routed without waiting
        # for the queue process, which a queue declare would do.
        assert self._channel is not None
        self._channel.basic_qos(prefetch_count=0,
                                callback=lambda _frame: self._on_synced(published))

    def _on_synced(self, published: int) -> None:
        self.settled = max(self.settled, published)
        if self.settled == self.count:
            self._count_messages()
        else:
            self._fill_window()

    def _count_messages(self) -> None:
        assert self._channel is not None
        self._channel.queue_declare(self.queue, passive=True,
                                    callback=self._on_message_count)

    def _on_message_count(self, frame: pika.frame.Method) -> None:
        # The queue process may still be enqueueing routed messages.
        if frame.method.message_count < self.count:
            assert self._connection is not None
            self._connection.ioloop.call_later(0.005, self._count_messages)
            return
        self._after_settle()

    def _after_settle(self) -> None:
        if self.settled == self.count:
            self._finished = time.perf_counter()
            self._stop()
        else:
            self._fill_window()


def publish_limit(queue: str, count: int, *, confirm: bool, window: int,
                  join_writes: bool = False) -> float:
    """Return the rate in messages per second of one :class:`PipelinedPublisher` run."""
    publisher = PipelinedPublisher(queue, count, confirm=confirm, window=window,
                                   timeout=60 + count / 500, join_writes=join_writes)
    return count / publisher.run()


def drain_pgq(database: Database, queue: str, consumer: str, count: int,
              fetch_size: int, timeout: float) -> float:
    """Read and finish batches of ``queue`` until ``count`` events are read.

    Returns the rate in events per second, from the first ``pgq.next_batch``
    to the commit of the last ``pgq.finish_batch``. Events are fetched from
    ``pgq.get_batch_cursor`` in chunks of ``fetch_size`` rows and dropped.
    Raises TimeoutError after ``timeout`` seconds.
    """
    connection = database.connect(autocommit=False)
    read = 0
    try:
        started = time.perf_counter()
        deadline = started + timeout
        while read < count:
            if time.perf_counter() > deadline:
                raise TimeoutError(f'PgQ queue {queue}: read {read} of {count} events '
                                   f'in {timeout:g} s')
            read += _drain_one_batch(connection, queue, consumer, fetch_size)
        finished = time.perf_counter()
    finally:
        connection.close()
    return read / (finished - started)


def _drain_one_batch(connection: Any, queue: str, consumer: str, fetch_size: int) -> int:
    """Read and finish the next batch and return its number of events (0 without a batch)."""
    with connection.cursor() as cursor:
        cursor.execute('SELECT pgq.next_batch(%s, %s)', (queue, consumer))
        batch_id = cursor.fetchone()[0]
        if batch_id is None:
            connection.commit()
            time.sleep(0.05)
            return 0
        cursor.execute('SELECT * FROM pgq.get_batch_cursor(%s, %s, %s)',
                       (batch_id, PGQ_CURSOR, fetch_size))
        read = len(cursor.fetchall())
        while True:
            cursor.execute(f'FETCH {int(fetch_size)} FROM {PGQ_CURSOR}')
            rows = cursor.fetchall()
            if not rows:
                break
            read += len(rows)
        cursor.execute(f'CLOSE {PGQ_CURSOR}')
        cursor.execute('SELECT pgq.finish_batch(%s)', (batch_id,))
    connection.commit()
    return read
