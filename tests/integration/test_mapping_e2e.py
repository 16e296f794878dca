"""End to end: each PgQ event column becomes the AMQP message part it maps to.

One relay (one mikkoo process, one PgQ queue) serves the whole module. Each
test routes its events to RabbitMQ queues of its own, so the tests do not
see each other's messages.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import socket
import uuid
from typing import Any

import pytest

from tests.integration.conftest import (
    AMQPHelper, InsertedEvent, MikkooProcess, MikkooRunner, Received, insert_events,
    mikkoo_config, queue_config, tick, unique_name)


# Headers mikkoo adds to every message unless the event sets them itself.
AUTOMATIC_HEADERS = {'origin', 'sequence', 'timestamp', 'txid', 'pgq_queue', 'pgq_event_id'}


@dataclasses.dataclass
class Relay:
    url: str
    queue: str
    process: MikkooProcess

    def send(self, **event: Any) -> InsertedEvent:
        """Insert one event and tick so that the relay picks it up."""
        return self.send_many([event])[0]

    def send_many(self, events: list[dict[str, Any]]) -> list[InsertedEvent]:
        inserted = insert_events(self.url, self.queue, events)
        tick(self.url, self.queue)
        return inserted

    def warnings(self, event_id: int, field: str) -> list[str]:
        """Wait for and return the WARNING lines about ``field`` of the event."""
        pattern = (rf'WARNING\b.*\bqueue {re.escape(self.queue)}\b.*\bevent {event_id}\b'
                   rf'.*{re.escape(field)}')
        return self.process.wait_for_log(pattern, timeout=5)

    def warning_count(self, event_id: int) -> int:
        return len(self.process.log_lines(
            rf'WARNING\b.*\bqueue {re.escape(self.queue)}\b.*\bevent {event_id}\b'))


@pytest.fixture(scope='module')
def relay(module_pg_database: str, module_run_mikkoo: MikkooRunner) -> Relay:
    queue = unique_name('mapping')
    process = module_run_mikkoo(mikkoo_config({queue: queue_config(module_pg_database)}))
    process.wait_registered(module_pg_database, queue)
    return Relay(module_pg_database, queue, process)


def relay_one(relay: Relay, amqp: AMQPHelper, **event: Any) -> tuple[InsertedEvent, Received]:
    """Send one event to a new queue through the default exchange; return it
    with the one message that arrived."""
    queue = amqp.declare_queue()
    event.setdefault('ev_type', queue)
    inserted = relay.send(**event)
    messages = amqp.get_messages(queue, count=1)
    assert len(messages) == 1, f'{len(messages)} messages for event {inserted.id}\n' \
                               f'{relay.process.describe()}'
    return inserted, messages[0]


# -- routing: ev_type and ev_extra1 -----------------------------------------

def test_default_exchange_routes_by_ev_type(relay: Relay, amqp: AMQPHelper) -> None:
    queue = amqp.declare_queue()

    relay.send(ev_type=queue, data='to the default exchange')

    [message] = amqp.get_messages(queue)
    assert message.method.exchange == ''
    assert message.method.routing_key == queue
    assert message.body == b'to the default exchange'


def test_topic_exchange_from_extra1(relay: Relay, amqp: AMQPHelper) -> None:
    exchange = amqp.declare_exchange('topic')
    queue = amqp.declare_queue()
    amqp.bind(queue, exchange, 'orders.*')

    relay.send(ev_type='orders.created', data='order 1', extra1=exchange)

    [message] = amqp.get_messages(queue)
    assert message.method.exchange == exchange
    assert message.method.routing_key == 'orders.created'
    assert message.body == b'order 1'


def test_direct_exchange_routes_by_key(relay: Relay, amqp: AMQPHelper) -> None:
    exchange = amqp.declare_exchange('direct')
    paid = amqp.declare_queue()
    shipped = amqp.declare_queue()
    amqp.bind(paid, exchange, 'order.paid')
    amqp.bind(shipped, exchange, 'order.shipped')

    relay.send_many([dict(ev_type='order.paid', data='p', extra1=exchange),
                     dict(ev_type='order.shipped', data='s', extra1=exchange)])

    [paid_message] = amqp.get_messages(paid)
    [shipped_message] = amqp.get_messages(shipped)
    assert (paid_message.method.routing_key, paid_message.body) == ('order.paid', b'p')
    assert (shipped_message.method.routing_key, shipped_message.body) == \
        ('order.shipped', b's')
    assert amqp.expect_no_message(paid, wait=0.3) == []


def test_null_ev_type_is_empty_routing_key(relay: Relay, amqp: AMQPHelper) -> None:
    exchange = amqp.declare_exchange('fanout')
    queue = amqp.declare_queue()
    amqp.bind(queue, exchange)

    relay.send(ev_type=None, data='no type', extra1=exchange)

    [message] = amqp.get_messages(queue)
    assert message.method.exchange == exchange
    assert message.method.routing_key == ''


# -- body: ev_data ------------------------------------------------------------

@pytest.mark.parametrize('data, body', [
    ('plain text', b'plain text'),
    ('{"id": 7, "name": "x"}', b'{"id": 7, "name": "x"}'),
    ('héllo wörld ✓ 日本語 🐇', 'héllo wörld ✓ 日本語 🐇'.encode('utf-8')),
    ('', b''),
    (None, b''),
], ids=['text', 'json', 'utf8', 'empty', 'null'])
def test_body_from_ev_data(relay: Relay, amqp: AMQPHelper, data: str | None,
                           body: bytes) -> None:
    _, message = relay_one(relay, amqp, data=data)

    assert message.body == body


# -- content type: ev_extra2 ------------------------------------------------

def test_content_type_from_extra2(relay: Relay, amqp: AMQPHelper) -> None:
    _, message = relay_one(relay, amqp, data='{}', extra2='application/json')

    assert message.properties.content_type == 'application/json'


@pytest.mark.parametrize('extra2', [None, ''], ids=['null', 'empty'])
def test_no_content_type_without_extra2(relay: Relay, amqp: AMQPHelper,
                                        extra2: str | None) -> None:
    _, message = relay_one(relay, amqp, data='x', extra2=extra2)

    assert message.properties.content_type is None


# -- properties: ev_extra3 --------------------------------------------------

@pytest.mark.parametrize('name, value, expected', [
    ('app_id', 'billing', 'billing'),
    ('content_encoding', 'gzip', 'gzip'),
    ('content_type', 'text/csv', 'text/csv'),
    ('correlation_id', 'corr-17', 'corr-17'),
    ('delivery_mode', 2, 2),
    ('expiration', '60000', '60000'),
    ('expiration', 60000, '60000'),
    ('message_id', 'msg-42', 'msg-42'),
    ('timestamp', 1700000000, 1700000000),
    ('type', 'user.created', 'user.created'),
    ('priority', 5, 5),
    # RabbitMQ refuses a user_id other than the publishing user's.
    ('user_id', 'guest', 'guest'),
], ids=lambda value: str(value))
def test_property_from_extra3(relay: Relay, amqp: AMQPHelper, name: str, value: Any,
                              expected: Any) -> None:
    event, message = relay_one(relay, amqp, data='x', extra3=json.dumps({name: value}))

    assert getattr(message.properties, name) == expected
    assert relay.warning_count(event.id) == 0


def test_headers_property_from_extra3(relay: Relay, amqp: AMQPHelper) -> None:
    headers = {'tenant': 'acme', 'attempt': 3}

    _, message = relay_one(relay, amqp, extra3=json.dumps({'headers': headers}))

    assert message.headers['tenant'] == 'acme'
    assert message.headers['attempt'] == 3
    assert set(message.headers) == {'tenant', 'attempt'} | AUTOMATIC_HEADERS


def test_all_properties_from_extra3(relay: Relay, amqp: AMQPHelper) -> None:
    properties = {
        'app_id': 'billing', 'content_encoding': 'utf-8', 'content_type': 'text/plain',
        'correlation_id': 'c-1', 'delivery_mode': 1, 'expiration': '5000',
        'message_id': 'm-1', 'timestamp': 1600000000, 'type': 't', 'priority': 9,
        'user_id': 'guest', 'headers': {'h': 'v'}}

    event, message = relay_one(relay, amqp, extra3=json.dumps(properties))

    for name, value in properties.items():
        if name != 'headers':
            assert getattr(message.properties, name) == value, name
    assert message.headers['h'] == 'v'
    assert relay.warning_count(event.id) == 0


# -- headers: ev_extra4 -----------------------------------------------------

def test_headers_from_extra4(relay: Relay, amqp: AMQPHelper) -> None:
    headers = {'tenant': 'acme', 'count': 12, 'big': 2 ** 40, 'negative': -5,
               'flag': True, 'nested': {'a': 'b', 'n': 1}, 'list': ['x', 2],
               'unicode': 'ünïcødé'}

    event, message = relay_one(relay, amqp, data='x', extra4=json.dumps(headers))

    for name, value in headers.items():
        assert message.headers[name] == value, name
    assert set(message.headers) == set(headers) | AUTOMATIC_HEADERS
    assert relay.warning_count(event.id) == 0


# -- automatic properties and headers ---------------------------------------

def test_automatic_properties(relay: Relay, amqp: AMQPHelper) -> None:
    event, message = relay_one(relay, amqp, data='x')

    assert message.properties.app_id == 'mikkoo'
    assert str(uuid.UUID(message.properties.correlation_id)) == \
        message.properties.correlation_id
    assert message.properties.timestamp == math.floor(event.time.timestamp())


def test_automatic_headers(relay: Relay, amqp: AMQPHelper) -> None:
    event, message = relay_one(relay, amqp, data='x')

    headers = message.headers
    assert set(headers) == AUTOMATIC_HEADERS
    assert headers['origin'] == socket.getfqdn()
    assert headers['txid'] == event.txid
    assert headers['pgq_queue'] == relay.queue
    assert headers['pgq_event_id'] == event.id
    assert isinstance(headers['sequence'], int) and headers['sequence'] > 0
    # ev_time in UTC, to the microsecond, as ISO-8601.
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00',
                        headers['timestamp']), headers['timestamp']
    stamp = datetime.datetime.fromisoformat(headers['timestamp'])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert stamp == event.time


def test_each_message_gets_own_correlation_id_and_sequence(relay: Relay,
                                                           amqp: AMQPHelper) -> None:
    queue = amqp.declare_queue()

    relay.send_many([dict(ev_type=queue, data='1'), dict(ev_type=queue, data='2')])

    first, second = amqp.get_messages(queue, count=2)
    assert (first.body, second.body) == (b'1', b'2')
    assert first.properties.correlation_id != second.properties.correlation_id
    assert second.headers['sequence'] > first.headers['sequence']


# -- precedence --------------------------------------------------------------

def test_extra3_content_type_wins_over_extra2(relay: Relay, amqp: AMQPHelper) -> None:
    _, message = relay_one(relay, amqp, extra2='text/plain',
                           extra3=json.dumps({'content_type': 'application/json'}))

    assert message.properties.content_type == 'application/json'


def test_extra3_headers_replace_extra4(relay: Relay, amqp: AMQPHelper) -> None:
    _, message = relay_one(relay, amqp, extra3=json.dumps({'headers': {'from': 'extra3'}}),
                           extra4=json.dumps({'from': 'extra4', 'only4': 1}))

    assert message.headers['from'] == 'extra3'
    assert 'only4' not in message.headers


def test_extra3_empty_headers_replace_extra4(relay: Relay, amqp: AMQPHelper) -> None:
    _, message = relay_one(relay, amqp, extra3=json.dumps({'headers': {}}),
                           extra4=json.dumps({'only4': 1}))

    assert set(message.headers) == AUTOMATIC_HEADERS


@pytest.mark.parametrize('column', ['extra3', 'extra4'])
def test_event_headers_win_over_automatic(relay: Relay, amqp: AMQPHelper,
                                          column: str) -> None:
    own = {'origin': 'elsewhere', 'sequence': 7, 'timestamp': 'yesterday', 'txid': 'abc',
           'pgq_queue': 'other', 'pgq_event_id': -1}
    text = json.dumps({'headers': own} if column == 'extra3' else own)

    _, message = relay_one(relay, amqp, **{column: text})

    assert message.headers == own


def test_extra2_used_when_extra3_has_no_content_type(relay: Relay,
                                                     amqp: AMQPHelper) -> None:
    _, message = relay_one(relay, amqp, extra2='text/plain',
                           extra3=json.dumps({'message_id': 'm'}))

    assert message.properties.content_type == 'text/plain'
    assert message.properties.message_id == 'm'


# -- unusable metadata --------------------------------------------------------

def test_invalid_json_in_extra3(relay: Relay, amqp: AMQPHelper) -> None:
    event, message = relay_one(relay, amqp, data='still sent', extra2='text/plain',
                               extra3='{"message_id": "m", oops',
                               extra4=json.dumps({'kept': 'yes'}))

    assert message.body == b'still sent'
    assert message.properties.message_id is None
    assert message.properties.app_id == 'mikkoo'
    assert message.properties.content_type == 'text/plain'
    assert message.headers['kept'] == 'yes'
    assert relay.warnings(event.id, 'ev_extra3')


def test_invalid_json_in_extra4(relay: Relay, amqp: AMQPHelper) -> None:
    event, message = relay_one(relay, amqp, data='still sent',
                               extra3=json.dumps({'message_id': 'kept'}),
                               extra4='{"tenant": ')

    assert message.body == b'still sent'
    assert message.properties.message_id == 'kept'
    assert set(message.headers) == AUTOMATIC_HEADERS
    assert relay.warnings(event.id, 'ev_extra4')


@pytest.mark.parametrize('column', ['extra3', 'extra4'])
def test_json_array_is_left_out(relay: Relay, amqp: AMQPHelper, column: str) -> None:
    event, message = relay_one(relay, amqp, data='array', **{column: '["a", "b"]'})

    assert message.body == b'array'
    assert message.properties.app_id == 'mikkoo'
    assert set(message.headers) == AUTOMATIC_HEADERS
    assert relay.warnings(event.id, f'ev_{column}')


def test_unknown_property_is_left_out(relay: Relay, amqp: AMQPHelper) -> None:
    event, message = relay_one(relay, amqp, data='x',
                               extra3=json.dumps({'colour': 'red', 'message_id': 'm-7'}))

    assert message.body == b'x'
    assert message.properties.message_id == 'm-7'
    assert 'colour' not in message.headers
    [line] = relay.warnings(event.id, "ev_extra3 property 'colour'")
    assert 'message_id' not in line


def test_wrongly_typed_property_is_left_out(relay: Relay, amqp: AMQPHelper) -> None:
    event, message = relay_one(relay, amqp, data='x',
                               extra3=json.dumps({'priority': 'high', 'type': 'kept'}))

    assert message.body == b'x'
    assert message.properties.priority is None
    assert message.properties.type == 'kept'
    assert relay.warnings(event.id, "ev_extra3 property 'priority'")


# -- metadata pika cannot encode ----------------------------------------------
# These run on a relay of their own: an event that breaks the worker would
# otherwise block the shared relay for every later test.

def own_relay(url: str, run_mikkoo: MikkooRunner, prefix: str) -> Relay:
    queue = unique_name(prefix)
    relay = Relay(url, queue, run_mikkoo(mikkoo_config({queue: queue_config(url)})))
    relay.process.wait_registered(url, queue)
    return relay


@pytest.mark.parametrize('column', ['extra4', 'extra3'])
def test_float_header_does_not_block_the_queue(pg_database: str, amqp: AMQPHelper,
                                               run_mikkoo: MikkooRunner,
                                               column: str) -> None:
    """JSON numbers with a fraction are valid header values in ev_extra4 (and
    in ev_extra3's headers), which pika cannot encode as floats; the event
    must still be published, with the header encoded (as a decimal) or left
    out with a warning, and the events after it must flow. (Before d71a8c1
    the worker died on such an event and on every replay of its batch.)"""
    relay = own_relay(pg_database, run_mikkoo, 'floats')
    queue = amqp.declare_queue()
    headers = {'price': 9.99, 'tenant': 'acme'}
    text = json.dumps({'headers': headers} if column == 'extra3' else headers)

    event, _ = relay.send_many([dict(ev_type=queue, data='float', **{column: text}),
                                dict(ev_type=queue, data='after')])

    messages = amqp.get_messages(queue, count=2, timeout=3)
    assert [message.body for message in messages] == [b'float', b'after'], \
        relay.process.describe()
    message = messages[0]
    assert message.headers['tenant'] == 'acme'
    if 'price' in message.headers:
        assert str(message.headers['price']) == '9.99'
    else:
        assert relay.warnings(event.id, "header 'price'")
    assert relay.process.log_lines(r'worker failed|Traceback') == []


@pytest.mark.parametrize('expiration', ['soon', '-5', '1.5'])
def test_invalid_expiration_is_left_out(pg_database: str, amqp: AMQPHelper,
                                        run_mikkoo: MikkooRunner, expiration: str) -> None:
    """An expiration that is not a whole number of milliseconds is unusable
    metadata like "priority": "high": left out with a warning, the event
    still published. (RabbitMQ closes the channel on such a value; before
    d71a8c1 it was passed through, so the event failed until discarded.)"""
    relay = own_relay(pg_database, run_mikkoo, 'expiration')
    queue = amqp.declare_queue()

    event = relay.send(ev_type=queue, data='expiring',
                       extra3=json.dumps({'expiration': expiration, 'type': 'kept'}))

    messages = amqp.get_messages(queue, count=1, timeout=3)
    assert [message.body for message in messages] == [b'expiring'], \
        relay.process.describe()
    assert messages[0].properties.expiration is None
    assert messages[0].properties.type == 'kept'
    assert relay.warnings(event.id, "ev_extra3 property 'expiration'")
