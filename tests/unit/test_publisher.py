"""Joining pika's queued send buffers: bytes, order and chunk bounds."""
import collections

from mikkoo.publisher import coalesce


def test_later_buffers_joined_into_chunks() -> None:
    buffers = collections.deque([b'head', b'aa', b'bb', b'cc', b'dd', b'e'])

    coalesce(buffers, chunk_bytes=8)

    assert list(buffers) == [b'head', b'aabbccdd', b'e']


def test_first_buffer_kept_apart() -> None:
    buffers = collections.deque([b'a', b'b', b'c'])

    coalesce(buffers, chunk_bytes=100)

    assert list(buffers) == [b'a', b'bc']


def test_walk_stops_at_large_buffer() -> None:
    # A buffer of half a chunk or more was joined on an earlier turn or is
    # large enough alone. So the buffers before it are not walked again.
    buffers = collections.deque([b'h', b'x', b'y', b'long-buffer', b'p', b'q'])

    coalesce(buffers, chunk_bytes=8)

    assert list(buffers) == [b'h', b'x', b'y', b'long-buffer', b'pq']


def test_one_small_buffer_left_alone() -> None:
    for items in ([], [b'only'], [b'one', b'two'], [b'h', b'long-buffer', b'x']):
        buffers = collections.deque(items)

        coalesce(buffers, chunk_bytes=8)

        assert list(buffers) == items


def test_joined_bytes_equal_original() -> None:
    items = [bytes([n % 251]) * (n % 17 + 1) for n in range(500)]
    buffers = collections.deque(items)

    coalesce(buffers, chunk_bytes=64)

    assert b''.join(buffers) == b''.join(items)

    assert all(len(chunk) <= 64 for chunk in list(buffers)[1:])


def test_second_turn_joins_only_new_buffers() -> None:
    buffers = collections.deque([b'h'] + [b'ab'] * 8)
    coalesce(buffers, chunk_bytes=8)
    buffers.extend([b'cd', b'ef'])

    coalesce(buffers, chunk_bytes=8)

    assert list(buffers) == [b'h', b'abababab', b'abababab', b'cdef']
