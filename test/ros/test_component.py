"""The node as a robot component over real rclpy and the real ros2 CLI: lifecycle, ask_stream, live parameters.

The node is started with autostart:=false (a managed lifecycle node) and the
tiny model; transitions go through its real lifecycle services, the real
``ros2 lifecycle`` and ``ros2 param`` commands run as subprocesses.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
import rclpy
import torch
from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from infinipot_ros.action import Ask as AskAction
from infinipot_ros.engine import EngineConfig, StreamingAssistant
from infinipot_ros.msg import CacheStatus
from infinipot_ros.ros.node import STATUS_QOS, AssistantNode
from infinipot_ros.srv import Ask
from infinipot_ros.tools.replay import rgb_to_image_msg

FRONT = "/comp_cam/front/image_raw"
REAR = "/comp_cam/rear/image_raw"
NODE = "/infinipot_assistant"
ROS2 = shutil.which("ros2")


def _wait(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _result(fut, timeout=60.0):
    assert _wait(fut.done, timeout), "no response"
    return fut.result()


class Graph:
    def __init__(self, node, client, executor):
        self.node, self.client, self.executor = node, client, executor
        self.statuses: list = []
        client.create_subscription(CacheStatus, "/infinipot/status", self.statuses.append, STATUS_QOS)
        self.pubs = {t: client.create_publisher(Image, t, qos_profile_sensor_data) for t in (FRONT, REAR)}
        self.ask = client.create_client(Ask, "/ask")
        self.action = ActionClient(client, AskAction, "/ask_stream")
        self.change = client.create_client(ChangeState, f"{NODE}/change_state")
        self.get_state = client.create_client(GetState, f"{NODE}/get_state")

    def transition(self, transition_id: int) -> bool:
        return _result(self.change.call_async(ChangeState.Request(transition=Transition(id=transition_id)))).success

    def state(self) -> str:
        return _result(self.get_state.call_async(GetState.Request())).current_state.label

    def publish(self, camera, frames, stamps, pause=0.12):
        for f, s in zip(frames, stamps):
            self.pubs[camera].publish(rgb_to_image_msg(f, s, "cam"))
            time.sleep(pause)  # sensor-data QoS keeps only the last message: give the node time to take it

    def call(self, **fields):
        req = Ask.Request()
        for k, v in fields.items():
            setattr(req, k, v)
        return _result(self.ask.call_async(req))

    def goal(self, feedback=None, **fields):
        goal = AskAction.Goal()
        for k, v in fields.items():
            setattr(goal, k, v)
        handle = _result(self.action.send_goal_async(goal, feedback_callback=feedback))
        assert handle.accepted
        return handle


@pytest.fixture()
def graph(tiny_adapter, tiny_model_dir):
    rclpy.init()
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200, frame_rate_hz=0, max_new_tokens=64,
                       max_pending_asks=2)
    engine = StreamingAssistant(cfg, adapter=tiny_adapter)
    node = AssistantNode(engine=engine, parameter_overrides=[
        Parameter("stream.image_topics", value=[FRONT, REAR]),
        Parameter("autostart", value=False),
        Parameter("status.period_s", value=0.2),
    ])
    client = rclpy.create_node("infinipot_component_client")
    executor = MultiThreadedExecutor(num_threads=6)
    executor.add_node(node)
    executor.add_node(client)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    g = Graph(node, client, executor)
    assert g.ask.wait_for_service(timeout_sec=10) and g.change.wait_for_service(timeout_sec=10)
    assert g.action.wait_for_server(timeout_sec=10)
    try:
        yield g
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        client.destroy_node()
        rclpy.shutdown()
        thread.join(5)


def _activate(g):
    assert g.transition(Transition.TRANSITION_CONFIGURE) and g.transition(Transition.TRANSITION_ACTIVATE)
    assert _wait(lambda: all(p.get_subscription_count() > 0 for p in g.pubs.values()), 10)


def _kv(engine):
    return [tuple(t.clone() for t in engine.cache.layer_kv(layer)) for layer in range(engine.cache.num_layers)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def test_lifecycle_states_memory_and_errors(graph, vtest_frames):
    g, (frames, stamps) = graph, vtest_frames
    assert g.state() == "unconfigured"
    assert _wait(lambda: g.statuses and g.statuses[-1].state == CacheStatus.STATE_UNCONFIGURED, 5)
    res = g.call(question="anything?")
    assert not res.success and res.error.startswith("MODEL_ERROR")
    assert g.transition(Transition.TRANSITION_CONFIGURE) and g.state() == "inactive"
    assert _wait(lambda: g.statuses[-1].state == CacheStatus.STATE_INACTIVE, 5)
    assert g.pubs[FRONT].get_subscription_count() == 0  # inactive: not subscribed
    assert g.transition(Transition.TRANSITION_ACTIVATE) and g.state() == "active"
    assert _wait(lambda: g.pubs[FRONT].get_subscription_count() > 0, 10)
    g.publish(FRONT, frames[:4], stamps[:4])
    assert _wait(lambda: g.node.stats().frames.ingested == 4, 60), g.node.stats().frames
    assert _wait(lambda: g.statuses[-1].state == CacheStatus.STATE_READY, 5)
    # deactivate: ingestion stops, memory and answers stay
    assert g.transition(Transition.TRANSITION_DEACTIVATE) and g.state() == "inactive"
    kept = g.node.stats().cache.vision_tokens
    assert kept > 0
    g.publish(FRONT, frames[4:8], stamps[4:8], pause=0.05)
    time.sleep(0.3)
    assert g.node.stats().frames.received == 4 and g.node.stats().cache.vision_tokens == kept
    res = g.call(question="What was there?", max_new_tokens=3)
    assert res.success and res.frames_in_context == 4
    # cleanup frees the model; asks say so; configure + activate works again
    assert g.transition(Transition.TRANSITION_CLEANUP) and g.state() == "unconfigured"
    res = g.call(question="still there?")
    assert not res.success and res.error.startswith("MODEL_ERROR") and "unconfigured" in res.error
    _activate(g)
    assert g.state() == "active"
    assert g.node.stats().cache.vision_tokens == 0  # cleanup forgot the memory (no snapshot configured)


def test_ask_stream_feedback_is_the_answer(graph, vtest_frames):
    g, (frames, stamps) = graph, vtest_frames
    _activate(g)
    g.publish(FRONT, frames[:6], stamps[:6])
    assert _wait(lambda: g.node.stats().frames.ingested == 6, 60)
    feedback = []
    handle = g.goal(feedback=lambda fb: feedback.append(fb.feedback), question="What is happening?",
                    max_new_tokens=24)
    res = _result(handle.get_result_async())
    assert res.status == GoalStatus.STATUS_SUCCEEDED
    r = res.result
    assert r.success and r.error == "" and r.generated_tokens > 0 and r.frames_in_context == 6
    assert feedback, "no feedback"
    assert "".join(f.piece for f in feedback).strip() == r.answer
    counts = [f.generated_tokens for f in feedback]
    assert counts == sorted(counts) and counts[-1] == r.generated_tokens
    # same question over the service: the same (greedy) answer
    srv = g.call(question="What is happening?", max_new_tokens=24)
    assert srv.success and srv.answer == r.answer and srv.generated_tokens == r.generated_tokens


def test_ask_stream_cancel_leaves_the_cache_as_it_was(graph, vtest_frames):
    g, (frames, stamps) = graph, vtest_frames
    _activate(g)
    g.publish(FRONT, frames[:6], stamps[:6])
    assert _wait(lambda: g.node.stats().frames.ingested == 6, 60)
    assert g.node._worker.wait_idle(30)
    before = _kv(g.node._engine)
    feedback = []
    handle = g.goal(feedback=lambda fb: feedback.append(fb.feedback), question="Describe everything in detail.",
                    max_new_tokens=64)
    assert _wait(lambda: feedback, 30), "no feedback before cancel"
    _result(handle.cancel_goal_async())
    res = _result(handle.get_result_async())
    assert res.status == GoalStatus.STATUS_CANCELED
    assert res.result.error.startswith("CANCELED") and not res.result.success
    assert res.result.generated_tokens >= 1 and res.result.answer  # what was decoded before the cancel
    assert g.node._worker.wait_idle(30)
    assert _same(before, _kv(g.node._engine))  # question and partial answer removed, nothing else touched
    assert g.call(question="ok?", max_new_tokens=2).success


def test_ask_stream_errors_use_the_service_codes(graph, vtest_frames):
    g, (frames, stamps) = graph, vtest_frames
    handle = g.goal(question="before configure?")
    res = _result(handle.get_result_async())
    assert res.status == GoalStatus.STATUS_ABORTED and res.result.error.startswith("MODEL_ERROR")
    _activate(g)
    for fields, code in (({"question": ""}, "BAD_REQUEST"), ({"question": "no frames yet?"}, "NO_FRAMES"),
                         ({"question": "too long?", "max_new_tokens": 65}, "BAD_REQUEST"),
                         ({"question": "which camera?", "camera_ids": ["/nope"]}, "BAD_REQUEST")):
        res = _result(g.goal(**fields).get_result_async())
        assert res.status == GoalStatus.STATUS_ABORTED, fields
        assert res.result.error.startswith(code) and not res.result.success, (fields, res.result.error)
    g.publish(FRONT, frames[:2], stamps[:2])
    assert _wait(lambda: g.node.stats().frames.ingested == 2, 60)
    res = _result(g.goal(question="Describe everything.", max_new_tokens=64, timeout_s=0.05).get_result_async())
    assert res.status == GoalStatus.STATUS_ABORTED and res.result.error.startswith("TIMEOUT")
    # more goals than ask.max_pending (2) at once: the extra ones are BUSY, the others answered
    handles = [g.goal(question=f"question {i}?", max_new_tokens=32) for i in range(5)]
    errors = [_result(h.get_result_async()).result.error for h in handles]
    assert any(e.startswith("BUSY") for e in errors) and any(e == "" for e in errors), errors


def test_one_bad_stamp_keeps_memory_and_cameras_are_reported(graph, vtest_frames):
    g, (frames, stamps) = graph, vtest_frames
    _activate(g)
    g.publish(FRONT, frames[:4], stamps[:4])
    g.publish(REAR, frames[4:8], stamps[4:8])
    assert _wait(lambda: g.node.stats().frames.ingested == 8, 60)
    tokens = g.node.stats().cache.vision_tokens
    g.publish(FRONT, frames[8:9], [stamps[0] - 3600 * 10**9])  # a driver glitch: one stamp an hour back
    assert _wait(lambda: g.node.stats().frames.stamp_dropped == 1, 10)
    assert g.node.stats().cache.vision_tokens == tokens
    assert _wait(lambda: g.statuses[-1].frames_stamp_dropped == 1, 5)
    st = g.statuses[-1]
    assert st.time_jumps == 0 and [c.camera_id for c in st.cameras] == [FRONT, REAR]
    front, rear = st.cameras
    assert (front.frames_received, front.frames_ingested, front.frames_stamp_dropped) == (5, 4, 1)
    assert (rear.frames_received, rear.frames_ingested, rear.frames_stamp_dropped) == (4, 4, 0)
    assert front.tokens_in_cache > 0 and rear.tokens_in_cache > 0
    assert front.tokens_in_cache + rear.tokens_in_cache == st.vision_tokens
    assert front.frames_in_cache == 4 and rear.frames_in_cache == 4
    assert front.newest_frame_stamp.sec == stamps[3] // 10**9 and 0 <= rear.seconds_since_ingest < 60


def test_live_parameters_in_process(graph):
    g = graph
    _activate(g)
    node, engine = g.node, g.node._engine
    ok = node.set_parameters([Parameter("ask.max_new_tokens", value=32), Parameter("ask.temperature", value=0.3),
                              Parameter("stream.frame_rate_hz", value=4.0)])
    assert all(r.successful for r in ok)
    assert engine.config.max_new_tokens == 32 and engine.config.temperature == 0.3
    assert engine.gate.rate_hz == 4.0
    res = node.set_parameters([Parameter("ask.max_new_tokens", value=4000)])[0]
    assert not res.successful and "KV reserve" in res.reason and engine.config.max_new_tokens == 32
    res = node.set_parameters([Parameter("model.id", value="other")])[0]
    assert not res.successful and node.get_parameter("model.id").value != "other"
    node.set_parameters([Parameter("status.period_s", value=0.5)])
    assert abs(node.status_timer.timer_period_ns - 0.5e9) < 1
    # atomic: a set whose engine part is refused changes nothing, the node part included
    res = node.set_parameters_atomically([Parameter("status.period_s", value=0.25),
                                          Parameter("ask.max_new_tokens", value=4000)])
    assert not res.successful and "KV reserve" in res.reason
    assert abs(node.status_timer.timer_period_ns - 0.5e9) < 1 and node.settings.status_period_s == 0.5
    assert engine.config.max_new_tokens == 32 and node.config.max_new_tokens == 32
    res = node.set_parameters_atomically([Parameter("ask.temperature", value=0.7),
                                          Parameter("status.period_s", value=0.0)])  # below the descriptor's range
    assert not res.successful and "out of range" in res.reason
    assert engine.config.temperature == 0.3 and node.config.temperature == 0.3


@pytest.mark.skipif(ROS2 is None, reason="the ros2 CLI is not installed")
def test_real_ros2_lifecycle_and_param_commands(graph):
    g = graph
    env = dict(os.environ)

    def ros2(*args):
        # Without a daemon each command discovers the graph itself: retry when discovery was too slow.
        # A loaded machine can stall one start-up of the CLI: a timed-out try counts as a retry too.
        rc, text = 1, ""
        for _ in range(4):
            try:
                out = subprocess.run([ROS2, *args, "--no-daemon", "--spin-time", "3"], capture_output=True,
                                     text=True, timeout=120, env=env)
            except subprocess.TimeoutExpired as exc:
                rc, text = 1, f"timed out: {exc}"
                continue
            rc, text = out.returncode, out.stdout + out.stderr
            if "Node not found" not in text:
                break
        return rc, text

    rc, out = ros2("lifecycle", "get", NODE)
    assert rc == 0 and "unconfigured" in out, out
    rc, out = ros2("lifecycle", "set", NODE, "configure")
    assert rc == 0 and "Transitioning successful" in out, out
    rc, out = ros2("lifecycle", "set", NODE, "activate")
    assert rc == 0 and "Transitioning successful" in out, out
    assert g.state() == "active"
    rc, out = ros2("param", "set", NODE, "ask.timeout_s", "12.5")
    assert "Set parameter successful" in out, out
    assert g.node._engine.config.ask_timeout_s == 12.5
    rc, out = ros2("param", "set", NODE, "cache.max_vision_tokens", "10")
    assert "failed" in out.lower() and g.node._engine.config.max_vision_tokens == 200, out
    desc = g.node.describe_parameter("cache.max_vision_tokens")
    assert desc.read_only and "read-only" in desc.description
    rc, out = ros2("lifecycle", "set", NODE, "shutdown")
    assert rc == 0 and "Transitioning successful" in out, out
    assert g.node._engine is None


def test_notes_topic_appends_text_events(graph, vtest_frames):
    """std_msgs/String on /notes (rclpy and the real `ros2 topic pub`): stamped on arrival, in the cache,
    counted in status, visible to a question's time window."""
    from std_msgs.msg import String

    g, (frames, stamps) = graph, vtest_frames
    _activate(g)
    pub = g.client.create_publisher(String, "/notes", 10)
    assert _wait(lambda: pub.get_subscription_count() > 0, 10)
    g.publish(FRONT, frames[:4], stamps[:4])
    assert _wait(lambda: g.node.stats().frames.ingested == 4, 60)
    pub.publish(String(data="The robot's name is Zorblax."))
    pub.publish(String(data=""))  # empty: rejected and counted
    assert _wait(lambda: g.node.stats().notes.received == 2, 20)
    assert _wait(lambda: g.statuses and g.statuses[-1].notes_ingested == 1 and g.statuses[-1].notes_rejected == 1, 10)
    st = g.statuses[-1]
    assert st.notes_in_cache == 1 and st.note_tokens > 0
    assert st.vision_tokens == sum(c.tokens_in_cache for c in st.cameras) + st.note_tokens
    if ROS2:
        for _ in range(3):  # the 2-core CI machine: discovery can be slow
            subprocess.run([ROS2, "topic", "pub", "--once", "-w", "1", "/notes", "std_msgs/msg/String",
                            "{data: 'operator: the door is locked'}"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ))
            if _wait(lambda: g.node.stats().notes.ingested == 2, 10):
                break
        assert g.node.stats().notes.ingested == 2
    # the notes are stamped with the node clock (now), after the frames: a window ending at the frames hides them
    from builtin_interfaces.msg import Time

    res = g.call(question="What is the robot's name?", until=Time(sec=stamps[3] // 10**9, nanosec=stamps[3] % 10**9))
    assert res.success, res.error
    newest_note = int(g.node._engine.cache.table.column("end_stamp").max())
    assert newest_note > stamps[3]
    res_all = g.call(question="What is the robot's name?")
    stamp = res_all.newest_frame_stamp
    assert res_all.success and stamp.sec * 10**9 + stamp.nanosec == newest_note
    assert (res.newest_frame_stamp.sec, res.newest_frame_stamp.nanosec) == (stamps[3] // 10**9, stamps[3] % 10**9)
