"""Fixtures and helpers for the end-to-end tests of the mikkoo relay.

The tests run the real ``mikkoo`` command against the local PostgreSQL with
PgQ and the local RabbitMQ that ``scripts/setup`` starts. They fail, never
skip, when either service is unreachable, so that CI cannot pass without
them. The only skip is for a server that lacks the pgq extension entirely.

Building blocks, meant to be reused by further tests:

* ``pg_database`` / ``module_pg_database``: the URL of a fresh database
  with the pgq extension, dropped afterwards.
* :func:`sql`, :func:`tick`, :func:`insert_event`, :func:`insert_events`,
  :func:`retry_events`, :func:`consumer_registered`, :func:`wait_until`.
* ``amqp``: an :class:`AMQPHelper` that declares uniquely named queues and
  exchanges (deleted afterwards) and reads messages back.
* ``run_mikkoo``: start ``mikkoo -c FILE -f`` with a configuration dict
  (see :func:`mikkoo_config` and :func:`queue_config`); every process it
  starts is killed with its whole process group at teardown.

Environment: MIKKOO_TEST_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/postgres, the maintenance database)
and MIKKOO_TEST_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/%2F).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import pika.spec
import psycopg2
import psycopg2.extensions
import pytest
import yaml
from psycopg2 import sql as pgsql

ROOT = Path(__file__).resolve().parents[2]

POSTGRES_URL = os.environ.get('MIKKOO_TEST_POSTGRES_URL',
                              'postgresql://postgres@127.0.0.1:5432/postgres')
RABBITMQ_URL = os.environ.get('MIKKOO_TEST_RABBITMQ_URL',
                              'amqp://guest:guest@127.0.0.1:5672/%2F')

CONSUMER = 'mikkoo'
# Seconds to wait for anything the relay does (start, register, relay, stop).
TIMEOUT = 15.0
# Seconds between two checks while polling.
POLL = 0.05


# -- generic ----------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT,
               interval: float = POLL, message: str | Callable[[], str] = '') -> Any:
    """Return the first true value of ``predicate()``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            pytest.fail(f'timed out after {timeout:g} s waiting: {text}')
        time.sleep(interval)


def unique_name(prefix: str = 'mikkoo_it') -> str:
    return f'{prefix}_{uuid.uuid4().hex[:12]}'


# -- PostgreSQL --------------------------------------------------------------

def database_url(name: str, base: str = POSTGRES_URL) -> str:
    """Return ``base`` with its database replaced by ``name``."""
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path=f'/{name}'))


@contextlib.contextmanager
def connect(url: str, autocommit: bool = True) -> Iterator[psycopg2.extensions.connection]:
    connection = psycopg2.connect(url, connect_timeout=5)
    connection.autocommit = autocommit
    try:
        yield connection
    finally:
        connection.close()


def sql(url: str, query: str | pgsql.Composable,
        params: tuple[Any, ...] | dict[str, Any] | None = None) -> list[tuple[Any, ...]] | None:
    """Run one statement in its own autocommitted session.

    Returns every row, or None for a statement that returns no rows.
    """
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(query, params)
        return cursor.fetchall() if cursor.description is not None else None


def sql_value(url: str, query: str, params: tuple[Any, ...] | None = None) -> Any:
    """Run a query that returns one row and return its first column."""
    rows = sql(url, query, params)
    assert rows, f'no row returned by {query}'
    return rows[0][0]


def tick(url: str, queue: str) -> int:
    """Make a tick on ``queue`` now and return its id.

    pgq.ticker(queue) ticks only when enough events or seconds have gone by
    since the last tick, or (for retried events, which do not count as new)
    when the queue has been idle long enough; pgq.force_tick makes the
    queue look busy so that the next pgq.ticker call ticks.
    """
    with connect(url) as connection, connection.cursor() as cursor:
        for _ in range(3):
            cursor.execute('SELECT pgq.ticker(%s)', (queue,))
            row = cursor.fetchone()
            tick_id = row[0] if row else None
            if tick_id is not None:
                return int(tick_id)
            cursor.execute('SELECT pgq.force_tick(%s)', (queue,))
    raise AssertionError(f'pgq.ticker made no tick on queue {queue}')


def retry_events(url: str, queue: str) -> int:
    """Move every due retried event back into its queue, then tick.

    Returns how many events were moved (by this call; pgqd may move some).
    """
    moved = 0
    while True:
        count = sql_value(url, 'SELECT pgq.maint_retry_events()')
        moved += count
        if not count:
            break
    tick(url, queue)
    return moved


class InsertedEvent(NamedTuple):
    id: int
    txid: int                  # txid_current() of the inserting transaction
    time: datetime.datetime    # now() of the inserting transaction: ev_time


INSERT_SQL = ('SELECT pgq.insert_event(%s, %s, %s, %s, %s, %s, %s), '
              'txid_current(), now()')


def insert_event(url: str, queue: str, ev_type: str | None, data: str | None = None,
                 extra1: str | None = None, extra2: str | None = None,
                 extra3: str | None = None, extra4: str | None = None) -> InsertedEvent:
    """Insert one event in its own transaction; return its id, txid and time."""
    return insert_events(url, queue, [dict(ev_type=ev_type, data=data, extra1=extra1,
                                           extra2=extra2, extra3=extra3,
                                           extra4=extra4)])[0]


def insert_events(url: str, queue: str, events: list[dict[str, Any]]) -> list[InsertedEvent]:
    """Insert events in one transaction, so that they land in the same batch.

    Each event is a dict with the keyword arguments of :func:`insert_event`.
    """
    inserted = []
    with connect(url, autocommit=False) as connection:
        with connection, connection.cursor() as cursor:
            for event in events:
                values = {'ev_type': None, 'data': None, 'extra1': None, 'extra2': None,
                          'extra3': None, 'extra4': None, **event}
                cursor.execute(INSERT_SQL, (
                    queue, values['ev_type'], values['data'], values['extra1'],
                    values['extra2'], values['extra3'], values['extra4']))
                row = cursor.fetchone()
                assert row is not None
                event_id, txid, now = row
                inserted.append(InsertedEvent(int(event_id), int(txid), now))
    return inserted


def consumer_registered(url: str, queue: str, consumer: str = CONSUMER) -> bool:
    """Tell whether ``consumer`` is registered on ``queue``.

    False also while the queue does not exist yet.
    """
    try:
        count = sql_value(url, 'SELECT count(*) FROM pgq.get_consumer_info(%s, %s)',
                          (queue, consumer))
    except psycopg2.Error as error:
        if 'no such queue' in str(error).lower() or 'not found' in str(error).lower():
            return False
        raise
    return count > 0


def retry_queue_ids(url: str, queue: str) -> list[int]:
    """Return the ids of ``queue``'s events waiting in PgQ's retry queue."""
    rows = sql(url, 'SELECT r.ev_id FROM pgq.retry_queue AS r JOIN pgq.queue AS q'
                    ' ON q.queue_id = r.ev_queue WHERE q.queue_name = %s'
                    ' ORDER BY r.ev_id', (queue,))
    return [int(row[0]) for row in rows or []]


def pgq_available() -> bool:
    """Tell whether the server can CREATE EXTENSION pgq; fails if it is down."""
    value = sql_value(POSTGRES_URL,
                      "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgq'")
    return value > 0


def drop_database(name: str) -> None:
    with connect(POSTGRES_URL) as connection, connection.cursor() as cursor:
        # pgqd and mikkoo workers may hold sessions; neither may block the drop.
        cursor.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity'
                       ' WHERE datname = %s AND pid <> pg_backend_pid()', (name,))
        cursor.execute(pgsql.SQL('DROP DATABASE IF EXISTS {} WITH (FORCE)').format(
            pgsql.Identifier(name)))


@contextlib.contextmanager
def pgq_database() -> Iterator[str]:
    """Create a database with the pgq extension, yield its URL, drop it."""
    if not pgq_available():
        pytest.skip('the pgq extension is not available on the PostgreSQL server at '
                    f'{POSTGRES_URL}; run scripts/setup to install PgQ')
    name = unique_name('mikkoo_it')
    with connect(POSTGRES_URL) as connection, connection.cursor() as cursor:
        cursor.execute(pgsql.SQL('CREATE DATABASE {}').format(pgsql.Identifier(name)))
    try:
        url = database_url(name)
        sql(url, 'CREATE EXTENSION pgq')
        yield url
    finally:
        drop_database(name)


@pytest.fixture()
def pg_database() -> Iterator[str]:
    """URL of a new database with the pgq extension, dropped after the test."""
    with pgq_database() as url:
        yield url


@pytest.fixture(scope='module')
def module_pg_database() -> Iterator[str]:
    """Like ``pg_database``, shared by the tests of one module."""
    with pgq_database() as url:
        yield url


# -- RabbitMQ ----------------------------------------------------------------

@dataclasses.dataclass
class Received:
    """One message read back with basic_get."""

    method: pika.spec.Basic.GetOk
    properties: pika.spec.BasicProperties
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


class AMQPHelper:
    """A blocking connection to declare, fill, inspect and delete test objects.

    Every operation reconnects once when the broker closed the connection
    (as fault-injection tests may make it do).
    """

    CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError,
                         pika.exceptions.ConnectionWrongStateError)

    def __init__(self, url: str = RABBITMQ_URL) -> None:
        self.url = url
        self.connection = self._connect()
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def _connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    @property
    def channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        """A confirming channel, reopened when the broker closed the last one."""
        if not self.connection.is_open:
            self.connection = self._connect()
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self.connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _call(self, action: Callable[[pika.adapters.blocking_connection.BlockingChannel],
                                     Any]) -> Any:
        try:
            return action(self.channel)
        except self.CONNECTION_ERRORS:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = self._connect()
            self._channel = None
            return action(self.channel)

    def declare_queue(self, name: str | None = None,
                      arguments: dict[str, Any] | None = None) -> str:
        """Declare a queue (named uniquely unless ``name``); deleted at close."""
        name = name or unique_name('mikkoo_it_q')
        self._call(lambda channel: channel.queue_declare(
            name, durable=False, auto_delete=False, arguments=arguments))
        self.queues.append(name)
        return name

    def declare_exchange(self, exchange_type: str = 'topic', name: str | None = None) -> str:
        """Declare an exchange (named uniquely unless ``name``); deleted at close."""
        name = name or unique_name(f'mikkoo_it_{exchange_type}')
        self._call(lambda channel: channel.exchange_declare(
            name, exchange_type=exchange_type, durable=False, auto_delete=False))
        self.exchanges.append(name)
        return name

    def bind(self, queue: str, exchange: str, routing_key: str = '',
             arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda channel: channel.queue_bind(queue, exchange,
                                                      routing_key=routing_key,
                                                      arguments=arguments))

    def publish(self, exchange: str, routing_key: str, body: bytes = b'',
                properties: pika.BasicProperties | None = None) -> None:
        """Publish with a confirmation; pika raises when the broker refuses."""
        self._call(lambda channel: channel.basic_publish(
            exchange, routing_key, body, properties, mandatory=True))

    def purge(self, queue: str) -> int:
        return self._call(lambda channel: channel.queue_purge(queue).method.message_count)

    def message_count(self, queue: str) -> int:
        return self._call(lambda channel: channel.queue_declare(
            queue, passive=True).method.message_count)

    def exchange_exists(self, name: str) -> bool:
        try:
            self._call(lambda channel: channel.exchange_declare(name, passive=True))
        except pika.exceptions.ChannelClosedByBroker:
            return False
        return True

    def get_messages(self, queue: str, count: int = 1,
                     timeout: float = TIMEOUT) -> list[Received]:
        """Poll basic_get until ``count`` messages arrived or ``timeout`` passed.

        Returns what arrived, possibly fewer (or more, if more were there).
        """
        messages: list[Received] = []
        deadline = time.monotonic() + timeout
        while True:
            method, properties, body = self._call(
                lambda channel: channel.basic_get(queue, auto_ack=True))
            if method is not None:
                messages.append(Received(method, properties, body))
                continue
            if len(messages) >= count or time.monotonic() >= deadline:
                return messages
            time.sleep(POLL)

    def expect_no_message(self, queue: str, wait: float = 1.0) -> list[Received]:
        """Return whatever arrives on ``queue`` within ``wait`` seconds."""
        return self.get_messages(queue, count=10 ** 9, timeout=wait)

    def close(self) -> None:
        try:
            for queue in self.queues:
                self._call(lambda channel: channel.queue_delete(queue))
            for exchange in self.exchanges:
                self._call(lambda channel: channel.exchange_delete(exchange))
        finally:
            if self.connection.is_open:
                self.connection.close()


@pytest.fixture()
def amqp() -> Iterator[AMQPHelper]:
    """An :class:`AMQPHelper`; what it declared is deleted after the test."""
    helper = AMQPHelper()
    try:
        yield helper
    finally:
        helper.close()


# -- the mikkoo process ------------------------------------------------------

def rabbitmq_settings(url: str = RABBITMQ_URL) -> dict[str, Any]:
    """The ``rabbitmq`` section of a worker for the test broker."""
    parts = urllib.parse.urlsplit(url)
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else '/'
    return {'host': parts.hostname or '127.0.0.1', 'port': parts.port or 5672,
            'vhost': vhost, 'username': urllib.parse.unquote(parts.username or 'guest'),
            'password': urllib.parse.unquote(parts.password or 'guest')}


def queue_config(postgres_url: str, **options: Any) -> dict[str, Any]:
    """The options of one worker, with timings small enough for tests."""
    return {'postgres_url': postgres_url, 'rabbitmq': rabbitmq_settings(),
            'wait_duration': 0.1, 'retry_delay': 1, **options}


def mikkoo_config(workers: dict[str, dict[str, Any]], **application: Any) -> dict[str, Any]:
    """A whole configuration file: ``workers`` maps queue names to options."""
    return {'Application': {'poll_interval': 1, 'shutdown_timeout': 10,
                            **application, 'workers': workers}}


def find_mikkoo() -> str:
    """The mikkoo console script next to this interpreter, else on PATH."""
    beside_python = Path(sys.executable).parent / 'mikkoo'
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which('mikkoo')
    assert on_path, "the mikkoo command is not installed; run pip install -e '.[test]'"
    return on_path


def child_pids(pid: int) -> list[int]:
    """The pids of the live processes whose parent is ``pid``, from /proc."""
    children = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: split after it.
        fields = text.rsplit(')', 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != 'Z':
            children.append(int(stat.parent.name))
    return sorted(children)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != 'Z'


class MikkooProcess:
    """One ``mikkoo -c FILE -f`` run in a session (process group) of its own."""

    def __init__(self, config: dict[str, Any] | str, directory: Path,
                 name: str = 'mikkoo') -> None:
        self.config_path = directory / f'{name}.yml'
        self.log_path = directory / f'{name}.log'
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)
        self.command = [find_mikkoo(), '-c', str(self.config_path), '-f']
        with open(self.log_path, 'ab') as log:
            self.process = subprocess.Popen(
                self.command, cwd=directory, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors='replace')

    def log_lines(self, pattern: str) -> list[str]:
        """The log lines that match the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return [line for line in self.log().splitlines() if regex.search(line)]

    def send(self, signum: int) -> None:
        """Send ``signum`` to the controller only."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the controller to exit; return its status.

        Raises subprocess.TimeoutExpired when it is still running.
        """
        return self.process.wait(timeout)

    def worker_pids(self) -> list[int]:
        return child_pids(self.pid)

    def describe(self, lines: int = 60) -> str:
        tail = '\n'.join(self.log().splitlines()[-lines:])
        return (f'mikkoo (pid {self.pid}, status {self.returncode}) log '
                f'{self.log_path}, last lines:\n{tail}')

    def wait_for_log(self, pattern: str, timeout: float = TIMEOUT,
                     count: int = 1) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return those lines.

        Fails early when mikkoo exits first.
        """
        def found() -> list[str] | None:
            lines = self.log_lines(pattern)
            if len(lines) >= count:
                return lines
            if self.returncode is not None:
                # Read once more: the last lines may have come with the exit.
                lines = self.log_lines(pattern)
                if len(lines) >= count:
                    return lines
                pytest.fail(f'mikkoo exited before logging {pattern!r}\n'
                            f'{self.describe()}')
            return None

        return wait_until(found, timeout, message=lambda: (
            f'{count} log lines matching {pattern!r}\n{self.describe()}'))

    def wait_registered(self, url: str, queue: str, consumer: str = CONSUMER,
                        timeout: float = TIMEOUT) -> None:
        """Wait until the relay has created ``queue`` and registered on it."""
        def registered() -> bool:
            if self.returncode is not None:
                pytest.fail(f'mikkoo exited before registering on {queue}\n'
                            f'{self.describe()}')
            return consumer_registered(url, queue, consumer)

        wait_until(registered, timeout, message=lambda: (
            f'consumer {consumer} on queue {queue}\n{self.describe()}'))

    def kill(self) -> None:
        """SIGKILL the whole process group (workers too) and reap the controller."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(TIMEOUT)

    def __enter__(self) -> MikkooProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()


class MikkooRunner:
    """Start mikkoo processes and kill every one of them at :meth:`close`."""

    def __init__(self, directory_factory: Callable[[], Path]) -> None:
        self.directory_factory = directory_factory
        self.processes: list[MikkooProcess] = []

    def __call__(self, config: dict[str, Any] | str) -> MikkooProcess:
        name = f'mikkoo{len(self.processes) + 1}'
        process = MikkooProcess(config, self.directory_factory(), name)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            # pytest shows this only when the test failed.
            print(f'----- {process.describe(lines=200)}')


@pytest.fixture()
def run_mikkoo(tmp_path: Path) -> Iterator[MikkooRunner]:
    """``run_mikkoo(config)`` starts mikkoo and returns a :class:`MikkooProcess`.

    The process can also be used as a context manager; in any case its
    process group is killed at teardown.
    """
    runner = MikkooRunner(lambda: tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope='module')
def module_run_mikkoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MikkooRunner]:
    """Like ``run_mikkoo``, for a relay shared by the tests of one module."""
    directory = tmp_path_factory.mktemp('mikkoo')
    runner = MikkooRunner(lambda: directory)
    try:
        yield runner
    finally:
        runner.close()
