"""Integration tests for sql/mikkoo.sql against a local PostgreSQL with PgQ.

The module creates a database of its own on 127.0.0.1:5432 (user postgres,
trust authentication), installs the schema there and drops the database at
the end. Events are read back the way a PgQ consumer reads them: register,
insert, tick, next_batch, get_batch_events.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest
from psycopg2 import sql

POSTGRES_HOST = '127.0.0.1'
POSTGRES_PORT = 5432
POSTGRES_USER = 'postgres'
MAINTENANCE_DATABASE = 'postgres'

SCHEMA_FILE = Path(__file__).resolve().parents[2] / 'sql' / 'mikkoo.sql'
CONSUMER = 'test_consumer'

# Every SECURITY DEFINER function in the schema, by name.
DEFINER_FUNCTIONS = {
    'delete_audit_record',
    'insert_audited_event',
    'new_audit_record',
}

Connection = psycopg2.extensions.connection


def connect(dbname: str, autocommit: bool = True) -> Connection:
    """Open a connection to the local PostgreSQL server."""
    conn = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT,
                            user=POSTGRES_USER, dbname=dbname,
                            connect_timeout=5)
    conn.autocommit = autocommit
    return conn


def install_schema(dbname: str) -> None:
    """Run sql/mikkoo.sql in one transaction (psql --single-transaction)."""
    conn = connect(dbname, autocommit=False)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(SCHEMA_FILE.read_text())
    finally:
        conn.close()


def drop_database(admin: Connection, dbname: str) -> None:
    """Terminate the database's sessions, then drop it."""
    with admin.cursor() as cursor:
        cursor.execute(
            'SELECT pg_terminate_backend(pid) FROM pg_stat_activity'
            ' WHERE datname = %s AND pid <> pg_backend_pid()', (dbname,))
        cursor.execute(sql.SQL('DROP DATABASE IF EXISTS {}').format(
            sql.Identifier(dbname)))


@pytest.fixture(scope='module')
def admin() -> Iterator[Connection]:
    conn = connect(MAINTENANCE_DATABASE)
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pgq'")
        available = cursor.fetchone() is not None
    if not available:
        conn.close()
        pytest.skip('the PgQ extension is not installed on the local '
                    'PostgreSQL server (Debian: postgresql-15-pgq3)')
    yield conn
    conn.close()


@pytest.fixture(scope='module')
def database(admin: Connection) -> Iterator[str]:
    dbname = f'mikkoo_test_sql_{uuid.uuid4().hex[:12]}'
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL('CREATE DATABASE {}').format(
            sql.Identifier(dbname)))
    try:
        install_schema(dbname)
        yield dbname
    finally:
        drop_database(admin, dbname)


@pytest.fixture(scope='module')
def writer_role(admin: Connection, database: str) -> Iterator[str]:
    """Create a role that is only a member of PgQ's pgq_writer role."""
    role = f'mikkoo_test_writer_{uuid.uuid4().hex[:12]}'
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL('CREATE ROLE {} NOLOGIN IN ROLE pgq_writer')
                       .format(sql.Identifier(role)))
    yield role
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL('DROP ROLE IF EXISTS {}').format(
            sql.Identifier(role)))


@pytest.fixture()
def conn(database: str) -> Iterator[Connection]:
    connection = connect(database)
    yield connection
    connection.close()


@pytest.fixture()
def queue(conn: Connection) -> str:
    """Create a queue with a registered consumer and return its name.

    The consumer registers before any insert because PgQ shows a consumer
    only the events inserted after its registration.
    """
    name = f'test_queue_{uuid.uuid4().hex[:12]}'
    with conn.cursor() as cursor:
        cursor.execute('SELECT pgq.create_queue(%s)', (name,))
        # Tick on every pgq.ticker call instead of waiting for PgQ 3.5's
        # defaults of 500 events or 3 s of lag.
        cursor.execute(
            "SELECT pgq.set_queue_config(%s, 'ticker_max_lag', '0')", (name,))
        cursor.execute('SELECT pgq.register_consumer(%s, %s)',
                       (name, CONSUMER))
    return name


def fetch_value(conn: Connection, query: str, *args: Any) -> Any:
    """Run a query that returns one value and return that value."""
    with conn.cursor() as cursor:
        cursor.execute(query, args)
        row = cursor.fetchone()
    assert row is not None, f'no row returned by {query}'
    return row[0]


def read_events(conn: Connection, queue: str) -> list[dict[str, Any]]:
    """Tick the queue and return the events of the consumer's next batch.

    The batch is finished before returning, so the next call reads newer
    events.
    """
    assert fetch_value(conn, 'SELECT pgq.ticker(%s)', queue) is not None, \
        f'pgq.ticker made no tick on queue {queue}'
    batch_id = fetch_value(conn, 'SELECT pgq.next_batch(%s, %s)',
                           queue, CONSUMER)
    assert batch_id is not None, f'no batch ready on queue {queue}'

    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
        cursor.execute('SELECT * FROM pgq.get_batch_events(%s) ORDER BY ev_id',
                       (batch_id,))
        events = [dict(row) for row in cursor.fetchall()]

    fetch_value(conn, 'SELECT pgq.finish_batch(%s)', batch_id)
    return events


def fetch_audit_row(conn: Connection,
                    message_id: str) -> dict[str, Any] | None:
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
        cursor.execute('SELECT * FROM mikkoo.audit WHERE message_id = %s',
                       (message_id,))
        row = cursor.fetchone()
    return dict(row) if row is not None else None


def insert_event_defaults(conn: Connection, queue: str) -> int:
    """Call the 5-argument mikkoo.insert_event."""
    event_id = fetch_value(conn,
                           'SELECT mikkoo.insert_event(%s, %s, %s, %s, %s)',
                           queue, 'events', 'user.created', '{"id": 7}',
                           'application/json')
    return int(event_id)


def insert_event_json(conn: Connection, queue: str,
                      properties: str | None, headers: str | None,
                      content_type: str | None = 'text/plain') -> int:
    """Call the 7-argument mikkoo.insert_event with JSON text or None."""
    event_id = fetch_value(conn,
                           'SELECT mikkoo.insert_event(%s, %s, %s, %s, %s,'
                           ' %s::jsonb, %s::jsonb)',
                           queue, 'events', 'user.deleted', 'gone',
                           content_type, properties, headers)
    return int(event_id)


def insert_audited(conn: Connection, queue: str) -> int:
    """Call mikkoo.insert_audited_event."""
    query = 'SELECT mikkoo.insert_audited_event(%s, %s, %s, %s, %s)'
    event_id = fetch_value(conn, query, queue, 'audited', 'order.paid',
                           'order 42', 'text/plain')
    return int(event_id)


def test_schema_installs_twice(database: str) -> None:
    install_schema(database)
    install_schema(database)


def test_reinstall_keeps_audit_rows(database: str, conn: Connection,
                                    queue: str) -> None:
    insert_audited(conn, queue)
    message_id = json.loads(read_events(conn, queue)[0]['ev_extra3'])[
        'message_id']

    install_schema(database)

    assert fetch_audit_row(conn, message_id) is not None


def test_insert_event_maps_columns(conn: Connection, queue: str) -> None:
    event_id = insert_event_defaults(conn, queue)

    events = read_events(conn, queue)

    assert len(events) == 1
    event = events[0]
    assert event['ev_id'] == event_id
    assert event['ev_type'] == 'user.created'
    assert event['ev_data'] == '{"id": 7}'
    assert event['ev_extra1'] == 'events'
    assert event['ev_extra2'] == 'application/json'


def test_insert_event_adds_message_id(conn: Connection, queue: str) -> None:
    insert_event_defaults(conn, queue)

    properties = json.loads(read_events(conn, queue)[0]['ev_extra3'])

    assert list(properties) == ['message_id']
    assert uuid.UUID(properties['message_id']).version == 4


def test_insert_event_adds_queue_header(conn: Connection, queue: str) -> None:
    insert_event_defaults(conn, queue)

    headers = json.loads(read_events(conn, queue)[0]['ev_extra4'])

    assert headers == {'pgq_queue': queue}


def test_insert_event_new_message_ids(conn: Connection, queue: str) -> None:
    insert_event_defaults(conn, queue)
    insert_event_defaults(conn, queue)

    events = read_events(conn, queue)

    message_ids = {json.loads(event['ev_extra3'])['message_id']
                   for event in events}
    assert len(events) == 2
    assert len(message_ids) == 2


def test_insert_event_unknown_queue(conn: Connection) -> None:
    # PgQ 3.5 raises this from C code with SQLSTATE XX000 (internal_error),
    # so only the message identifies the cause.
    with pytest.raises(psycopg2.Error, match='No such queue'):
        insert_event_defaults(conn, f'missing_queue_{uuid.uuid4().hex[:12]}')


def test_insert_event_passes_json(conn: Connection, queue: str) -> None:
    properties = {
        'app_id': 'billing',
        'correlation_id': 'c-17',
        'delivery_mode': 2,
        'expiration': '60000',
        'message_id': 'fixed-id',
        'priority': 5,
        'timestamp': 1700000000,
        'type': 'user.deleted',
        'headers': {'nested': {'list': [1, 'two', None]}},
    }
    headers = {'tenant': 'acme', 'retries': 0, 'flag': True}
    event_id = insert_event_json(conn, queue, json.dumps(properties),
                             json.dumps(headers))

    event = read_events(conn, queue)[0]

    assert event['ev_id'] == event_id
    assert event['ev_type'] == 'user.deleted'
    assert event['ev_data'] == 'gone'
    assert event['ev_extra1'] == 'events'
    assert event['ev_extra2'] == 'text/plain'
    assert json.loads(event['ev_extra3']) == properties
    assert json.loads(event['ev_extra4']) == headers


def test_insert_event_keeps_null_json(conn: Connection, queue: str) -> None:
    insert_event_json(conn, queue, None, None, content_type=None)

    event = read_events(conn, queue)[0]

    assert event['ev_extra2'] is None
    assert event['ev_extra3'] is None
    assert event['ev_extra4'] is None


@pytest.mark.parametrize('properties, headers, message', [
    ('[1, 2]', None, 'invalid AMQP properties: .* JSON array'),
    ('"text"', '{}', 'invalid AMQP properties: .* JSON string'),
    ('{}', '42', 'invalid AMQP headers: .* JSON number'),
    (None, 'null', 'invalid AMQP headers: .* JSON null'),
])
def test_insert_event_rejects_non_objects(conn: Connection, queue: str,
                                           properties: str | None,
                                           headers: str | None,
                                           message: str) -> None:
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match=message):
        insert_event_json(conn, queue, properties, headers)


def test_audited_event_writes_row(conn: Connection, queue: str) -> None:
    event_id = insert_audited(conn, queue)
    event = read_events(conn, queue)[0]
    properties = json.loads(event['ev_extra3'])

    row = fetch_audit_row(conn, properties['message_id'])

    assert row is not None
    assert row['event_id'] == event_id
    assert row['event_id'] == event['ev_id']
    assert row['queue'] == queue
    assert row['exchange'] == event['ev_extra1'] == 'audited'
    assert row['routing_key'] == event['ev_type'] == 'order.paid'
    assert row['payload'] == event['ev_data'] == 'order 42'
    assert row['content_type'] == event['ev_extra2'] == 'text/plain'
    assert row['properties'] == properties
    assert row['headers'] == json.loads(event['ev_extra4'])
    assert row['headers'] == {'pgq_queue': queue}
    assert row['published_at'] is not None


def test_audited_event_rolls_back(database: str, queue: str,
                                  conn: Connection) -> None:
    writer = connect(database, autocommit=False)
    try:
        insert_audited(writer, queue)
        writer.rollback()
    finally:
        writer.close()

    audit_rows = fetch_value(conn, 'SELECT count(*) FROM mikkoo.audit'
                             ' WHERE queue = %s', queue)
    assert audit_rows == 0
    assert fetch_value(conn, 'SELECT pgq.ticker(%s)', queue) is not None
    batch_id = fetch_value(conn, 'SELECT pgq.next_batch(%s, %s)',
                           queue, CONSUMER)
    events = fetch_value(conn,
                         'SELECT count(*) FROM pgq.get_batch_events(%s)',
                         batch_id)
    assert events == 0


def test_new_audit_record_inserts_row(conn: Connection) -> None:
    message_id = str(uuid.uuid4())

    fetch_value(conn,
                'SELECT mikkoo.new_audit_record(%s, %s, %s, %s, %s, %s, %s,'
                ' %s::jsonb, %s::jsonb) IS NULL',
                message_id, 99, 'q', 'x', 'rk', 'body', 'text/plain',
                '{"message_id": "m"}', '{"h": 1}')

    row = fetch_audit_row(conn, message_id)
    assert row is not None
    assert row['event_id'] == 99
    assert row['queue'] == 'q'
    assert row['exchange'] == 'x'
    assert row['routing_key'] == 'rk'
    assert row['payload'] == 'body'
    assert row['content_type'] == 'text/plain'
    assert row['properties'] == {'message_id': 'm'}
    assert row['headers'] == {'h': 1}


def test_new_audit_record_duplicate_id(conn: Connection) -> None:
    message_id = str(uuid.uuid4())
    query = ('SELECT mikkoo.new_audit_record(%s, 1, NULL, NULL, NULL, NULL,'
             ' NULL, NULL, NULL) IS NULL')
    fetch_value(conn, query, message_id)

    with pytest.raises(psycopg2.errors.UniqueViolation):
        fetch_value(conn, query, message_id)


def test_delete_audit_record_once(conn: Connection, queue: str) -> None:
    insert_audited(conn, queue)
    message_id = json.loads(read_events(conn, queue)[0]['ev_extra3'])[
        'message_id']
    query = 'SELECT mikkoo.delete_audit_record(%s)'

    assert fetch_value(conn, query, message_id) is True
    assert fetch_audit_row(conn, message_id) is None
    assert fetch_value(conn, query, message_id) is False


def test_delete_audit_record_unknown_id(conn: Connection) -> None:
    deleted = fetch_value(conn, 'SELECT mikkoo.delete_audit_record(%s)',
                          str(uuid.uuid4()))

    assert deleted is False


def test_definer_functions_pin_search_path(conn: Connection) -> None:
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT proname, proconfig FROM pg_proc"
            " WHERE pronamespace = 'mikkoo'::regnamespace AND prosecdef")
        rows = cursor.fetchall()

    assert {name for name, _ in rows} == DEFINER_FUNCTIONS
    for name, config in rows:
        assert config is not None, f'{name} has no SET clause'
        assert 'search_path=pg_catalog, pg_temp' in config, \
            f'{name} has config {config}'


def test_definer_functions_not_public(conn: Connection) -> None:
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT proname FROM pg_proc"
            " WHERE pronamespace = 'mikkoo'::regnamespace AND prosecdef"
            " AND (proacl IS NULL OR EXISTS ("
            "   SELECT 1 FROM aclexplode(proacl) AS acl"
            "   WHERE acl.grantee = 0))")
        public_functions = [name for (name,) in cursor.fetchall()]

    assert public_functions == []


def test_functions_have_comments(conn: Connection) -> None:
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p"
            " WHERE p.pronamespace = 'mikkoo'::regnamespace"
            " AND obj_description(p.oid, 'pg_proc') IS NULL")
        uncommented = [signature for (signature,) in cursor.fetchall()]

    assert uncommented == []


def test_writer_role_inserts_audited(database: str, queue: str,
                                     writer_role: str) -> None:
    writer = connect(database, autocommit=False)
    try:
        with writer.cursor() as cursor:
            cursor.execute(sql.SQL('SET LOCAL ROLE {}').format(
                sql.Identifier(writer_role)))
        event_id = insert_audited(writer, queue)
        with writer.cursor() as cursor:
            cursor.execute('RESET ROLE')
        audit_rows = fetch_value(writer,
                                 'SELECT count(*) FROM mikkoo.audit'
                                 ' WHERE event_id = %s AND queue = %s',
                                 event_id, queue)
    finally:
        writer.rollback()
        writer.close()

    assert audit_rows == 1


@pytest.mark.parametrize('query', [
    'SELECT mikkoo.delete_audit_record(gen_random_uuid())',
    'SELECT mikkoo.new_audit_record(gen_random_uuid(), 1, NULL, NULL, NULL,'
    ' NULL, NULL, NULL, NULL) IS NULL',
    'SELECT count(*) FROM mikkoo.audit',
])
def test_writer_role_denied_audit(database: str, writer_role: str,
                                  query: str) -> None:
    writer = connect(database, autocommit=False)
    try:
        with writer.cursor() as cursor:
            cursor.execute(sql.SQL('SET LOCAL ROLE {}').format(
                sql.Identifier(writer_role)))
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            fetch_value(writer, query)
    finally:
        writer.rollback()
        writer.close()
