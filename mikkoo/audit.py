"""The ``mikkoo-audit`` command: confirm that audited events reached RabbitMQ.

Events inserted with ``mikkoo.insert_audited_event`` leave a row in
``mikkoo.audit`` keyed by the message's ``message_id``. This command drains
a RabbitMQ queue bound to the audited exchanges, deletes the audit row of
every message it receives, and then lists the rows older than a given age:
those events never arrived.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
import psycopg2

from mikkoo import config
from mikkoo.config import ConfigError, RabbitMQSettings
from mikkoo.publisher import connection_parameters
from mikkoo.tls import TLSConfigError

# Exit statuses of mikkoo-audit.
EXIT_ALL_ARRIVED = 0
EXIT_MISSING = 1        # audited events older than --older-than never arrived
EXIT_USAGE = 2          # bad arguments or configuration
EXIT_UNAVAILABLE = 3    # PostgreSQL or RabbitMQ could not be used

MISSING_SQL = """
SELECT message_id, event_id, queue, exchange, routing_key, published_at
  FROM mikkoo.audit
 WHERE published_at < now() - make_interval(secs => %s)
 ORDER BY published_at, event_id
"""


@dataclasses.dataclass
class Report:
    received: int = 0
    confirmed: int = 0
    missing: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)


class AuditError(Exception):
    """Raised when PostgreSQL or RabbitMQ cannot be used; the message names the cause."""


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='mikkoo-audit',
        description='Confirm that audited mikkoo events reached RabbitMQ. Drains a '
                    'queue bound to the audited exchanges, deletes the audit row of '
                    'each message received, and lists the audited events older than '
                    '--older-than seconds that never arrived. Exit status 0: all '
                    'arrived; 1: some are missing.')
    parser.add_argument('--queue', required=True,
                        help='RabbitMQ queue bound to the audited exchanges')
    parser.add_argument('-c', '--config', help='mikkoo configuration file to take '
                        'the connections from (with --worker)')
    parser.add_argument('-w', '--worker', help='queue name in Application/workers '
                        'whose postgres_url and rabbitmq to use')
    parser.add_argument('--postgres-url', help='libpq URL of the audited database')
    parser.add_argument('--rabbitmq-url', help='amqp:// or amqps:// URL of RabbitMQ')
    parser.add_argument('--older-than', type=float, default=300.0, metavar='SECONDS',
                        help='report audited events at least this old (default 300)')
    parser.add_argument('--idle', type=float, default=2.0, metavar='SECONDS',
                        help='stop draining after the queue stayed empty this '
                             'long (default 2)')
    return parser.parse_args(argv)


def connections(arguments: argparse.Namespace) -> tuple[str, RabbitMQSettings]:
    """Return the PostgreSQL URL and RabbitMQ settings the arguments name.

    Raises ConfigError or ValueError when they are missing or invalid.
    """
    postgres_url = arguments.postgres_url
    rabbitmq = None
    if arguments.config:
        settings = config.load(arguments.config)
        name = arguments.worker or (next(iter(settings.workers)) if len(settings.workers) == 1
                                    else None)
        if name not in settings.workers:
            raise ValueError(f'--worker must name one of {", ".join(settings.workers)}')
        postgres_url = postgres_url or settings.workers[name].postgres_url
        rabbitmq = settings.workers[name].rabbitmq
    if arguments.rabbitmq_url:
        rabbitmq = config.parse_amqp_url(arguments.rabbitmq_url)
    if not postgres_url:
        raise ValueError('give --postgres-url, or -c with a mikkoo configuration')
    return postgres_url, rabbitmq or RabbitMQSettings()


def drain(channel: Any, queue: str, database: Any, idle: float) -> Report:
    """Delete the audit row of every message in ``queue``; return the counts.

    A message is acknowledged only after its audit row is deleted, so a
    crash leaves it in the queue for the next run.
    """
    report = Report()
    last_message = time.monotonic()
    while time.monotonic() - last_message < idle:
        method, properties, _body = channel.basic_get(queue)
        if method is None:
            channel.connection.sleep(0.1)
            continue
        last_message = time.monotonic()
        report.received += 1
        message_id = _as_uuid(properties.message_id)
        if message_id is not None:
            with database.cursor() as cursor:
                cursor.execute('SELECT mikkoo.delete_audit_record(%s)', (message_id,))
                report.confirmed += bool(cursor.fetchone()[0])
            database.commit()
        channel.basic_ack(method.delivery_tag)
    return report


def _as_uuid(value: str | None) -> str | None:
    try:
        return str(uuid.UUID(value)) if value else None
    except ValueError:
        return None


def missing_events(database: Any, older_than: float) -> list[tuple[Any, ...]]:
    with database.cursor() as cursor:
        cursor.execute(MISSING_SQL, (older_than,))
        rows = cursor.fetchall()
    database.commit()
    return rows


def print_report(report: Report, older_than: float) -> None:
    print(f'received {report.received} messages, confirmed {report.confirmed} '
          f'audited events')
    if not report.missing:
        print(f'no audited event older than {older_than:g} s is missing')
        return
    print(f'{len(report.missing)} audited events older than {older_than:g} s never '
          'arrived:')
    header = ('message_id', 'event_id', 'queue', 'exchange', 'routing_key', 'published_at')
    rows = [header] + [tuple('' if value is None else str(value) for value in row)
                       for row in report.missing]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print('  '.join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


def audit(postgres_url: str, rabbitmq: RabbitMQSettings, queue: str, older_than: float,
          idle: float) -> Report:
    """Drain ``queue`` and return the report; raises AuditError."""
    try:
        database = psycopg2.connect(postgres_url, application_name='mikkoo-audit')
    except psycopg2.Error as error:
        raise AuditError(f'cannot connect to PostgreSQL: {_one_line(error)}') from None
    try:
        connection = pika.BlockingConnection(connection_parameters(rabbitmq, 'mikkoo-audit'))
    except (pika.exceptions.AMQPError, TLSConfigError) as error:
        database.close()
        raise AuditError(f'cannot connect to RabbitMQ at {rabbitmq.host}:{rabbitmq.port}: '
                         f'{_one_line(error) or type(error).__name__}') from None
    try:
        channel = connection.channel()
        report = drain(channel, queue, database, idle)
        report.missing = missing_events(database, older_than)
        return report
    except pika.exceptions.ChannelClosedByBroker as error:
        raise AuditError(f'cannot read queue {queue!r}: {error.reply_text}; declare it and '
                         'bind it to the audited exchanges') from None
    except psycopg2.Error as error:
        raise AuditError(f'PostgreSQL failed: {_one_line(error)}; is sql/mikkoo.sql '
                         'installed in this database?') from None
    finally:
        if connection.is_open:
            connection.close()
        database.close()


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        postgres_url, rabbitmq = connections(arguments)
    except ConfigError as error:
        for problem in error.problems:
            print(f'mikkoo-audit: {error.path}: {problem}', file=sys.stderr)
        return EXIT_USAGE
    except ValueError as error:
        print(f'mikkoo-audit: {error}', file=sys.stderr)
        return EXIT_USAGE
    try:
        report = audit(postgres_url, rabbitmq, arguments.queue, arguments.older_than,
                       arguments.idle)
    except AuditError as error:
        print(f'mikkoo-audit: {error}', file=sys.stderr)
        return EXIT_UNAVAILABLE
    print_report(report, arguments.older_than)
    return EXIT_MISSING if report.missing else EXIT_ALL_ARRIVED


if __name__ == '__main__':
    sys.exit(main())
