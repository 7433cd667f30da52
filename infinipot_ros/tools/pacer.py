"""Playback timing for the replayer: when each message is due, and the simulated clock (/clock).

:class:`Pacer` knows nothing of ROS: it sleeps until a message's recorded time
(scaled by ``rate``) has come and calls a ``clock`` sink with the simulated
time in ns, which the replayer turns into ``rosgraph_msgs/Clock`` on /clock.
Its rules:

* within a pass, message k is due ``(time_k - time_0) / rate`` seconds after
  the pass's first message went out (``rate`` 0 = as fast as possible);
* between passes (``--loop``) it waits one nominal period (the last spacing
  seen) after the last message;
* the clock is set to each message's stamp just before the message is sent
  and, while waiting, ticks ``clock_rate_hz`` times a second, interpolated at
  ``rate`` from the last stamp and held below the next one; it never goes
  backwards (a stamp at or below the last clock value publishes nothing).

All times are ns for recorded times and stamps, seconds of ``time.monotonic``
for the wall clock. :meth:`Pacer.wait` returns early when ``stop`` is set.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable, Optional

__all__ = ["Pacer"]

_NS = 1_000_000_000


class Pacer:
    """Times the messages of a replay and drives the simulated clock.

    Args:
        rate: 1.0 real time, 4.0 four times faster, 0 as fast as possible.
        clock: called with the simulated time (ns) whenever it moves forward;
            None = no clock.
        clock_rate_hz: clock ticks per second while waiting between messages
            (0 = only at messages).
        stop: event that ends every wait early (shared with the caller).

    Raises:
        ValueError: rate or clock_rate_hz negative or not finite.
    """

    def __init__(self, rate: float = 1.0, *, clock: Optional[Callable[[int], None]] = None,
                 clock_rate_hz: float = 50.0, stop: Optional[threading.Event] = None) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be >= 0 (0 = as fast as possible), got {rate}")
        if not (math.isfinite(clock_rate_hz) and clock_rate_hz >= 0):
            raise ValueError(f"clock_rate_hz must be >= 0, got {clock_rate_hz}")
        self.rate = float(rate)
        self.clock = clock
        self.clock_rate_hz = float(clock_rate_hz)
        self.stop = stop if stop is not None else threading.Event()
        self.clock_published = 0  # clock values sent to the sink
        self.period_ns = 0  # last spacing between two recorded times of a pass (ns)
        self.first_wall: Optional[float] = None  # monotonic time of the first message sent
        self.last_wall = time.monotonic()  # of the last message sent (or construction)
        self._last_clock_ns = -1
        self._passes = 0  # passes started
        self._origin: Optional[tuple] = None  # (wall s, recorded ns) of this pass's first message
        self._prev_ns: Optional[int] = None

    @property
    def in_pass(self) -> bool:
        """False until the first :meth:`wait` of a pass (after :meth:`new_pass`)."""
        return self._origin is not None

    @property
    def wall_time_s(self) -> float:
        """Seconds from the first to the last message sent (0 before two)."""
        return 0.0 if self.first_wall is None else self.last_wall - self.first_wall

    def new_pass(self) -> None:
        """Start a pass over the source: its first message is sent without waiting on the last pass's times."""
        self._origin = None
        self._prev_ns = None

    def wait(self, time_ns: int, next_stamp_ns: Optional[int] = None) -> bool:
        """Sleep until the message recorded at ``time_ns`` is due; False when stopped.

        Args:
            time_ns: the message's recorded time (ns; only differences matter).
            next_stamp_ns: its stamp as it will be sent (ns); the clock ticks in
                between stay below it. None = no ticks.
        """
        if self._origin is None:  # first message of a pass
            if self._passes and self.period_ns and self.rate > 0:
                self._sleep_until(self.last_wall + self.period_ns / _NS / self.rate, None)
            self._passes += 1
            self._origin = (time.monotonic(), int(time_ns))
        elif self.rate > 0:
            wall0, rec0 = self._origin
            self._sleep_until(wall0 + (int(time_ns) - rec0) / _NS / self.rate, next_stamp_ns)
        if self._prev_ns is not None and time_ns > self._prev_ns:
            self.period_ns = int(time_ns) - self._prev_ns
        self._prev_ns = int(time_ns)
        return not self.stop.is_set()

    def send(self, stamp_ns: int, publish: Callable[[], None]) -> None:
        """Set the clock to ``stamp_ns`` (if that moves it forward), then call ``publish`` and note the time."""
        self.tick(stamp_ns)
        publish()
        self.last_wall = time.monotonic()
        if self.first_wall is None:
            self.first_wall = self.last_wall

    def tick(self, stamp_ns: int) -> bool:
        """Send ``stamp_ns`` to the clock sink unless that would not move the clock forward."""
        if self.clock is None or stamp_ns <= self._last_clock_ns:
            return False
        self._last_clock_ns = int(stamp_ns)
        self.clock(int(stamp_ns))
        self.clock_published += 1
        return True

    def _sleep_until(self, target: float, next_stamp: Optional[int]) -> None:
        """Sleep until monotonic() >= target, ticking the clock in between when enabled."""
        tick = 1.0 / self.clock_rate_hz if (self.clock is not None and self.clock_rate_hz > 0) else None
        base, since = self._last_clock_ns, self.last_wall
        while True:
            remaining = target - time.monotonic()
            if remaining <= 0 or self.stop.is_set():
                return
            if tick is None or base < 0 or next_stamp is None:
                self.stop.wait(remaining)
                continue
            self.stop.wait(min(remaining, tick))
            sim = base + int((time.monotonic() - since) * self.rate * _NS)
            self.tick(min(sim, next_stamp - 1))
