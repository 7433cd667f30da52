"""Bad requests over the /ask service and the ask_stream action (issue 9, item 4).

Every request class is sent with the real rclpy service client and the real action client to a
running node (real rclpy, the colcon-built interfaces, the tiny model): each gets success=false and
the exact error code documented in srv/Ask.srv / action/Ask.action (the action goal is ABORTED), no
traceback anywhere, and the node answers a good question afterwards. Asks before the model is
ready (unconfigured, loading, inactive) and after its load failed are covered too.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import rclpy
from action_msgs.msg import GoalStatus
from builtin_interfaces.msg import Time
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from infinipot_ros.action import Ask as AskAction
from infinipot_ros.engine import EngineConfig, EngineState, StreamingAssistant
from infinipot_ros.engine.assistant import MAX_QUESTION_CHARS
from infinipot_ros.msg import CacheStatus
from infinipot_ros.ros import node as node_module
from infinipot_ros.ros.node import STATUS_QOS, AssistantNode
from infinipot_ros.ros.stamps import ns_to_time
from infinipot_ros.srv import Ask

pytestmark = pytest.mark.ros

CAM = "/req_cam/image_raw"
OTHER = "/req_cam/other/image_raw"
MAX_NEW = 64  # the engine's ask.max_new_tokens in these tests
T0 = 1_700_000_000 * 10**9  # first frame stamp (ns)
TRANSPORTS = ("service", "action")


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


def _rgb(h=56, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _image(frame, stamp_ns):
    msg = Image(encoding="rgb8", height=frame.shape[0], width=frame.shape[1], step=frame.shape[1] * 3)
    msg.data = frame.tobytes()
    msg.header.stamp = ns_to_time(stamp_ns)
    return msg


class Ros:
    """One rclpy context for the module: an executor thread and a client node; nodes come and go."""

    def __init__(self):
        rclpy.init()
        self.executor = MultiThreadedExecutor(num_threads=6)
        self.client = rclpy.create_node("infinipot_requests_client")
        self.executor.add_node(self.client)
        self.retired_actions: list = []
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown()
        self.thread.join(5)
        for action in self.retired_actions:  # destroyed only once no executor thread walks the waitables
            action.destroy()
        self.client.destroy_node()
        rclpy.shutdown()


class Handle:
    """A node under test (in its own namespace) and clients of its service, action, lifecycle and status."""

    def __init__(self, ros: Ros, node: AssistantNode, ns: str):
        self.ros, self.node, self.ns = ros, node, ns
        c = ros.client
        self.srv = c.create_client(Ask, f"{ns}/ask")
        self.action = ActionClient(c, AskAction, f"{ns}/ask_stream")
        self.change = c.create_client(ChangeState, f"{ns}/infinipot_assistant/change_state")
        self.statuses: list = []
        self.status_sub = c.create_subscription(CacheStatus, f"{ns}/infinipot/status", self.statuses.append,
                                                STATUS_QOS)
        ros.executor.add_node(node)
        assert self.srv.wait_for_service(timeout_sec=10) and self.action.wait_for_server(timeout_sec=10)
        assert self.change.wait_for_service(timeout_sec=10)

    def transition(self, tid: int) -> bool:
        return _result(self.change.call_async(ChangeState.Request(transition=Transition(id=tid)))).success

    def ask(self, transport: str, **fields):
        """(code, response) over the service or the action; checks that success and code agree."""
        if transport == "service":
            req = Ask.Request()
            for k, v in fields.items():
                setattr(req, k, v)
            res = _result(self.srv.call_async(req))
        else:
            goal = AskAction.Goal()
            for k, v in fields.items():
                setattr(goal, k, v)
            handle = _result(self.action.send_goal_async(goal))
            assert handle.accepted
            out = _result(handle.get_result_async())
            res = out.result
            assert out.status == (GoalStatus.STATUS_SUCCEEDED if res.success else GoalStatus.STATUS_ABORTED), \
                (out.status, res.error)
        code = res.error.partition(":")[0]
        assert res.success == (res.error == ""), res.error
        assert "Traceback" not in res.error and "\n" not in res.error, res.error
        if not res.success:
            assert res.answer == "" and res.generated_tokens == 0
        return code, res

    def close(self):
        c = self.ros.client
        self.node.shutdown()
        self.ros.executor.remove_node(self.node)
        self.node.destroy_node()
        # ActionClient.destroy() while the executor thread walks the client node's waitables kills that
        # thread (AttributeError: no '_lock'): destroyed by Ros.close once the executor stopped
        if self.action not in self.ros.retired_actions:
            self.ros.retired_actions.append(self.action)
        for x in (self.srv, self.change):
            c.destroy_client(x)
        c.destroy_subscription(self.status_sub)


@pytest.fixture(scope="module")
def ros():
    r = Ros()
    try:
        yield r
    finally:
        r.close()


def _engine(tiny_adapter, tiny_model_dir, **overrides):
    cfg = dict(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28, policy="infinipot_v",
               max_vision_tokens=200, frame_rate_hz=0.0, max_new_tokens=MAX_NEW, max_pending_asks=2)
    cfg.update(overrides)
    return StreamingAssistant(EngineConfig(**cfg), adapter=tiny_adapter)


def _node(ns, engine=None, **params):
    overrides = [Parameter("stream.image_topics", value=[CAM]), Parameter("status.period_s", value=0.2)]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    return AssistantNode(engine=engine, namespace=ns, parameter_overrides=overrides)


@pytest.fixture(scope="module")
def active(ros, tiny_adapter, tiny_model_dir):
    """An active node with 4 frames (2 chunks) of CAM in its cache, stamped T0 .. T0 + 0.3 s."""
    h = Handle(ros, _node("/req_active", _engine(tiny_adapter, tiny_model_dir)), "/req_active")
    try:
        assert _wait(lambda: h.node._state is EngineState.READY, 30)
        for i in range(4):
            h.node._on_image(CAM, _image(_rgb(seed=i), T0 + i * 10**8))
            assert h.node._worker.wait_idle(30)
        assert h.node.stats().frames.ingested == 4
        yield h
    finally:
        h.close()


def _t(ns: int) -> Time:
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


ROBOTS = "\U0001F916" * 70  # 70 characters, 280 byte-level tokens: over max_question_tokens (256)

#: (id, request fields, code, a piece of the detail)
BAD = [
    ("empty", {"question": ""}, "BAD_REQUEST", "empty"),
    ("whitespace", {"question": " \t\n  "}, "BAD_REQUEST", "empty"),
    ("short-but-many-tokens", {"question": ROBOTS}, "BAD_REQUEST", "tokens, more than max_question_tokens=256"),
    ("long-many-tokens", {"question": "a b " * 900}, "BAD_REQUEST", "is 1800 tokens"),
    ("over-char-limit", {"question": "x" * (MAX_QUESTION_CHARS + 1)}, "BAD_REQUEST", "characters"),
    ("since-after-until", {"question": "what?", "since": _t(T0 + 3 * 10**8), "until": _t(T0 + 10**8)},
     "BAD_REQUEST", "is after until"),
    ("window-after-frames", {"question": "what?", "since": _t(T0 + 10**12), "until": _t(T0 + 2 * 10**12)},
     "NO_FRAMES", "window"),
    ("window-before-frames", {"question": "what?", "until": _t(T0 - 10**9)}, "NO_FRAMES", "window"),
    ("window-between-chunks", {"question": "what?", "since": _t(T0 + 10**8 + 1), "until": _t(T0 + 2 * 10**8 - 1)},
     "NO_FRAMES", "window"),
    ("unknown-camera", {"question": "what?", "camera_ids": ["/nope/image_raw"]}, "BAD_REQUEST", "unknown camera"),
    ("known-and-unknown-camera", {"question": "what?", "camera_ids": [CAM, OTHER]}, "BAD_REQUEST", OTHER),
    ("max-new-tokens-over", {"question": "what?", "max_new_tokens": MAX_NEW + 1}, "BAD_REQUEST", "max_new_tokens"),
    ("max-new-tokens-uint32-max", {"question": "what?", "max_new_tokens": 2**32 - 1}, "BAD_REQUEST",
     "max_new_tokens"),
    ("negative-since", {"question": "what?", "since": Time(sec=-5)}, "BAD_REQUEST", "negative time window"),
    ("negative-until", {"question": "what?", "until": Time(sec=-1, nanosec=5)}, "BAD_REQUEST", "negative"),
    ("nanosec-overflow", {"question": "what?", "since": Time(sec=1, nanosec=2_000_000_000)}, "BAD_REQUEST",
     "nanosec"),
    ("negative-timeout", {"question": "what?", "timeout_s": -1.0}, "BAD_REQUEST", "timeout_s"),
    ("inf-timeout", {"question": "what?", "timeout_s": math.inf}, "BAD_REQUEST", "timeout_s"),
    ("nan-timeout", {"question": "what?", "timeout_s": math.nan}, "BAD_REQUEST", "timeout_s"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fields, code, detail", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(active, transport, fields, code, detail):
    engine = active.node._engine
    before = engine.cache.state_dict()
    got, res = active.ask(transport, **fields)
    assert got == code, res.error
    assert detail in res.error, res.error
    assert res.latency_s >= 0
    after = engine.cache.state_dict()
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)  # nothing was written
    ok_code, ok = active.ask(transport, question="What is there?", max_new_tokens=2)
    assert ok_code == "" and ok.success and ok.frames_in_context == 4 and ok.generated_tokens >= 1


def test_nul_in_a_question_is_cut_by_the_wire(active):
    """ROS strings end at a NUL byte: "what\\x00 else" arrives as "what" (a good question). The engine
    refuses a NUL itself (CLI, Python callers): BAD_REQUEST."""
    from infinipot_ros.engine import AskError

    for transport in TRANSPORTS:
        code, res = active.ask(transport, question="what\x00 else", max_new_tokens=1)
        assert code == "" and res.success
    with pytest.raises(AskError, match="NUL") as err:
        active.node._engine.ask("what\x00 else")
    assert err.value.code.value == "BAD_REQUEST"


def test_negative_max_new_tokens_cannot_be_sent(active):
    """max_new_tokens is uint32: rclpy refuses to serialize -1 (the client raises), so it never reaches
    the node; the node goes on answering."""
    for send, msg in ((active.srv.call_async, Ask.Request(question="what?")),
                      (active.action.send_goal_async, AskAction.Goal(question="what?"))):
        msg.max_new_tokens = -1  # accepted on assignment unless ROS_PYTHON_CHECK_FIELDS is set
        with pytest.raises((OverflowError, SystemError, AssertionError)):
            send(msg)
    for transport in TRANSPORTS:
        assert active.ask(transport, question="still there?", max_new_tokens=1)[0] == ""


def test_good_requests_at_the_limits(active):
    """The edges that are allowed: max_new_tokens == limit, a window on one chunk, timeout 0 (= default),
    a question of exactly max_question_tokens tokens."""
    for transport in TRANSPORTS:
        code, res = active.ask(transport, question="What?", max_new_tokens=MAX_NEW)
        assert code == "" and res.generated_tokens <= MAX_NEW
        code, res = active.ask(transport, question="What?", since=_t(T0), until=_t(T0 + 10**8), max_new_tokens=1)
        assert code == "" and res.frames_in_context == 2
        assert (res.oldest_frame_stamp.sec, res.oldest_frame_stamp.nanosec) == divmod(T0, 10**9)
        code, res = active.ask(transport, question="\U0001F916" * 64, max_new_tokens=1)  # 256 tokens
        assert code == "", res.error


def test_bad_requests_are_refused_even_when_the_queue_is_full(active):
    """Checks that need no model run before queueing: with the worker held inside an answer and
    ask.max_pending (2) questions waiting, a bad request is still BAD_REQUEST (not BUSY or TIMEOUT),
    a good one is BUSY, and the held and waiting ones are answered once the worker goes on."""
    engine, worker = active.node._engine, active.node._worker
    engine._lock.acquire()  # the answer in hand blocks on the engine lock: questions pile up
    try:
        futs = [active.srv.call_async(Ask.Request(question="q0?", max_new_tokens=1))]
        assert _wait(lambda: worker._current is not None, 10)
        futs += [active.srv.call_async(Ask.Request(question=f"q{i}?", max_new_tokens=1)) for i in (1, 2)]
        assert _wait(lambda: worker.depths()["asks"] == 2, 10)
        for fields in ({"question": ""}, {"question": "x", "max_new_tokens": MAX_NEW + 1},
                       {"question": "x", "timeout_s": -2.0}, {"question": "x", "until": Time(sec=-3)}):
            for transport in TRANSPORTS:
                code, res = active.ask(transport, **fields)
                assert code == "BAD_REQUEST", res.error
        code, res = active.ask("service", question="one more?")
        assert code == "BUSY" and "ask.max_pending=2" in res.error, res.error
    finally:
        engine._lock.release()
    assert [_result(f).error for f in futs] == ["", "", ""]


def test_no_traceback_in_the_log(active, capfd):
    capfd.readouterr()
    for _, fields, code, _ in BAD:
        for transport in TRANSPORTS:
            assert active.ask(transport, **fields)[0] == code
    out = capfd.readouterr()
    assert "Traceback" not in out.err + out.out


def test_before_ready_loading_inactive_and_failed(ros, tiny_adapter, tiny_model_dir, monkeypatch):
    """unconfigured -> MODEL_ERROR; loading -> MODEL_ERROR ("loading"), status LOADING; inactive (model up,
    no frames) -> NO_FRAMES and then answers; a node whose model failed to load -> MODEL_ERROR with the reason."""
    loading, release = threading.Event(), threading.Event()

    def slow_engine(config):  # the real engine, after a load that takes as long as the test wants
        loading.set()
        assert release.wait(60)
        return StreamingAssistant(config, adapter=tiny_adapter)

    monkeypatch.setattr(node_module, "StreamingAssistant", slow_engine)
    h = Handle(ros, _node("/req_lc", **{"autostart": False, "model.id": tiny_model_dir, "model.device": "cpu",
                                        "model.dtype": "float32", "model.max_pixels": 64 * 28 * 28,
                                        "cache.max_vision_tokens": 200, "ask.max_new_tokens": MAX_NEW,
                                        "stream.frame_rate_hz": 0.0}), "/req_lc")
    try:
        for transport in TRANSPORTS:
            code, res = h.ask(transport, question="anyone?")
            assert code == "MODEL_ERROR" and "no model loaded (state unconfigured)" in res.error, res.error
        # a bad request is BAD_REQUEST whatever the state
        assert h.ask("service", question="")[0] == "BAD_REQUEST"
        result: list = []
        t = threading.Thread(target=lambda: result.append(h.transition(Transition.TRANSITION_CONFIGURE)))
        t.start()
        assert loading.wait(30)
        assert _wait(lambda: h.statuses and h.statuses[-1].state == CacheStatus.STATE_LOADING, 10)
        for transport in TRANSPORTS:
            code, res = h.ask(transport, question="loading?")
            assert code == "MODEL_ERROR" and "model is loading" in res.error, res.error
        release.set()
        t.join(60)
        assert result == [True]
        assert _wait(lambda: h.statuses[-1].state == CacheStatus.STATE_INACTIVE, 10)
        for transport in TRANSPORTS:  # inactive: the model answers, the memory is empty
            code, res = h.ask(transport, question="inactive?")
            assert code == "NO_FRAMES" and "no frames ingested yet" in res.error, res.error
        assert h.transition(Transition.TRANSITION_ACTIVATE)
        for i in range(2):
            h.node._on_image(CAM, _image(_rgb(seed=i), T0 + i * 10**8))
            assert h.node._worker.wait_idle(30)
        assert h.node.stats().frames.ingested == 2, h.node.stats().frames
        for transport in TRANSPORTS:
            code, res = h.ask(transport, question="now?", max_new_tokens=2)
            assert code == "" and res.frames_in_context == 2
    finally:
        release.set()
        h.close()
    monkeypatch.undo()
    # a model that failed to load: asks say why
    h = Handle(ros, _node("/req_failed", **{"model.id": "/nonexistent/infinipot/model", "model.device": "cpu"}),
               "/req_failed")
    try:
        assert _wait(lambda: h.node._state is EngineState.ERROR, 30), h.node._state
        for transport in TRANSPORTS:
            code, res = h.ask(transport, question="hello?")
            assert code == "MODEL_ERROR" and "model load failed" in res.error, res.error
            assert "/nonexistent/infinipot/model" in res.error, res.error
    finally:
        h.close()
