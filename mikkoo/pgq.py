"""Read batches of events from a PgQ queue and settle them.

A batch is read inside one transaction that also records its retries and
finishes it, so a batch is either finished with all its retries or, when
anything fails first, left unfinished and read again in full.
"""
from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.sql

from mikkoo.mapping import Event

LOGGER = logging.getLogger(__name__)

CURSOR_NAME = 'mikkoo_batch'

# ev_time travels as ISO-8601 text in UTC and as whole epoch seconds, which
# are the two forms the message needs; PostgreSQL formats them faster than
# Python parses timestamps.
EVENT_COLUMNS = """
    ev_id,
    to_char(ev_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
    floor(extract(epoch FROM ev_time))::bigint,
    ev_txid, ev_retry, ev_type, ev_data,
    ev_extra1, ev_extra2, ev_extra3, ev_extra4
"""

RETRY_SQL = """
SELECT pgq.event_retry_raw({queue}, {consumer}, now() + make_interval(secs => {delay}),
                           e.id, e.time, e.retry, e.type, e.data,
                           e.extra1, e.extra2, e.extra3, e.extra4)
  FROM (VALUES %s) AS e(id, time, retry, type, data,
                        extra1, extra2, extra3, extra4)
"""
RETRY_TEMPLATE = ('(%s::bigint, %s::timestamptz, %s::integer, %s::text, %s::text, '
                  '%s::text, %s::text, %s::text, %s::text)')

# Target size of one chunk of events. Each FETCH requests as many rows as
# fit at the average size of the previous chunk's, and at most fetch_size.
# The first requests FIRST_FETCH_ROWS at most, because nothing is known yet.
# NOTE: the estimate only looks back. Events that turn large after many
# small ones can still come fetch_size at a time: 2.9 GB peak RSS was
# measured for 1 MB events after 5,020 small ones. The README warns of it.
FETCH_BYTES = 16 * 1024 * 1024
FIRST_FETCH_ROWS = 20
# Bytes counted per row besides its data and metadata texts: the Python
# objects of the row and its other columns (an estimate).
ROW_OVERHEAD_BYTES = 500
DATA_COLUMNS = (6, 9, 10)   # ev_data, ev_extra3, ev_extra4 in EVENT_COLUMNS

# Connection-level failures: the session is gone and must be reopened.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class PgQNotInstalled(Exception):
    """Raised when the database lacks the pgq extension."""


class ConsumerBusy(Exception):
    """Raised when another session already consumes the queue as this consumer."""


# TCP keepalives detect a database host that vanished without closing the
# connection. The statement timeout ends a query blocked for minutes, for
# example by a lock on the queue's tables, and the query is then retried.
KEEPALIVES: dict[str, Any] = {'keepalives': 1, 'keepalives_idle': 30, 'keepalives_interval': 10,
              'keepalives_count': 3}
STATEMENT_TIMEOUT = '5min'


class ConsumerInfo(NamedTuple):
    pending_events: int
    lag_seconds: float          # age of the last tick the consumer has seen
    ticker_lag_seconds: float   # age of the queue's newest tick


class BatchSource:
    """One PostgreSQL session that consumes one PgQ queue as one consumer."""

    def __init__(self, url: str, queue: str, consumer: str, fetch_size: int = 5000) -> None:
        self.url = url
        self.queue = queue
        self.consumer = consumer
        self.fetch_size = fetch_size
        self._connection: psycopg2.extensions.connection | None = None

    @property
    def is_connected(self) -> bool:
        return self._connection is not None and not self._connection.closed

    def connect(self) -> None:
        """Open the session, create the queue if missing and register the consumer.

        Raises PgQNotInstalled, or psycopg2.Error when the database fails.
        """
        self.close()
        self._connection = psycopg2.connect(
            self.url, application_name=f'mikkoo {self.queue}'[:63], **KEEPALIVES)
        with self._connection.cursor() as cursor:
            self._lock_consumer(cursor)
            cursor.execute("SELECT current_setting('statement_timeout')")
            if _scalar(cursor) == '0':
                cursor.execute('SET statement_timeout = %s', (STATEMENT_TIMEOUT,))
            cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'pgq'")
            if cursor.fetchone() is None:
                database = self._connection.info.dbname
                raise PgQNotInstalled(
                    f'the pgq extension is not installed in database {database!r}; '
                    'run CREATE EXTENSION pgq there as a superuser')
            cursor.execute('SELECT pgq.create_queue(%s)', (self.queue,))
            if _scalar(cursor) == 1:
                LOGGER.info('created PgQ queue %s', self.queue)
            cursor.execute('SELECT pgq.register_consumer(%s, %s)',
                           (self.queue, self.consumer))
            if _scalar(cursor) == 1:
                LOGGER.info('registered PgQ consumer %s on queue %s',
                            self.consumer, self.queue)
        self._connection.commit()

    def _lock_consumer(self, cursor: psycopg2.extensions.cursor) -> None:
        """Take a session lock on this queue and consumer, or raise ConsumerBusy.

        Two relays with the same queue and consumer would get the same
        batches and publish every event twice, and one that unregisters
        would drop the other's position.
        """
        cursor.execute("SELECT pg_try_advisory_lock(hashtext('mikkoo'), hashtext(%s))",
                       (f'{self.queue}/{self.consumer}',))
        if not _scalar(cursor):
            raise ConsumerBusy(
                f'another mikkoo already consumes queue {self.queue!r} as consumer '
                f'{self.consumer!r} in this database; stop it or set another '
                'consumer_name')

    def backlog(self) -> int:
        """Return how many events wait for this consumer, retries included."""
        cursor = self._cursor()
        cursor.execute('SELECT coalesce(c.pending_events, 0) + coalesce(q.ev_new, 0) '
                       '  FROM pgq.get_consumer_info(%s, %s) AS c, '
                       '       pgq.get_queue_info(%s) AS q',
                       (self.queue, self.consumer, self.queue))
        row = cursor.fetchone()
        waiting = int(row[0]) if row else 0
        cursor.execute('SELECT count(*) FROM pgq.retry_queue AS r '
                       '  JOIN pgq.subscription AS s ON s.sub_id = r.ev_owner '
                       '  JOIN pgq.consumer AS c ON c.co_id = s.sub_consumer '
                       '  JOIN pgq.queue AS q ON q.queue_id = s.sub_queue '
                       ' WHERE q.queue_name = %s AND c.co_name = %s',
                       (self.queue, self.consumer))
        waiting += int(_scalar(cursor))
        self._commit()
        return waiting

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            connection.close()

    def next_batch(self) -> int | None:
        """Return the id of the next batch, or None when no tick has made one."""
        cursor = self._cursor()
        cursor.execute('SELECT pgq.next_batch(%s, %s)', (self.queue, self.consumer))
        batch_id = _scalar(cursor)
        self._commit()
        return batch_id

    def events(self, batch_id: int) -> Iterator[list[Event]]:
        """Yield the batch's events in chunks of at most ``fetch_size``.

        The events are read through a server-side cursor in a transaction
        that stays open until :meth:`finish` or :meth:`abandon`. The next
        chunk is fetched in a thread while the caller works on the current
        one. psycopg2 serialises the two threads' use of the connection.
        Chunks of large events hold fewer of them (see FETCH_BYTES).
        """
        cursor = self._cursor()
        cursor.execute('SELECT pgq.batch_event_sql(%s)', (batch_id,))
        batch_sql = _scalar(cursor)
        cursor.execute(f'DECLARE {CURSOR_NAME} NO SCROLL CURSOR FOR '
                       f'SELECT {EVENT_COLUMNS} FROM ({batch_sql}) AS batch ORDER BY ev_id')
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix='pgq-fetch') as pool:
            pending = pool.submit(self._fetch, cursor, min(self.fetch_size, FIRST_FETCH_ROWS))
            while True:
                rows = pending.result()
                if not rows:
                    break
                pending = pool.submit(self._fetch, cursor, self._rows_per_fetch(rows))
                yield [Event._make(row) for row in rows]
        cursor.execute(f'CLOSE {CURSOR_NAME}')

    def _fetch(self, cursor: psycopg2.extensions.cursor, rows: int) -> list[tuple[Any, ...]]:
        cursor.execute(f'FETCH {int(rows)} FROM {CURSOR_NAME}')
        return cursor.fetchall()

    def _rows_per_fetch(self, rows: list[tuple[Any, ...]]) -> int:
        """Return how many rows the next FETCH requests, given the last chunk."""
        size = sum(len(value) for column in DATA_COLUMNS for row in rows
                   if (value := row[column]) is not None)
        per_row = size / len(rows) + ROW_OVERHEAD_BYTES
        return max(1, min(self.fetch_size, int(FETCH_BYTES / per_row)))

    def retry(self, events: list[tuple[Event, int | None]], delay: float) -> None:
        """Hand ``events`` back to PgQ after ``delay`` seconds.

        Each event is paired with the retry count it comes back with. The
        retries become visible when :meth:`finish` commits.
        """
        if not events:
            return
        rows = [(event.id, event.time, retry, event.type, event.data, event.extra1,
                 event.extra2, event.extra3, event.extra4) for event, retry in events]
        cursor = self._cursor()
        query = psycopg2.sql.SQL(RETRY_SQL).format(
            queue=psycopg2.sql.Literal(self.queue),
            consumer=psycopg2.sql.Literal(self.consumer),
            delay=psycopg2.sql.Literal(delay)).as_string(cursor)
        # execute_values treats every % as a placeholder; the names may hold one.
        query = query.replace('%', '%%').replace('(VALUES %%s)', '(VALUES %s)')
        psycopg2.extras.execute_values(cursor, query, rows, template=RETRY_TEMPLATE,
                                       page_size=1000)

    def finish(self, batch_id: int) -> None:
        """Finish the batch and commit everything done in its transaction."""
        cursor = self._cursor()
        cursor.execute('SELECT pgq.finish_batch(%s)', (batch_id,))
        self._commit()

    def abandon(self) -> None:
        """Roll back the batch's transaction; PgQ hands out the same batch again."""
        if self.is_connected:
            try:
                self._connection.rollback()  # type: ignore[union-attr]
            except CONNECTION_ERRORS:
                self.close()

    def unregister(self) -> None:
        """Unregister the consumer, which drops its position and its retry events in PgQ."""
        cursor = self._cursor()
        cursor.execute('SELECT pgq.unregister_consumer(%s, %s)', (self.queue, self.consumer))
        self._commit()
        LOGGER.info('unregistered PgQ consumer %s from queue %s', self.consumer, self.queue)

    def consumer_info(self) -> ConsumerInfo:
        """Return how many events wait for the consumer and how old its last tick is."""
        cursor = self._cursor()
        cursor.execute('SELECT c.pending_events, extract(epoch FROM c.lag), '
                       '       extract(epoch FROM q.ticker_lag) '
                       '  FROM pgq.get_consumer_info(%s, %s) AS c, '
                       '       pgq.get_queue_info(%s) AS q',
                       (self.queue, self.consumer, self.queue))
        row = cursor.fetchone()
        self._commit()
        if row is None:
            return ConsumerInfo(0, 0.0, 0.0)
        return ConsumerInfo(int(row[0] or 0), float(row[1] or 0.0), float(row[2] or 0.0))

    def _cursor(self) -> psycopg2.extensions.cursor:
        if self._connection is None or self._connection.closed:
            raise psycopg2.InterfaceError('not connected to PostgreSQL')
        return self._connection.cursor()

    def _commit(self) -> None:
        assert self._connection is not None
        self._connection.commit()


def _scalar(cursor: psycopg2.extensions.cursor) -> Any:
    """Return the single value of a one-row query."""
    row = cursor.fetchone()
    assert row is not None, 'a one-row query returned no row'
    return row[0]
