"""Capped exponential backoff with jitter, shared by every reconnect loop."""
from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Count attempts and compute the delay before the next one.

    The delay doubles from ``initial`` up to ``maximum`` seconds. Jitter
    spreads it by up to ``jitter`` (a fraction) either way, so that workers
    that failed together do not retry together.
    """

    def __init__(self, initial: float = 1.0, maximum: float = 60.0,
                 factor: float = 2.0, jitter: float = 0.1,
                 random_fraction: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.random_fraction = random_fraction
        self.attempts = 0

    def next_delay(self) -> float:
        """Record a failed attempt and return seconds to wait before the next."""
        try:
            base = min(self.maximum, self.initial * self.factor ** self.attempts)
        except OverflowError:
            # After about a thousand doublings the float overflows; the cap
            # was reached long before.
            base = self.maximum
        self.attempts += 1
        spread = 1 + self.jitter * (2 * self.random_fraction() - 1)
        return min(self.maximum, base * spread)

    def reset(self) -> None:
        """Forget the failures after a success."""
        self.attempts = 0
