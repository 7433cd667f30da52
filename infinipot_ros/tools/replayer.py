"""Publishing a replay source onto ROS 2 topics: the Replayer, the video source, image messages.

:class:`Replayer` creates one publisher per output topic of a source (any
iterable of :class:`ReplayItem` with a ``topics`` dict) and publishes the
items in order; *when* each goes out and what /clock says is the
:class:`~.pacer.Pacer`'s. :class:`VideoSource` turns the frames of the tools'
one video reader (:class:`~.video.VideoReader`) into Image messages. The bag
source and the ``infinipot-replay`` CLI are in :mod:`.replay`.

Works with the rclpy of Humble through kilted (Python >= 3.10).
"""
from __future__ import annotations

import array
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import cv2
import numpy as np
import rclpy
from builtin_interfaces.msg import Time as TimeMsg
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy, DurabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image

from ..ros.stamps import ns_to_time, time_to_ns
from .pacer import Pacer
from .video import ReadStats, VideoError, VideoReader, probe_video

__all__ = ["DEFAULT_VIDEO_TOPIC", "ReplayError", "ReplayItem", "ReplayResult", "Replayer", "VideoSource",
           "rgb_to_image_msg"]

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



class VideoSource:
    """Frames of a video file as Image messages (read with :class:`~.video.VideoReader`).

    Args:
        path: video file (anything OpenCV opens).
        topic: output topic.
        encoding: ``"rgb8"`` or ``"bgr8"``.
        frame_id: ``header.frame_id``.
        fps: frame rate of the stamps; None = the header's when sane, else 30
            (:func:`~.video.resolve_fps`, the rule of every tool).
        start_stamp: stamp of frame 0 in seconds since the epoch; None = the
            wall-clock time when each pass over the video starts.

    Undecodable frames are skipped (their time slot kept) and counted in
    ``stats`` (:class:`~.video.ReadStats`, all passes together).

    Raises:
        ReplayError: file missing or unreadable, bad fps, bad encoding.
    """

    def __init__(self, path: Union[str, Path], *, topic: str = DEFAULT_VIDEO_TOPIC, encoding: str = "rgb8",
                 frame_id: str = "camera", fps: Optional[float] = None,
                 start_stamp: Optional[float] = None) -> None:
        self.path = Path(path)
        if encoding not in ("rgb8", "bgr8"):
            raise ReplayError(f"video encoding must be rgb8 or bgr8, got {encoding!r}")
        try:
            self.info = probe_video(str(self.path), fps)
        except (OSError, ValueError) as exc:
            raise ReplayError(str(exc)) from None
        self.fps = self.info.fps
        self.topic = topic if topic.startswith("/") else "/" + topic
        self.encoding = encoding
        self.frame_id = frame_id
        self.start_stamp = start_stamp
        self.topics: Dict[str, type] = {self.topic: Image}
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[ReplayItem]:
        start_ns = int(round((time.time() if self.start_stamp is None else self.start_stamp) * _NS))
        reader = VideoReader(str(self.path), fps=self.fps, color=self.encoding[:3])
        reader.stats = self.stats  # one count over every pass
        try:
            for index, offset, pixels in reader:
                yield ReplayItem(self.topic, offset,
                                 _pixels_to_image_msg(pixels, start_ns + offset, self.frame_id, self.encoding))
        except VideoError as exc:
            raise ReplayError(str(exc)) from None

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
        skipped: undecodable video frames or bag messages skipped (all passes).
    """

    published: int = 0
    per_topic: Dict[str, int] = field(default_factory=dict)
    clock_published: int = 0
    loops: int = 0
    wall_time_s: float = 0.0
    first_stamp_ns: int = 0
    last_stamp_ns: int = 0
    stopped: bool = False
    skipped: int = 0


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
        self._pacer: Optional[Pacer] = None

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

        Timing and /clock are the :class:`~.pacer.Pacer`'s (a new one per run).

        Raises:
            ReplayError: the subscriber wait timed out, or the source failed
                while reading (damaged bag, video with no decodable frame).
        """
        result = ReplayResult(per_topic={t: 0 for t in self._publishers})
        clock = None
        if self._clock_pub is not None:
            clock = lambda ns: self._clock_pub.publish(Clock(clock=ns_to_time(ns)))  # noqa: E731
        pacer = self._pacer = Pacer(self.rate, clock=clock, clock_rate_hz=self.clock_rate_hz, stop=self._stop)
        self._wait_for_subscribers()
        if self.start_delay and self._stop.wait(self.start_delay):
            result.stopped = True
            return result
        last_stamp: Optional[int] = None
        while not self._stop.is_set():
            pacer.new_pass()
            offset_ns = 0
            sent_in_loop = 0
            for item in self.source:
                if self._stop.is_set() or self._limit_reached(result):
                    break
                stamp = time_to_ns(item.msg.header.stamp)
                first = not pacer.in_pass
                if not pacer.wait(item.time_ns, stamp + offset_ns):
                    break
                if first and self.restamp:
                    offset_ns = self.node.get_clock().now().nanoseconds - stamp
                    if last_stamp is not None and stamp + offset_ns <= last_stamp:
                        offset_ns = last_stamp + max(pacer.period_ns, 1) - stamp
                if offset_ns:
                    stamp += offset_ns
                    item.msg.header.stamp = ns_to_time(stamp)
                pacer.send(stamp, lambda: self._publishers[item.topic].publish(item.msg))
                if result.published == 0:
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
        result.clock_published = pacer.clock_published
        result.skipped = self._source_skipped()
        if self.reliable and result.published:
            self._wait_for_acks(2.0)
        result.wall_time_s = pacer.wall_time_s
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

    def _source_skipped(self) -> int:
        """Frames or messages the source skipped as undecodable (so far, all passes)."""
        stats = getattr(self.source, "stats", None)
        return int(stats.skipped) if stats is not None else int(getattr(self.source, "skipped", 0))
