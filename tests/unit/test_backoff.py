"""Unit tests for mikkoo.backoff: capped exponential delays with jitter."""
from __future__ import annotations

import pytest

from mikkoo.backoff import Backoff


def no_jitter() -> float:
    # A random fraction of 0.5 puts the jitter factor at exactly 1.
    return 0.5


def test_delays_double_from_initial() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0, random_fraction=no_jitter)

    delays = [backoff.next_delay() for _ in range(5)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_delays_use_factor() -> None:
    backoff = Backoff(initial=0.5, maximum=60.0, factor=3.0, random_fraction=no_jitter)

    delays = [backoff.next_delay() for _ in range(3)]

    assert delays == [0.5, 1.5, 4.5]


def test_delays_cap_at_maximum() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0, random_fraction=no_jitter)

    delays = [backoff.next_delay() for _ in range(8)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]


def test_attempts_count_delays() -> None:
    backoff = Backoff(random_fraction=no_jitter)

    for _ in range(3):
        backoff.next_delay()

    assert backoff.attempts == 3


@pytest.mark.parametrize(('fraction', 'expected'), [
    pytest.param(0.0, 3.6, id='lowest'),
    pytest.param(0.25, 3.8, id='below'),
    pytest.param(0.75, 4.2, id='above'),
    pytest.param(1.0, 4.4, id='highest'),
])
def test_jitter_spreads_delay(fraction: float, expected: float) -> None:
    backoff = Backoff(initial=4.0, maximum=60.0, jitter=0.1,
                      random_fraction=lambda: fraction)

    assert backoff.next_delay() == pytest.approx(expected)


@pytest.mark.parametrize('fraction', [0.0, 0.1, 0.5, 0.9, 0.999999])
def test_jitter_stays_within_bounds(fraction: float) -> None:
    backoff = Backoff(initial=1.0, maximum=1000.0, jitter=0.25,
                      random_fraction=lambda: fraction)

    for attempt in range(8):
        base = 2.0 ** attempt
        delay = backoff.next_delay()
        assert delay >= base * 0.75
        assert delay <= base * 1.25


def test_jitter_never_exceeds_maximum() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0, jitter=0.5, random_fraction=lambda: 1.0)

    delays = [backoff.next_delay() for _ in range(8)]

    assert max(delays) == 10.0


def test_jitter_lowers_capped_delay() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0, jitter=0.5, random_fraction=lambda: 0.0)

    delays = [backoff.next_delay() for _ in range(8)]

    assert delays[-1] == 5.0


def test_zero_jitter_ignores_random() -> None:
    backoff = Backoff(initial=2.0, maximum=60.0, jitter=0.0, random_fraction=lambda: 0.9)

    assert backoff.next_delay() == 2.0


def test_reset_restarts_at_initial() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0, random_fraction=no_jitter)
    for _ in range(4):
        backoff.next_delay()

    backoff.reset()

    assert backoff.attempts == 0
    assert backoff.next_delay() == 1.0


def test_many_attempts_stay_at_maximum() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0, random_fraction=no_jitter)
    # About 17 hours of retries at the 60 s cap.
    backoff.attempts = 1100

    assert backoff.next_delay() == 60.0
