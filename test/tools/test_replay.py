"""Replay bags/videos onto ROS 2 topics (infinipot_ros.tools.replay) with real rclpy.

Publisher and subscriber live in this process on their own rclpy Context (the
conftest gives the run its own ROS_DOMAIN_ID and localhost-only discovery);
the subscriber node is spun by a SingleThreadedExecutor in a thread.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from infinipot_ros.ros.conversions import image_to_rgb
from infinipot_ros.tools.bag_writer import write_video_to_bag

# No module-level pytest.skip/importorskip: launch_testing's pytest plugin
# imports every test module while collecting a directory, and a module-level
# skip there would skip test_bag_writer.py too. Skip by marker instead.
try:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    from infinipot_ros.tools.replay import (
        BagSource,
        Replayer,
        ReplayError,
        VideoSource,
        main,
        rgb_to_image_msg,
    )
except ImportError as exc:  # no ROS 2 Python stack in this environment
    _RCLPY_MISSING = f"rclpy / ROS 2 messages not importable: {exc}"
    qos_profile_sensor_data = None
    Image = None
else:
    _RCLPY_MISSING = ""

pytestmark = pytest.mark.skipif(bool(_RCLPY_MISSING), reason=_RCLPY_MISSING or "n/a")

N = 12
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 100_000_000
RELIABLE = None if _RCLPY_MISSING else QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


@pytest.fixture(scope="module")
def ctx():
    context = Context()
    rclpy.init(context=context)
    yield context
    rclpy.shutdown(context=context)


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory, vtest_path) -> Path:
    """N frames of vtest.avi at 160x120, rgb8, 10 fps stamps from 1.7e9 s."""
    bag = tmp_path_factory.mktemp("replay") / "small"
    write_video_to_bag(vtest_path, bag, storage="mcap", max_frames=N, width=160, progress=False)
    return bag


@pytest.fixture(scope="module")
def small_frames(vtest_path) -> list:
    cap = cv2.VideoCapture(vtest_path)
    out = []
    for _ in range(N):
        ok, f = cap.read()
        assert ok
        out.append(cv2.cvtColor(cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    return out


class Listener:
    """A subscriber node spun in a background thread; records (recv_monotonic, msg)."""

    _count = 0

    def __init__(self, context, topic: str, msg_type=Image, qos=qos_profile_sensor_data) -> None:
        Listener._count += 1
        self.node = rclpy.create_node(f"listener_{Listener._count}", context=context)
        self.received: list = []
        self._lock = threading.Lock()
        self.node.create_subscription(msg_type, topic, self._cb, qos)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._running = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _cb(self, msg) -> None:
        with self._lock:
            self.received.append((time.monotonic(), msg))

    def _spin(self) -> None:
        while self._running:
            self.executor.spin_once(timeout_sec=0.05)

    def wait_for(self, n: int, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.received) < n:
            time.sleep(0.01)
        time.sleep(0.1)  # catch extras
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self.executor.remove_node(self.node)
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.fixture
def pub_node(ctx):
    node = rclpy.create_node("replay_under_test", context=ctx)
    yield node
    node.destroy_node()


def unique_topic(name: str) -> str:
    unique_topic.n = getattr(unique_topic, "n", 0) + 1
    return f"/t{unique_topic.n}/{name}"


def test_bag_all_messages_in_order_real_rate(ctx, pub_node, small_bag, small_frames):
    topic = unique_topic("image_raw")
    listener = Listener(ctx, topic)  # sensor-data QoS like the assistant node
    try:
        source = BagSource(small_bag, remap={"/camera/image_raw": topic})
        assert source.topics == {topic: Image}
        rep = Replayer(source, node=pub_node, rate=1.0, wait_for_subscribers=1, wait_timeout=10,
                       start_delay=0.3)
        t0 = time.monotonic()
        result = rep.run()
        elapsed = time.monotonic() - t0
        rep.destroy()
        got = listener.wait_for(N)
    finally:
        listener.close()
    assert result.published == N and result.per_topic == {topic: N} and result.loops == 1
    assert result.first_stamp_ns == START_NS and result.last_stamp_ns == START_NS + (N - 1) * PERIOD_NS
    # 12 frames at 10 fps: 1.1 s between first and last publish
    assert 1.05 <= result.wall_time_s < 1.6, result.wall_time_s
    assert elapsed >= 0.3 + 1.05
    assert len(got) == N
    assert [stamp_ns(m) for _, m in got] == [START_NS + i * PERIOD_NS for i in range(N)]
    for i, (_, m) in enumerate(got):
        assert m.header.frame_id == "camera" and m.encoding == "rgb8"
        np.testing.assert_array_equal(image_to_rgb(m), small_frames[i], err_msg=f"frame {i}")
    gaps = np.diff([t for t, _ in got])
    assert gaps.min() > 0.05, gaps  # paced, not a burst


def test_rate_zero_is_fast_and_reliable_delivers_all(ctx, pub_node, small_bag):
    topic = unique_topic("image_raw")
    listener = Listener(ctx, topic, qos=RELIABLE)
    try:
        rep = Replayer(BagSource(small_bag, remap={"/camera/image_raw": topic}), node=pub_node, rate=0,
                       reliable=True, wait_for_subscribers=1, wait_timeout=10, start_delay=0.2)
        result = rep.run()
        rep.destroy()
        got = listener.wait_for(N)
    finally:
        listener.close()
    assert result.published == N
    assert result.wall_time_s < 0.5, result.wall_time_s  # vs 1.1 s at rate 1
    assert [stamp_ns(m) for _, m in got] == [START_NS + i * PERIOD_NS for i in range(N)]


def test_scaled_rate(ctx, pub_node, small_bag):
    rep = Replayer(BagSource(small_bag), node=pub_node, rate=4.0, max_messages=9)
    result = rep.run()
    rep.destroy()
    assert result.published == 9
    assert 0.8 * 0.2 <= result.wall_time_s < 0.45, result.wall_time_s  # 8 gaps of 25 ms


def test_restamp_shifts_to_now_and_keeps_spacing(ctx, pub_node, small_bag):
    topic = unique_topic("image_raw")
    listener = Listener(ctx, topic, qos=RELIABLE)
    try:
        rep = Replayer(BagSource(small_bag, remap={"/camera/image_raw": topic}), node=pub_node, rate=0,
                       reliable=True, restamp=True, wait_for_subscribers=1, start_delay=0.2)
        before = time.time_ns()
        result = rep.run()
        after = time.time_ns()
        rep.destroy()
        got = listener.wait_for(N)
    finally:
        listener.close()
    stamps = [stamp_ns(m) for _, m in got]
    assert len(stamps) == N
    assert before - 10**8 <= stamps[0] <= after, (before, stamps[0], after)
    assert stamps[0] == result.first_stamp_ns
    assert np.all(np.diff(stamps) == PERIOD_NS)


def test_loop_restamped_stamps_keep_increasing(ctx, pub_node, small_bag):
    rep = Replayer(BagSource(small_bag), node=pub_node, rate=0, loop=True, restamp=True, max_messages=30)
    result = rep.run()
    rep.destroy()
    assert result.published == 30 and result.loops == 2
    assert result.last_stamp_ns > result.first_stamp_ns + 29 * PERIOD_NS - 1


def test_stop_from_another_thread(ctx, pub_node, small_bag):
    rep = Replayer(BagSource(small_bag), node=pub_node, rate=1.0, loop=True)
    threading.Timer(0.35, rep.stop).start()
    result = rep.run()
    rep.destroy()
    assert result.stopped and 2 <= result.published <= 6


def test_video_source(ctx, pub_node, vtest_path):
    topic = unique_topic("image_raw")
    listener = Listener(ctx, topic, qos=RELIABLE)
    cap = cv2.VideoCapture(vtest_path)
    frames = [cap.read()[1] for _ in range(5)]
    cap.release()
    try:
        source = VideoSource(vtest_path, topic=topic, encoding="bgr8", frame_id="front", start_stamp=1_700_000_100.5)
        assert source.fps == 10.0
        rep = Replayer(source, node=pub_node, rate=0, reliable=True, max_messages=5,
                       wait_for_subscribers=1, start_delay=0.2)
        result = rep.run()
        rep.destroy()
        got = listener.wait_for(5)
    finally:
        listener.close()
    assert result.published == 5 and len(got) == 5
    start = 1_700_000_100_500_000_000
    assert [stamp_ns(m) for _, m in got] == [start + i * PERIOD_NS for i in range(5)]
    for i, (_, m) in enumerate(got):
        assert (m.encoding, m.header.frame_id, m.width, m.height) == ("bgr8", "front", 768, 576)
        np.testing.assert_array_equal(np.frombuffer(m.data, np.uint8).reshape(576, 768, 3), frames[i])


def test_clock_follows_stamps(ctx, pub_node, small_bag):
    listener = Listener(ctx, "/clock", msg_type=Clock, qos=RELIABLE)
    try:
        rep = Replayer(BagSource(small_bag), node=pub_node, rate=4.0, clock=True, clock_rate_hz=100,
                       max_messages=6, start_delay=0.3)
        deadline = time.monotonic() + 5
        while rep._clock_pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        result = rep.run()
        rep.destroy()
        got = listener.wait_for(result.clock_published)
    finally:
        listener.close()
    clocks = [m.clock.sec * 10**9 + m.clock.nanosec for _, m in got]
    image_stamps = [START_NS + i * PERIOD_NS for i in range(6)]
    assert result.clock_published == len(clocks) > 6  # message stamps plus ticks in between
    assert all(b > a for a, b in zip(clocks, clocks[1:]))
    assert set(image_stamps) <= set(clocks)
    assert clocks[0] == START_NS and clocks[-1] == image_stamps[-1]


def test_wait_for_subscribers_times_out(ctx, pub_node, small_bag):
    topic = unique_topic("nobody")
    rep = Replayer(BagSource(small_bag, remap={"/camera/image_raw": topic}), node=pub_node,
                   wait_for_subscribers=1, wait_timeout=0.3)
    with pytest.raises(ReplayError, match="timed out"):
        rep.run()
    rep.destroy()


def test_bag_source_errors(small_bag, tmp_path):
    with pytest.raises(ReplayError, match="not image topics"):
        BagSource(small_bag, topics=["/nope"])
    with pytest.raises(ReplayError, match="remap"):
        BagSource(small_bag, remap={"/nope": "/x"})
    with pytest.raises(ReplayError, match="cannot read bag"):
        BagSource(tmp_path)


def test_rgb_to_image_msg_round_trip():
    frame = np.random.default_rng(3).integers(0, 256, (576, 768, 3), dtype=np.uint8)
    m = rgb_to_image_msg(frame, 1_700_000_000_123_456_789, "cam")
    assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (1_700_000_000, 123_456_789, "cam")
    assert (m.height, m.width, m.step, m.encoding) == (576, 768, 768 * 3, "rgb8")
    np.testing.assert_array_equal(image_to_rgb(m), frame)
    b = rgb_to_image_msg(frame, m.header.stamp, "cam", encoding="bgr8")
    np.testing.assert_array_equal(np.frombuffer(b.data, np.uint8).reshape(576, 768, 3), frame[..., ::-1])
    np.testing.assert_array_equal(image_to_rgb(b), frame)
    with pytest.raises(ValueError):
        rgb_to_image_msg(frame[..., 0], 0, "cam")


def test_cli_main_publishes_bag(ctx, small_bag, capsys):
    topic = unique_topic("cli")
    listener = Listener(ctx, topic, qos=RELIABLE)
    try:
        rc = main([str(small_bag), "--rate", "0", "--reliable", "--remap", f"/camera/image_raw:={topic}",
                   "--wait-for-subscribers", "1", "--wait-timeout", "10", "--start-delay", "0.2",
                   "--ros-args", "-r", "__node:=cli_replay"])
        got = listener.wait_for(N)
    finally:
        listener.close()
    assert rc == 0
    assert f"published {N} messages" in capsys.readouterr().out
    assert [stamp_ns(m) for _, m in got] == [START_NS + i * PERIOD_NS for i in range(N)]


@pytest.mark.parametrize("argv", [["--rate", "-1"], ["--bogus"], [], ["--max-messages", "0"],
                                  ["--topics", "/nope"], ["--remap", "nonsense"]])
def test_cli_bad_arguments_return_2(small_bag, argv, capsys):
    full = argv if argv in ([], ["--bogus"]) else [str(small_bag)] + argv
    assert main(full) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["/does/not/exist"]) == 2
