"""Relay one event from PgQ to RabbitMQ with the example configuration.

Run by scripts/quickstart after scripts/setup has started PostgreSQL,
RabbitMQ and pgqd. The demo starts ``mikkoo -c example.yml -f``, inserts
one event into the configured PgQ queue and prints the message that
arrives in the RabbitMQ queue ``mikkoo_example_demo``.

Exits 0 when the message arrived, 1 on a failure or timeout and 130 when
interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import psycopg2
import psycopg2.extensions

from mikkoo import config

ROOT = Path(__file__).resolve().parent.parent

# The event has no exchange (ev_extra1 is NULL), so RabbitMQ's default
# exchange routes it to the queue named by the routing key (ev_type).
DEMO_QUEUE = 'mikkoo_example_demo'
EVENT_BODY = '{"hello": "world"}'
EVENT_CONTENT_TYPE = 'application/json'

# Seconds between two checks while waiting for the relay or a message.
POLL_INTERVAL = 0.2
# Seconds to wait for pgqd to tick after pgq.force_tick before ticking here.
PGQD_TICK_TIMEOUT = 3.0
# Seconds to wait for the relay to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0


class DemoError(Exception):
    """Raised when a step of the demo fails; the message names the step."""


def main() -> int:
    arguments = parse_arguments()
    try:
        run_demo(arguments.config, arguments.timeout)
    except DemoError as error:
        print(f'demo: failed: {error}', file=sys.stderr)
        return 1
    except config.ConfigError as error:
        print(f'demo: invalid configuration:\n{error}', file=sys.stderr)
        return 1
    except psycopg2.Error as error:
        print(f'demo: failed: PostgreSQL error: {error}', file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as error:
        print(f'demo: failed: RabbitMQ error: {error!r}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('demo: interrupted', file=sys.stderr)
        return 130
    print('demo: done, the event went from PgQ to RabbitMQ')
    return 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '-c', '--config', type=Path, default=ROOT / 'example.yml',
        help='mikkoo configuration file with one queue (default: %(default)s)')
    parser.add_argument(
        '-t', '--timeout', type=float, default=30.0,
        help='seconds to wait for each of the relay and the message '
             '(default: %(default)s)')
    return parser.parse_args()


def run_demo(config_path: Path, timeout: float) -> None:
    queue = load_queue_settings(config_path)
    database = connect_postgres(queue.postgres_url)
    rabbitmq = connect_rabbitmq(queue.rabbitmq)
    try:
        channel = rabbitmq.channel()
        declare_demo_queue(channel)

        relay = Relay(config_path)
        try:
            wait_for_consumer(database, queue, relay, timeout)
            event_id = insert_event(database, queue.queue)
            make_tick(database, queue.queue)
            message = wait_for_message(rabbitmq, channel, relay, timeout)
            print_message(event_id, *message)
        finally:
            relay.stop()
    finally:
        rabbitmq.close()
        database.close()


def load_queue_settings(config_path: Path) -> config.QueueSettings:
    settings = config.load(str(config_path))
    if len(settings.workers) != 1:
        raise DemoError(f'{config_path} configures {len(settings.workers)} '
                        f'queues; the demo expects exactly one')
    return next(iter(settings.workers.values()))


def connect_postgres(url: str) -> psycopg2.extensions.connection:
    try:
        connection = psycopg2.connect(url)
    except psycopg2.OperationalError as error:
        raise DemoError(f'cannot connect to PostgreSQL at {config.mask_url(url)}: '
                        f'{error}; run scripts/setup') from None
    connection.autocommit = True
    return connection


def connect_rabbitmq(settings: config.RabbitMQSettings) -> pika.BlockingConnection:
    # NOTE: the demo connects without TLS, so a configuration with
    # ssl_options set fails here.
    parameters = pika.ConnectionParameters(
        host=settings.host, port=settings.port, virtual_host=settings.vhost,
        credentials=pika.PlainCredentials(settings.username, settings.password))
    try:
        return pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPError as error:
        raise DemoError(f'cannot connect to RabbitMQ at {settings.host}:{settings.port}: '
                        f'{error!r}; run scripts/setup') from None


def declare_demo_queue(channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
    channel.queue_declare(DEMO_QUEUE, durable=False, auto_delete=False)
    # Messages left by an earlier run would be mistaken for this run's.
    purged = channel.queue_purge(DEMO_QUEUE).method.message_count
    print(f'demo: declared RabbitMQ queue {DEMO_QUEUE} '
          f'(purged {purged} old messages)')


def find_mikkoo() -> str:
    """Return the path of the mikkoo console script.

    Prefers the script next to this interpreter, where pip installs it,
    over the first one on PATH.
    """
    beside_python = Path(sys.executable).parent / 'mikkoo'
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which('mikkoo')
    if on_path is None:
        raise DemoError('the mikkoo command was not found; run scripts/setup')
    return on_path


class Relay:
    """The ``mikkoo`` process started by the demo, with its output copied."""

    def __init__(self, config_path: Path) -> None:
        command = [find_mikkoo(), '-c', str(config_path), '-f']
        print(f'demo: starting {" ".join(command)}')
        # A session of its own lets stop() signal the relay and every worker
        # process it forked as one process group.
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output_thread = threading.Thread(target=self._copy_output, daemon=True)
        self.output_thread.start()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            print(f'  mikkoo | {line}', end='', flush=True)

    def check_running(self) -> None:
        """Raise DemoError when the relay has exited."""
        status = self.process.poll()
        if status is not None:
            raise DemoError(f'mikkoo exited early with status {status}; '
                            f'its output is above')

    def stop(self) -> None:
        """Stop the relay's process group with SIGTERM, then SIGKILL if needed."""
        if self.process.poll() is None:
            print('demo: stopping mikkoo with SIGTERM')
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f'demo: mikkoo still running after {STOP_TIMEOUT:g}s; '
                      f'sending SIGKILL', file=sys.stderr)
                self._signal_group(signal.SIGKILL)
                self.process.wait()

        # The group exists while any member is alive, so its id cannot have
        # been reused by another process group yet.
        if self._signal_group(0):
            print('demo: processes of mikkoo outlived its main process; '
                  'sending them SIGKILL', file=sys.stderr)
            self._signal_group(signal.SIGKILL)

        self.output_thread.join(timeout=2.0)
        print(f'demo: mikkoo exited with status {self.process.returncode}')

    def _signal_group(self, signum: int) -> bool:
        """Send signum to the relay's process group; False if it is gone."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            return False
        return True


def wait_for_consumer(database: psycopg2.extensions.connection,
                      queue: config.QueueSettings, relay: Relay,
                      timeout: float) -> None:
    """Block until the relay registered its PgQ consumer on the queue.

    A consumer receives only events inserted after it registered, so the demo
    inserts its event only after this returns.
    """
    print(f'demo: waiting for consumer {queue.consumer_name} on PgQ queue {queue.queue}')
    deadline = time.monotonic() + timeout
    while not is_consumer_registered(database, queue.queue, queue.consumer_name):
        relay.check_running()
        if time.monotonic() >= deadline:
            raise DemoError(f'timed out after {timeout:g}s waiting for mikkoo to '
                            f'register consumer {queue.consumer_name} on PgQ '
                            f'queue {queue.queue}')
        time.sleep(POLL_INTERVAL)
    print('demo: consumer registered')


def is_consumer_registered(database: psycopg2.extensions.connection,
                           queue: str, consumer: str) -> bool:
    # get_consumer_info returns no row, rather than raising, while the
    # queue does not exist yet.
    with database.cursor() as cursor:
        cursor.execute('SELECT 1 FROM pgq.get_consumer_info(%s, %s)', (queue, consumer))
        return cursor.fetchone() is not None


def insert_event(database: psycopg2.extensions.connection, queue: str) -> int:
    with database.cursor() as cursor:
        cursor.execute(
            'SELECT pgq.insert_event(%s, %s, %s, NULL, %s, NULL, NULL)',
            (queue, DEMO_QUEUE, EVENT_BODY, EVENT_CONTENT_TYPE))
        row = cursor.fetchone()
    assert row is not None
    event_id = int(row[0])
    print(f'demo: inserted event {event_id} into PgQ queue {queue}: '
          f'routing key {DEMO_QUEUE}, body {EVENT_BODY}')
    return event_id


def make_tick(database: psycopg2.extensions.connection, queue: str) -> None:
    """Close the current batch with a tick, so the relay can read the event.

    pgq.ticker(queue) ticks only once ticker_max_lag (3 s by default) has
    passed or ticker_max_count (500) events wait, and PgQ 3.5 warns in
    pgq.force_tick's comment that parallel pgq.ticker calls are dangerous.
    So the demo calls pgq.force_tick, which makes pgqd tick on its next pass,
    and calls pgq.ticker itself only when pgqd makes no tick in time.
    force_tick advances the queue's event id sequence by
    2 * ticker_max_count + 1000, so event ids jump after each run.
    """
    last_tick = last_tick_id(database, queue)
    with database.cursor() as cursor:
        cursor.execute('SELECT pgq.force_tick(%s)', (queue,))

    deadline = time.monotonic() + PGQD_TICK_TIMEOUT
    while time.monotonic() < deadline:
        tick = last_tick_id(database, queue)
        if tick != last_tick:
            print(f'demo: pgqd made tick {tick}')
            return
        time.sleep(POLL_INTERVAL)

    with database.cursor() as cursor:
        cursor.execute('SELECT pgq.ticker(%s)', (queue,))
        row = cursor.fetchone()
    assert row is not None
    print(f'demo: pgqd made no tick within {PGQD_TICK_TIMEOUT:g}s '
          f'(is it running?); made tick {row[0]} with pgq.ticker')


def last_tick_id(database: psycopg2.extensions.connection, queue: str) -> int | None:
    with database.cursor() as cursor:
        cursor.execute('SELECT last_tick_id FROM pgq.get_queue_info(%s)', (queue,))
        row = cursor.fetchone()
    return None if row is None else row[0]


Message = tuple[pika.spec.Basic.GetOk, pika.spec.BasicProperties, bytes]


def wait_for_message(rabbitmq: pika.BlockingConnection,
                     channel: pika.adapters.blocking_connection.BlockingChannel,
                     relay: Relay, timeout: float) -> Message:
    """Poll the demo queue until the demo's message arrives.

    Skips messages whose body differs, because events inserted by an
    earlier, failed run may still be relayed first.
    """
    print(f'demo: waiting up to {timeout:g}s for a message in {DEMO_QUEUE}')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(DEMO_QUEUE, auto_ack=True)
        if method is None:
            relay.check_running()
            # Sleeps while still servicing heartbeats on the connection.
            rabbitmq.sleep(POLL_INTERVAL)
        elif body.decode('utf-8', 'replace') == EVENT_BODY:
            return method, properties, body
        else:
            print(f'demo: skipped a message from an earlier run: {body!r}')
    raise DemoError(f'timed out after {timeout:g}s waiting for the message in '
                    f'RabbitMQ queue {DEMO_QUEUE}; see the mikkoo output above')


def print_message(event_id: int, method: pika.spec.Basic.GetOk,
                  properties: pika.spec.BasicProperties, body: bytes) -> None:
    print(f'demo: received the message for event {event_id}')
    print(f'  exchange:    {method.exchange or "(default exchange)"}')
    print(f'  routing key: {method.routing_key}')
    print('  properties:')
    for name, value in sorted(vars(properties).items()):
        if name == 'timestamp' and value is not None:
            # AMQP timestamps are seconds since the Unix epoch.
            moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
            print(f'    {name}: {value} ({moment.isoformat()})')
        elif value is not None and name != 'headers':
            print(f'    {name}: {value}')
    print('  headers:')
    for name, value in sorted((properties.headers or {}).items()):
        print(f'    {name}: {format_value(value)}')
    print(f'  body:        {body.decode("utf-8", "replace")}')


def format_value(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


if __name__ == '__main__':
    sys.exit(main())
