"""Joining pika's queued send buffers: bytes, order and chunk bounds."""
import collections

from mikkoo.publisher import coalesce


def test_later_buffers_joined_into_chunks() -> None:
    buffers = collections.deque([b'head', b'aa', b'bb', b'cc', b'dd', b'e'])

    coalesce(buffers, chunk_bytes=4)

    assert list(buffers) == [b'head', b'aabb', b'ccdd', b'e']


def test_first_buffer_kept_apart() -> None:
    buffers = collections.deque([b'a', b'b', b'c'])

    coalesce(buffers, chunk_bytes=100)

    assert list(buffers) == [b'a', b'bc']


def test_long_buffer_stays_whole() -> None:
    buffers = collections.deque([b'h', b'x', b'long-buffer', b'y', b'z'])

    coalesce(buffers, chunk_bytes=4)

    assert list(buffers) == [b'h', b'x', b'long-buffer', b'yz']


def test_two_buffers_left_alone() -> None:
    for items in ([], [b'only'], [b'one', b'two']):
        buffers = collections.deque(items)

        coalesce(buffers, chunk_bytes=100)

        assert list(buffers) == items


def test_joined_bytes_equal_original() -> None:
    items = [bytes([n % 251]) * (n % 17 + 1) for n in range(500)]
    buffers = collections.deque(items)

    coalesce(buffers, chunk_bytes=64)

    assert b''.join(buffers) == b''.join(items)

    assert all(len(chunk) <= 64 for chunk in list(buffers)[1:])
