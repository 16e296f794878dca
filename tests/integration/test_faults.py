"""End to end: the relay under faults of RabbitMQ, PostgreSQL, pgqd and itself.

Each fault test sends numbered events (body ``{"id": N}``), injects a fault
while a batch is in flight, reads every message back and checks that no
event is lost. Duplicates are allowed, because delivery is at least once,
and counted. :func:`faults_support.record` prints the numbers and appends them
to $MIKKOO_FAULT_REPORT.

The relay logs in with a RabbitMQ user and a PostgreSQL URL that carry
passwords, and every test checks that no log of the relay contains them.

Tests marked ``disruptive`` stop, restart or reconfigure the shared
RabbitMQ, PostgreSQL or pgqd, and restore them before they end.
"""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.integration import faults_support as faults
from tests.integration.conftest import (
    AMQPHelper, MikkooProcess, MikkooRunner, consumer_registered, insert_event,
    insert_events, mikkoo_config, queue_config, retry_queue_ids, sql, tick, unique_name,
    wait_until)
from tests.integration.faults_support import Credentials, Tally

# Events in the batch a fault hits: enough that the relay is still
# publishing when the fault arrives a second or two after the first message.
BATCH = 50_000
# Seconds to read back every event of a faulted batch.
COLLECT_TIMEOUT = 120.0
# The maximum CPU share of one core a waiting worker may use.
IDLE_CPU_SHARE = 0.2
# Seconds a worker gets to stop after SIGTERM before the controller kills
# it, and the seconds within which the tests expect it to stop by itself.
SHUTDOWN_TIMEOUT = 30
STOP_SECONDS = 15


@pytest.fixture(scope='module')
def credentials() -> Iterator[Credentials]:
    """A RabbitMQ user with a password for the relays of this module."""
    with faults.rabbitmq_user() as credentials:
        yield credentials


@pytest.fixture(autouse=True)
def no_password_in_logs(run_mikkoo: MikkooRunner,
                        credentials: Credentials) -> Iterator[None]:
    """Check after each test that no relay log contains a password."""
    yield
    faults.assert_no_secret({str(process.log_path): process.log()
                             for process in run_mikkoo.processes}, credentials.secrets)


@dataclasses.dataclass
class Relay:
    """A mikkoo relaying one PgQ queue to one RabbitMQ queue by routing key."""

    url: str                # the test database, for the test's own sessions
    pgq_queue: str
    queue: str
    config: dict[str, Any]
    process: MikkooProcess

    def send(self, count: int, first: int = 1, **options: Any) -> range:
        """Insert numbered events in one batch and tick; return their ids."""
        ids = faults.insert_numbered(self.url, self.pgq_queue, self.queue, first, count,
                                     **options)
        tick(self.url, self.pgq_queue)
        return ids

    def collect(self, scenario: str, ids: range | set[int],
                timeout: float = COLLECT_TIMEOUT) -> Tally:
        tally = Tally(scenario, self.pgq_queue, set(ids))
        return faults.collect(self.queue, tally, timeout)

    def worker_pid(self) -> int:
        [pid] = wait_until(lambda: (pids := self.process.worker_pids()) and pids,
                           message=lambda: f'the worker\n{self.process.describe()}')
        return pid

    def connected_lines(self) -> list[str]:
        return self.process.log_lines(r'connected to RabbitMQ at')


def assert_stopped_by_itself(relay: Relay) -> None:
    """Check that the worker exited after SIGTERM without being killed."""
    assert not relay.process.log_lines(r'did not stop within'), relay.process.describe()
    assert relay.process.log_lines(rf'INFO\b.*worker for queue {relay.pgq_queue} stopped$')


def relay_options(url: str, credentials: Credentials,
                  rabbitmq: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Worker options that log in to both services with a password.

    ``rabbitmq`` adds keys to the worker's rabbitmq section.
    """
    worker = queue_config(faults.with_password(url, credentials.postgres_password),
                          **options)
    worker['rabbitmq'] = {**worker['rabbitmq'], 'username': credentials.username,
                          'password': credentials.rabbitmq_password, **(rabbitmq or {})}
    return worker


def start_relay(run_mikkoo: MikkooRunner, url: str, amqp: AMQPHelper,
                credentials: Credentials, queue: str | None = None,
                application: dict[str, Any] | None = None, **options: Any) -> Relay:
    """Start mikkoo on a new PgQ queue; wait until it is connected to both services.

    Events go to ``queue`` (by default a new one) through the default
    exchange. ``application`` sets options of the Application section.
    """
    pgq_queue = unique_name('fault')
    queue = queue or amqp.declare_queue()
    config = mikkoo_config({pgq_queue: relay_options(url, credentials, **options)},
                           **(application or {}))
    process = run_mikkoo(config)
    process.wait_registered(url, pgq_queue)
    process.wait_for_log(r'connected to RabbitMQ at')
    return Relay(url, pgq_queue, queue, config, process)


# -- RabbitMQ faults ---------------------------------------------------------------

def test_relay_connection_closed_mid_batch(pg_database: str, amqp: AMQPHelper,
                                           run_mikkoo: MikkooRunner,
                                           credentials: Credentials) -> None:
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)
    [connection] = wait_until(lambda: faults.relay_connections(relay.pgq_queue),
                              message='the relay connection in rabbitmqctl')
    assert connection.user == credentials.username

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    faults.rabbitmqctl('close_connection', connection.pid, 'fault test closes the relay')

    tally = relay.collect('relay connection closed mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*lost the RabbitMQ connection')
    assert len(relay.connected_lines()) == 2
    assert relay.process.returncode is None


@pytest.mark.disruptive
def test_all_connections_closed_mid_batch(pg_database: str, amqp: AMQPHelper,
                                          run_mikkoo: MikkooRunner,
                                          credentials: Credentials) -> None:
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    faults.rabbitmqctl('close_all_connections', 'fault test closes every connection')

    tally = relay.collect('all connections closed mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*lost the RabbitMQ connection')
    assert len(relay.connected_lines()) == 2


@pytest.mark.disruptive
def test_rabbitmq_app_restarted_mid_batch(pg_database: str, amqp: AMQPHelper,
                                          run_mikkoo: MikkooRunner,
                                          credentials: Credentials) -> None:
    """Stopping the broker's application drops its transient queues and
    messages, so this test uses a durable queue and persistent messages."""
    queue = faults.declare_durable_queue(amqp)
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, queue=queue)

    ids = relay.send(BATCH, extra3=json.dumps({'delivery_mode': 2}))
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    try:
        faults.rabbitmqctl('stop_app')
        relay.process.wait_for_log(r'WARNING\b.*cannot connect to RabbitMQ', timeout=60)
    finally:
        faults.wait_rabbitmq_ready()

    tally = relay.collect('rabbitmq app restarted mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*lost the RabbitMQ connection')
    assert relay.process.returncode is None


@pytest.fixture()
def proxy() -> Iterator[faults.TCPProxy]:
    """A TCP proxy to RabbitMQ that the test can freeze or cut."""
    proxy = faults.TCPProxy()
    try:
        yield proxy
    finally:
        proxy.close()


def test_tcp_connection_cut_mid_batch(pg_database: str, amqp: AMQPHelper,
                                      run_mikkoo: MikkooRunner, credentials: Credentials,
                                      proxy: faults.TCPProxy) -> None:
    """The network drops the connection without an AMQP close."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials,
                        rabbitmq={'port': proxy.port})

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    assert proxy.cut() == 1

    tally = relay.collect('tcp connection cut mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*lost the RabbitMQ connection')
    assert len(relay.connected_lines()) == 2


def test_hung_connection_found_by_heartbeat(pg_database: str, amqp: AMQPHelper,
                                            run_mikkoo: MikkooRunner,
                                            credentials: Credentials,
                                            proxy: faults.TCPProxy) -> None:
    """The connection stops passing data but stays open; missed heartbeats
    make the relay reconnect and publish the messages in doubt again."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials,
                        rabbitmq={'port': proxy.port, 'heartbeat_interval': 2})

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    assert proxy.freeze() == 1

    tally = relay.collect('connection hangs mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*lost the RabbitMQ connection')
    assert len(relay.connected_lines()) == 2


def test_sigterm_while_connection_hangs(pg_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner,
                                        credentials: Credentials,
                                        proxy: faults.TCPProxy) -> None:
    """A worker waiting for confirmations that never come still stops on
    SIGTERM, leaving its batch for the next start."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, unregister=False,
                        rabbitmq={'port': proxy.port, 'heartbeat_interval': 60},
                        application={'shutdown_timeout': SHUTDOWN_TIMEOUT})
    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    assert proxy.freeze() == 1
    time.sleep(0.5)

    started = time.monotonic()
    relay.process.send(signal.SIGTERM)
    status = relay.process.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    seconds = time.monotonic() - started

    second = run_mikkoo(relay.config)
    tally = relay.collect('sigterm while connection hangs', ids)
    print(f'stopped in {seconds:.1f} s while the connection hung')
    faults.assert_all_arrived(tally)
    assert second.returncode is None
    assert status == 0, relay.process.describe()
    assert seconds < STOP_SECONDS
    assert_stopped_by_itself(relay)


# -- PostgreSQL faults -------------------------------------------------------------

def test_relay_session_terminated_mid_batch(pg_database: str, amqp: AMQPHelper,
                                            run_mikkoo: MikkooRunner,
                                            credentials: Credentials) -> None:
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    assert faults.terminate_relay_backends(pg_database) == 1

    tally = relay.collect('relay session terminated mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*cannot use PostgreSQL')
    assert len(relay.process.log_lines(r'connected to PostgreSQL')) == 2
    assert relay.process.returncode is None


@pytest.mark.disruptive
def test_postgres_restarted_mid_batch(pg_database: str, amqp: AMQPHelper,
                                      run_mikkoo: MikkooRunner,
                                      credentials: Credentials) -> None:
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    try:
        faults.pg_ctlcluster('restart')
    finally:
        faults.wait_postgres_ready()
        if faults.pgqd_pid() is None:
            faults.start_pgqd()

    tally = relay.collect('postgres restarted mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*cannot use PostgreSQL')
    assert relay.process.returncode is None


# -- the relay's own processes -----------------------------------------------------

def test_worker_killed_mid_batch(pg_database: str, amqp: AMQPHelper,
                                 run_mikkoo: MikkooRunner,
                                 credentials: Credentials) -> None:
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)
    old_pid = relay.worker_pid()

    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    os.kill(old_pid, signal.SIGKILL)

    relay.process.wait_for_log(rf'worker for queue {relay.pgq_queue} was killed by SIGKILL')
    tally = relay.collect('worker killed mid-batch', ids)
    faults.assert_all_arrived(tally)
    assert relay.worker_pid() != old_pid
    assert relay.process.returncode is None


def test_sigterm_during_large_batch(pg_database: str, amqp: AMQPHelper,
                                    run_mikkoo: MikkooRunner,
                                    credentials: Credentials) -> None:
    """SIGTERM while a batch of 100,000 events is in flight: the relay
    stops soon, leaves the batch unfinished and relays it after a restart."""
    total = 100_000
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, unregister=False,
                        application={'shutdown_timeout': SHUTDOWN_TIMEOUT})
    ids = relay.send(total)
    faults.wait_mid_batch(amqp, relay.queue, total, relay.process, at_least=2000)

    started = time.monotonic()
    relay.process.send(signal.SIGTERM)
    status = relay.process.wait(timeout=60)
    seconds = time.monotonic() - started

    assert status == 0, relay.process.describe()
    assert seconds < STOP_SECONDS
    assert_stopped_by_itself(relay)
    assert relay.process.log_lines(r'leaving batch \d+ unfinished')
    assert consumer_registered(pg_database, relay.pgq_queue)
    published = amqp.message_count(relay.queue)
    assert published < total

    second = run_mikkoo(relay.config)
    tally = relay.collect('sigterm during 100,000-event batch', ids)
    print(f'stopped in {seconds:.1f} s with {published} of {total} messages published')
    faults.assert_all_arrived(tally)
    assert second.returncode is None


def test_frozen_worker_killed_at_deadline(pg_database: str, amqp: AMQPHelper,
                                          run_mikkoo: MikkooRunner,
                                          credentials: Credentials) -> None:
    """A worker that cannot act on SIGTERM (stopped with SIGSTOP) is killed
    once at shutdown_timeout; its batch is relayed after a restart."""
    shutdown_timeout = 2
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, unregister=False,
                        application={'shutdown_timeout': shutdown_timeout})
    pid = relay.worker_pid()
    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)
    os.kill(pid, signal.SIGSTOP)

    started = time.monotonic()
    relay.process.send(signal.SIGTERM)
    status = relay.process.wait(timeout=30)
    seconds = time.monotonic() - started

    second = run_mikkoo(relay.config)
    tally = relay.collect('worker frozen, killed at shutdown deadline', ids)
    faults.assert_all_arrived(tally)
    assert second.returncode is None
    assert status == 0, relay.process.describe()
    assert shutdown_timeout <= seconds < shutdown_timeout + 5
    assert relay.process.log_lines(rf'worker for queue {relay.pgq_queue} was killed by '
                                   'SIGKILL')
    assert len(relay.process.log_lines(r'ERROR\b.*did not stop within')) == 1


def test_sigterm_with_unregister_finishes_batch(pg_database: str, amqp: AMQPHelper,
                                                run_mikkoo: MikkooRunner,
                                                credentials: Credentials) -> None:
    """With unregister on, the worker finishes the batch in hand before it
    unregisters, so the batch arrives once and nothing is left behind."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, unregister=True,
                        application={'shutdown_timeout': SHUTDOWN_TIMEOUT})
    ids = relay.send(BATCH)
    faults.wait_mid_batch(amqp, relay.queue, BATCH, relay.process)

    started = time.monotonic()
    relay.process.send(signal.SIGTERM)
    status = relay.process.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    seconds = time.monotonic() - started

    tally = relay.collect('sigterm with unregister on', ids)
    print(f'stopped in {seconds:.1f} s after finishing the batch')
    faults.assert_all_arrived(tally)
    assert tally.duplicated == 0
    assert status == 0, relay.process.describe()
    assert seconds < STOP_SECONDS
    assert_stopped_by_itself(relay)
    assert not relay.process.log_lines(r'leaving batch \d+ unfinished')
    assert not consumer_registered(pg_database, relay.pgq_queue)


def test_reload_loses_no_event(pg_database: str, amqp: AMQPHelper,
                               run_mikkoo: MikkooRunner, credentials: Credentials) -> None:
    """A SIGHUP that changes the queue's settings restarts its worker. Events
    waiting in PgQ's retry queue and events inserted during the restart must
    still arrive, with unregister at its default (true)."""
    capacity = 1
    queue = amqp.declare_queue(arguments={'x-max-length': capacity,
                                          'x-overflow': 'reject-publish'})
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, queue=queue,
                        retry_delay=2, max_failures=100)
    nacked = relay.send(20)
    wait_until(lambda: len(retry_queue_ids(pg_database, relay.pgq_queue)) >= 19,
               message=lambda: f'19 nacked events to retry\n{relay.process.describe()}')
    relay.config['Application']['workers'][relay.pgq_queue]['wait_duration'] = 0.2
    relay.process.config_path.write_text(yaml.safe_dump(relay.config))

    with faults.numbered_inserts(pg_database, relay.pgq_queue, queue,
                                 first=1001) as during:
        relay.process.send(signal.SIGHUP)
        relay.process.wait_for_log(rf'queue {relay.pgq_queue}: settings changed')
        relay.process.wait_for_log(r'connected to RabbitMQ at', count=2)
        time.sleep(0.5)
    with faults.retry_pump(pg_database, relay.pgq_queue):
        tally = relay.collect('reload with events waiting and arriving',
                              set(nacked) | set(during), timeout=60)

    print(f'{len(during)} events inserted during the reload')
    faults.assert_all_arrived(tally)
    assert len(during) > 0


# -- refusals by the broker ----------------------------------------------------------

def test_nacks_then_accepts(pg_database: str, amqp: AMQPHelper, run_mikkoo: MikkooRunner,
                            credentials: Credentials) -> None:
    """A full queue that rejects new messages makes the broker nack them;
    once a consumer makes room, every event arrives."""
    capacity, total = 100, 1000
    queue = amqp.declare_queue(arguments={'x-max-length': capacity,
                                          'x-overflow': 'reject-publish'})
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, queue=queue,
                        max_failures=100, retry_delay=1)

    with faults.retry_pump(pg_database, relay.pgq_queue):
        ids = relay.send(total)
        relay.process.wait_for_log(r'WARNING\b.*\bnack\b.*; retry 2 in', timeout=30)
        assert amqp.message_count(queue) == capacity
        tally = relay.collect('broker nacks, then accepts', ids)

    faults.assert_all_arrived(tally)
    assert relay.process.log_lines(r'WARNING\b.*\bnack\b.*; retry 1 in')
    assert not relay.process.log_lines(r'discarding event')


@pytest.mark.disruptive
def test_memory_alarm_blocks_without_spinning(pg_database: str, amqp: AMQPHelper,
                                              run_mikkoo: MikkooRunner,
                                              credentials: Credentials) -> None:
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)
    pid = relay.worker_pid()
    original = faults.memory_watermark()

    try:
        faults.set_memory_watermark('0.0000001')
        wait_until(lambda: 'memory' in faults.rabbitmqctl(
            'eval', 'rabbit_alarm:get_alarms().'), 30, interval=0.5,
            message='the memory alarm')
        ids = relay.send(1000)
        relay.process.wait_for_log(r'WARNING\b.*RabbitMQ blocked publishing', timeout=30)
        before = amqp.message_count(relay.queue)
        share = faults.cpu_share(pid, 5.0)
        after = amqp.message_count(relay.queue)
    finally:
        faults.set_memory_watermark(original)
    assert faults.memory_watermark() == original

    relay.process.wait_for_log(r'RabbitMQ unblocked publishing', timeout=30)
    tally = relay.collect('memory alarm blocks publishing', ids)
    print(f'worker CPU while blocked: {share:.1%} of a core')
    faults.assert_all_arrived(tally)
    assert share < IDLE_CPU_SHARE
    assert after == before
    assert after < len(ids)


def test_missing_exchange_among_thousand(pg_database: str, amqp: AMQPHelper,
                                         run_mikkoo: MikkooRunner,
                                         credentials: Credentials) -> None:
    retry_delay = 5
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials,
                        retry_delay=retry_delay, max_failures=2)
    missing = unique_name('mikkoo_it_missing')
    bad = 500

    started = time.monotonic()
    ids = relay.send(1000, exchanges={bad: missing})
    good = set(ids) - {bad}
    tally = relay.collect('missing exchange among 1,000', good, timeout=retry_delay)
    seconds = time.monotonic() - started
    faults.assert_all_arrived(tally)
    assert seconds < retry_delay

    with faults.retry_pump(pg_database, relay.pgq_queue):
        [line] = relay.process.wait_for_log(r'WARNING\b.*discarding event \d+', timeout=30)
    event_id = int(line.split('discarding event ')[1].split()[0])
    assert f'exchange {missing!r}' in line
    assert 'not found' in line
    assert relay.pgq_queue in line
    failures = relay.process.log_lines(rf'WARNING\b.*\bevent {event_id} failed\b')
    assert len(failures) == 2
    assert all(missing in failure for failure in failures)
    assert len(relay.process.log_lines(r'\bfailed \(exchange')) == 2
    assert amqp.expect_no_message(relay.queue, wait=0.5) == []


def test_exchange_deleted_while_relaying(pg_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner,
                                        credentials: Credentials) -> None:
    """An exchange the relay has used before is deleted: publishing to it
    makes the broker close the channel, and only its events fail."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, retry_delay=0,
                        max_failures=1)
    exchange = amqp.declare_exchange('fanout')
    amqp.bind(relay.queue, exchange)
    first = relay.send(10, exchange=exchange)
    known = relay.collect('exchange known to the relay', first, timeout=30)
    assert known.lost == []
    amqp.channel.exchange_delete(exchange)
    amqp.exchanges.remove(exchange)
    doomed = {number for number in range(11, 1011) if number % 100 == 0}

    with faults.retry_pump(pg_database, relay.pgq_queue):
        ids = relay.send(1000, first=11, exchanges=dict.fromkeys(doomed, exchange))
        tally = relay.collect('exchange deleted while relaying', set(ids) - doomed,
                              timeout=60)
        wait_until(lambda: len(relay.process.log_lines(r'discarding event')) >= len(doomed),
                   30, message=lambda: f'{len(doomed)} discards\n{relay.process.describe()}')

    faults.assert_all_arrived(tally)
    discards = relay.process.log_lines(r'WARNING\b.*discarding event')
    assert len(discards) == len(doomed)
    assert all(exchange in line for line in discards)
    assert relay.process.returncode is None


def test_channel_error_fails_one_event(pg_database: str, amqp: AMQPHelper,
                                       run_mikkoo: MikkooRunner,
                                       credentials: Credentials) -> None:
    """RabbitMQ closes the channel on a user_id property that is not the
    connection's user. The messages in flight are then sent again one at a
    time, so only the event at fault fails."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, retry_delay=0,
                        max_failures=1)
    events = [dict(ev_type=relay.queue, data=json.dumps({'id': number}))
              for number in range(1, 1001)]
    events.insert(500, dict(ev_type=relay.queue, data=json.dumps({'id': 0}),
                            extra3=json.dumps({'user_id': 'somebody_else'})))

    with faults.retry_pump(pg_database, relay.pgq_queue):
        inserted = insert_events(pg_database, relay.pgq_queue, events)
        tick(pg_database, relay.pgq_queue)
        bad_id = inserted[500].id
        tally = relay.collect('channel closed by one event', range(1, 1001), timeout=60)
        [line] = relay.process.wait_for_log(rf'WARNING\b.*discarding event {bad_id}\b',
                                            timeout=30)

    faults.assert_all_arrived(tally)
    assert 'user_id' in line
    assert len(relay.process.log_lines(r'discarding event')) == 1
    assert relay.process.log_lines(r'WARNING\b.*closed the channel')
    assert relay.process.returncode is None


def test_dead_letter_exchange_gets_exhausted_event(pg_database: str, amqp: AMQPHelper,
                                                   run_mikkoo: MikkooRunner,
                                                   credentials: Credentials) -> None:
    dead_letters = amqp.declare_exchange('fanout')
    dead_queue = amqp.declare_queue()
    amqp.bind(dead_queue, dead_letters)
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, retry_delay=0,
                        max_failures=1, dead_letter_exchange=dead_letters)
    missing = unique_name('mikkoo_it_missing')
    bad = 50

    with faults.retry_pump(pg_database, relay.pgq_queue):
        ids = relay.send(100, exchanges={bad: missing})
        tally = relay.collect('dead-lettered event', set(ids) - {bad}, timeout=30)
        [message] = amqp.get_messages(dead_queue, timeout=30)

    faults.assert_all_arrived(tally)
    assert json.loads(message.body) == {'id': bad}
    assert message.method.exchange == dead_letters
    headers = message.headers
    event_id = headers['x-mikkoo-event-id']
    assert isinstance(event_id, int)
    assert headers['x-mikkoo-queue'] == relay.pgq_queue
    assert headers['x-mikkoo-exchange'] == missing
    assert headers['x-mikkoo-routing-key'] == relay.queue
    assert headers['x-mikkoo-failures'] == 2
    assert 'not found' in headers['x-mikkoo-reason']
    event_time = datetime.datetime.fromisoformat(headers['x-mikkoo-event-time'])
    age = datetime.datetime.now(datetime.timezone.utc) - event_time
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=2)
    [line] = relay.process.wait_for_log(rf'WARNING\b.*dead-lettered.*\bevent {event_id}\b')
    assert missing in line
    assert not relay.process.log_lines(r'discarding event')
    assert amqp.expect_no_message(dead_queue, wait=0.5) == []


# -- message contents --------------------------------------------------------------

UTF8_TEXTS = {
    'emoji': 'family 👩‍👩‍👧‍👦, flag 🏳️‍🌈, face 😀, keycap 1️⃣',
    'cjk': '漢字 かな カナ 한국어 𠜎𠜱 (astral CJK)',
    'rtl': 'עברית \u200fالعربية\u200e mixed ‏RTL‏ text',
    'combining': 'e\u0301 a\u0308 Z\u0324\u0354\u0367\u0311\u0313 o\u0336 \u1e9b\u0323',
    'controls': 'tab\there, bell\x07, escape\x1b, delete\x7f, BOM \ufeff',
    'astral': '𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙 \U0010fffd \uffff',
}


def test_utf8_bodies_arrive_unchanged(pg_database: str, amqp: AMQPHelper,
                                      run_mikkoo: MikkooRunner,
                                      credentials: Credentials) -> None:
    """Bodies, header values and properties keep every UTF-8 character.
    PostgreSQL text cannot hold NUL, so no event can carry one."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)
    events = []
    for number, text in enumerate(UTF8_TEXTS.values(), start=1):
        events.append(dict(ev_type=relay.queue,
                           data=json.dumps({'id': number, 'text': text}, ensure_ascii=False),
                           extra3=json.dumps({'type': text[:40]}),
                           extra4=json.dumps({'text': text})))

    insert_events(pg_database, relay.pgq_queue, events)
    tick(pg_database, relay.pgq_queue)

    messages = amqp.get_messages(relay.queue, count=len(events))
    assert len(messages) == len(events), relay.process.describe()
    for message, event, text in zip(messages, events, UTF8_TEXTS.values()):
        assert message.body == event['data'].encode('utf-8')
        assert message.headers['text'] == text
        assert message.properties.type == text[:40]
    assert not relay.process.log_lines(r'WARNING')


@pytest.mark.disruptive
def test_message_over_max_size_fails_alone(pg_database: str, amqp: AMQPHelper,
                                           run_mikkoo: MikkooRunner,
                                           credentials: Credentials) -> None:
    """RabbitMQ closes the channel on a message above max_message_size; only
    that event fails, and it is discarded after max_failures."""
    limit = 1024 * 1024
    original = faults.max_message_size()
    try:
        # A channel may read the limit when it opens, so it is set first.
        faults.set_max_message_size(limit)
        assert faults.max_message_size() == limit
        relay = start_relay(run_mikkoo, pg_database, amqp, credentials, retry_delay=0,
                            max_failures=1)
        with faults.retry_pump(pg_database, relay.pgq_queue):
            big = json.dumps({'id': 0, 'padding': 'x' * (2 * limit)})
            insert_events(pg_database, relay.pgq_queue, [
                dict(ev_type=relay.queue, data=json.dumps({'id': number}))
                for number in range(1, 51)] + [dict(ev_type=relay.queue, data=big)] + [
                dict(ev_type=relay.queue, data=json.dumps({'id': number}))
                for number in range(51, 101)])
            tick(pg_database, relay.pgq_queue)
            [line] = relay.process.wait_for_log(r'WARNING\b.*discarding event \d+',
                                                timeout=60)
            tally = relay.collect('message over max_message_size', range(1, 101),
                                  timeout=30)
    finally:
        faults.set_max_message_size(original)
    assert faults.max_message_size() == original

    faults.assert_all_arrived(tally)
    assert 'larger than max size' in line or 'PRECONDITION_FAILED' in line
    assert len(relay.process.log_lines(r'discarding event')) == 1
    assert relay.process.returncode is None


# -- headers -------------------------------------------------------------------------

HEADERS_OF_EVERY_TYPE = {
    'string': 'text',
    'integer': 42,
    'negative': -7,
    'int64_max': 2 ** 63 - 1,
    'float': 1.5,
    'long_float': 3.141592653589793,
    'exponent': 1e20,
    'true': True,
    'false': False,
    'null': None,
    'object': {'inner': 'value', 'deeper': {'number': 1}},
    'array': [1, 'two', 3.25, None, True, {'key': 'value'}, [4]],
    'empty_object': {},
    'empty_array': [],
}

EXPECTED_HEADERS = {
    'string': 'text',
    'integer': 42,
    'negative': -7,
    'int64_max': 2 ** 63 - 1,
    'float': decimal.Decimal('1.5'),
    'true': True,
    'false': False,
    'null': None,
    'object': {'inner': 'value', 'deeper': {'number': 1}},
    'array': [1, 'two', decimal.Decimal('3.25'), None, True, {'key': 'value'}, [4]],
    'empty_object': {},
    'empty_array': [],
}


def nested(depth: int) -> Any:
    value: Any = 'bottom'
    for _ in range(depth):
        value = {'next': value}
    return value


@pytest.mark.parametrize('column', ['extra4', 'extra3'])
def test_header_types_arrive_typed(pg_database: str, amqp: AMQPHelper,
                                   run_mikkoo: MikkooRunner, credentials: Credentials,
                                   column: str) -> None:
    """Every JSON type arrives as the matching AMQP field type; values that
    AMQP cannot carry are left out with a WARNING naming the event."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials)
    headers = {**HEADERS_OF_EVERY_TYPE, 'too_big': 2 ** 64, 'too_deep': nested(40)}
    text = json.dumps({'headers': headers} if column == 'extra3' else headers)

    event = insert_event(pg_database, relay.pgq_queue, relay.queue, 'typed',
                         **{column: text})
    tick(pg_database, relay.pgq_queue)

    [message] = amqp.get_messages(relay.queue)
    received = message.headers
    for name, expected in EXPECTED_HEADERS.items():
        assert received[name] == expected, name
        # pika decodes 64-bit integers as pika.compat.long, a subclass of int.
        assert isinstance(received[name], type(expected)), name
    assert isinstance(received['long_float'], str)
    assert decimal.Decimal(received['long_float']) == decimal.Decimal('3.141592653589793')
    assert decimal.Decimal(received['exponent']) == decimal.Decimal('1e20')
    assert 'too_big' not in received
    assert 'too_deep' not in received
    for name in ('too_big', 'too_deep'):
        [line] = relay.process.log_lines(rf"WARNING\b.*event {event.id}: header '{name}'")
        assert relay.pgq_queue in line
    assert received['pgq_queue'] == relay.pgq_queue
    assert received['pgq_event_id'] == event.id


@pytest.mark.parametrize('column', ['extra4', 'extra3'])
def test_headers_over_frame_max_fail_alone(pg_database: str, amqp: AMQPHelper,
                                           run_mikkoo: MikkooRunner,
                                           credentials: Credentials, column: str) -> None:
    """Headers larger than the negotiated frame_max (131,072 bytes by
    default) cannot be sent; only that event fails, without a reconnect."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, retry_delay=0,
                        max_failures=1)
    headers = {'large': 'h' * 200_000}
    text = json.dumps({'headers': headers} if column == 'extra3' else headers)
    events = [dict(ev_type=relay.queue, data=json.dumps({'id': number}))
              for number in range(1, 101)]
    events.insert(50, dict(ev_type=relay.queue, data=json.dumps({'id': 0}),
                           **{column: text}))

    with faults.retry_pump(pg_database, relay.pgq_queue):
        inserted = insert_events(pg_database, relay.pgq_queue, events)
        tick(pg_database, relay.pgq_queue)
        large_id = inserted[50].id
        tally = relay.collect(f'headers over frame_max in {column}', range(1, 101),
                              timeout=30)
        [line] = relay.process.wait_for_log(rf'WARNING\b.*discarding event {large_id}\b',
                                            timeout=30)

    faults.assert_all_arrived(tally)
    assert 'frame_max' in line
    assert len(relay.process.log_lines(rf'\bevent {large_id} failed\b')) == 1
    assert len(relay.connected_lines()) == 1
    assert not relay.process.log_lines(r'lost the RabbitMQ connection|closed the channel')


# -- idle relay ----------------------------------------------------------------------

def test_idle_relay_keeps_connection(pg_database: str, amqp: AMQPHelper,
                                     run_mikkoo: MikkooRunner,
                                     credentials: Credentials) -> None:
    """With heartbeats every 5 s, a relay without events stays connected for
    a minute, then relays the next event at once."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials,
                        rabbitmq={'heartbeat_interval': 5})
    [before] = wait_until(lambda: faults.relay_connections(relay.pgq_queue),
                          message='the relay connection in rabbitmqctl')

    time.sleep(60)

    [after] = faults.relay_connections(relay.pgq_queue)
    assert before.timeout == 5
    assert after.name == before.name
    assert after.pid == before.pid
    assert len(relay.connected_lines()) == 1
    assert not relay.process.log_lines(r'WARNING')
    started = time.monotonic()
    insert_event(pg_database, relay.pgq_queue, relay.queue, json.dumps({'id': 1}))
    tick(pg_database, relay.pgq_queue)
    messages = amqp.get_messages(relay.queue, timeout=3)
    assert len(messages) == 1
    assert time.monotonic() - started < 3


# -- the ticker ----------------------------------------------------------------------

@pytest.mark.disruptive
def test_stopped_ticker_is_reported(pg_database: str, amqp: AMQPHelper,
                                    run_mikkoo: MikkooRunner,
                                    credentials: Credentials) -> None:
    """Without pgqd, no batch is made: the relay waits without spinning and
    warns about the queue; once pgqd runs again the events arrive."""
    relay = start_relay(run_mikkoo, pg_database, amqp, credentials, ticker_warning=2)
    # pgqd ticks an idle queue once per ticker_idle_period (60 s by default),
    # which would warn even with pgqd running; once a second it does not.
    sql(pg_database, "SELECT pgq.set_queue_config(%s, 'ticker_idle_period', '1 second')",
        (relay.pgq_queue,))
    pid = relay.worker_pid()
    # pgqd finds a new database only at its next database check, and warnings
    # until then are right; the relay must be quiet once pgqd ticks the queue.
    faults.wait_ticked_by_pgqd(pg_database, relay.pgq_queue)
    early = len(relay.process.log_lines(r'no new tick'))
    time.sleep(4)
    assert len(relay.process.log_lines(r'no new tick')) == early, relay.process.describe()

    try:
        faults.stop_pgqd()
        line = relay.process.wait_for_log(r'WARNING\b.*no new tick', timeout=30,
                                          count=early + 1)[-1]
        ids = faults.insert_numbered(pg_database, relay.pgq_queue, relay.queue, 1, 100)
        share = faults.cpu_share(pid, 5.0)
        waiting = amqp.message_count(relay.queue)
    finally:
        faults.start_pgqd()

    tally = relay.collect('ticker stopped', ids, timeout=60)
    print(f'worker CPU without ticks: {share:.1%} of a core')
    faults.assert_all_arrived(tally)
    assert relay.pgq_queue in line
    assert share < IDLE_CPU_SHARE
    assert waiting == 0
