"""ROS time <-> integer nanoseconds (header stamps), shared by the node and the tools."""
from __future__ import annotations

from typing import Any

from builtin_interfaces.msg import Time

NS_PER_S = 1_000_000_000


def time_to_ns(t: Any) -> int:
    """builtin_interfaces/Time (anything with sec, nanosec) -> int nanoseconds."""
    return int(t.sec) * NS_PER_S + int(t.nanosec)


def ns_to_time(ns: int) -> Time:
    """int nanoseconds -> builtin_interfaces/Time (negative values clamp to 0)."""
    ns = max(0, int(ns))
    return Time(sec=ns // NS_PER_S, nanosec=ns % NS_PER_S)
