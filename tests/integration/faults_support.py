"""Helpers for the fault-injection tests: numbered events, counting, faults.

Every fault test sends events whose body is ``{"id": N}``, reads every
message back after the fault, and counts each id: an id never read is a
lost event, an id read twice is a duplicate. A summary line per scenario
goes to the JSON-lines file named by MIKKOO_FAULT_REPORT, when it is set.

The fault injectors act only on the relay under test (its AMQP connection,
its PostgreSQL session, its processes) unless their name says otherwise.
The ones that stop or reconfigure a whole service are for tests marked
``disruptive``, which restore the service before they end.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2

from tests.integration.conftest import (
    POLL, RABBITMQ_URL, ROOT, AMQPHelper, MikkooProcess, connect, retry_events, sql,
    wait_until)

# Seconds a rabbitmqctl, pg_ctlcluster or scripts/setup call may take.
COMMAND_TIMEOUT = 120.0
# Seconds RabbitMQ or PostgreSQL get to accept connections after a restart.
SERVICE_TIMEOUT = 90.0
PGQD_PIDFILE = Path('/tmp/mikkoo-pgqd/pgqd.pid')
PG_CLUSTER = ('15', 'main')


# -- numbered events ---------------------------------------------------------

# The exchanges argument maps some ids to an exchange of their own.
NUMBERED_SQL = """
SELECT count(pgq.insert_event(%(queue)s, %(routing_key)s,
                              json_build_object('id', n)::text,
                              coalesce(%(exchanges)s::jsonb ->> n::text, %(exchange)s),
                              NULL, %(extra3)s, NULL))
  FROM generate_series(%(first)s, %(last)s) AS n
"""


def insert_numbered(url: str, pgq_queue: str, routing_key: str, first: int, count: int,
                    exchange: str | None = None, extra3: str | None = None,
                    exchanges: dict[int, str] | None = None) -> range:
    """Insert ``count`` events with bodies {"id": first} onwards in one transaction.

    The events go to ``exchange`` (None: the default exchange), except the
    ids that ``exchanges`` maps to another one. Returns the ids.
    """
    ids = range(first, first + count)
    with connect(url, autocommit=False) as connection:
        with connection, connection.cursor() as cursor:
            cursor.execute(NUMBERED_SQL, {
                'queue': pgq_queue, 'routing_key': routing_key, 'exchange': exchange,
                'exchanges': json.dumps({str(key): value
                                         for key, value in (exchanges or {}).items()}),
                'extra3': extra3, 'first': ids.start, 'last': ids.stop - 1})
            row = cursor.fetchone()
    assert row is not None and row[0] == count
    return ids


@dataclasses.dataclass
class Tally:
    """How often each numbered event arrived, and what its messages carried."""

    scenario: str
    pgq_queue: str
    expected: set[int]
    counts: collections.Counter[int] = dataclasses.field(
        default_factory=collections.Counter)
    # Body id -> the pgq_event_id headers of its messages.
    event_ids: dict[int, set[Any]] = dataclasses.field(default_factory=dict)
    # Messages without the pgq_queue and pgq_event_id headers of this queue.
    unmarked: int = 0

    def add(self, body: bytes, headers: dict[str, Any]) -> None:
        number = json.loads(body)['id']
        self.counts[number] += 1
        self.event_ids.setdefault(number, set()).add(headers.get('pgq_event_id'))
        if headers.get('pgq_queue') != self.pgq_queue \
                or not isinstance(headers.get('pgq_event_id'), int):
            self.unmarked += 1

    @property
    def complete(self) -> bool:
        return self.expected <= self.counts.keys()

    @property
    def received(self) -> int:
        return sum(self.counts.values())

    @property
    def lost(self) -> list[int]:
        return sorted(self.expected - self.counts.keys())

    @property
    def duplicated(self) -> int:
        return sum(count - 1 for count in self.counts.values())

    @property
    def unexpected(self) -> list[int]:
        return sorted(self.counts.keys() - self.expected)

    @property
    def inconsistent(self) -> list[int]:
        """Ids whose messages carry more than one PgQ event id."""
        return sorted(number for number, ids in self.event_ids.items() if len(ids) > 1)

    def summary(self) -> dict[str, Any]:
        return {'scenario': self.scenario, 'sent': len(self.expected),
                'received': self.received, 'lost': len(self.lost),
                'duplicated': self.duplicated}


def record(tally: Tally) -> None:
    """Print the scenario's numbers and append them to $MIKKOO_FAULT_REPORT."""
    summary = tally.summary()
    print('fault scenario: ' + ', '.join(f'{key} {value}' for key, value in summary.items()))
    path = os.environ.get('MIKKOO_FAULT_REPORT')
    if path:
        with open(path, 'a', encoding='utf-8') as report:
            report.write(json.dumps(summary) + '\n')


def assert_all_arrived(tally: Tally) -> None:
    """Record the numbers, then check that every event arrived and nothing else."""
    record(tally)
    assert tally.lost == [], f'{len(tally.lost)} events lost, first ids {tally.lost[:20]}'
    assert tally.unexpected == []
    assert tally.unmarked == 0, 'messages without pgq_queue and pgq_event_id headers'
    assert tally.inconsistent == [], 'one body id arrived with several pgq_event_id'


def collect(queue: str, tally: Tally, timeout: float, linger: float = 1.0,
            url: str = RABBITMQ_URL) -> Tally:
    """Consume ``queue`` into ``tally`` until every expected id arrived.

    Then keeps reading for ``linger`` seconds so that late duplicates are
    counted too. Stops at ``timeout`` seconds even when ids are missing;
    the caller's asserts report them. Reconnects when the broker closes
    the connection.
    """
    deadline = time.monotonic() + timeout
    complete_at: float | None = None
    while time.monotonic() < deadline:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPConnectionError:
            time.sleep(0.5)
            continue
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=2000)
            for method, properties, body in channel.consume(
                    queue, auto_ack=True, inactivity_timeout=0.2):
                if method is not None:
                    tally.add(body, properties.headers or {})
                now = time.monotonic()
                if complete_at is None and tally.complete:
                    complete_at = now
                if complete_at is not None and now - complete_at >= linger:
                    return tally
                if now >= deadline:
                    return tally
        except (pika.exceptions.AMQPConnectionError,
                pika.exceptions.ChannelClosedByBroker):
            time.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                connection.close()
    return tally


def declare_durable_queue(amqp: AMQPHelper, arguments: dict[str, Any] | None = None) -> str:
    """Declare a durable queue that survives a broker restart; deleted at teardown."""
    name = f'mikkoo_it_durable_{uuid.uuid4().hex[:12]}'
    amqp.channel.queue_declare(name, durable=True, arguments=arguments)
    amqp.queues.append(name)
    return name


def wait_mid_batch(amqp: AMQPHelper, queue: str, total: int, process: MikkooProcess,
                   at_least: int = 200, timeout: float = 30.0) -> int:
    """Wait until part of a batch of ``total`` messages is in ``queue``.

    Fails when the whole batch arrived first, as the fault would then hit
    no batch in flight. Returns the count seen.
    """
    count = wait_until(lambda: (count := amqp.message_count(queue)) >= at_least and count,
                       timeout, interval=0.01,
                       message=lambda: f'{at_least} messages in {queue}\n'
                                       f'{process.describe()}')
    assert count < total, f'the whole batch of {total} arrived before the fault'
    return count


@contextlib.contextmanager
def numbered_inserts(url: str, pgq_queue: str, routing_key: str, first: int,
                     interval: float = 0.005) -> Iterator[list[int]]:
    """Insert one numbered event every ``interval`` s in the background.

    Yields the list of ids inserted so far; it is complete when the block ends.
    """
    ids: list[int] = []
    stop = threading.Event()

    def insert() -> None:
        number = first
        with connect(url) as connection, connection.cursor() as cursor:
            while not stop.wait(interval):
                cursor.execute(NUMBERED_SQL, {
                    'queue': pgq_queue, 'routing_key': routing_key, 'exchange': None,
                    'exchanges': '{}', 'extra3': None, 'first': number, 'last': number})
                ids.append(number)
                number += 1

    thread = threading.Thread(target=insert, name=f'inserts {pgq_queue}', daemon=True)
    thread.start()
    try:
        yield ids
    finally:
        stop.set()
        thread.join(30)


@contextlib.contextmanager
def retry_pump(url: str, pgq_queue: str, interval: float = 0.3) -> Iterator[None]:
    """Hand retried events back to the relay every ``interval`` s in the background.

    PgQ moves retried events back into the queue only in pgqd's maintenance,
    and pgq.ticker does not count them as new events, so without this they
    may wait for the queue's idle tick.
    """
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(interval):
            # A restarting server or a tick refused must not end the pump.
            with contextlib.suppress(psycopg2.Error, AssertionError):
                retry_events(url, pgq_queue)

    thread = threading.Thread(target=pump, name=f'retry pump {pgq_queue}', daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


# -- processes -----------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user and system) that process ``pid`` used so far."""
    text = Path(f'/proc/{pid}/stat').read_text()
    # The command name, in parentheses, may hold spaces: split after it.
    fields = text.rsplit(')', 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5), in clock ticks.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf('SC_CLK_TCK')


def cpu_share(pid: int, seconds: float) -> float:
    """Return the fraction of one core that ``pid`` used over the next ``seconds``."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def run_command(*command: str, timeout: float = COMMAND_TIMEOUT,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, (
            f'{" ".join(command)} exited with {result.returncode}:\n'
            f'{result.stdout}\n{result.stderr}')
    return result


# -- a TCP proxy in front of RabbitMQ ------------------------------------------------

class _Link:
    """One client connection through the proxy and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for side in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                side.shutdown(socket.SHUT_RDWR)
            side.close()


class TCPProxy:
    """Forward loopback connections to RabbitMQ, so a test can break them.

    :meth:`freeze` stops forwarding on the connections open at that moment
    while they stay open, like a network that drops every packet; later
    connections pass. :meth:`cut` closes the open connections at the TCP
    level, without an AMQP close, like a lost network.
    """

    def __init__(self, target: tuple[str, int] = ('127.0.0.1', 5672)) -> None:
        self.target = target
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port: int = self.listener.getsockname()[1]
        self.links: list[_Link] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name='proxy accept', daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                self.links.append(link)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._forward, args=(link, source, sink),
                                 name='proxy forward', daemon=True).start()

    @staticmethod
    def _forward(link: _Link, source: socket.socket, sink: socket.socket) -> None:
        while not link.closed:
            if link.frozen:
                time.sleep(0.05)
                continue
            readable, _, _ = select.select([source], [], [], 0.1)
            if not readable:
                continue
            try:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
        if not link.frozen:
            link.close()

    def open_links(self) -> list[_Link]:
        with self._lock:
            return [link for link in self.links if not link.closed]

    def freeze(self) -> int:
        """Stop forwarding on every open connection; return how many."""
        links = self.open_links()
        for link in links:
            link.frozen = True
        return len(links)

    def cut(self) -> int:
        """Close every open connection at the TCP level; return how many."""
        links = self.open_links()
        for link in links:
            link.close()
        return len(links)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for link in self.open_links():
            link.close()


# -- RabbitMQ ------------------------------------------------------------------

def rabbitmqctl(*arguments: str, check: bool = True) -> str:
    return run_command('rabbitmqctl', *arguments, check=check).stdout


@dataclasses.dataclass(frozen=True)
class BrokerConnection:
    """One row of ``rabbitmqctl list_connections``."""

    pid: str
    name: str          # "client address -> server address": new on every connect
    timeout: int       # negotiated heartbeat, in seconds
    user: str
    connection_name: str


CONNECTION_NAME = re.compile(r'\{"connection_name","((?:[^"\\]|\\.)*)"\}')


def broker_connections() -> list[BrokerConnection]:
    output = rabbitmqctl('list_connections', 'pid', 'name', 'timeout', 'user',
                         'client_properties', '--no-table-headers', '--quiet')
    connections = []
    for line in output.splitlines():
        fields = line.split('\t')
        if len(fields) != 5:
            continue
        match = CONNECTION_NAME.search(fields[4])
        connections.append(BrokerConnection(fields[0], fields[1], int(fields[2]),
                                            fields[3], match.group(1) if match else ''))
    return connections


def relay_connections(pgq_queue: str) -> list[BrokerConnection]:
    """The AMQP connections of the worker that relays ``pgq_queue``."""
    return [connection for connection in broker_connections()
            if connection.connection_name == f'mikkoo {pgq_queue}']


def wait_rabbitmq_ready() -> None:
    """Start RabbitMQ's application if it is stopped and wait until it runs."""
    rabbitmqctl('start_app')
    rabbitmqctl('await_startup', '--timeout', str(int(SERVICE_TIMEOUT)))

    def accepts_connections() -> bool:
        try:
            pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL)).close()
        except pika.exceptions.AMQPError:
            return False
        return True

    wait_until(accepts_connections, SERVICE_TIMEOUT, interval=0.5,
               message='RabbitMQ accepting connections')


def memory_watermark() -> str:
    """The current vm_memory_high_watermark, as rabbitmqctl prints it."""
    return rabbitmqctl('eval', 'vm_memory_monitor:get_vm_memory_high_watermark().').strip()


def set_memory_watermark(value: str) -> None:
    """Set the watermark; ``value`` is a fraction or {absolute, Bytes}."""
    match = re.fullmatch(r'\{absolute,\s*(\d+)\}', value)
    if match:
        rabbitmqctl('set_vm_memory_high_watermark', 'absolute', match.group(1))
    else:
        rabbitmqctl('set_vm_memory_high_watermark', value)


def max_message_size() -> int:
    output = rabbitmqctl('eval', 'application:get_env(rabbit, max_message_size).').strip()
    match = re.fullmatch(r'\{ok,(\d+)\}', output)
    assert match, f'unexpected max_message_size: {output}'
    return int(match.group(1))


def set_max_message_size(size: int) -> None:
    rabbitmqctl('eval', f'application:set_env(rabbit, max_message_size, {int(size)}).')


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A RabbitMQ user and the passwords the relay is configured with."""

    username: str
    rabbitmq_password: str
    postgres_password: str

    @property
    def secrets(self) -> tuple[str, str]:
        return self.rabbitmq_password, self.postgres_password


@contextlib.contextmanager
def rabbitmq_user() -> Iterator[Credentials]:
    """Create a RabbitMQ user with a password and full rights on vhost /."""
    suffix = uuid.uuid4().hex[:8]
    credentials = Credentials(f'mikkoo_test_user_{suffix}', f'S3cr3t-xyz-{suffix}',
                              f'Pg-S3cr3t-{suffix}')
    rabbitmqctl('add_user', credentials.username, credentials.rabbitmq_password)
    try:
        rabbitmqctl('set_permissions', '-p', '/', credentials.username, '.*', '.*', '.*')
        yield credentials
    finally:
        rabbitmqctl('delete_user', credentials.username, check=False)


def with_password(url: str, password: str) -> str:
    """Return the libpq URL ``url`` with ``password`` for its user."""
    parts = urllib.parse.urlsplit(url)
    user = parts.username or 'postgres'
    host = parts.hostname or '127.0.0.1'
    netloc = f'{user}:{urllib.parse.quote(password, safe="")}@{host}:{parts.port or 5432}'
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def assert_no_secret(texts: dict[str, str], secrets: tuple[str, ...]) -> None:
    """Check that no text (a log, keyed by its name) contains a secret."""
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f'{name} contains a password'
            assert urllib.parse.quote(secret) not in text, f'{name} contains a password'


# -- PostgreSQL ----------------------------------------------------------------

def terminate_relay_backends(url: str) -> int:
    """Terminate the relay's sessions in the database of ``url``; return how many."""
    database = urllib.parse.urlsplit(url).path.lstrip('/')
    rows = sql(url, 'SELECT pg_terminate_backend(pid) FROM pg_stat_activity'
                    " WHERE application_name LIKE 'mikkoo %%' AND datname = %s",
               (database,))
    return sum(1 for row in rows or [] if row[0])


def wait_postgres_ready() -> None:
    """Wait until PostgreSQL accepts connections on 127.0.0.1."""
    def ready() -> bool:
        return run_command('pg_isready', '-h', '127.0.0.1', '-t', '2',
                           check=False).returncode == 0

    wait_until(ready, SERVICE_TIMEOUT, interval=0.5, message='pg_isready')


def pg_ctlcluster(action: str) -> None:
    run_command('pg_ctlcluster', '--skip-systemctl-redirect', *PG_CLUSTER, action)


# -- pgqd ----------------------------------------------------------------------

def pgqd_pid() -> int | None:
    """The pid of the pgqd that scripts/setup started, if it runs."""
    try:
        pid = int(PGQD_PIDFILE.read_text().strip())
        comm = Path(f'/proc/{pid}/comm').read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == 'pgqd' else None


def stop_pgqd() -> None:
    pid = pgqd_pid()
    assert pid is not None, f'pgqd is not running (no live pid in {PGQD_PIDFILE})'
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: pgqd_pid() is None, 30, message='pgqd to exit')


def wait_ticked_by_pgqd(url: str, pgq_queue: str, ticks: int = 2,
                        timeout: float = 30.0) -> None:
    """Wait until ``pgq_queue`` gets ``ticks`` new ticks that the test did not make."""
    def last_tick() -> int:
        rows = sql(url, 'SELECT last_tick_id FROM pgq.get_queue_info(%s)', (pgq_queue,))
        assert rows is not None
        return int(rows[0][0])

    first = last_tick()
    wait_until(lambda: last_tick() >= first + ticks, timeout, interval=0.2,
               message=f'{ticks} ticks by pgqd on {pgq_queue}')


def start_pgqd() -> None:
    """Start pgqd with scripts/setup, which starts only what is missing."""
    run_command(str(ROOT / 'scripts' / 'setup'), timeout=300)
    wait_until(pgqd_pid, 30, interval=POLL, message='pgqd to run')
