"""The assistant node over real rclpy: real frames in, /ask answered, CacheStatus out."""
from __future__ import annotations

import threading
import time

import cv2
import pytest

import rclpy  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from infinipot_ros.engine import EngineConfig, StreamingAssistant  # noqa: E402
from infinipot_ros.msg import CacheStatus  # noqa: E402
from infinipot_ros.ros.node import STATUS_QOS, AssistantNode  # noqa: E402
from infinipot_ros.ros.stamps import ns_to_time  # noqa: E402
from infinipot_ros.srv import Ask  # noqa: E402
from infinipot_ros.tools.replay import rgb_to_image_msg  # noqa: E402

FRONT = "/test_cam/front/image_raw"
REAR = "/test_cam/rear/image_raw/compressed"


@pytest.fixture()
def graph(tiny_adapter, tiny_model_dir):
    """Node (engine with the shared tiny model) + a client node, spun by one executor thread."""
    rclpy.init()
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200, frame_rate_hz=2.0, max_new_tokens=2000)
    engine = StreamingAssistant(cfg, adapter=tiny_adapter)
    node = AssistantNode(engine=engine, parameter_overrides=[
        Parameter("stream.image_topics", value=[FRONT, REAR]),
        Parameter("cache.max_vision_tokens", value=200),
        Parameter("status.period_s", value=0.2),
    ])
    client = rclpy.create_node("infinipot_test_client")
    statuses = []
    client.create_subscription(CacheStatus, "/infinipot/status", statuses.append, STATUS_QOS)
    pubs = {
        FRONT: client.create_publisher(Image, FRONT, qos_profile_sensor_data),
        REAR: client.create_publisher(CompressedImage, REAR, qos_profile_sensor_data),
    }
    ask = client.create_client(Ask, "/ask")
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    executor.add_node(client)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    assert ask.wait_for_service(timeout_sec=10)
    _wait(lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 10)
    try:
        yield node, client, pubs, ask, statuses
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        client.destroy_node()
        rclpy.shutdown()
        thread.join(5)


def _wait(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _call(client_srv, timeout=60.0, **fields):
    req = Ask.Request()
    for k, v in fields.items():
        setattr(req, k, v)
    fut = client_srv.call_async(req)
    assert _wait(fut.done, timeout), "no /ask response"
    return fut.result()


def _publish_video(pub, frames, stamps, pause=0.05):
    for f, s in zip(frames, stamps):
        pub.publish(rgb_to_image_msg(f, s, "front"))
        time.sleep(pause)  # sensor-data QoS keeps only the last message: give the node time to take it


def test_frames_in_answer_out_status_reported(graph, vtest_frames):
    node, client, pubs, ask, statuses = graph
    frames, stamps = vtest_frames
    # 10 fps source stamps, every frame published: the node keeps those 0.5 s apart (2 Hz by stamp)
    src_stamps = [stamps[0] + i * 100_000_000 for i in range(40)]
    src_frames = [frames[i // 5 % len(frames)] for i in range(40)]
    _publish_video(pubs[FRONT], src_frames, src_stamps)
    assert _wait(lambda: node.stats().frames.ingested >= 8, 60), node.stats().frames
    res = _call(ask, question="What is happening?", max_new_tokens=5)
    assert res.success, res.error
    assert res.error == "" and res.generated_tokens > 0 and res.frames_in_context >= 8
    assert res.newest_frame_stamp.sec > 0 and res.latency_s > 0
    st = node.stats()
    assert st.frames.received == 40 and st.frames.sampled == 8
    assert _wait(lambda: statuses and statuses[-1].frames_ingested == st.frames.ingested, 5)
    last = statuses[-1]
    assert last.state == CacheStatus.STATE_READY and last.policy == "infinipot_v"
    assert 0 < last.kv_bytes_used <= last.kv_bytes_budget
    assert last.vision_tokens <= last.vision_tokens_budget == 200
    assert last.process_rss_bytes > 0 and last.prefix_tokens > 0


def test_compressed_camera_filters_and_error_codes(graph, vtest_frames):
    node, client, pubs, ask, statuses = graph
    frames, stamps = vtest_frames
    for i, (f, s) in enumerate(zip(frames[:4], stamps[:4])):
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        msg = CompressedImage(format="jpeg", data=jpg.tobytes())
        msg.header.stamp = ns_to_time(s)
        pubs[REAR].publish(msg)
        time.sleep(0.1)
    assert _wait(lambda: node.stats().frames.ingested >= 4, 60)
    res = _call(ask, question="What is behind?", camera_ids=[REAR], max_new_tokens=3)
    assert res.success and res.frames_in_context == 4
    res = _call(ask, question="front?", camera_ids=["/nope"])
    assert not res.success and res.error.startswith("BAD_REQUEST")
    res = _call(ask, question="")
    assert not res.success and res.error.startswith("BAD_REQUEST")
    res = _call(ask, question="later?", since=ns_to_time(stamps[-1] + 10**12))
    assert not res.success and res.error.startswith("NO_FRAMES")


def test_malformed_frames_are_counted_not_fatal(graph, vtest_frames):
    node, client, pubs, ask, statuses = graph
    frames, stamps = vtest_frames
    bad = rgb_to_image_msg(frames[0], stamps[0], "front")
    bad.encoding = "32FC1"  # a float (depth) image: refused as such
    pubs[FRONT].publish(bad)
    time.sleep(0.1)
    truncated = rgb_to_image_msg(frames[1], stamps[1], "front")
    truncated.data = truncated.data[:1000]
    pubs[FRONT].publish(truncated)
    assert _wait(lambda: node.stats().frames.rejected >= 2, 10)
    _publish_video(pubs[FRONT], frames[2:6], stamps[2:6], pause=0.15)
    assert _wait(lambda: node.stats().frames.ingested >= 4, 60)
    assert _call(ask, question="ok?", max_new_tokens=2).success


def test_ask_times_out_with_code(graph, vtest_frames):
    node, client, pubs, ask, statuses = graph
    frames, stamps = vtest_frames
    _publish_video(pubs[FRONT], frames[:2], stamps[:2], pause=0.2)
    assert _wait(lambda: node.stats().frames.ingested >= 2, 60)
    res = _call(ask, question="Describe everything in detail.", max_new_tokens=2000, timeout_s=0.05)
    assert not res.success and res.error.startswith("TIMEOUT")
    # beyond the configured answer cap (the KV reserve is sized for it): refused, not truncated
    res = _call(ask, question="Describe everything in detail.", max_new_tokens=2001)
    assert not res.success and res.error.startswith("BAD_REQUEST") and "max_new_tokens" in res.error
    assert _call(ask, question="still alive?", max_new_tokens=2).success
