"""Worker memory while relaying events of 1 MB each."""
from pathlib import Path

from .conftest import (
    AMQPHelper, MikkooRunner, insert_events, mikkoo_config, queue_config, sql, tick,
    unique_name, wait_until)

EVENTS = 150
EVENT_BYTES = 1024 * 1024
# Without the byte bounds the worker peaked at 503 MB here: one FETCH of
# all 150 events and a window of 150 messages, with copies of each. With
# them it peaked at 168 MB.
PEAK_RSS_LIMIT = 250 * 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
    raise AssertionError(f'no VmHWM in /proc/{pid}/status')


def test_large_events_bounded_memory(pg_database: str, amqp: AMQPHelper,
                                                run_mikkoo: MikkooRunner) -> None:
    queue = amqp.declare_queue()
    pgq_queue = unique_name('memory')
    sql(pg_database, 'SELECT pgq.create_queue(%s)', (pgq_queue,))
    sql(pg_database, 'SELECT pgq.register_consumer(%s, %s)', (pgq_queue, 'mikkoo'))
    body = 'x' * EVENT_BYTES
    insert_events(pg_database, pgq_queue, [{'ev_type': queue, 'data': body}] * EVENTS)
    tick(pg_database, pgq_queue)

    process = run_mikkoo(mikkoo_config({pgq_queue: queue_config(pg_database)}))
    wait_until(lambda: amqp.message_count(queue) >= EVENTS, timeout=120,
               message=lambda: f'{amqp.message_count(queue)} of {EVENTS} messages arrived')
    workers = process.worker_pids()

    assert len(workers) == 1, process.describe()
    assert peak_rss_bytes(workers[0]) < PEAK_RSS_LIMIT
    assert amqp.message_count(queue) == EVENTS
