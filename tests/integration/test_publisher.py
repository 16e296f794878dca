"""The publisher against the real RabbitMQ: many messages, one connection."""
import pytest

from mikkoo.config import RabbitMQSettings
from mikkoo.mapping import Message
from mikkoo.publisher import FLUSH_EVERY, Publisher, send_buffers

from .conftest import AMQPHelper, rabbitmq_settings, wait_until


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
