"""AskScene (py_trees) and infinipot-bt-demo over real rclpy and the real AssistantNode's ask_stream."""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import threading
import time
from types import SimpleNamespace

import py_trees
import pytest

import rclpy  # noqa: E402
from action_msgs.msg import GoalStatus  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from infinipot_ros.bt import AskScene  # noqa: E402
from infinipot_ros.engine import EngineConfig, StreamingAssistant  # noqa: E402
from infinipot_ros.ros.node import AssistantNode  # noqa: E402
from infinipot_ros.ros.stamps import ns_to_time  # noqa: E402
from infinipot_ros.tools import bt_demo  # noqa: E402
from infinipot_ros.tools.replay import rgb_to_image_msg  # noqa: E402

Status = py_trees.common.Status
NS = "bt_test"  # node and client share it: the relative "ask_stream" is /bt_test/ask_stream
FRONT = "/bt_test_cam/front/image_raw"
TICK_BUDGET_S = 0.05


def _assistant(tiny_adapter, tiny_model_dir, namespace):
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200, frame_rate_hz=2.0, max_new_tokens=2000)
    return AssistantNode(engine=StreamingAssistant(cfg, adapter=tiny_adapter), namespace=namespace,
                         parameter_overrides=[
                             Parameter("stream.image_topics", value=[FRONT]),
                             Parameter("cache.max_vision_tokens", value=200),
                             Parameter("ask.max_new_tokens", value=2000),
                         ])


@pytest.fixture()
def graph(tiny_adapter, tiny_model_dir):
    """AssistantNode (tiny model) + a client node for the behaviours, spun by one executor thread.

    Yields a namespace: node, client, pub (camera), executor, assistants (extra nodes to
    tear down), tree(root) (a set-up BehaviourTree, shut down at the end).
    """
    rclpy.init()
    py_trees.blackboard.Blackboard.clear()
    g = SimpleNamespace(assistants=[], trees=[], executor=None)
    thread = None
    try:
        g.node = _assistant(tiny_adapter, tiny_model_dir, NS)
        g.assistants.append(g.node)
        g.client = rclpy.create_node("infinipot_bt_test_client", namespace=NS)
        g.pub = g.client.create_publisher(Image, FRONT, qos_profile_sensor_data)
        g.executor = MultiThreadedExecutor(num_threads=4)
        g.executor.add_node(g.node)
        g.executor.add_node(g.client)
        thread = threading.Thread(target=g.executor.spin, daemon=True)
        thread.start()

        def tree(root):
            t = py_trees.trees.BehaviourTree(root)
            t.setup()
            g.trees.append(t)
            return t

        g.tree = tree
        assert _wait(lambda: g.pub.get_subscription_count() > 0, 10)
        yield g
    finally:
        for t in g.trees:
            t.shutdown()  # destroys the behaviours' action clients
        for a in g.assistants:
            a.shutdown()
        if g.executor is not None:
            g.executor.shutdown()
        for n in [*g.assistants, getattr(g, "client", None)]:
            if n is not None:
                n.destroy_node()
        g = None
        # destroy_node() leaves an action server alive until it is collected; a live one
        # answers nothing and would still be matched by the next test's clients
        gc.collect()
        rclpy.shutdown()
        if thread is not None:
            thread.join(5)
        py_trees.blackboard.Blackboard.clear()


def _wait(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _publish_recent(g, frames, n=8, end_ns=None):
    """Publish n frames stamped 0.5 s apart, ending at end_ns (default now, client clock); wait until cached."""
    now = g.client.get_clock().now().nanoseconds if end_ns is None else end_ns
    for i, f in enumerate(frames[:n]):
        g.pub.publish(rgb_to_image_msg(f, now - (n - 1 - i) * 500_000_000, "front"))
        time.sleep(0.1)  # sensor-data QoS keeps only the last message: give the node time to take it
    assert _wait(lambda: g.node.stats().frames.ingested >= n, 60), g.node.stats().frames
    return now


def _tick(tree, until, timeout=60.0, pause=0.01):
    """Tick until ``until()`` holds; returns [(status, tick seconds, partial answer)] per tick."""
    log = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t0 = time.perf_counter()
        tree.tick()
        log.append((tree.root.status, time.perf_counter() - t0, _bb("/infinipot/partial_answer")))
        if until():
            return log
        time.sleep(pause)
    pytest.fail(f"tree did not finish in {timeout} s: {tree.root.status}, {tree.root.feedback_message}")


def _bb(key):
    return py_trees.blackboard.Blackboard.get(key)


def test_ask_scene_running_then_success_ticks_never_block(graph, vtest_frames):
    frames, _ = vtest_frames
    _publish_recent(graph, frames)
    ask = AskScene("ask", graph.client, "What is happening?", last_s=60.0, max_new_tokens=300, timeout_s=60.0)
    log = _tick(graph.tree(ask), lambda: ask.status != Status.RUNNING)
    statuses = [s for s, _, _ in log]
    assert statuses[-1] == Status.SUCCESS, ask.feedback_message
    assert statuses[:-1] == [Status.RUNNING] * (len(log) - 1) and len(log) >= 5
    answer = _bb("/infinipot/answer")
    result = _bb("/infinipot/result")
    assert result.success and result.error == "" and _bb("/infinipot/error") == ""
    assert answer == result.answer != "" and result.generated_tokens > 1
    assert result.frames_in_context == 8  # all 8 frames are inside the last 60 s
    assert ask.outcome.status == Status.SUCCESS and ask.outcome.answer == answer and ask.goals_sent == 1
    # the answer took many ticks; no tick came close to it
    worst = max(dt for _, dt, _ in log)
    assert worst < TICK_BUDGET_S, f"a tick took {worst * 1e3:.1f} ms"
    assert ask.outcome.latency_s > 4 * worst and result.latency_s > 0
    # feedback streamed while RUNNING: partial answers are growing prefixes of the answer
    partials = [p for s, _, p in log if s == Status.RUNNING and p]
    assert partials, "no feedback seen while RUNNING"
    assert all(answer.startswith(p.rstrip()) for p in partials)  # the node strips the final answer
    assert len(partials[0]) < len(answer) and partials == sorted(partials, key=len)
    assert _bb("/infinipot/partial_answer") == answer


def test_ask_before_any_frame_fails_with_no_frames(graph):
    ask = AskScene("ask", graph.client, "Anything?", timeout_s=30.0)
    _tick(graph.tree(ask), lambda: ask.status != Status.RUNNING)
    assert ask.status == Status.FAILURE
    assert _bb("/infinipot/error").startswith("NO_FRAMES: ")
    assert ask.feedback_message == _bb("/infinipot/error") and ask.outcome.code == "NO_FRAMES"
    result = _bb("/infinipot/result")
    assert result is not None and not result.success and result.error == _bb("/infinipot/error")
    assert not py_trees.blackboard.Blackboard.exists("/infinipot/answer")  # a failure writes no answer


def test_last_s_window_excludes_older_frames(graph, vtest_frames):
    frames, _ = vtest_frames
    now = _publish_recent(graph, frames, n=4)  # stamped now - 1.5 s .. now
    time.sleep(max(0.0, 2.0 - (graph.client.get_clock().now().nanoseconds - now) / 1e9))
    ask = AskScene("ask", graph.client, "Anything new?", last_s=0.5, max_new_tokens=2)
    _tick(graph.tree(ask), lambda: ask.status != Status.RUNNING)
    assert ask.status == Status.FAILURE and ask.outcome.code == "NO_FRAMES"


class _Flag(py_trees.behaviour.Behaviour):
    """SUCCESS once ``raised`` is set, else FAILURE (a higher-priority branch that takes over)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.raised = False

    def update(self) -> Status:
        return Status.SUCCESS if self.raised else Status.FAILURE


def test_higher_priority_preempts_and_cancels_goal(graph, vtest_frames):
    frames, _ = vtest_frames
    _publish_recent(graph, frames, n=4)
    flag = _Flag("emergency")
    ask = AskScene("ask", graph.client, "Describe everything in detail.", max_new_tokens=2000, timeout_s=60.0)
    root = py_trees.composites.Selector("root", memory=False, children=[flag, ask])
    tree = graph.tree(root)
    # executing: some text streamed, far from the 2000-token cap
    _tick(tree, lambda: bool(_bb("/infinipot/partial_answer")))
    assert ask.status == Status.RUNNING and ask.goal_status == GoalStatus.STATUS_EXECUTING
    streamed = _bb("/infinipot/partial_answer")
    flag.raised = True
    tree.tick()
    assert root.status == Status.SUCCESS and ask.status == Status.INVALID
    # the server saw the cancel: the goal ends CANCELED, with the text decoded before it
    assert _wait(lambda: ask.goal_status == GoalStatus.STATUS_CANCELED, 10), ask.goal_status
    result = ask.goal_result
    assert not result.success and result.error.startswith("CANCELED")
    assert result.answer.startswith(streamed.strip())
    # the assistant answers again afterwards (the canceled goal left it usable)
    again = AskScene("again", graph.client, "Still there?", max_new_tokens=2, answer_key="/again/answer")
    _tick(graph.tree(again), lambda: again.status != Status.RUNNING)
    assert again.status == Status.SUCCESS and _bb("/again/answer") == again.outcome.answer


def test_behaviour_timeout_fails_and_cancels_goal(graph, vtest_frames):
    frames, _ = vtest_frames
    _publish_recent(graph, frames, n=4)
    ask = AskScene("ask", graph.client, "Describe everything in detail.", max_new_tokens=2000, timeout_s=0.5)
    _tick(graph.tree(ask), lambda: ask.status != Status.RUNNING)
    assert ask.status == Status.FAILURE
    assert ask.outcome.code == "TIMEOUT" and "behaviour timeout" in ask.outcome.error
    assert _bb("/infinipot/error") == ask.outcome.error == ask.feedback_message
    assert _bb("/infinipot/result") is None
    assert 0.5 <= ask.outcome.latency_s < 1.5
    assert _wait(lambda: ask.goal_status == GoalStatus.STATUS_CANCELED, 10), ask.goal_status


def test_no_action_server_fails_fast(graph):
    ask = AskScene("ask", graph.client, "Anyone?", action_name="no_such_action", server_wait_s=0.3)
    t0 = time.monotonic()
    log = _tick(graph.tree(ask), lambda: ask.status != Status.RUNNING)
    assert ask.status == Status.FAILURE and 0.3 <= time.monotonic() - t0 < 2.0 and len(log) > 3
    assert ask.outcome.code == "NO_SERVER" and "/bt_test/no_such_action" in ask.outcome.error
    assert ask.goals_sent == 0


def test_unacknowledged_goal_is_sent_again(graph, tiny_adapter, tiny_model_dir):
    # a server that is discovered but does not answer yet (its node is not spun): the first
    # goal goes unacknowledged, the behaviour sends it again, the late acceptance is canceled
    late = _assistant(tiny_adapter, tiny_model_dir, "bt_late")
    graph.assistants.append(late)
    ask = AskScene("ask", graph.client, "Anyone?", action_name="/bt_late/ask_stream", accept_timeout_s=0.5,
                   server_wait_s=10.0, timeout_s=30.0)
    tree = graph.tree(ask)
    _tick(tree, lambda: ask.goals_sent == 2)
    assert ask.status == Status.RUNNING and ask.feedback_message.startswith("goal sent")
    graph.executor.add_node(late)
    _tick(tree, lambda: ask.status != Status.RUNNING)
    # answered (no frames on this node yet) by the resent goal
    assert ask.status == Status.FAILURE and ask.outcome.code == "NO_FRAMES" and ask.goals_sent == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        AskScene("x", None, "q", last_s=-1.0)
    with pytest.raises(ValueError):
        AskScene("x", None, "q", last_s=5.0, since=rclpy.time.Time(seconds=1).to_msg())
    assert bt_demo.main(["--question", "q", "--period", "-1"]) == 2
    assert bt_demo.main(["--question", " "]) == 2
    assert bt_demo.main(["--last", "5"]) == 2  # --question is required


def test_bt_demo_against_node(graph, vtest_frames):
    frames, stamps = vtest_frames
    end = stamps[0] + 10**9
    _publish_recent(graph, frames, n=4, end_ns=end)  # stamped in 2023: only sim time puts them in the last 5 s
    exe = shutil.which("infinipot-bt-demo")
    assert exe, "infinipot-bt-demo not installed (pip install --no-deps -e .)"
    clock_pub = graph.client.create_publisher(Clock, "/clock", 10)
    stop = threading.Event()

    def sim_clock():  # sim time 1 s after the newest frame
        while not stop.is_set():
            clock_pub.publish(Clock(clock=ns_to_time(end + 10**9)))
            time.sleep(0.05)

    clock_thread = threading.Thread(target=sim_clock, daemon=True)
    clock_thread.start()
    run = [exe, "--question", "What is happening?", "--last", "5", "--period", "0.5", "--max-new-tokens", "4",
           "--namespace", NS]
    try:
        t0 = time.monotonic()
        proc = subprocess.run([*run, "--asks", "2", "--ros-args", "-p", "use_sim_time:=true"],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ))
        took = time.monotonic() - t0
        # the same without sim time: the last 5 s of wall time hold no frame
        wall = subprocess.run(run, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    finally:
        stop.set()
        clock_thread.join(2)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert [ln.split(" in ")[0] for ln in lines] == ["ask 1/2 SUCCESS", "ask 2/2 SUCCESS"], lines
    assert all("(4 frames, 4 tokens): " in ln for ln in lines), lines
    assert took >= 1.0  # two periods of 0.5 s
    assert wall.returncode == 1, (wall.stdout, wall.stderr)
    assert wall.stdout.startswith("ask 1/1 FAILURE") and "NO_FRAMES" in wall.stdout
    # no assistant in that namespace: the one ask fails with NO_SERVER, exit 1
    proc = subprocess.run([exe, "--question", "q", "--period", "0", "--namespace", "nobody", "--server-wait", "0.5"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("ask 1/1 FAILURE") and "NO_SERVER" in proc.stdout
