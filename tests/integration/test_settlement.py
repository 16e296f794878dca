"""End to end: what becomes of events RabbitMQ refuses (nack, return, no exchange)."""
from __future__ import annotations

import re

import pika

from tests.integration.conftest import (
    AMQPHelper, MikkooProcess, MikkooRunner, Received, insert_event, insert_events,
    mikkoo_config, queue_config, retry_events, retry_queue_ids, sql, tick, unique_name,
    wait_until)

# Seconds to keep retrying an event until it arrives or is discarded.
RETRY_TIMEOUT = 15.0


def start_relay(run_mikkoo: MikkooRunner, url: str, **options: object) -> tuple[str,
                                                                                 MikkooProcess]:
    pgq_queue = unique_name('settle')
    process = run_mikkoo(mikkoo_config({pgq_queue: queue_config(url, **options)}))
    process.wait_registered(url, pgq_queue)
    return pgq_queue, process


def retry_until_received(url: str, pgq_queue: str, amqp: AMQPHelper, queue: str,
                         process: MikkooProcess) -> list[Received]:
    """Hand retried events back to the relay until a message arrives on ``queue``."""
    def received() -> list[Received]:
        retry_events(url, pgq_queue)
        return amqp.get_messages(queue, count=1, timeout=0.2)

    return wait_until(received, RETRY_TIMEOUT, interval=0.1,
                      message=lambda: f'the retried event on {queue}\n{process.describe()}')


def test_nacked_event_is_retried(pg_database: str, amqp: AMQPHelper,
                                 run_mikkoo: MikkooRunner) -> None:
    pgq_queue, process = start_relay(run_mikkoo, pg_database, retry_delay=1,
                                     max_failures=100)
    # A full queue that rejects new messages makes the broker nack them.
    queue = amqp.declare_queue(arguments={'x-max-length': 1,
                                          'x-overflow': 'reject-publish'})
    amqp.publish('', queue, b'filler')
    assert amqp.message_count(queue) == 1

    event = insert_event(pg_database, pgq_queue, queue, 'nacked at first')
    tick(pg_database, pgq_queue)

    [line] = process.wait_for_log(rf'WARNING\b.*\bevent {event.id} failed\b.*retry 1\b')
    assert 'nack' in line
    assert pgq_queue in line
    assert amqp.purge(queue) == 1
    messages = retry_until_received(pg_database, pgq_queue, amqp, queue, process)
    messages += amqp.expect_no_message(queue, wait=0.5)
    assert [message.body for message in messages] == [b'nacked at first']
    assert messages[0].headers['pgq_event_id'] == event.id
    assert not process.log_lines(rf'discarding event {event.id}\b')


def test_failed_event_waits_retry_delay(pg_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner) -> None:
    pgq_queue, process = start_relay(run_mikkoo, pg_database, retry_delay=30)
    routing_key = unique_name('nobody_listens')

    event = insert_event(pg_database, pgq_queue, routing_key, 'later')
    tick(pg_database, pgq_queue)

    process.wait_for_log(rf'WARNING\b.*\bevent {event.id} failed\b.*retry 1 in 30 s')
    rows = wait_until(lambda: sql(
        pg_database, 'SELECT r.ev_retry, extract(epoch FROM r.ev_retry_after - now())'
                     '  FROM pgq.retry_queue AS r JOIN pgq.queue AS q'
                     '    ON q.queue_id = r.ev_queue'
                     ' WHERE q.queue_name = %s AND r.ev_id = %s', (pgq_queue, event.id)),
        message='the event in the retry queue')
    [(retry, seconds_left)] = rows
    assert retry == 1
    assert 25 < seconds_left <= 30
    assert retry_events(pg_database, pgq_queue) == 0
    assert retry_queue_ids(pg_database, pgq_queue) == [event.id]


def test_unroutable_event_is_discarded_after_max_failures(
        pg_database: str, amqp: AMQPHelper, run_mikkoo: MikkooRunner) -> None:
    pgq_queue, process = start_relay(run_mikkoo, pg_database, retry_delay=0,
                                     max_failures=2)
    routing_key = unique_name('nobody_listens')
    event = insert_event(pg_database, pgq_queue, routing_key, 'lost')
    tick(pg_database, pgq_queue)

    def discarded() -> list[str]:
        retry_events(pg_database, pgq_queue)
        return process.log_lines(rf'WARNING\b.*\bdiscarding event {event.id}\b')

    [line] = wait_until(discarded, RETRY_TIMEOUT, interval=0.1,
                        message=lambda: f'the discard\n{process.describe()}')
    assert pgq_queue in line
    assert "exchange ''" in line
    assert f'routing key {routing_key!r}' in line
    assert 'unroutable' in line
    failures = process.log_lines(rf'WARNING\b.*\bevent {event.id} failed\b')
    assert len(failures) == 2, process.describe()
    assert re.search(r'\bretry 1\b', failures[0])
    assert re.search(r'\bretry 2\b', failures[1])
    assert all('unroutable' in failure for failure in failures)

    # Nothing is left for PgQ to hand back: no retry, no more attempts.
    assert retry_queue_ids(pg_database, pgq_queue) == []
    for _ in range(5):
        retry_events(pg_database, pgq_queue)
        amqp.connection.sleep(0.1)
    assert len(process.log_lines(rf'\bevent {event.id} failed\b')) == 2
    assert len(process.log_lines(rf'\bdiscarding event {event.id}\b')) == 1
    assert retry_queue_ids(pg_database, pgq_queue) == []


def test_missing_exchange_fails_only_its_event(pg_database: str, amqp: AMQPHelper,
                                               run_mikkoo: MikkooRunner) -> None:
    pgq_queue, process = start_relay(run_mikkoo, pg_database, retry_delay=0)
    queue = amqp.declare_queue()
    missing = unique_name('mikkoo_it_missing')

    before, lost, after = insert_events(pg_database, pgq_queue, [
        dict(ev_type=queue, data='before'),
        dict(ev_type='anything', data='to a missing exchange', extra1=missing),
        dict(ev_type=queue, data='after')])
    tick(pg_database, pgq_queue)

    messages = amqp.get_messages(queue, count=2)
    assert [message.body for message in messages] == [b'before', b'after']
    assert [message.headers['pgq_event_id'] for message in messages] == [before.id, after.id]
    [line] = process.wait_for_log(rf'WARNING\b.*\bevent {lost.id} failed\b.*retry 1\b')
    assert f'exchange {missing!r}' in line
    assert 'not found' in line
    assert amqp.exchange_exists('amq.direct')  # the helper's channel still works

    # Once the exchange exists, the retried event goes through.
    amqp.declare_exchange('fanout', name=missing)
    amqp.bind(queue, missing)
    messages = retry_until_received(pg_database, pgq_queue, amqp, queue, process)
    assert [message.body for message in messages] == [b'to a missing exchange']
    assert messages[0].method.exchange == missing
    assert messages[0].headers['pgq_event_id'] == lost.id


def test_nack_fails_only_its_event(pg_database: str, amqp: AMQPHelper,
                                   run_mikkoo: MikkooRunner) -> None:
    """Events around a nacked one in the same batch are delivered once."""
    pgq_queue, process = start_relay(run_mikkoo, pg_database, retry_delay=1,
                                     max_failures=100)
    full = amqp.declare_queue(arguments={'x-max-length': 1,
                                         'x-overflow': 'reject-publish'})
    amqp.publish('', full, b'filler', pika.BasicProperties())
    queue = amqp.declare_queue()

    first, nacked, last = insert_events(pg_database, pgq_queue, [
        dict(ev_type=queue, data='1'), dict(ev_type=full, data='nacked'),
        dict(ev_type=queue, data='3')])
    tick(pg_database, pgq_queue)

    process.wait_for_log(rf'\bevent {nacked.id} failed\b')
    messages = amqp.get_messages(queue, count=2)
    messages += amqp.expect_no_message(queue, wait=0.5)
    assert [message.body for message in messages] == [b'1', b'3']
    assert not process.log_lines(rf'\bevent ({first.id}|{last.id}) failed\b')


def test_exhausted_event_goes_to_dead_letter_exchange(pg_database: str, amqp: AMQPHelper,
                                                      run_mikkoo: MikkooRunner) -> None:
    dead_letters = amqp.declare_exchange('fanout')
    dead_queue = amqp.declare_queue()
    amqp.bind(dead_queue, dead_letters)
    pgq_queue, process = start_relay(run_mikkoo, pg_database, retry_delay=0,
                                     max_failures=0, dead_letter_exchange=dead_letters)
    routing_key = unique_name('nobody_listens')

    event = insert_event(pg_database, pgq_queue, routing_key, 'dead', extra2='text/plain')
    tick(pg_database, pgq_queue)

    [message] = amqp.get_messages(dead_queue)
    assert message.body == b'dead'
    assert message.method.exchange == dead_letters
    assert message.properties.content_type == 'text/plain'
    headers = message.headers
    assert headers['x-mikkoo-queue'] == pgq_queue
    assert headers['x-mikkoo-event-id'] == event.id
    assert headers['x-mikkoo-exchange'] == ''
    assert headers['x-mikkoo-routing-key'] == routing_key
    assert 'unroutable' in headers['x-mikkoo-reason']
    [line] = process.wait_for_log(rf'WARNING\b.*\bdead-lettered\b.*\bevent {event.id}\b')
    assert routing_key in line
    assert retry_queue_ids(pg_database, pgq_queue) == []
