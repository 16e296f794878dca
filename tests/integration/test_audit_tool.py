"""End to end: mikkoo-audit finds the audited event that never reached RabbitMQ.

The database has sql/mikkoo.sql installed. Audited events are inserted
while the relay is stopped but its consumer is registered. One event row
is then deleted from PgQ's event table by hand, so the relay never reads
it. mikkoo-audit must report exactly that event.
"""
from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from psycopg2 import sql as pgsql

from tests.integration import faults_support as faults
from tests.integration.conftest import (
    RABBITMQ_URL, ROOT, AMQPHelper, MikkooRunner, connect, mikkoo_config, queue_config, sql, sql_value,
    tick, unique_name, wait_until)
from tests.integration.faults_support import Credentials

SCHEMA = ROOT / 'sql' / 'mikkoo.sql'
# Audited events per test; the one at index MISSING is deleted from PgQ.
EVENTS = 20
MISSING = 7
AUDIT_TIMEOUT = 60.0


class AuditedEvent(NamedTuple):
    event_id: int
    message_id: str


@pytest.fixture(scope='module')
def credentials() -> Iterator[Credentials]:
    with faults.rabbitmq_user() as credentials:
        yield credentials


@pytest.fixture()
def audit_database(pg_database: str) -> str:
    """The test database with sql/mikkoo.sql installed."""
    faults.run_command('psql', '-v', 'ON_ERROR_STOP=1', '-q', '-d', pg_database,
                       '-f', str(SCHEMA))
    return pg_database


def find_audit() -> str:
    """The mikkoo-audit console script next to this interpreter."""
    command = Path(sys.executable).parent / 'mikkoo-audit'
    assert command.is_file(), "mikkoo-audit is not installed; run pip install -e '.[test]'"
    return str(command)


def run_audit(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_audit(), *arguments], capture_output=True, text=True,
                          timeout=AUDIT_TIMEOUT, stdin=subprocess.DEVNULL)


def insert_audited(url: str, pgq_queue: str, exchange: str,
                   count: int) -> list[AuditedEvent]:
    """Insert ``count`` audited events in one transaction; return their ids."""
    events = []
    with connect(url, autocommit=False) as connection:
        with connection, connection.cursor() as cursor:
            for number in range(count):
                cursor.execute(
                    "SELECT mikkoo.insert_audited_event(%s, %s, 'audit.test', %s, "
                    "'application/json')", (pgq_queue, exchange, f'{{"id": {number}}}'))
                row = cursor.fetchone()
                assert row is not None
                event_id = int(row[0])
                cursor.execute('SELECT message_id FROM mikkoo.audit WHERE event_id = %s'
                               ' AND queue = %s', (event_id, pgq_queue))
                [(message_id,)] = cursor.fetchall()
                events.append(AuditedEvent(event_id, str(message_id)))
    return events


def delete_from_pgq(url: str, pgq_queue: str, event_id: int) -> None:
    """Delete an event row from the queue's event tables, as if it was lost."""
    prefix = sql_value(url, 'SELECT queue_data_pfx FROM pgq.queue WHERE queue_name = %s',
                       (pgq_queue,))
    schema, table = prefix.split('.')
    # The prefix names the parent table; DELETE reaches its rotated children.
    sql(url, pgsql.SQL('DELETE FROM {}.{} WHERE ev_id = %s').format(
        pgsql.Identifier(schema), pgsql.Identifier(table)), (event_id,))
    rows = sql(url, pgsql.SQL('SELECT count(*) FROM {}.{} WHERE ev_id = %s').format(
        pgsql.Identifier(schema), pgsql.Identifier(table)), (event_id,))
    assert rows == [(0,)]


def write_config(path: Path, url: str, pgq_queue: str,
                 credentials: Credentials) -> dict[str, Any]:
    """Write a mikkoo configuration whose connections carry passwords."""
    worker = queue_config(faults.with_password(url, credentials.postgres_password),
                          unregister=False)
    worker['rabbitmq'] = {**worker['rabbitmq'], 'username': credentials.username,
                          'password': credentials.rabbitmq_password}
    config = mikkoo_config({pgq_queue: worker})
    path.write_text(yaml.safe_dump(config))
    return config


class Setup(NamedTuple):
    pgq_queue: str
    audit_queue: str
    config_path: Path
    events: list[AuditedEvent]


def relay_audited_events(url: str, amqp: AMQPHelper, run_mikkoo: MikkooRunner,
                         credentials: Credentials, tmp_path: Path,
                         lose: int | None) -> Setup:
    """Relay EVENTS audited events, all but the one at index ``lose``."""
    exchange = amqp.declare_exchange('topic')
    audit_queue = amqp.declare_queue()
    amqp.bind(audit_queue, exchange, '#')
    pgq_queue = unique_name('audited')
    sql(url, 'SELECT pgq.create_queue(%s)', (pgq_queue,))
    sql(url, "SELECT pgq.register_consumer(%s, 'mikkoo')", (pgq_queue,))

    events = insert_audited(url, pgq_queue, exchange, EVENTS)
    if lose is not None:
        delete_from_pgq(url, pgq_queue, events[lose].event_id)
    tick(url, pgq_queue)
    config_path = tmp_path / 'audit.yml'
    config = write_config(config_path, url, pgq_queue, credentials)
    process = run_mikkoo(config)

    expected = EVENTS - (lose is not None)
    wait_until(lambda: amqp.message_count(audit_queue) >= expected, message=lambda: (
        f'{expected} messages in {audit_queue}\n{process.describe()}'))
    assert amqp.message_count(audit_queue) == expected
    return Setup(pgq_queue, audit_queue, config_path, events)


def assert_no_password(result: subprocess.CompletedProcess[str],
                       credentials: Credentials) -> None:
    faults.assert_no_secret({'mikkoo-audit stdout': result.stdout,
                             'mikkoo-audit stderr': result.stderr}, credentials.secrets)


def test_audit_reports_lost_event(audit_database: str, amqp: AMQPHelper,
                                  run_mikkoo: MikkooRunner, credentials: Credentials,
                                  tmp_path: Path) -> None:
    setup = relay_audited_events(audit_database, amqp, run_mikkoo, credentials, tmp_path,
                                 lose=MISSING)
    lost = setup.events[MISSING]

    result = run_audit('-c', str(setup.config_path), '-w', setup.pgq_queue,
                       '--queue', setup.audit_queue, '--older-than', '0', '--idle', '1')

    assert result.returncode == 1, result
    assert_no_password(result, credentials)
    lines = result.stdout.splitlines()
    assert lines[0] == f'received {EVENTS - 1} messages, confirmed {EVENTS - 1} audited events'
    assert lines[1] == '1 audited events older than 0 s never arrived:'
    assert lines[2].split() == ['message_id', 'event_id', 'queue', 'exchange',
                                'routing_key', 'published_at']
    assert len(lines) == 4, result.stdout
    row = lines[3].split()
    assert row[0] == lost.message_id
    assert row[1] == str(lost.event_id)
    assert row[2] == setup.pgq_queue
    assert row[4] == 'audit.test'
    for event in setup.events:
        if event != lost:
            assert event.message_id not in result.stdout
    assert amqp.message_count(setup.audit_queue) == 0
    remaining = sql(audit_database, 'SELECT message_id::text FROM mikkoo.audit')
    assert remaining == [(lost.message_id,)]


def test_audit_ignores_recent_missing_event(audit_database: str, amqp: AMQPHelper,
                                            run_mikkoo: MikkooRunner,
                                            credentials: Credentials,
                                            tmp_path: Path) -> None:
    setup = relay_audited_events(audit_database, amqp, run_mikkoo, credentials, tmp_path,
                                 lose=MISSING)

    result = run_audit('-c', str(setup.config_path), '--queue', setup.audit_queue,
                       '--older-than', '3600', '--idle', '1')

    assert result.returncode == 0, result
    assert setup.events[MISSING].message_id not in result.stdout
    assert 'no audited event older than 3600 s is missing' in result.stdout


def test_audit_exits_0_when_all_arrived(audit_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner,
                                        credentials: Credentials, tmp_path: Path) -> None:
    setup = relay_audited_events(audit_database, amqp, run_mikkoo, credentials, tmp_path,
                                 lose=None)
    rabbitmq_url = (f'amqp://{credentials.username}:{credentials.rabbitmq_password}'
                    '@127.0.0.1:5672/%2F')

    result = run_audit('--postgres-url', audit_database, '--rabbitmq-url', rabbitmq_url,
                       '--queue', setup.audit_queue, '--older-than', '0', '--idle', '1')

    assert result.returncode == 0, result
    assert_no_password(result, credentials)
    assert result.stdout.splitlines() == [
        f'received {EVENTS} messages, confirmed {EVENTS} audited events',
        'no audited event older than 0 s is missing']
    assert sql(audit_database, 'SELECT count(*) FROM mikkoo.audit') == [(0,)]


def test_audit_missing_queue_exits_3(audit_database: str) -> None:
    queue = unique_name('mikkoo_it_no_such_queue')

    result = run_audit('--postgres-url', audit_database, '--rabbitmq-url', RABBITMQ_URL,
                       '--queue', queue)

    assert result.returncode == 3, result
    assert queue in result.stderr
    assert 'Traceback' not in result.stderr


def test_audit_without_schema_exits_3(pg_database: str, amqp: AMQPHelper) -> None:
    queue = amqp.declare_queue()

    result = run_audit('--postgres-url', pg_database, '--rabbitmq-url', RABBITMQ_URL,
                       '--queue', queue, '--idle', '0.2')

    assert result.returncode == 3, result
    assert 'sql/mikkoo.sql' in result.stderr
    assert 'Traceback' not in result.stderr


def test_audit_without_database_exits_2() -> None:
    result = run_audit('--queue', f'unused_{uuid.uuid4().hex[:8]}')

    assert result.returncode == 2, result
    assert '--postgres-url' in result.stderr
