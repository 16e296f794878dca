"""The publisher against the real RabbitMQ: many messages, one connection."""
import pika.exceptions
import pika.frame
import pika.spec
import pytest

from mikkoo.config import RabbitMQSettings
from mikkoo.mapping import Message
from mikkoo.publisher import FLUSH_EVERY, Publisher, send_buffers

from .conftest import AMQPHelper, rabbitmq_settings, wait_until

ROUTED_BEFORE_RETURN = 400


@pytest.mark.parametrize('confirm', [True, False])
def test_pipelined_messages_arrive_in_order(amqp: AMQPHelper, confirm: bool) -> None:
    queue = amqp.declare_queue()
    publisher = Publisher(RabbitMQSettings(**rabbitmq_settings()), confirm=confirm,
                          max_unconfirmed=2000)
    publisher.connect()
    try:
        # pika keeps its send buffers in a private attribute. When a pika
        # release moves them, mikkoo still works but sends each frame alone.
        assert send_buffers(publisher._connection) is not None
        # A full window queues far more than SEND_CHUNK_BYTES, so the
        # buffers are joined into several chunks before each loop turn.
        bodies = [f'message {number} '.encode() * (number % 50 + 1) for number in range(5000)]
        for number, body in enumerate(bodies):
            publisher.publish(Message('', queue, body, {'app_id': 'mikkoo'}), number)
        publisher.wait_for_confirms()
    finally:
        publisher.close()

    assert publisher.take_failures() == []
    assert publisher.delivered == len(bodies)
    received = amqp.get_messages(queue, count=len(bodies))
    assert [message.body for message in received] == bodies


def test_messages_sent_before_window_fills(amqp: AMQPHelper) -> None:
    queue = amqp.declare_queue()
    publisher = Publisher(RabbitMQSettings(**rabbitmq_settings()), confirm=True,
                          max_unconfirmed=10 * FLUSH_EVERY)
    publisher.connect()
    try:
        for number in range(FLUSH_EVERY):
            publisher.publish(Message('', queue, b'early', {}), number)

        # No further publisher call: the last publish has handed the
        # frames to the socket although the window is far from full.
        wait_until(lambda: amqp.message_count(queue) == FLUSH_EVERY, timeout=10,
                   message=lambda: f'{amqp.message_count(queue)} messages arrived')
    finally:
        publisher.close()


def test_old_connection_callbacks_ignored(amqp: AMQPHelper) -> None:
    # After a reconnect the old connection may still deliver acks and its
    # close. Delivery tags restart at 1 on the new channel, so an old ack
    # must not settle the new channel's messages.
    queue = amqp.declare_queue()
    publisher = Publisher(RabbitMQSettings(**rabbitmq_settings()), confirm=True)
    publisher.connect()
    try:
        old_connection, old_channel = publisher._connection, publisher._channel
        publisher.close()
        publisher.connect()
        for number in range(50):
            publisher.publish(Message('', queue, b'new', {}), number)

        publisher._on_confirmation(old_channel, pika.frame.Method(
            1, pika.spec.Basic.Ack(delivery_tag=50, multiple=True)))
        publisher._on_connection_closed(old_connection, pika.exceptions.ConnectionClosedByBroker(
            320, 'CONNECTION_FORCED'))

        assert len(publisher._outstanding) == 50
        assert publisher.is_connected
        publisher.wait_for_confirms()
    finally:
        publisher.close()

    assert publisher.delivered == 50
    assert len(amqp.get_messages(queue, count=50)) == 50


def publish_routed_then_unroutable(routed: Message, unroutable: Message) -> Publisher:
    """Publish many ``routed`` messages, then ``unroutable``, and return the closed publisher.

    The routed messages come first, so that some are still unconfirmed when
    the broker returns the last one. Their tokens are their numbers, and
    the unroutable message's token is 'unroutable'.
    """
    publisher = Publisher(RabbitMQSettings(**rabbitmq_settings()), confirm=True)
    publisher.connect()
    try:
        for number in range(ROUTED_BEFORE_RETURN):
            publisher.publish(routed, number)
        publisher.publish(unroutable, 'unroutable')
        publisher.wait_for_confirms()
    finally:
        publisher.close()
    return publisher


def test_return_matched_despite_same_ids(amqp: AMQPHelper) -> None:
    # Events may set correlation_id and the id headers themselves, so two
    # messages in flight can share them. The routing key separates these.
    exchange = amqp.declare_exchange('direct')
    queue = amqp.declare_queue()
    amqp.bind(queue, exchange, 'routed')
    properties = {'correlation_id': 'replayed',
                  'headers': {'sequence': 7, 'pgq_event_id': 4242}}

    publisher = publish_routed_then_unroutable(
        Message(exchange, 'routed', b'event', properties),
        Message(exchange, 'nowhere', b'event', properties))

    failures = publisher.take_failures()
    assert [token for token, _reason in failures] == ['unroutable']
    assert publisher.delivered == ROUTED_BEFORE_RETURN


def test_return_matched_by_headers_exchange(amqp: AMQPHelper) -> None:
    # A headers exchange routes by the headers alone, so two messages alike
    # in routing key, body and id properties can part ways there.
    exchange = amqp.declare_exchange('headers')
    queue = amqp.declare_queue()
    amqp.bind(queue, exchange, arguments={'x-match': 'all', 'k': 'routable'})
    ids = {'sequence': 7, 'pgq_event_id': 4242}
    routed = {'correlation_id': 'replayed', 'headers': {**ids, 'k': 'routable'}}
    unroutable = {'correlation_id': 'replayed', 'headers': {**ids, 'k': 'other'}}

    publisher = publish_routed_then_unroutable(
        Message(exchange, '', b'event', routed), Message(exchange, '', b'event', unroutable))

    failures = publisher.take_failures()
    assert [token for token, _reason in failures] == ['unroutable']
    assert publisher.delivered == ROUTED_BEFORE_RETURN
