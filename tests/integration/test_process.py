"""End to end: the controller, its worker processes, signals and exit statuses."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    RABBITMQ_URL, AMQPHelper, MikkooProcess, MikkooRunner, consumer_registered, find_mikkoo,
    insert_event, mikkoo_config, pid_alive, queue_config, tick, unique_name, wait_until)


def start_relay(run_mikkoo: MikkooRunner, url: str, queues: list[str],
                **options: object) -> MikkooProcess:
    process = run_mikkoo(mikkoo_config({queue: queue_config(url, **options)
                                        for queue in queues}))
    for queue in queues:
        process.wait_registered(url, queue)
    return process


def assert_relays(url: str, pgq_queue: str, amqp: AMQPHelper, body: str) -> None:
    """Insert an event on ``pgq_queue`` and check it arrives in RabbitMQ."""
    queue = amqp.declare_queue()
    insert_event(url, pgq_queue, queue, body)
    tick(url, pgq_queue)
    messages = amqp.get_messages(queue)
    assert [message.body for message in messages] == [body.encode()]


def worker_pids(process: MikkooProcess, count: int) -> list[int]:
    """Wait until the controller has ``count`` live children; return their pids."""
    return wait_until(lambda: (pids := process.worker_pids()) and len(pids) == count
                      and pids, message=lambda: f'{count} workers\n{process.describe()}')


def test_one_worker_process_per_queue(pg_database: str, amqp: AMQPHelper,
                                      run_mikkoo: MikkooRunner) -> None:
    first, second = unique_name('first'), unique_name('second')

    process = start_relay(run_mikkoo, pg_database, [first, second])

    pids = worker_pids(process, 2)
    assert process.pid not in pids
    for queue in (first, second):
        [line] = process.wait_for_log(rf'started worker for queue {queue} \(pid \d+\)')
        assert int(line.rsplit('pid ', 1)[1].rstrip(')')) in pids
    assert_relays(pg_database, first, amqp, 'to the first')
    assert_relays(pg_database, second, amqp, 'to the second')


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT],
                         ids=['SIGTERM', 'SIGINT'])
def test_stop_signal_unregisters_consumer(pg_database: str, amqp: AMQPHelper,
                                          run_mikkoo: MikkooRunner, signum: int) -> None:
    first, second = unique_name('first'), unique_name('second')
    process = start_relay(run_mikkoo, pg_database, [first, second], unregister=True)
    assert_relays(pg_database, first, amqp, 'before the stop')
    pids = worker_pids(process, 2)

    process.send(signum)

    assert process.wait() == 0, process.describe()
    assert not consumer_registered(pg_database, first)
    assert not consumer_registered(pg_database, second)
    assert not any(pid_alive(pid) for pid in pids)
    assert 'Traceback' not in process.log()
    assert len(process.log_lines(r'unregistered PgQ consumer mikkoo')) == 2


def test_sigterm_keeps_consumer_without_unregister(pg_database: str, amqp: AMQPHelper,
                                                   run_mikkoo: MikkooRunner) -> None:
    queue = unique_name('kept')
    process = start_relay(run_mikkoo, pg_database, [queue], unregister=False)
    assert_relays(pg_database, queue, amqp, 'before the stop')
    [pid] = worker_pids(process, 1)

    process.send(signal.SIGTERM)

    assert process.wait() == 0, process.describe()
    assert consumer_registered(pg_database, queue)
    assert not pid_alive(pid)
    assert 'Traceback' not in process.log()


def test_events_inserted_while_stopped_arrive_after_restart(
        pg_database: str, amqp: AMQPHelper, run_mikkoo: MikkooRunner) -> None:
    """With unregister false, the consumer keeps its place while mikkoo is down."""
    pgq_queue = unique_name('kept')
    first = start_relay(run_mikkoo, pg_database, [pgq_queue], unregister=False)
    first.send(signal.SIGTERM)
    assert first.wait() == 0, first.describe()
    queue = amqp.declare_queue()
    insert_event(pg_database, pgq_queue, queue, 'while stopped')
    tick(pg_database, pgq_queue)

    start_relay(run_mikkoo, pg_database, [pgq_queue], unregister=False)

    assert [message.body for message in amqp.get_messages(queue)] == [b'while stopped']


def test_killed_worker_is_restarted(pg_database: str, amqp: AMQPHelper,
                                    run_mikkoo: MikkooRunner) -> None:
    queue = unique_name('restart')
    process = start_relay(run_mikkoo, pg_database, [queue])
    [old_pid] = worker_pids(process, 1)

    os.kill(old_pid, signal.SIGKILL)

    process.wait_for_log(rf'worker for queue {queue} was killed by SIGKILL')
    new_pid = wait_until(lambda: (pids := process.worker_pids()) and pids[0] != old_pid
                         and pids[0], message=lambda: f'a new worker\n{process.describe()}')
    process.wait_for_log(rf'started worker for queue {queue} \(pid {new_pid}\)')
    process.wait_for_log(rf'\[{new_pid}\].*connected to RabbitMQ')
    assert process.returncode is None
    assert_relays(pg_database, queue, amqp, 'after the restart')


def test_stop_while_worker_waits_for_restart(pg_database: str,
                                             run_mikkoo: MikkooRunner) -> None:
    queue = unique_name('backoff')
    process = start_relay(run_mikkoo, pg_database, [queue])
    [pid] = worker_pids(process, 1)
    os.kill(pid, signal.SIGKILL)
    process.wait_for_log(rf'worker for queue {queue} was killed by SIGKILL; restarting')

    process.send(signal.SIGTERM)

    assert process.wait(timeout=5) == 0, process.describe()
    assert process.worker_pids() == []
    assert 'Traceback' not in process.log()


def test_rabbitmq_url_consumer_name_and_no_confirms(pg_database: str, amqp: AMQPHelper,
                                                    run_mikkoo: MikkooRunner) -> None:
    queue = unique_name('options')
    options = queue_config(pg_database, consumer_name='other_relay', confirm=False)
    del options['rabbitmq']
    options['rabbitmq_url'] = RABBITMQ_URL
    process = run_mikkoo(mikkoo_config({queue: options}))
    process.wait_registered(pg_database, queue, consumer='other_relay')
    assert not consumer_registered(pg_database, queue, 'mikkoo')

    assert_relays(pg_database, queue, amqp, 'without confirmations')

    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.describe()
    assert not consumer_registered(pg_database, queue, 'other_relay')


# -- configuration errors -------------------------------------------------------

def run_with_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / 'bad.yml'
    path.write_text(text)
    return subprocess.run([find_mikkoo(), '-c', str(path), '-f'], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize('options, key', [
    ({'max_failures': 'many'}, 'Application.workers.orders.max_failures'),
    ({'wait_duration': -1}, 'Application.workers.orders.wait_duration'),
    ({'rabbitmq': {'port': 70000}}, 'Application.workers.orders.rabbitmq.port'),
    ({'postgres_url': None}, 'Application.workers.orders.postgres_url'),
    ({'unregister': 'yes'}, 'Application.workers.orders.unregister'),
], ids=['max_failures', 'wait_duration', 'port', 'postgres_url', 'unregister'])
def test_bad_config_exits_2(tmp_path: Path, options: dict[str, object], key: str) -> None:
    worker = {'postgres_url': 'postgresql://postgres@127.0.0.1/postgres', **options}
    if worker['postgres_url'] is None:
        del worker['postgres_url']
    text = yaml.safe_dump({'Application': {'workers': {'orders': worker}}})

    result = run_with_config(tmp_path, text)

    assert result.returncode == 2, result
    assert 'Traceback' not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if key in line]
    assert str(tmp_path / 'bad.yml') in line


def test_bad_config_reports_every_problem(tmp_path: Path) -> None:
    text = yaml.safe_dump({'Application': {'poll_interval': 0, 'workers': {
        'orders': {'postgres_url': 'postgresql://postgres@127.0.0.1/postgres',
                   'retry_delay': 'soon', 'confirm': 3}}}})

    result = run_with_config(tmp_path, text)

    assert result.returncode == 2, result
    assert 'Traceback' not in result.stderr
    problems = [line for line in result.stderr.splitlines()
                if str(tmp_path / 'bad.yml') in line]
    assert len(problems) == 3, result.stderr
    for key in ('Application.poll_interval', 'Application.workers.orders.retry_delay',
                'Application.workers.orders.confirm'):
        assert sum(key in line for line in problems) == 1, (key, result.stderr)


@pytest.mark.parametrize('text', ['Application: [unclosed', 'Application:\n  workers: {}\n',
                                  'just a string'],
                         ids=['invalid-yaml', 'no-workers', 'not-a-mapping'])
def test_unusable_config_file_exits_2(tmp_path: Path, text: str) -> None:
    result = run_with_config(tmp_path, text)

    assert result.returncode == 2, result
    assert 'Traceback' not in result.stderr
    assert str(tmp_path / 'bad.yml') in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / 'missing.yml'

    result = subprocess.run([find_mikkoo(), '-c', str(missing), '-f'], capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)

    assert result.returncode == 2, result
    assert 'Traceback' not in result.stderr
    assert str(missing) in result.stderr
