"""Publish camera images from a rosbag2 or a video file onto ROS 2 topics.

Sources:

* a rosbag2 directory (sqlite3 or mcap, read with ``rosbags.rosbag2.Reader``):
  every ``sensor_msgs/msg/Image`` and ``sensor_msgs/msg/CompressedImage``
  connection (or those chosen with ``--topics``), optionally renamed with
  ``--remap old:=new``. The recorded CDR bytes are deserialized by rclpy, so
  what is published is exactly what was recorded (stamps included).
* a video file (OpenCV): frames as ``rgb8`` (default) or ``bgr8`` Images,
  stamped ``start + index / fps``.

Timing follows the recorded times (bag: log time; video: index / fps) scaled by
``--rate`` (1 = real time, 4 = four times faster, 0 = as fast as possible).
Header stamps are kept unless ``--restamp`` shifts them so that the first
message is stamped "now" (the node's ROS clock), keeping their spacing.
``--clock`` also publishes ``rosgraph_msgs/Clock`` on ``/clock`` following the
header stamps (for nodes with ``use_sim_time``).

Works with the rclpy of Humble through kilted (Python >= 3.10).
"""
from __future__ import annotations

import argparse
import array
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import rclpy
from builtin_interfaces.msg import Time as TimeMsg
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy, DurabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image

from ..ros.stamps import ns_to_time, time_to_ns

__all__ = [
    "IMAGE_MSGTYPES",
    "ReplayError",
    "ReplayItem",
    "ReplayResult",
    "BagSource",
    "VideoSource",
    "Replayer",
    "rgb_to_image_msg",
    "main",
]

#: rosbag2 message type names this tool can publish, with their rclpy classes.
IMAGE_MSGTYPES = {
    "sensor_msgs/msg/Image": Image,
    "sensor_msgs/msg/CompressedImage": CompressedImage,
}
DEFAULT_VIDEO_TOPIC = "/camera/image_raw"
_NS = 1_000_000_000


class ReplayError(RuntimeError):
    """Bad source or options, or a replay precondition that failed (e.g. no subscribers)."""


# --------------------------------------------------------------------------
# message helpers
# --------------------------------------------------------------------------
def _pixels_to_image_msg(pixels: np.ndarray, stamp_ns: int, frame_id: str, encoding: str) -> Image:
    """[H, W, 3] uint8 already in `encoding` channel order -> Image (no colour conversion)."""
    pixels = np.ascontiguousarray(pixels)
    msg = Image()
    msg.header.stamp = ns_to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.shape[1] * 3)
    # array('B') + frombytes: one memcpy, and the generated setter takes an
    # array('B') as is. Assigning bytes (frame.tobytes()) is as fast on kilted,
    # but Humble's setter (and kilted's with ROS_PYTHON_CHECK_FIELDS=1) checks
    # every element of a non-array sequence: ~85 ms for a 768x576 frame.
    data = array.array("B")
    data.frombytes(pixels.reshape(-1))
    msg.data = data
    return msg


def rgb_to_image_msg(frame: np.ndarray, stamp: Union[int, TimeMsg, Any], frame_id: str,
                     encoding: str = "rgb8") -> Image:
    """Build a sensor_msgs/msg/Image from an RGB frame.

    Args:
        frame: ``np.ndarray`` [H, W, 3] uint8, RGB order.
        stamp: ``header.stamp``: int nanoseconds since the epoch, or a
            ``builtin_interfaces/Time`` message (anything with ``sec``/``nanosec``).
        frame_id: ``header.frame_id``.
        encoding: ``"rgb8"`` (pixels as given) or ``"bgr8"`` (channels swapped).

    Returns:
        a new rclpy ``sensor_msgs.msg.Image`` (step = 3 * W, little endian flag 0).

    Raises:
        ValueError: frame not [H, W, 3] uint8, or encoding not rgb8/bgr8.
    """
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be [H, W, 3] uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")
    if encoding == "bgr8":
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    elif encoding != "rgb8":
        raise ValueError(f"encoding must be 'rgb8' or 'bgr8', got {encoding!r}")
    stamp_ns = int(stamp) if isinstance(stamp, (int, np.integer)) else time_to_ns(stamp)
    return _pixels_to_image_msg(frame, stamp_ns, frame_id, encoding)


# --------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------
@dataclass
class ReplayItem:
    """One message to publish.

    Attributes:
        topic: output topic (after remapping).
        time_ns: pacing time in ns (bag log time, or index/fps for video); only
            differences between items matter.
        msg: rclpy Image or CompressedImage, header included.
    """

    topic: str
    time_ns: int
    msg: Any


class BagSource:
    """Image/CompressedImage messages of a rosbag2 directory, in log-time order.

    Args:
        path: bag directory (the folder with metadata.yaml); a ``.mcap``/``.db3``
            file inside it is accepted too.
        topics: topics to play (recorded names); None = every image topic.
        remap: {recorded topic: output topic}.

    Raises:
        ReplayError: not a readable bag, no image topics, unknown or non-image
            topic requested, or a remap names a topic that is not played.
    """

    def __init__(self, path: Union[str, Path], topics: Optional[Sequence[str]] = None,
                 remap: Optional[Dict[str, str]] = None) -> None:
        from rosbags.rosbag2 import Reader

        path = Path(path)
        if path.is_file() and path.suffix in (".mcap", ".db3"):
            path = path.parent
        if not path.is_dir():
            raise ReplayError(f"bag {path} is not a directory")
        self.path = path
        try:
            with Reader(path) as reader:
                connections = list(reader.connections)
        except Exception as exc:  # rosbags raises its own error types for bad bags
            raise ReplayError(f"cannot read bag {path}: {exc}") from None
        images = [c for c in connections if c.msgtype in IMAGE_MSGTYPES]
        available = sorted({c.topic for c in images})
        if not images:
            types = sorted({f"{c.topic} ({c.msgtype})" for c in connections})
            raise ReplayError(f"bag {path} has no Image/CompressedImage topics (has: {', '.join(types) or 'none'})")
        if topics:
            wanted = [t if t.startswith("/") else "/" + t for t in topics]
            missing = [t for t in wanted if t not in available]
            if missing:
                raise ReplayError(f"topic(s) {', '.join(missing)} not image topics of {path}; "
                                  f"available: {', '.join(available)}")
            images = [c for c in images if c.topic in wanted]
        remap = dict(remap or {})
        unknown = [k for k in remap if k not in {c.topic for c in images}]
        if unknown:
            raise ReplayError(f"--remap source topic(s) {', '.join(unknown)} are not played; "
                              f"played: {', '.join(sorted({c.topic for c in images}))}")
        self._connection_ids = {c.id for c in images}
        self._out = {c.id: (remap.get(c.topic, c.topic), IMAGE_MSGTYPES[c.msgtype]) for c in images}
        self.topics: Dict[str, type] = {}
        for out, cls in self._out.values():
            if self.topics.get(out, cls) is not cls:
                raise ReplayError(f"topic {out} would carry both Image and CompressedImage")
            self.topics[out] = cls

    def __iter__(self) -> Iterator[ReplayItem]:
        from rosbags.rosbag2 import Reader

        with Reader(self.path) as reader:
            conns = [c for c in reader.connections if c.id in self._connection_ids]
            for conn, log_ns, raw in reader.messages(connections=conns):
                out, cls = self._out[conn.id]
                yield ReplayItem(out, int(log_ns), deserialize_message(bytes(raw), cls))

    def __repr__(self) -> str:
        return f"BagSource({str(self.path)!r}, topics={sorted(self.topics)})"


class VideoSource:
    """Frames of a video file as Image messages.

    Args:
        path: video file (anything OpenCV opens).
        topic: output topic.
        encoding: ``"rgb8"`` or ``"bgr8"``.
        frame_id: ``header.frame_id``.
        fps: override the container's frame rate.
        start_stamp: stamp of frame 0 in seconds since the epoch; None = the
            wall-clock time when each pass over the video starts.

    Raises:
        ReplayError: file missing or unreadable, no frame rate, bad encoding.
    """

    def __init__(self, path: Union[str, Path], *, topic: str = DEFAULT_VIDEO_TOPIC, encoding: str = "rgb8",
                 frame_id: str = "camera", fps: Optional[float] = None,
                 start_stamp: Optional[float] = None) -> None:
        self.path = Path(path)
        if encoding not in ("rgb8", "bgr8"):
            raise ReplayError(f"video encoding must be rgb8 or bgr8, got {encoding!r}")
        if not self.path.is_file():
            raise ReplayError(f"video file {self.path} does not exist")
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise ReplayError(f"OpenCV cannot open video {self.path}")
            native_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        finally:
            cap.release()
        self.fps = float(fps) if fps is not None else native_fps
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ReplayError(f"video {self.path} reports no frame rate; pass --fps")
        self.topic = topic if topic.startswith("/") else "/" + topic
        self.encoding = encoding
        self.frame_id = frame_id
        self.start_stamp = start_stamp
        self.topics: Dict[str, type] = {self.topic: Image}

    def __iter__(self) -> Iterator[ReplayItem]:
        start_ns = int(round((time.time() if self.start_stamp is None else self.start_stamp) * _NS))
        cap = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            while True:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    return
                if bgr.ndim == 2:
                    bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
                pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if self.encoding == "rgb8" else bgr
                offset = int(round(index * _NS / self.fps))
                yield ReplayItem(self.topic, offset,
                                 _pixels_to_image_msg(pixels, start_ns + offset, self.frame_id, self.encoding))
                index += 1
        finally:
            cap.release()

    def __repr__(self) -> str:
        return f"VideoSource({str(self.path)!r}, topic={self.topic!r}, fps={self.fps})"


# --------------------------------------------------------------------------
# replayer
# --------------------------------------------------------------------------
@dataclass
class ReplayResult:
    """Counts returned by :meth:`Replayer.run`.

    Attributes:
        published: image messages published (all topics, all loops).
        per_topic: image messages per output topic.
        clock_published: /clock messages published.
        loops: completed passes over the source.
        wall_time_s: seconds from the first to the last publish.
        first_stamp_ns / last_stamp_ns: header stamps as published (after
            --restamp); 0 when nothing was published.
        stopped: True when :meth:`Replayer.stop` ended the run early.
    """

    published: int = 0
    per_topic: Dict[str, int] = field(default_factory=dict)
    clock_published: int = 0
    loops: int = 0
    wall_time_s: float = 0.0
    first_stamp_ns: int = 0
    last_stamp_ns: int = 0
    stopped: bool = False


def _image_qos(reliable: bool) -> QoSProfile:
    if reliable:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    return qos_profile_sensor_data


class Replayer:
    """Publishes the messages of a source with their recorded timing.

    Args:
        source: :class:`BagSource`, :class:`VideoSource`, or any iterable of
            :class:`ReplayItem` with a ``topics`` dict {topic: message class}.
        node: node to create the publishers on; None creates a node named
            ``node_name`` (rclpy must be initialised) that :meth:`destroy` removes.
        context: rclpy context for the node created here (None: default).
        rate: 1.0 real time, 4.0 four times faster, 0 as fast as possible.
        restamp: shift header stamps so the first message is stamped with the
            node clock's "now", keeping their spacing (also across --loop).
        clock: publish rosgraph_msgs/Clock on /clock (reliable, depth 10) with
            each message's stamp (never backwards), and between messages every
            1/clock_rate_hz s, interpolated. With loop and without restamp the
            stamps repeat, so /clock holds during later passes: use restamp.
        loop: play the source again and again until :meth:`stop`/max_messages.
        start_delay: seconds to sleep after the subscriber wait, before the first message.
        wait_for_subscribers: before publishing, wait until every image
            publisher has at least this many matched subscriptions.
        wait_timeout: seconds for that wait; then ReplayError.
        max_messages: stop after this many image messages (None: no limit).
        reliable: reliable, keep-last-10 publishers instead of the sensor-data
            profile (best effort, keep last 5). A best-effort publisher does
            not reach a reliable subscription.

    Publishing happens in the thread calling :meth:`run`; the node need not be
    spun for it, and may be spun by an executor elsewhere.
    """

    def __init__(self, source: Any, *, node: Optional[Node] = None, context: Any = None,
                 node_name: str = "infinipot_replay", rate: float = 1.0, restamp: bool = False,
                 clock: bool = False, clock_rate_hz: float = 50.0, loop: bool = False,
                 start_delay: float = 0.0, wait_for_subscribers: int = 0, wait_timeout: float = 30.0,
                 max_messages: Optional[int] = None, reliable: bool = False) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise ReplayError(f"rate must be >= 0 (0 = as fast as possible), got {rate}")
        if start_delay < 0 or wait_timeout < 0 or wait_for_subscribers < 0:
            raise ReplayError("start_delay, wait_timeout and wait_for_subscribers must be >= 0")
        if max_messages is not None and max_messages < 1:
            raise ReplayError(f"max_messages must be >= 1, got {max_messages}")
        if clock_rate_hz < 0:
            raise ReplayError(f"clock_rate_hz must be >= 0, got {clock_rate_hz}")
        self.source = source
        self.rate = float(rate)
        self.restamp = restamp
        self.loop = loop
        self.start_delay = float(start_delay)
        self.wait_for_subscribers = int(wait_for_subscribers)
        self.wait_timeout = float(wait_timeout)
        self.max_messages = max_messages
        self.clock_rate_hz = float(clock_rate_hz)
        self._own_node = node is None
        self.node = node if node is not None else rclpy.create_node(node_name, context=context)
        self.reliable = reliable
        qos = _image_qos(reliable)
        self._publishers = {topic: self.node.create_publisher(cls, topic, qos)
                            for topic, cls in dict(source.topics).items()}
        self._clock_pub = None
        if clock:
            self._clock_pub = self.node.create_publisher(
                Clock, "/clock", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self._stop = threading.Event()
        self._last_clock_ns = -1
        self._clock_count = 0

    # -- public API ---------------------------------------------------------
    @property
    def topics(self) -> List[str]:
        """Output topics, sorted."""
        return sorted(self._publishers)

    def subscription_counts(self) -> Dict[str, int]:
        """Matched subscriptions per output topic."""
        return {t: p.get_subscription_count() for t, p in self._publishers.items()}

    def stop(self) -> None:
        """Ask :meth:`run` (in another thread) to return after the current message."""
        self._stop.set()

    def destroy(self) -> None:
        """Destroy the publishers (and the node when this object created it)."""
        for pub in self._publishers.values():
            self.node.destroy_publisher(pub)
        self._publishers.clear()
        if self._clock_pub is not None:
            self.node.destroy_publisher(self._clock_pub)
            self._clock_pub = None
        if self._own_node:
            self._own_node = False  # destroy() may be called twice
            self.node.destroy_node()

    def __enter__(self) -> "Replayer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

    def run(self) -> ReplayResult:
        """Publish the source; returns when done, stopped or max_messages reached.

        Raises:
            ReplayError: the subscriber wait timed out.
        """
        result = ReplayResult(per_topic={t: 0 for t in self._publishers})
        self._clock_count = 0
        self._wait_for_subscribers()
        if self.start_delay and self._stop.wait(self.start_delay):
            result.stopped = True
            return result
        first_wall: Optional[float] = None
        last_wall = time.monotonic()
        last_stamp: Optional[int] = None
        period_ns = 0
        while not self._stop.is_set():
            loop_t0_wall: Optional[float] = None
            loop_t0_rec = 0
            prev_rec: Optional[int] = None
            offset_ns = 0
            sent_in_loop = 0
            for item in self.source:
                if self._stop.is_set() or self._limit_reached(result):
                    break
                stamp = time_to_ns(item.msg.header.stamp)
                if loop_t0_wall is None:
                    if result.loops and period_ns and self.rate > 0:  # one nominal period between loops
                        self._sleep_until(last_wall + period_ns / _NS / self.rate, last_wall, None)
                    loop_t0_wall, loop_t0_rec = time.monotonic(), item.time_ns
                    if self.restamp:
                        offset_ns = self.node.get_clock().now().nanoseconds - stamp
                        if last_stamp is not None and stamp + offset_ns <= last_stamp:
                            offset_ns = last_stamp + max(period_ns, 1) - stamp
                elif self.rate > 0:
                    target = loop_t0_wall + (item.time_ns - loop_t0_rec) / _NS / self.rate
                    self._sleep_until(target, last_wall, stamp + offset_ns)
                    if self._stop.is_set():
                        break
                if prev_rec is not None and item.time_ns > prev_rec:
                    period_ns = item.time_ns - prev_rec
                prev_rec = item.time_ns
                if offset_ns:
                    stamp += offset_ns
                    item.msg.header.stamp = ns_to_time(stamp)
                self._publish_clock(stamp)
                self._publishers[item.topic].publish(item.msg)
                last_wall = time.monotonic()
                if first_wall is None:
                    first_wall = last_wall
                    result.first_stamp_ns = stamp
                result.last_stamp_ns = stamp
                last_stamp = stamp if last_stamp is None else max(last_stamp, stamp)
                result.published += 1
                result.per_topic[item.topic] = result.per_topic.get(item.topic, 0) + 1
                sent_in_loop += 1
            else:
                result.loops += 1
            if not self.loop or sent_in_loop == 0 or self._limit_reached(result):
                break
        result.stopped = self._stop.is_set()
        result.clock_published = self._clock_count
        if self.reliable and result.published:
            self._wait_for_acks(2.0)
        if first_wall is not None:
            result.wall_time_s = last_wall - first_wall
        return result

    # -- internals ----------------------------------------------------------
    def _limit_reached(self, result: ReplayResult) -> bool:
        return self.max_messages is not None and result.published >= self.max_messages

    def _wait_for_subscribers(self) -> None:
        n = self.wait_for_subscribers
        if n <= 0 or not self._publishers:
            return
        deadline = time.monotonic() + self.wait_timeout
        while True:
            counts = self.subscription_counts()
            if all(c >= n for c in counts.values()) or self._stop.is_set():
                return
            if time.monotonic() >= deadline:
                have = ", ".join(f"{t}: {c}" for t, c in sorted(counts.items()))
                raise ReplayError(f"timed out after {self.wait_timeout:g} s waiting for {n} subscriber(s) "
                                  f"per topic ({have}); check topic names, ROS_DOMAIN_ID and QoS "
                                  f"(a best-effort publisher does not match a reliable subscription)")
            self._stop.wait(0.02)

    def _wait_for_acks(self, timeout_s: float) -> None:
        """Reliable: let the last messages be acknowledged before the caller destroys the publishers."""
        from rclpy.duration import Duration

        for pub in self._publishers.values():
            wait = getattr(pub, "wait_for_all_acked", None)  # rclpy >= Galactic
            if wait is not None:
                wait(Duration(nanoseconds=int(timeout_s * _NS)))

    def _publish_clock(self, stamp_ns: int) -> None:
        """Publish /clock = stamp_ns unless that would not move the clock forward."""
        if self._clock_pub is None or stamp_ns <= self._last_clock_ns:
            return
        self._last_clock_ns = stamp_ns
        self._clock_pub.publish(Clock(clock=ns_to_time(stamp_ns)))
        self._clock_count += 1

    def _sleep_until(self, target: float, since_wall: float, next_stamp: Optional[int]) -> None:
        """Sleep until monotonic() >= target, ticking /clock in between when enabled."""
        tick = 1.0 / self.clock_rate_hz if (self._clock_pub is not None and self.clock_rate_hz > 0) else None
        base = self._last_clock_ns
        while True:
            remaining = target - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return
            if tick is None or base < 0 or next_stamp is None:
                self._stop.wait(remaining)
                continue
            self._stop.wait(min(remaining, tick))
            sim = base + int((time.monotonic() - since_wall) * self.rate * _NS)
            self._publish_clock(min(sim, next_stamp - 1))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def _parse_remap(values: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for value in values:
        old, sep, new = value.partition(":=")
        if not sep or not old or not new:
            raise ReplayError(f"--remap expects OLD:=NEW, got {value!r}")
        norm = lambda t: t if t.startswith("/") else "/" + t  # noqa: E731
        out[norm(old)] = norm(new)
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinipot-replay",
        description="Publish camera images from a rosbag2 directory (sqlite3/mcap) or a video file "
                    "onto ROS 2 topics, paced by the recorded times. ROS arguments go after --ros-args.",
        epilog="QoS: the default sensor-data profile is best effort; a best-effort publisher does NOT "
               "reach a reliable subscription (ros2 topic echo and many nodes default to reliable): use "
               "--reliable for those. A reliable publisher reaches both.",
    )
    p.add_argument("source", help="rosbag2 directory, or a video file")
    g = p.add_argument_group("bag source")
    g.add_argument("--topics", nargs="+", metavar="TOPIC", help="image topics to play (default: all)")
    g.add_argument("--remap", action="append", default=[], metavar="OLD:=NEW",
                   help="publish recorded topic OLD as NEW (repeatable)")
    g = p.add_argument_group("video source")
    g.add_argument("--topic", default=DEFAULT_VIDEO_TOPIC, help=f"output topic (default {DEFAULT_VIDEO_TOPIC})")
    g.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8", help="Image encoding (default rgb8)")
    g.add_argument("--frame-id", default="camera", help="header.frame_id (default camera)")
    g.add_argument("--fps", type=float, default=None, help="override the video frame rate")
    g.add_argument("--video-start-stamp", type=float, default=None, metavar="SECONDS",
                   help="stamp of frame 0 (default: wall-clock time when playback starts)")
    g = p.add_argument_group("playback")
    g.add_argument("--rate", type=float, default=1.0,
                   help="speed factor: 1 real time, 4 four times faster, 0 as fast as possible (default 1)")
    g.add_argument("--restamp", action="store_true",
                   help="shift header stamps so the first message is stamped now (ROS clock), keeping spacing")
    g.add_argument("--clock", action="store_true",
                   help="also publish rosgraph_msgs/Clock on /clock (never backwards; with --loop add --restamp)")
    g.add_argument("--clock-rate", type=float, default=50.0, metavar="HZ",
                   help="/clock ticks per second between messages (default 50; 0 = only at messages)")
    g.add_argument("--loop", action="store_true", help="play the source again and again")
    g.add_argument("--start-delay", type=float, default=0.0, metavar="S",
                   help="sleep S seconds before the first message (after --wait-for-subscribers)")
    g.add_argument("--wait-for-subscribers", type=int, default=0, metavar="N",
                   help="wait until every image topic has N matched subscribers")
    g.add_argument("--wait-timeout", type=float, default=30.0, metavar="S",
                   help="give up waiting for subscribers after S seconds (default 30; exit code 1)")
    g.add_argument("--max-messages", type=int, default=None, metavar="N", help="stop after N image messages")
    g.add_argument("--reliable", action="store_true",
                   help="reliable QoS, keep last 10 (default: sensor data = best effort, keep last 5)")
    g.add_argument("--node-name", default="infinipot_replay", help="node name (default infinipot_replay)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.rate) and args.rate >= 0):
        raise ReplayError(f"--rate must be >= 0, got {args.rate}")
    for name in ("start_delay", "wait_timeout", "clock_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise ReplayError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.wait_for_subscribers < 0:
        raise ReplayError(f"--wait-for-subscribers must be >= 0, got {args.wait_for_subscribers}")
    if args.max_messages is not None and args.max_messages < 1:
        raise ReplayError(f"--max-messages must be >= 1, got {args.max_messages}")


def _make_source(args: argparse.Namespace) -> Any:
    path = Path(args.source)
    if not path.exists():
        raise ReplayError(f"source {path} does not exist")
    if path.is_dir() or path.suffix in (".mcap", ".db3"):
        return BagSource(path, topics=args.topics, remap=_parse_remap(args.remap))
    if args.topics or args.remap:
        raise ReplayError("--topics/--remap apply to bag sources; for a video use --topic")
    return VideoSource(path, topic=args.topic, encoding=args.encoding, frame_id=args.frame_id,
                       fps=args.fps, start_stamp=args.video_start_stamp)


def _split_ros_args(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split argv into (our arguments, the ``--ros-args ... [--]`` sections).

    rclpy's remove_ros_args cannot be used: rcl still treats a bare
    ``old:=new`` outside ``--ros-args`` as a (deprecated) remap rule and would
    swallow the value of our own ``--remap old:=new``. Only the explicit
    sections go to rclpy.init.
    """
    ours: List[str] = []
    ros: List[str] = []
    inside = False
    for token in argv:
        if token == "--ros-args":
            inside = True
            ros.append(token)
        elif inside and token == "--":
            inside = False
            ros.append(token)
        elif inside:
            ros.append(token)
        else:
            ours.append(token)
    return ours, ros


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point.

    Returns 0 on success, 2 on bad arguments or an unusable source, 1 when the
    replay itself fails (e.g. the subscriber wait timed out), 130 on Ctrl-C.
    ROS arguments (``--ros-args -r __node:=name -p ...``) are passed to rclpy.
    """
    raw = list(sys.argv[1:] if argv is None else argv)
    prog = "infinipot-replay"
    ours, ros_args = _split_ros_args(raw)
    parser = _build_parser()
    try:
        args = parser.parse_args(ours)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        _check_args(args)
        source = _make_source(args)
    except ReplayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    try:
        rclpy.init(args=[prog] + ros_args)
    except Exception as exc:  # malformed --ros-args section
        print(f"{prog}: error: bad ROS arguments {' '.join(ros_args)!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    replayer: Optional[Replayer] = None
    try:
        replayer = Replayer(
            source, node_name=args.node_name, rate=args.rate, restamp=args.restamp, clock=args.clock,
            clock_rate_hz=args.clock_rate, loop=args.loop, start_delay=args.start_delay,
            wait_for_subscribers=args.wait_for_subscribers, wait_timeout=args.wait_timeout,
            max_messages=args.max_messages, reliable=args.reliable)
        print(f"{prog}: {source!r} -> {', '.join(replayer.topics)} (rate {args.rate:g}, "
              f"{'reliable' if args.reliable else 'sensor-data QoS'})", file=sys.stderr)
        result = replayer.run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ReplayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if replayer is not None:
            try:
                replayer.destroy()
            except Exception:  # context may already be shut down by Ctrl-C
                pass
        if rclpy.ok():
            rclpy.shutdown()
    print(f"{prog}: published {result.published} messages "
          f"({', '.join(f'{t}: {n}' for t, n in sorted(result.per_topic.items()))}), "
          f"{result.loops} loop(s), {result.clock_published} /clock, {result.wall_time_s:.2f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
