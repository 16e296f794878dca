"""Publish messages to RabbitMQ with pipelined publisher confirms.

pika's BlockingConnection waits for each confirmation before the next
publish returns, which limits a relay to one message per round trip. This
publisher drives a SelectConnection's I/O loop itself instead: it keeps up
to ``max_unconfirmed`` messages in flight and records each outcome as the
broker's acks, nacks and returns arrive. Callers still see blocking calls.

Outcomes are reported as *failures*: a list of ``(token, reason)`` pairs for
messages the broker refused. Messages whose fate became unknown because the
channel or connection closed are *in doubt*, and they are published again.
When the broker closed the channel over an error, they are sent one at a
time, so that the message at fault fails alone.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed, AMQPConnectorPhaseErrorBase)

from mikkoo import tls
from mikkoo.config import RabbitMQSettings
from mikkoo.mapping import InvalidMessage, Message

LOGGER = logging.getLogger(__name__)

# Seconds to wait for the broker to respond to a connection or channel request.
RPC_TIMEOUT = 30.0
# Seconds pika may take to open a connection: TCP connect, TLS handshake
# and AMQP handshake. It is shorter than the wait in Publisher.connect, so
# that pika's own timeout fires first and reports the phase that hung.
CONNECT_TIMEOUT = 20.0
# Without confirmations, a Basic.Qos round trip after every this many
# publishes (a quarter of the window) shows which messages the broker has
# received. See Publisher._request_sync.
SYNC_FRACTION = 4
# AMQP reply codes of a connection the broker closed for a reason of its
# own (shutdown, management action), not because of something we sent.
CONNECTION_FORCED = 320
# pika queues each frame as a buffer of its own and writes each with one
# send() call, three per message. Before each I/O loop turn the queued
# buffers are joined into chunks of at most this many bytes. In the
# benchmark that cut the worker's CPU time per message by about 30%.
# The bound keeps pika's copy of a partly sent chunk small.
SEND_CHUNK_BYTES = 256 * 1024
# Publishes between two non-blocking loop turns, which hand the queued
# frames to the socket while the window still has room. Without them the
# broker gets no byte until a whole window is encoded, which at the start
# of a batch left it idle for about 0.1 s.
FLUSH_EVERY = 500
# Body bytes in flight, at most, besides the max_unconfirmed messages, so
# that large events cannot fill the worker's memory.
MAX_UNCONFIRMED_BYTES = 32 * 1024 * 1024


# pika raises these when a channel or connection closed under a call.
WRONG_STATE_ERRORS = (pika.exceptions.ChannelWrongStateError,
                      pika.exceptions.ConnectionWrongStateError,
                      pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed,
                      pika.exceptions.StreamLostError)


class BrokerUnavailable(Exception):
    """Raised when the broker connection is closed or cannot be opened."""


class Interrupted(Exception):
    """Raised when a stop is requested while waiting for the broker."""


class ExchangeNotFound(Exception):
    """Raised when a message names an exchange that does not exist."""


class _Delivery(NamedTuple):
    token: Any
    message: Message


def send_buffers(connection: pika.SelectConnection | None) -> collections.deque[bytes] | None:
    """Return the queue of bytes that ``connection`` has yet to send.

    The queue is internal to pika. Returns None when this pika version keeps
    it elsewhere, and then each buffer is sent as pika queued it.
    """
    transport = getattr(connection, '_transport', None)
    buffers = getattr(transport, '_tx_buffers', None)
    return buffers if isinstance(buffers, collections.deque) else None


def coalesce(buffers: collections.deque[bytes], chunk_bytes: int) -> None:
    """Join the small buffers at the end of ``buffers``, in place, into chunks.

    Only the trailing run of buffers shorter than half of ``chunk_bytes``
    is joined, into chunks of at most ``chunk_bytes``. The buffers before
    it were joined on an earlier turn or are large enough to send alone,
    so a turn costs time for what was queued since the last one, not for
    a whole backlog. The first buffer is never joined: a TLS write that
    could not finish must be retried with the same bytes. The bytes and
    their order are unchanged.
    """
    small = chunk_bytes // 2
    tail: list[bytes] = []
    while len(buffers) > 1 and len(buffers[-1]) < small:
        tail.append(buffers.pop())
    tail.reverse()
    if len(tail) < 2:
        buffers.extend(tail)
        return
    pending: list[bytes] = []
    size = 0
    for buffer in tail:
        if pending and size + len(buffer) > chunk_bytes:
            buffers.append(b''.join(pending))
            pending, size = [], 0
        pending.append(buffer)
        size += len(buffer)
    buffers.append(b''.join(pending))


def connection_parameters(settings: RabbitMQSettings, name: str) -> pika.ConnectionParameters:
    """Return pika connection parameters for ``settings``.

    Raises tls.TLSConfigError when ``ssl_options`` cannot be used.
    """
    ssl_options = None
    if settings.ssl_options is not None:
        context = tls.client_context(settings.ssl_options)
        ssl_options = pika.SSLOptions(context, settings.host)
    return pika.ConnectionParameters(
        host=settings.host, port=settings.port, virtual_host=settings.vhost,
        credentials=pika.PlainCredentials(settings.username, settings.password),
        heartbeat=settings.heartbeat_interval, ssl_options=ssl_options,
        connection_attempts=1, socket_timeout=10, stack_timeout=CONNECT_TIMEOUT,
        client_properties={'connection_name': name})


class Publisher:
    """A blocking publisher over one AMQP connection and channel.

    ``wakeup_fd`` is a file descriptor that becomes readable when a signal
    arrives (see :func:`signal.set_wakeup_fd`). Then :meth:`sleep` returns
    early when ``should_stop`` returns true, and every other waiting call
    raises Interrupted when ``should_interrupt`` returns true.
    """

    def __init__(self, settings: RabbitMQSettings, *, confirm: bool = True,
                 max_unconfirmed: int = 5000, name: str = 'mikkoo',
                 wakeup_fd: int | None = None,
                 should_stop: Callable[[], bool] = lambda: False,
                 should_interrupt: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.confirm = confirm
        self.max_unconfirmed = max_unconfirmed
        self.name = name
        self.should_stop = should_stop
        self.should_interrupt = should_interrupt
        self.failures: list[tuple[Any, str]] = []
        self.delivered = 0

        # The loop is driven here with poll(), never start(), which would
        # activate the poller itself.
        self._ioloop = IOLoop()
        self._ioloop.activate_poller()
        self._wakeup_fd = wakeup_fd
        if wakeup_fd is not None:
            self._ioloop.add_handler(wakeup_fd, self._drain_wakeup_fd, IOLoop.READ)
        self._connection: pika.SelectConnection | None = None
        self._connection_error: BaseException | None = None
        self._channel: pika.channel.Channel | None = None
        self._channel_opening = False
        self._probe: pika.channel.Channel | None = None
        self._probe_result: str | None = None
        self._known_exchanges: set[str] = set()
        self._missing_exchanges: dict[str, float] = {}
        self._next_tag = 1
        self._outstanding: dict[int, _Delivery] = {}
        self._in_doubt: collections.deque[_Delivery] = collections.deque()
        self._isolating = False
        # True when a message in flight may have caused the last channel or
        # connection closure, because it came with an error code other than
        # a forced close. The in-doubt messages are then sent one at a time.
        self._suspect = False
        self._sync_every = max(1, max_unconfirmed // SYNC_FRACTION)
        self._last_sync_tag = 0
        self._unflushed = 0   # publishes since the last loop turn
        # Body bytes sent on any channel, and what was sent before the
        # oldest message in flight when the window was last counted.
        self._sent_bytes = 0
        self._window_start_bytes = 0

    # -- connection ----------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return (self._connection is not None and self._connection_error is None
                and self._connection.is_open)

    def connect(self) -> None:
        """Open the connection and a channel in confirm mode.

        Blocks until both are ready. Raises BrokerUnavailable, or
        tls.TLSConfigError when the TLS settings cannot be used.
        """
        self.close()
        self._connection_error = None
        parameters = connection_parameters(self.settings, self.name)
        self._connection = pika.SelectConnection(
            parameters, on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop)
        try:
            self._run_until(lambda: self._channel is not None and self._channel.is_open
                            and not self._channel_opening, CONNECT_TIMEOUT + RPC_TIMEOUT)
        except BrokerUnavailable:
            # A connection that opened too late must not pass for a usable one.
            self.close()
            raise
        self._known_exchanges.clear()

    def close(self) -> None:
        """Close the connection; deliveries still in flight become in doubt.

        A connection that does not close within 5 s is left to close on its
        own, and its callbacks still run on the shared I/O loop. So every
        callback first checks that its connection or channel is the current
        one. Delivery tags restart at 1 on every channel, and a late ack of
        the old channel would otherwise settle a message of the new one.
        """
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.is_open:
            try:
                connection.close()
                self._poll_until(lambda: connection.is_closed, 5.0)
            except pika.exceptions.AMQPError:
                LOGGER.debug('ignoring an error while closing the connection',
                             exc_info=True)
        self._mark_in_doubt()
        self._channel = self._probe = None

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        if self._connection is None or connection is not self._connection:
            return
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._open_channel()

    def _on_connection_error(self, connection: Any, error: BaseException) -> None:
        if connection is self._connection:
            self._connection_error = error

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        self._connection_error = reason
        if _is_caused_by_message(reason):
            if self._isolating:
                self._fail_outstanding(f'the broker closed the connection: {reason}')
            self._suspect = True
        self._mark_in_doubt()
        self._channel = self._probe = None

    def _on_blocked(self, _connection: Any, frame: pika.frame.Method) -> None:
        LOGGER.warning('%s: RabbitMQ blocked publishing (%s); waiting until it '
                       'unblocks', self.name, frame.method.reason)

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        LOGGER.info('%s: RabbitMQ unblocked publishing', self.name)

    # -- channel -------------------------------------------------------------

    def _open_channel(self) -> None:
        assert self._connection is not None
        self._channel_opening = True
        self._channel = self._connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        if self._channel is None or channel is not self._channel:
            return
        # Delivery tags count from 1 on every new channel.
        self._next_tag = 1
        self._last_sync_tag = 0
        channel.add_on_close_callback(self._on_channel_closed)
        if not self.confirm:
            self._channel_opening = False
            return
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(lambda frame: self._on_confirmation(channel, frame),
                                 callback=lambda _frame: self._on_confirm_selected(channel))

    def _on_confirm_selected(self, channel: pika.channel.Channel) -> None:
        if channel is self._channel:
            self._channel_opening = False

    def _on_channel_closed(self, channel: pika.channel.Channel,
                           reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        if not isinstance(reason, pika.exceptions.ChannelClosedByClient):
            LOGGER.warning('%s: RabbitMQ closed the channel: %s', self.name, reason)
        self._known_exchanges.clear()
        if _is_caused_by_message(reason):
            if self._isolating:
                self._fail_outstanding(f'the broker closed the channel: {reason}')
            self._suspect = True
        self._mark_in_doubt()

    def _ensure_channel(self) -> None:
        if not self.is_connected:
            raise BrokerUnavailable(self._describe_error())
        if self._channel is None:
            try:
                self._open_channel()
            except WRONG_STATE_ERRORS as error:
                raise BrokerUnavailable(f'{type(error).__name__}: {error}') from None
        self._run_until(lambda: self._channel is not None and not self._channel_opening,
                        RPC_TIMEOUT)

    # -- exchanges -----------------------------------------------------------

    def check_exchange(self, exchange: str) -> None:
        """Raise ExchangeNotFound unless ``exchange`` exists.

        Asks the broker once per exchange and connection (a passive declare
        on a separate channel), so that a missing exchange never closes the
        publishing channel with messages in flight. A missing exchange is
        asked about again after one second.
        """
        if exchange == '' or exchange in self._known_exchanges:
            return
        if not self.is_connected:
            raise BrokerUnavailable(self._describe_error())
        missing_since = self._missing_exchanges.get(exchange)
        if missing_since is not None and time.monotonic() - missing_since < 1.0:
            raise ExchangeNotFound(f'exchange {exchange!r} not found')
        try:
            if self._probe is None or not self._probe.is_open:
                self._probe = None
                assert self._connection is not None
                self._connection.channel(on_open_callback=self._on_probe_open)
                self._run_until(lambda: self._probe is not None, RPC_TIMEOUT)
            self._probe_result = None
            assert self._probe is not None
            probe = self._probe
            probe.exchange_declare(exchange, passive=True,
                                   callback=lambda _frame: self._on_probe_ok(probe))
        except WRONG_STATE_ERRORS as error:
            raise BrokerUnavailable(f'{type(error).__name__}: {error}') from None
        self._run_until(lambda: self._probe_result is not None, RPC_TIMEOUT)
        if self._probe_result == 'ok':
            self._known_exchanges.add(exchange)
            self._missing_exchanges.pop(exchange, None)
            return
        self._missing_exchanges[exchange] = time.monotonic()
        raise ExchangeNotFound(f'exchange {exchange!r} not found ({self._probe_result})')

    def _on_probe_open(self, channel: pika.channel.Channel) -> None:
        if channel.connection is not self._connection:
            return
        channel.add_on_close_callback(self._on_probe_closed)
        self._probe = channel

    def _on_probe_ok(self, probe: pika.channel.Channel) -> None:
        if probe is self._probe:
            self._probe_result = 'ok'

    def _on_probe_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._probe:
            return
        self._probe = None
        self._probe_result = f'closed: {reason}'

    def check_frame_size(self, message: Message) -> None:
        """Raise InvalidMessage when the message's properties exceed one frame.

        AMQP sends properties and headers in a single frame of at most the
        negotiated frame_max bytes; RabbitMQ closes the whole connection when
        a frame is larger, so such a message must never be sent.
        """
        if self._connection is None:
            return
        frame_max = self._connection.params.frame_max
        properties = pika.BasicProperties(**message.properties)
        size = len(pika.frame.Header(1, len(message.body), properties).marshal())
        if size > frame_max:
            raise InvalidMessage(f'properties and headers take {size} bytes, more than '
                                 f'the frame_max of {frame_max} bytes RabbitMQ allows')

    # -- publishing ----------------------------------------------------------

    def publish(self, message: Message, token: Any) -> None:
        """Send ``message``; its outcome is reported later under ``token``.

        Blocks while ``max_unconfirmed`` messages or MAX_UNCONFIRMED_BYTES
        bytes of bodies are in flight. Raises
        BrokerUnavailable when the connection is lost; the messages in flight
        then stay in doubt and are sent again after :meth:`connect`.
        """
        # The common case, checked inline: an open channel with room.
        if (self._channel is None or self._in_doubt or self._connection_error is not None
                or len(self._outstanding) >= self.max_unconfirmed
                or self._sent_bytes - self._window_start_bytes >= MAX_UNCONFIRMED_BYTES):
            self._wait_for_window()
        self._send(_Delivery(token, message))
        self._unflushed += 1
        if self._unflushed >= FLUSH_EVERY:
            self._poll_once(0)

    def _wait_for_window(self) -> None:
        """Block until a message may be sent: the channel is open, the
        in-doubt messages are sent again, and the window has room."""
        while True:
            self._ensure_channel()
            if self._in_doubt and self._suspect:
                self._isolate_in_doubt()
                continue
            if not self._window_full():
                if not self._in_doubt:
                    return
                self._send(self._in_doubt.popleft())
                continue
            if not self.confirm and self._next_tag - 1 > self._last_sync_tag:
                # A window full of bytes may come before the next sync is due.
                self._request_sync()
            self._run_until(lambda: not self._window_full() or self._channel is None)

    def _window_full(self) -> bool:
        if len(self._outstanding) >= self.max_unconfirmed:
            return True
        if self._sent_bytes - self._window_start_bytes < MAX_UNCONFIRMED_BYTES:
            return False
        # Counted only when everything sent since the oldest message in
        # flight may exceed the bound: once per 32 MiB for small messages.
        unconfirmed = sum(len(delivery.message.body) for delivery in self._outstanding.values())
        self._window_start_bytes = self._sent_bytes - unconfirmed
        return unconfirmed >= MAX_UNCONFIRMED_BYTES

    def wait_for_confirms(self) -> None:
        """Block until every message sent so far is settled.

        Raises BrokerUnavailable when the connection is lost first.
        """
        while True:
            self._wait_for_window()
            if not self.confirm and self._next_tag - 1 > self._last_sync_tag:
                self._request_sync()
            self._run_until(lambda: not self._outstanding or self._channel is None)
            if not self._outstanding and not self._in_doubt:
                return

    def take_failures(self) -> list[tuple[Any, str]]:
        """Return the failures recorded so far and forget them."""
        failures, self.failures = self.failures, []
        return failures

    def forget_pending(self) -> None:
        """Drop every delivery in flight or in doubt, as when a batch is abandoned."""
        self._outstanding.clear()
        self._in_doubt.clear()
        self.failures = []

    def _send(self, delivery: _Delivery) -> None:
        """Publish one message on the channel and record it as outstanding.

        Raises InvalidMessage when pika cannot encode the message, and
        BrokerUnavailable when the connection is gone.
        """
        assert self._channel is not None
        message = delivery.message
        try:
            properties = pika.BasicProperties(**message.properties)
            self._channel.basic_publish(message.exchange, message.routing_key,
                                        message.body, properties,
                                        mandatory=self.confirm)
        except WRONG_STATE_ERRORS as error:
            raise BrokerUnavailable(f'{type(error).__name__}: {error}') from None
        except Exception as error:
            # pika encodes the whole message before it writes a byte, and
            # raises many types for values it cannot encode; none of them
            # concerns another message.
            raise InvalidMessage(f'cannot encode the message: {type(error).__name__}: '
                                 f'{error}') from None
        tag = self._next_tag
        self._next_tag += 1
        self._outstanding[tag] = delivery
        self._sent_bytes += len(message.body)
        if not self.confirm and tag - self._last_sync_tag >= self._sync_every:
            self._request_sync()

    def _request_sync(self) -> None:
        """Ask the broker to prove it received every message sent so far.

        Without confirmations, the Qos-Ok of a Basic.Qos sent on the same
        channel proves that the broker has processed every earlier frame,
        so the messages up to then count as delivered. pika sends one such
        request at a time and queues the rest.
        """
        channel = self._channel
        assert channel is not None
        upto = self._last_sync_tag = self._next_tag - 1
        try:
            channel.basic_qos(prefetch_count=0,
                              callback=lambda _frame: self._on_synced(channel, upto))
        except WRONG_STATE_ERRORS:
            # The channel is closing; its close callback puts the messages
            # not yet synced in doubt.
            pass

    def _on_synced(self, channel: pika.channel.Channel, upto: int) -> None:
        if channel is self._channel:
            self.delivered += len(self._pop_through(upto))

    def _pop_through(self, upto: int) -> list[_Delivery]:
        """Remove and return the outstanding deliveries with tags up to ``upto``."""
        # Tags enter the dict in increasing order, so these are a prefix of it.
        tags = []
        for tag in self._outstanding:
            if tag > upto:
                break
            tags.append(tag)
        return [self._outstanding.pop(tag) for tag in tags]

    def _isolate_in_doubt(self) -> None:
        """Send each in-doubt message alone and wait for its outcome.

        The broker closed the channel or connection with an error while
        these messages were in flight. Sent one at a time, the message at
        fault fails alone and the others are delivered.
        """
        LOGGER.info('%s: publishing %d messages in doubt again, one at a time',
                    self.name, len(self._in_doubt))
        self._run_until(lambda: not self._outstanding or self._channel is None)
        self._isolating = True
        try:
            while self._in_doubt:
                self._ensure_channel()
                self._send(self._in_doubt.popleft())
                if not self.confirm:
                    self._request_sync()
                self._run_until(lambda: not self._outstanding)
            self._suspect = False
        finally:
            self._isolating = False

    # -- confirmations -------------------------------------------------------

    def _on_confirmation(self, channel: pika.channel.Channel,
                         frame: pika.frame.Method) -> None:
        if channel is not self._channel:
            return
        method = frame.method
        failed = isinstance(method, pika.spec.Basic.Nack)
        if method.multiple:
            settled = self._pop_through(method.delivery_tag)
        else:
            delivery = self._outstanding.pop(method.delivery_tag, None)
            settled = [] if delivery is None else [delivery]
        for delivery in settled:
            if failed:
                self.failures.append((delivery.token, 'the broker rejected it (nack)'))
            else:
                self.delivered += 1

    def _on_return(self, channel: pika.channel.Channel, method: pika.spec.Basic.Return,
                   properties: pika.BasicProperties, body: bytes) -> None:
        if channel is not self._channel:
            return
        # A return arrives before the ack of the same message, so the message
        # is still outstanding. Returns come in publish order, so among
        # messages alike in exchange, routing key, body and key properties
        # the oldest outstanding one is returned. Events may set the key
        # properties themselves, and then a headers exchange can route two
        # such messages apart by their other headers: a message whose
        # headers equal the returned ones comes first. Returns are rare, so
        # scanning here costs less than keeping an index up to date.
        key = _return_key(vars(properties))
        alike = [tag for tag, delivery in self._outstanding.items()
                 if delivery.message.exchange == method.exchange
                 and delivery.message.routing_key == method.routing_key
                 and delivery.message.body == body
                 and _return_key(delivery.message.properties) == key]
        if not alike:
            LOGGER.warning('%s: cannot match a returned message (exchange %r, routing key %r)',
                           self.name, method.exchange, method.routing_key)
            return
        same_headers = [tag for tag in alike if
                        self._outstanding[tag].message.properties.get('headers')
                        == properties.headers]
        delivery = self._outstanding.pop((same_headers or alike)[0])
        self.failures.append(
            (delivery.token, f'unroutable: {method.reply_code} {method.reply_text}'))

    def _fail_outstanding(self, reason: str) -> None:
        for delivery in self._outstanding.values():
            self.failures.append((delivery.token, reason))
        self._outstanding.clear()

    def _mark_in_doubt(self) -> None:
        if not self._outstanding:
            return
        # Tags enter the dict in increasing order, so its values are in
        # publish order.
        doubt = list(self._outstanding.values())
        self._outstanding.clear()
        self._in_doubt.extendleft(reversed(doubt))

    # -- I/O loop ------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` while servicing heartbeats; return early on a signal."""
        deadline = time.monotonic() + seconds
        while not self.should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._poll_once(remaining)

    def _run_until(self, condition: Callable[[], bool],
                   timeout: float | None = None) -> None:
        """Turn the I/O loop until ``condition`` holds.

        Raises BrokerUnavailable when the connection closes or ``timeout``
        seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not condition():
            if self._connection is None or self._connection_error is not None:
                raise BrokerUnavailable(self._describe_error())
            if self.should_interrupt():
                raise Interrupted('stop requested while waiting for RabbitMQ')
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise BrokerUnavailable(f'RabbitMQ did not respond within {timeout:g} s (timed out)')
            self._poll_once(remaining)

    def _poll_until(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            self._poll_once(deadline - time.monotonic())

    def _poll_once(self, timeout: float | None) -> None:
        """Run one I/O loop turn, waiting at most ``timeout`` seconds."""
        if timeout is not None:
            timer = self._ioloop.call_later(max(timeout, 0), lambda: None)
        buffers = send_buffers(self._connection)
        if buffers is not None:
            coalesce(buffers, SEND_CHUNK_BYTES)
        self._unflushed = 0
        self._ioloop.poll()
        self._ioloop.process_timeouts()
        if timeout is not None:
            self._ioloop.remove_timeout(timer)

    @staticmethod
    def _drain_wakeup_fd(fd: int, _events: int) -> None:
        # The descriptor is non-blocking, as signal.set_wakeup_fd requires.
        try:
            while os.read(fd, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _describe_error(self) -> str:
        error = self._connection_error
        if error is None:
            return 'not connected to RabbitMQ'
        if self.settings.ssl_options is not None:
            failure = tls.describe_handshake_failure(error, self.settings.host,
                                                     self.settings.port)
            if failure is not None:
                return failure
        cause = _root_cause(error)
        return f'{type(cause).__name__}: {cause}' if str(cause) else type(cause).__name__


def _root_cause(error: BaseException) -> BaseException:
    """Return the innermost of the errors that pika wraps a connection failure in."""
    while True:
        if isinstance(error, AMQPConnectionWorkflowFailed) and error.exceptions:
            error = error.exceptions[-1]
        elif isinstance(error, AMQPConnectorPhaseErrorBase):
            error = error.exception
        elif (isinstance(error, pika.exceptions.AMQPConnectionError) and error.args
              and isinstance(error.args[0], BaseException)):
            error = error.args[0]
        else:
            return error


def _return_key(properties: dict[str, Any]) -> tuple[str, ...]:
    """Return the key that separates a returned message from the others in flight.

    Every message mikkoo publishes carries a fresh correlation_id and a
    sequence header unless the event sets them, and the event id headers of
    events and dead letters separate the rest. repr() makes any header
    value hashable.
    """
    headers = properties.get('headers') or {}
    return (_key_part(properties.get('correlation_id')), _key_part(headers.get('sequence')),
            _key_part(headers.get('pgq_event_id')),
            _key_part(headers.get('x-mikkoo-event-id')))


def _key_part(value: Any) -> str:
    # pika decodes 64-bit integers as its own int subclass, whose repr
    # differs from int's.
    return repr(int(value)) if isinstance(value, int) else repr(value)


def _is_caused_by_message(reason: BaseException) -> bool:
    """Return whether the broker closed the channel or connection over an error.

    A forced close (an operator, a broker shutdown) or a lost socket gives
    no information about the messages in flight.
    """
    return (isinstance(reason, (pika.exceptions.ConnectionClosedByBroker,
                                pika.exceptions.ChannelClosedByBroker))
            and reason.reply_code != CONNECTION_FORCED)
