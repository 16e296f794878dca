"""Create and clean up the database, PgQ queues and RabbitMQ queue of a benchmark.

Everything runs against the local services only: PostgreSQL with PgQ on
127.0.0.1:5432 (user postgres, trust authentication) and RabbitMQ on
127.0.0.1:5672 (guest/guest).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions
import psycopg2
import psycopg2.extensions
from pika.adapters.blocking_connection import BlockingChannel
from psycopg2 import sql

from benchmarks import interrupt

LOGGER = logging.getLogger(__name__)
T = TypeVar('T')

POSTGRES_HOST = '127.0.0.1'
POSTGRES_PORT = 5432
POSTGRES_USER = 'postgres'
MAINTENANCE_DATABASE = 'postgres'

RABBITMQ_HOST = '127.0.0.1'
RABBITMQ_PORT = 5672
RABBITMQ_USER = 'guest'
RABBITMQ_PASSWORD = 'guest'
# Attempts of one RabbitMQ call, and seconds between them, when the broker
# closes the benchmark's own connection.
RECONNECT_ATTEMPTS = 3
RECONNECT_DELAY = 1.0

CONTENT_TYPE = 'application/json'
BODY_SIZE = 100
# Bodies are JSON objects of exactly BODY_SIZE bytes: the prefix, the event
# number as 8 digits, and a suffix padded to the size.
BODY_PREFIX = '{"id": "'
_SUFFIX_START = '", "kind": "benchmark", "source": "benchmarks.relay", "pad": "'
BODY_SUFFIX = _SUFFIX_START + 'x' * (BODY_SIZE - len(BODY_PREFIX) - 8
                                     - len(_SUFFIX_START) - 2) + '"}'
MAX_EVENTS = 99_999_999

# Inserting in one statement makes the whole set one transaction, so one
# tick puts every event in one batch.
INSERT_EVENTS_SQL = """
SELECT count(pgq.insert_event(%(queue)s, %(routing_key)s,
                              %(prefix)s || lpad(g::text, 8, '0') || %(suffix)s,
                              NULL::text, %(content_type)s, NULL::text, NULL::text))
  FROM generate_series(1, %(count)s) AS g
"""


def event_body(number: int) -> bytes:
    """Return the body of event ``number``, the same bytes the database inserts."""
    return f'{BODY_PREFIX}{number:08d}{BODY_SUFFIX}'.encode()


def unique_suffix() -> str:
    return uuid.uuid4().hex[:8]


class Database:
    """A fresh PostgreSQL database with the pgq extension, dropped by :meth:`drop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = (f'postgresql://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/'
                    f'{name}')
        self.created = False

    def create(self) -> None:
        # Set first: a signal right after CREATE DATABASE returns must still
        # leave the database to drop(), which tolerates a missing one.
        self.created = True
        with _admin_connection() as admin, admin.cursor() as cursor:
            cursor.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(self.name)))
        with self.connect() as connection, connection.cursor() as cursor:
            cursor.execute('CREATE EXTENSION IF NOT EXISTS pgq')

    def connect(self, autocommit: bool = True) -> psycopg2.extensions.connection:
        connection = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT,
                                      user=POSTGRES_USER, dbname=self.name,
                                      connect_timeout=10)
        connection.autocommit = autocommit
        return connection

    def query_one(self, query: str, *arguments: Any) -> Any:
        """Run ``query`` in its own session and return the first column of its row."""
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, arguments)
                return _first_value(cursor)
        finally:
            connection.close()

    def create_queue(self, queue: str, consumer: str) -> None:
        """Create a PgQ queue and register ``consumer`` before any event exists.

        PgQ shows a consumer only the events inserted after it registered.
        """
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute('SELECT pgq.create_queue(%s)', (queue,))
                # Tick on every pgq.ticker(queue) call, not after PgQ's
                # default of 500 events or 3 s of lag.
                cursor.execute("SELECT pgq.set_queue_config(%s, 'ticker_max_lag', '0')",
                               (queue,))
                cursor.execute('SELECT pgq.register_consumer(%s, %s)', (queue, consumer))
        finally:
            connection.close()

    def insert_events(self, queue: str, count: int, routing_key: str) -> float:
        """Insert ``count`` events in one transaction and return the seconds it took."""
        started = time.monotonic()
        connection = self.connect(autocommit=False)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(INSERT_EVENTS_SQL, {
                    'queue': queue, 'routing_key': routing_key, 'count': count,
                    'prefix': BODY_PREFIX, 'suffix': BODY_SUFFIX,
                    'content_type': CONTENT_TYPE})
        finally:
            connection.close()
        return time.monotonic() - started

    def tick(self, queue: str, timeout: float = 30.0) -> None:
        """Make a tick that comes after every committed event of ``queue``.

        A tick is a snapshot, so any tick made after the insert committed
        closes a batch holding every inserted event. pgqd may make it or
        may split off empty batches before it. Raises TimeoutError after
        ``timeout`` seconds without such a tick.
        """
        query = 'SELECT last_tick_id FROM pgq.get_queue_info(%s)'
        committed_before = self.query_one(query, queue)
        deadline = time.monotonic() + timeout
        while True:
            self.query_one('SELECT pgq.ticker(%s)', queue)
            if self.query_one(query, queue) > committed_before:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f'PgQ queue {queue}: no new tick within {timeout:g} s')
            time.sleep(0.1)

    def drop_queue(self, queue: str) -> None:
        """Drop a PgQ queue with its consumers and event tables."""
        self.query_one('SELECT pgq.drop_queue(%s, true)', queue)

    def drop(self) -> None:
        """End the database's sessions (pgqd keeps one open), then drop it."""
        if not self.created:
            return
        with _admin_connection() as admin, admin.cursor() as cursor:
            cursor.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                           'WHERE datname = %s AND pid <> pg_backend_pid()', (self.name,))
            cursor.execute(sql.SQL('DROP DATABASE IF EXISTS {}').format(
                sql.Identifier(self.name)))
        self.created = False


class _AdminConnection:
    """A session on the maintenance database, closed on leaving the block."""

    def __enter__(self) -> psycopg2.extensions.connection:
        self.connection = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT,
                                           user=POSTGRES_USER,
                                           dbname=MAINTENANCE_DATABASE,
                                           connect_timeout=10)
        self.connection.autocommit = True
        return self.connection

    def __exit__(self, *_exc_info: Any) -> None:
        self.connection.close()


def _admin_connection() -> _AdminConnection:
    return _AdminConnection()


def postgres_version() -> str:
    with _admin_connection() as admin, admin.cursor() as cursor:
        cursor.execute('SHOW server_version')
        return str(_first_value(cursor))


def _first_value(cursor: psycopg2.extensions.cursor) -> Any:
    row = cursor.fetchone()
    if row is None:
        raise psycopg2.ProgrammingError(f'no row returned by {cursor.query!r}')
    return row[0]


def rabbitmq_parameters() -> pika.ConnectionParameters:
    # No heartbeats: this connection sits unused while events are inserted,
    # and a BlockingConnection sends heartbeats only inside its calls.
    return pika.ConnectionParameters(
        host=RABBITMQ_HOST, port=RABBITMQ_PORT,
        credentials=pika.PlainCredentials(RABBITMQ_USER, RABBITMQ_PASSWORD),
        heartbeat=0, connection_attempts=1, socket_timeout=10,
        client_properties={'connection_name': 'mikkoo benchmark control'})


class BrokerQueue:
    """The RabbitMQ queue the messages go to, on the default exchange.

    Every call reconnects and declares the queue again when the broker has
    closed the connection or the channel, for example when another client
    forces all connections closed. :attr:`reconnects` counts those events,
    so that a caller can discard a measurement they disturbed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.reconnects = 0
        self._connected_before = False
        self._deleted = False
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def declare(self) -> None:
        """Connect and declare the queue. Raises pika.exceptions.AMQPError."""
        self._run(lambda _channel: None)

    @property
    def server_version(self) -> str:
        self._run(lambda _channel: None)
        assert self._connection is not None
        # BlockingConnection does not expose the server properties, so they
        # are read from the connection object it wraps.
        properties = self._connection._impl.server_properties
        product = properties.get('product', b'')
        version = properties.get('version', b'')
        return f'{_text(product)} {_text(version)}'.strip()

    def message_count(self) -> int:
        """Return how many messages are ready in the queue (a passive declare)."""
        result = self._run(lambda channel: channel.queue_declare(self.name, passive=True))
        return int(result.method.message_count)

    def purge(self) -> None:
        self._run(lambda channel: channel.queue_purge(self.name))

    def delete(self) -> None:
        """Delete the queue and close the connection.

        Does nothing when the queue was never declared or is deleted already.
        """
        if not self._connected_before or self._deleted:
            return
        try:
            self._run(lambda channel: channel.queue_delete(self.name))
            self._deleted = True
        finally:
            self._close()

    def _run(self, operation: Callable[[BlockingChannel], T]) -> T:
        """Run ``operation`` on the channel, reconnecting up to RECONNECT_ATTEMPTS times.

        Raises the last pika.exceptions.AMQPError when every attempt fails.
        """
        for attempt in range(1, RECONNECT_ATTEMPTS + 1):
            try:
                with interrupt.deferred():
                    if self._channel is None or not self._channel.is_open:
                        self._connect()
                    assert self._channel is not None
                    return operation(self._channel)
            except (pika.exceptions.AMQPConnectionError,
                    pika.exceptions.AMQPChannelError) as error:
                self._close()
                if attempt == RECONNECT_ATTEMPTS:
                    raise
                LOGGER.warning('RabbitMQ queue %s: connection or channel closed (%s); '
                               'reconnecting, attempt %d of %d', self.name, error,
                               attempt + 1, RECONNECT_ATTEMPTS)
                time.sleep(RECONNECT_DELAY)
        raise AssertionError('unreachable: the last attempt returns or raises')

    def _connect(self) -> None:
        if self._connected_before:
            self.reconnects += 1
        self._close()
        self._connection = pika.BlockingConnection(rabbitmq_parameters())
        self._connected_before = True
        self._channel = self._connection.channel()
        self._channel.queue_declare(self.name, durable=False, auto_delete=False)

    def _close(self) -> None:
        self._channel = None
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                LOGGER.debug('ignoring an error while closing the connection',
                             exc_info=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
