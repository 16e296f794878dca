"""Turn a PgQ event into an AMQP message.

| PgQ       | AMQP                                              |
|-----------|---------------------------------------------------|
| ev_type   | routing key                                       |
| ev_data   | body (NULL is an empty body)                      |
| ev_extra1 | exchange (NULL is the default exchange)           |
| ev_extra2 | content_type property                             |
| ev_extra3 | JSON object of AMQP properties                    |
| ev_extra4 | JSON object of headers                            |
| ev_time   | timestamp header (ISO-8601, UTC) and property     |
| ev_txid   | txid header                                       |

Metadata that cannot be used is left out with a warning and the event is
still published. This module imports neither pika nor psycopg2.
"""
from __future__ import annotations

import decimal
import json
import logging
import os
import socket
import time
from typing import Any, NamedTuple

LOGGER = logging.getLogger(__name__)

# AMQP encodes these as shortstr: at most 255 bytes of UTF-8.
SHORTSTR_MAX = 255
INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1
# pika encodes an AMQP decimal as a 32-bit signed mantissa and a count of
# decimal places.
INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
# Header tables and arrays nested deeper than this are left out; a JSON
# document can nest deeper than Python's recursion limit.
MAX_HEADER_DEPTH = 32

STRING_PROPERTIES = frozenset({
    'app_id', 'content_encoding', 'content_type', 'correlation_id',
    'expiration', 'message_id', 'type', 'user_id'})
INTEGER_PROPERTIES = {'delivery_mode': (1, 2), 'priority': (0, 255),
                      'timestamp': (0, INT64_MAX)}
ALLOWED_PROPERTIES = STRING_PROPERTIES | set(INTEGER_PROPERTIES) | {'headers'}


class Event(NamedTuple):
    """One row of a PgQ batch, as :mod:`mikkoo.pgq` reads it."""

    id: int
    time: str       # ev_time as ISO-8601 in UTC
    epoch: int      # ev_time as whole seconds since the Unix epoch
    txid: int | None
    retry: int | None
    type: str | None
    data: str | None
    extra1: str | None
    extra2: str | None
    extra3: str | None
    extra4: str | None


class Message(NamedTuple):
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]


class InvalidMessage(Exception):
    """Raised when an event cannot become an AMQP message at all."""


class Sequence:
    """Produce 64-bit integers that increase within this process.

    Each value is at least the current time in microseconds since the epoch,
    so values from different hosts with synchronised clocks sort roughly by
    time. They fit a signed 64-bit header until the year 294,000.
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


class UUIDFactory:
    """Produce random (version 4) UUID strings.

    uuid.uuid4() makes one urandom system call per UUID; reading the random
    bytes 1,024 UUIDs at a time makes correlation ids about twice as cheap.
    """

    BLOCK = 16 * 1024

    def __init__(self) -> None:
        self._random = b''
        self._position = 0

    def next(self) -> str:
        if self._position >= len(self._random):
            self._random = os.urandom(self.BLOCK)
            self._position = 0
        start, self._position = self._position, self._position + 16
        value = int.from_bytes(self._random[start:self._position], 'big')
        # Set the version (4) and the RFC 4122 variant bits.
        value = (value & ~(0xF000 << 64)) | (0x4000 << 64)
        value = (value & ~(0xC000 << 48)) | (0x8000 << 48)
        text = f'{value:032x}'
        return f'{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}'


class EventMapper:
    """Map the events of one queue to messages, logging unusable metadata."""

    def __init__(self, queue: str, origin: str | None = None,
                 sequence: Sequence | None = None) -> None:
        self.queue = queue
        self.origin = origin or socket.getfqdn()
        self.sequence = sequence or Sequence()
        self.uuids = UUIDFactory()

    def map(self, event: Event) -> Message:
        """Return the message for ``event``.

        Raises InvalidMessage when the exchange or routing key cannot be sent.
        """
        exchange = event.extra1 or ''
        routing_key = event.type or ''
        _check_shortstr(exchange, 'exchange (ev_extra1)')
        _check_shortstr(routing_key, 'routing key (ev_type)')

        # The automatic values come first and the event's own override them.
        # Most events carry no metadata and skip the JSON steps entirely.
        headers = self._automatic_headers(event)
        properties: dict[str, Any] = {'app_id': 'mikkoo',
                                      'correlation_id': self.uuids.next(),
                                      'timestamp': event.epoch}
        if event.extra2:
            content_type = self._content_type(event)
            if content_type is not None:
                properties['content_type'] = content_type
        event_properties = self._event_properties(event) if event.extra3 else {}
        event_headers = event_properties.pop('headers', None)
        if event_headers is None and event.extra4:
            event_headers = self._json_object(event, 'ev_extra4', event.extra4)
        if event_headers:
            headers.update(self._clean_headers(event, event_headers))
        properties.update(event_properties)
        properties['headers'] = headers

        body = event.data.encode('utf-8') if event.data is not None else b''
        return Message(exchange, routing_key, body, properties)

    def _event_properties(self, event: Event) -> dict[str, Any]:
        """Return the valid properties of ev_extra3, warning about the rest."""
        values = self._json_object(event, 'ev_extra3', event.extra3)
        if not values:
            return {}
        properties: dict[str, Any] = {}
        for name, value in values.items():
            if name == 'headers' and isinstance(value, dict):
                properties[name] = value
                continue
            problem = _property_problem(name, value)
            if problem:
                self._warn(event, f'ev_extra3 property {name!r}', problem)
                continue
            properties[name] = str(value) if name == 'expiration' else value
        return properties

    def _content_type(self, event: Event) -> str | None:
        content_type = event.extra2 or ''
        if not content_type:
            return None
        if len(content_type.encode('utf-8')) > SHORTSTR_MAX:
            self._warn(event, 'ev_extra2', 'content type is longer than 255 bytes')
            return None
        return content_type

    def _json_object(self, event: Event, field: str,
                     text: str | None) -> dict[str, Any] | None:
        if text is None or text == '':
            return None
        try:
            # Numbers with a fraction become Decimal: pika cannot encode a
            # float, and the decimal keeps the digits the event was written with.
            # NaN and Infinity, which Python's json accepts, become Decimal
            # too, and then text.
            value = json.loads(text, parse_float=decimal.Decimal,
                               parse_constant=decimal.Decimal)
        except ValueError as error:
            self._warn(event, field, f'invalid JSON ({error})')
            return None
        except RecursionError:
            self._warn(event, field, 'JSON nested too deeply to read')
            return None
        if value is None:
            return None
        if not isinstance(value, dict):
            self._warn(event, field, f'JSON {type(value).__name__} is not an object')
            return None
        return value

    def _clean_headers(self, event: Event, headers: dict[str, Any]) -> dict[str, Any]:
        clean = {}
        for name, value in headers.items():
            try:
                clean[name] = _header_value(name, value, 1)
            except UnusableHeader as error:
                self._warn(event, f'header {name!r}', str(error))
        return clean

    def _automatic_headers(self, event: Event) -> dict[str, Any]:
        # pgq_queue and pgq_event_id identify a redelivered event, so that a
        # consumer can drop the duplicates at-least-once delivery makes.
        return {'origin': self.origin, 'sequence': self.sequence.next(),
                'timestamp': event.time, 'txid': event.txid,
                'pgq_queue': self.queue, 'pgq_event_id': event.id}

    def _warn(self, event: Event, field: str, problem: str) -> None:
        LOGGER.warning('queue %s event %s: %s left out: %s',
                       self.queue, event.id, field, problem)


def _check_shortstr(value: str, what: str) -> None:
    # A character takes at most 4 bytes of UTF-8, so short strings need no
    # encoding to be measured.
    if len(value) > SHORTSTR_MAX // 4 and len(value.encode('utf-8')) > SHORTSTR_MAX:
        raise InvalidMessage(f'{what} is longer than 255 bytes')


def _property_problem(name: str, value: Any) -> str | None:
    """Return why ``value`` cannot be the AMQP property ``name``, or None."""
    if name not in ALLOWED_PROPERTIES:
        return 'not an AMQP property mikkoo sets'
    if name == 'headers':
        return 'must be a JSON object'
    if name == 'expiration':
        # RabbitMQ takes the expiration in milliseconds, as digits.
        if (_is_integer(value) and value >= 0) or (isinstance(value, str) and value.isdigit()):
            return None
        return f'must be a number of milliseconds, got {value!r}'
    if name in STRING_PROPERTIES:
        if not isinstance(value, str):
            return f'must be a string, got {value!r}'
        if len(value.encode('utf-8')) > SHORTSTR_MAX:
            return 'longer than 255 bytes'
        return None
    low, high = INTEGER_PROPERTIES[name]
    if not _is_integer(value) or not low <= value <= high:
        return f'must be an integer from {low} to {high}, got {value!r}'
    return None


class UnusableHeader(Exception):
    """Raised when a header value cannot be encoded in an AMQP table."""


def _header_value(name: str, value: Any, depth: int) -> Any:
    """Return ``value`` in a form pika encodes, or raise UnusableHeader."""
    if len(name.encode('utf-8')) > SHORTSTR_MAX:
        raise UnusableHeader('header name is longer than 255 bytes')
    if depth > MAX_HEADER_DEPTH:
        raise UnusableHeader(f'nested more than {MAX_HEADER_DEPTH} levels deep')
    if _is_integer(value) and not INT64_MIN <= value <= INT64_MAX:
        raise UnusableHeader(f'integer {value} does not fit in 64 bits')
    if isinstance(value, decimal.Decimal):
        return _decimal_or_text(value)
    if isinstance(value, dict):
        table = {}
        for key, item in value.items():
            try:
                table[key] = _header_value(key, item, depth + 1)
            except UnusableHeader as error:
                raise UnusableHeader(f'in {key!r}: {error}') from None
        return table
    if isinstance(value, list):
        return [_header_value('', item, depth + 1) for item in value]
    return value


def _decimal_or_text(value: decimal.Decimal) -> decimal.Decimal | str:
    """Return ``value`` if it fits an AMQP decimal, else its text."""
    if not value.is_finite():
        return str(value)
    normalized = value.normalize()
    exponent = normalized.as_tuple().exponent
    assert isinstance(exponent, int)
    places = max(0, -exponent)
    mantissa = int(normalized.scaleb(places))
    if places > 255 or not INT32_MIN <= mantissa <= INT32_MAX:
        return str(value)
    return normalized


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
