"""The frame gate: which camera frames enter the stream, decided by header stamp alone.

One gate sits in front of every way frames reach the engine (the ROS node,
``infinipot-stream``, ``infinipot-bench``), so the three sample, refuse and
restart in the same way:

* **sampling** -- at most one frame per ``1 / frame_rate_hz`` slot of stamp
  time per camera, slots counted from the camera's first accepted stamp, so a
  bag played fast or slow gives the same stream;
* **stale** -- a stamp at or before the camera's last accepted one, but less
  than ``time_jump_s`` older (out of order, duplicated): refused silently;
* **time jump** -- a stamp more than ``time_jump_s`` older than the camera's
  last accepted one. One such frame is a driver glitch: it is dropped and
  counted (``stamp_dropped``) and the memory is kept. Only
  ``time_jump_frames`` consecutive jumped frames of a camera (a looping bag, a
  simulator reset) restart the stream: the caller then forgets the memory and
  the gate starts every camera's clock again (``time_jumps``);
* **future** -- when the caller passes its clock (``now_ns``, the node's ROS
  time), a stamp more than ``max_future_s`` ahead of it is refused and does
  not move the camera's clock. Without this one frame stamped far in the
  future would poison the gate: every later, correct frame would look like a
  jump back, and after ``time_jump_frames`` of them the memory would be
  forgotten. ``max_future_s`` is ``time_jump_s`` (5 s by default): a stamp
  less far ahead can at worst make the camera's frames stale for less than
  ``time_jump_s``;
* **invalid** -- a negative stamp is refused.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


#: How far ahead of the caller's clock a stamp may be when the time-jump rule is off (s).
DEFAULT_MAX_FUTURE_S = 5.0


class GateDecision(str, enum.Enum):
    """What the gate decided about one frame."""

    ACCEPT = "accept"  # sampled: convert and ingest it
    SKIP = "skip"  # in a slot already taken (frame_rate_hz)
    STALE = "stale"  # at or before the last accepted stamp (out of order, duplicate)
    JUMP_DROPPED = "jump_dropped"  # jumped back more than time_jump_s: one glitch, dropped and counted
    RESTART = "restart"  # sustained jump back: the stream restarts with this frame (accept it)
    FUTURE = "future"  # more than max_future_s ahead of the caller's clock: refused, clock not moved
    INVALID = "invalid"  # negative stamp: refused


@dataclass
class _CameraClock:
    origin_ns: int
    last_slot: int
    last_stamp_ns: int
    jumped: int = 0  # consecutive frames stamped more than time_jump_s before last_stamp_ns


class FrameGate:
    """Sampling by header stamp plus the time-jump rule (see module docstring). Not thread-safe: one caller.

    Args:
        rate_hz: frames per second kept per camera; <= 0 keeps every frame in stamp order.
        time_jump_s: a stamp this many seconds older than the camera's last accepted
            one is a jump back; <= 0 disables the rule (every older stamp is stale).
        time_jump_frames: consecutive jumped frames of one camera that restart the
            stream (>= 1; 1 = every jump restarts, the old behaviour).

    ``max_future_s`` (attribute, seconds): how far ahead of ``now_ns`` a stamp
    may be; ``time_jump_s``, or :data:`DEFAULT_MAX_FUTURE_S` when the jump rule is off.

    Raises:
        ValueError: time_jump_frames < 1.
    """

    def __init__(self, rate_hz: float, time_jump_s: float = 5.0, time_jump_frames: int = 3) -> None:
        if time_jump_frames < 1:
            raise ValueError(f"time_jump_frames must be >= 1, got {time_jump_frames}")
        self.time_jump_ns = int(time_jump_s * 1e9) if time_jump_s > 0 else 0
        self.time_jump_frames = int(time_jump_frames)
        self.max_future_s = time_jump_s if time_jump_s > 0 else DEFAULT_MAX_FUTURE_S
        self.max_future_ns = int(self.max_future_s * 1e9)
        self._clocks: dict[str, _CameraClock] = {}
        self.set_rate(rate_hz)

    def set_rate(self, rate_hz: float) -> None:
        """Change frame_rate_hz (live); slots restart from each camera's last accepted frame."""
        self.rate_hz = float(rate_hz)
        self.period_ns = int(round(1e9 / rate_hz)) if rate_hz > 0 else 0
        for clock in self._clocks.values():
            clock.origin_ns, clock.last_slot = clock.last_stamp_ns, 0

    def offer(self, camera: str, stamp_ns: int, now_ns: Optional[int] = None) -> GateDecision:
        """Decide about the frame of ``camera`` stamped ``stamp_ns`` (header stamp, ns).

        ``now_ns``: the caller's clock (ns, same time base as the stamps); None
        or <= 0 (e.g. simulated time before the first /clock) skips the future check.
        On RESTART every camera's clock is forgotten and this frame starts the
        camera's new clock; the caller must forget the stream (engine reset).
        FUTURE and INVALID frames leave every clock as it was.
        """
        if stamp_ns < 0:
            return GateDecision.INVALID
        if now_ns is not None and now_ns > 0 and stamp_ns > now_ns + self.max_future_ns:
            return GateDecision.FUTURE
        clock = self._clocks.get(camera)
        if clock is None:
            self._clocks[camera] = _CameraClock(stamp_ns, 0, stamp_ns)
            return GateDecision.ACCEPT
        if self.time_jump_ns and stamp_ns < clock.last_stamp_ns - self.time_jump_ns:
            clock.jumped += 1
            if clock.jumped < self.time_jump_frames:
                return GateDecision.JUMP_DROPPED
            self._clocks.clear()
            self._clocks[camera] = _CameraClock(stamp_ns, 0, stamp_ns)
            return GateDecision.RESTART
        clock.jumped = 0
        if stamp_ns <= clock.last_stamp_ns:
            return GateDecision.STALE
        if self.period_ns <= 0:
            clock.last_stamp_ns = stamp_ns
            return GateDecision.ACCEPT
        # 0.1 % of a period of tolerance for stamps quantised by the camera driver.
        slot = (stamp_ns - clock.origin_ns + self.period_ns // 1000) // self.period_ns
        if slot <= clock.last_slot:
            return GateDecision.SKIP
        clock.last_slot = slot
        clock.last_stamp_ns = stamp_ns
        return GateDecision.ACCEPT

    def last_stamp_ns(self, camera: str) -> Optional[int]:
        """Newest accepted stamp of ``camera`` (ns), None before its first frame."""
        clock = self._clocks.get(camera)
        return None if clock is None else clock.last_stamp_ns

    def seed(self, camera: str, last_stamp_ns: int) -> None:
        """Start ``camera``'s clock at ``last_stamp_ns`` as if that frame had been accepted (a restored memory):
        later frames are sampled from it, older ones are stale or jumps."""
        self._clocks[camera] = _CameraClock(last_stamp_ns, 0, last_stamp_ns)

    def reset(self) -> None:
        """Forget every camera's clock (the stream restarted for another reason: /clock jumped back)."""
        self._clocks.clear()
