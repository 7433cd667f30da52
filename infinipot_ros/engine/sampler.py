"""Frame sampling by header stamp, so a bag played fast or slow gives the same stream."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _CameraClock:
    origin_ns: int
    last_slot: int
    last_stamp_ns: int


class FrameSampler:
    """Accepts at most one frame per 1/rate_hz slot of header-stamp time, per camera.

    Slots are counted from each camera's first accepted stamp: a frame is
    taken when its stamp falls in a later slot than the last taken frame.
    Arrival time plays no role, so replay speed does not change the stream.
    Frames stamped at or before the camera's last taken frame are refused
    (out of order or duplicated).

    Args:
        rate_hz: frames per second to keep; <= 0 keeps every frame in stamp order.
    """

    def __init__(self, rate_hz: float) -> None:
        self.rate_hz = float(rate_hz)
        self.period_ns = int(round(1e9 / rate_hz)) if rate_hz > 0 else 0
        self._clocks: dict[str, _CameraClock] = {}

    def accept(self, camera: str, stamp_ns: int) -> bool:
        """True if the frame of ``camera`` stamped ``stamp_ns`` (ns) should be ingested."""
        clock = self._clocks.get(camera)
        if clock is None:
            self._clocks[camera] = _CameraClock(stamp_ns, 0, stamp_ns)
            return True
        if stamp_ns <= clock.last_stamp_ns:
            return False
        if self.period_ns <= 0:
            clock.last_stamp_ns = stamp_ns
            return True
        # 0.1 % of a period of tolerance for stamps quantised by the camera driver.
        slot = (stamp_ns - clock.origin_ns + self.period_ns // 1000) // self.period_ns
        if slot <= clock.last_slot:
            return False
        clock.last_slot = slot
        clock.last_stamp_ns = stamp_ns
        return True

    def last_stamp_ns(self, camera: str) -> int | None:
        clock = self._clocks.get(camera)
        return None if clock is None else clock.last_stamp_ns

    def reset(self, camera: str | None = None) -> None:
        """Forget one camera's clock (or all), e.g. after the ROS time jumped back."""
        if camera is None:
            self._clocks.clear()
        else:
            self._clocks.pop(camera, None)
