"""Faults (issue 9, item 6): a model that fails to load, an exception inside ingestion or compression,
out of memory while ingesting, shutdown during an answer.

Real rclpy nodes and clients, the real tiny model; faults are injected by wrapping one method of
the running engine's adapter or policy to raise once (the component itself runs for every other
call). After each fault the cache is compared with its state before the failed frame pair
(``CappedKVCache.state_dict``: K/V, token ids, value norms, chunk table) and the stream goes on.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import rclpy
import torch
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from infinipot_ros.action import Ask as AskAction
from infinipot_ros.engine import EngineConfig, EngineState, IngestStatus, StreamingAssistant
from infinipot_ros.engine.stats import ENGINE_REJECT_REASONS
from infinipot_ros.msg import CacheStatus
from infinipot_ros.ros.node import STATUS_QOS, AssistantNode
from infinipot_ros.ros.stamps import ns_to_time
from infinipot_ros.ros.status import REASON_ORDER
from infinipot_ros.srv import Ask

pytestmark = pytest.mark.ros

CAM = "/fault_cam/image_raw"
T0 = 1_700_000_000 * 10**9


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


def _rgb(seed, h=56, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _image(frame, stamp_ns):
    msg = Image(encoding="rgb8", height=frame.shape[0], width=frame.shape[1], step=frame.shape[1] * 3)
    msg.data = frame.tobytes()
    msg.header.stamp = ns_to_time(stamp_ns)
    return msg


def _state(engine):
    state = engine.cache.state_dict()
    state["pending"] = {c: (f.copy(), s) for c, (f, s) in engine._pending.items()}
    return state


def _same_state(a, b):
    if a.keys() != b.keys():
        return False
    for k, t in a.items():
        if k == "pending":
            if t.keys() != b[k].keys() or any(s != b[k][c][1] or not np.array_equal(f, b[k][c][0])
                                              for c, (f, s) in t.items()):
                return False
        elif not torch.equal(t, b[k]):
            return False
    return True


class Ros:
    def __init__(self):
        rclpy.init()
        self.executor = MultiThreadedExecutor(num_threads=6)
        self.client = rclpy.create_node("infinipot_faults_client")
        self.statuses: dict = {}
        self.diagnostics: list = []
        self.client.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
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


@pytest.fixture(scope="module")
def ros():
    r = Ros()
    try:
        yield r
    finally:
        r.close()


class Handle:
    def __init__(self, ros, node, ns):
        self.ros, self.node, self.ns = ros, node, ns
        c = ros.client
        self.srv = c.create_client(Ask, f"{ns}/ask")
        self.action = ActionClient(c, AskAction, f"{ns}/ask_stream")
        self.statuses: list = []
        self.sub = c.create_subscription(CacheStatus, f"{ns}/infinipot/status", self.statuses.append, STATUS_QOS)
        ros.executor.add_node(node)
        assert self.srv.wait_for_service(timeout_sec=10) and self.action.wait_for_server(timeout_sec=10)
        self.closed = False

    def ask(self, transport, **fields):
        if transport == "service":
            return _result(self.srv.call_async(Ask.Request(**fields)))
        handle = _result(self.action.send_goal_async(AskAction.Goal(**fields)))
        out = _result(handle.get_result_async())
        assert out.status == (GoalStatus.STATUS_SUCCEEDED if out.result.success else GoalStatus.STATUS_ABORTED)
        return out.result

    def feed(self, seed, stamp_ns):
        self.node._on_image(CAM, _image(_rgb(seed), stamp_ns))
        assert self.node._worker.wait_idle(30)

    def close(self):
        c = self.ros.client
        if not self.closed:
            self.node.shutdown()
            self.ros.executor.remove_node(self.node)
            self.node.destroy_node()
        # ActionClient.destroy() while the executor thread walks the client node's waitables kills that
        # thread (AttributeError: no '_lock'): destroyed by Ros.close once the executor stopped
        if self.action not in self.ros.retired_actions:
            self.ros.retired_actions.append(self.action)
        c.destroy_client(self.srv)
        c.destroy_subscription(self.sub)


def _engine(tiny_adapter, tiny_model_dir, **overrides):
    cfg = dict(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28, policy="infinipot_v",
               max_vision_tokens=20, frame_rate_hz=0.0, max_new_tokens=64)
    cfg.update(overrides)
    return StreamingAssistant(EngineConfig(**cfg), adapter=tiny_adapter)


def _node(ns, engine=None, context=None, **params):
    overrides = [Parameter("stream.image_topics", value=[CAM]), Parameter("status.period_s", value=0.2)]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    return AssistantNode(engine=engine, namespace=ns, parameter_overrides=overrides, context=context)


@pytest.fixture()
def running(ros, tiny_adapter, tiny_model_dir, request):
    """An active node on the tiny model with 2 chunks (4 frames, 8 vision tokens, M=20) of CAM cached."""
    overrides = getattr(request, "param", {})
    h = Handle(ros, _node("/fault_run", _engine(tiny_adapter, tiny_model_dir, **overrides)), "/fault_run")
    try:
        assert _wait(lambda: h.node._state is EngineState.READY, 30)
        h.stamp = T0
        for i in range(4):
            h.feed(i, h.stamp)
            h.stamp += 10**8
        assert h.node.stats().frames.ingested == 4
        yield h
    finally:
        h.close()


# ---------------------------------------------------------------- model load
def _missing(tmp_path):
    return str(tmp_path / "no-such-model"), "no-such-model"


def _bert(tmp_path):
    d = tmp_path / "bert-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    return str(d), "model family 'bert'"


def _corrupt(tmp_path, tiny_model_dir):
    d = tmp_path / "tiny-corrupt"
    shutil.copytree(tiny_model_dir, d)
    weights = d / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # cut in the middle of the tensors
    return str(d), "SafetensorError"


@pytest.mark.parametrize("make", [_missing, _bert, _corrupt], ids=["missing-path", "wrong-family", "truncated-safetensors"])
def test_model_load_failure_is_state_error_and_asks_answer_model_error(ros, tmp_path, tiny_model_dir, make):
    path, why = make(tmp_path) if make is not _corrupt else make(tmp_path, tiny_model_dir)
    ns = "/fault_load"
    h = Handle(ros, _node(ns, **{"model.id": path, "model.device": "cpu", "model.dtype": "float32"}), ns)
    ros.diagnostics.clear()
    try:
        assert _wait(lambda: h.node._state is EngineState.ERROR, 60), h.node._state
        assert _wait(lambda: h.statuses and h.statuses[-1].state == CacheStatus.STATE_ERROR, 10)
        st = h.statuses[-1]
        assert st.error_message.startswith("model load failed: ") and why in st.error_message, st.error_message
        assert st.model_id == path and st.tokens_in_cache == 0

        def error_diag():
            for arr in list(ros.diagnostics):
                for s in arr.status:
                    if s.name.startswith(f"{ns.strip('/')}") or "infinipot_assistant" in s.name:
                        if s.level == DiagnosticStatus.ERROR and why in s.message:
                            return s
            return None

        assert _wait(lambda: error_diag() is not None, 10), [s.message for a in ros.diagnostics for s in a.status]
        for transport in ("service", "action"):
            res = h.ask(transport, question="what do you see?")
            assert not res.success and res.error.startswith("MODEL_ERROR: model load failed") and why in res.error
        assert h.node._worker is None and h.node._engine is None  # nothing half-loaded kept
    finally:
        h.close()


# -------------------------------------------------------------- ingestion
def _inject_once(monkeypatch, obj, name, exc):
    """Make obj.name raise exc on its next call only; returns the list of calls that raised."""
    real = getattr(obj, name)
    raised = []

    def once(*args, **kwargs):
        if not raised:
            raised.append(name)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, once)
    return raised


def _fault_pair(h, monkeypatch, obj, name, exc, *, compresses):
    """Feed one frame pair with ``obj.name`` raising once inside it: the pair is rejected, the cache is
    exactly as before the pair, and the next pair ingests (compressing when ``compresses``)."""
    engine = h.node._engine
    if CAM in engine._pending:  # start from a complete pair
        h.feed(99, h.stamp)
        h.stamp += 10**8
    will_compress = engine.cache.vision_length + 4 > engine.cache.max_vision_tokens
    assert will_compress == compresses, (engine.cache.vision_length, engine.cache.max_vision_tokens)
    h.feed(10, h.stamp)  # first of the pair: buffered
    before, counters = _state(engine), engine.counters
    compressions = engine.cache.compressions
    raised = _inject_once(monkeypatch, obj, name, exc)
    h.feed(11, h.stamp + 10**8)
    assert raised == [name]
    after = engine.counters
    assert after.ingested == counters.ingested
    before["pending"] = {}  # the pair was consumed (and dropped)
    assert _same_state(before, _state(engine))
    assert engine.cache.compressions == compressions
    h.feed(12, h.stamp + 2 * 10**8)  # the stream goes on: a new pair
    h.feed(13, h.stamp + 3 * 10**8)
    h.stamp += 4 * 10**8
    assert engine.counters.ingested == after.ingested + 2
    assert engine.cache.compressions == compressions + (1 if compresses else 0)
    assert engine.cache.vision_length <= engine.cache.max_vision_tokens
    for transport in ("service", "action"):
        res = h.ask(transport, question="What is there?", max_new_tokens=2)
        assert res.success, res.error
    return {r: after.rejected_by_reason.get(r, 0) - counters.rejected_by_reason.get(r, 0)
            for r in after.rejected_by_reason if after.rejected_by_reason.get(r, 0) != counters.rejected_by_reason.get(r, 0)}


def _status_counts(h):
    assert _wait(lambda: h.statuses, 5)
    h.node.publish_status()
    time.sleep(0.2)
    last = h.statuses[-1]
    return dict(zip(last.rejected_reasons, last.rejected_counts)), last


def test_exception_in_vision_encoding_drops_the_pair(running, monkeypatch):
    adapter = running.node._engine.adapter
    delta = _fault_pair(running, monkeypatch, adapter, "encode_patch", RuntimeError("injected encode fault"),
                        compresses=False)
    assert delta == {"model_error": 2}
    counts, last = _status_counts(running)
    assert counts == {"model_error": 2} and last.frames_rejected == 2
    assert dict(zip(last.cameras[0].rejected_reasons, last.cameras[0].rejected_counts)) == {"model_error": 2}


def test_exception_in_prefill_drops_the_pair(running, monkeypatch):
    adapter = running.node._engine.adapter
    delta = _fault_pair(running, monkeypatch, adapter, "prefill_patch", ValueError("injected prefill fault"),
                        compresses=False)
    assert delta == {"model_error": 2}


def test_exception_in_compression_takes_the_chunk_out_again(running, monkeypatch):
    """The cache compresses right after committing a chunk: a policy error there must not leave the
    chunk in the cache over the cap (it is taken out: K/V, ids, norms, table as before the pair)."""
    engine = running.node._engine
    running.feed(4, running.stamp)  # 3 chunks: 12 tokens; one more makes 16, the next 20: fill to M
    running.feed(5, running.stamp + 10**8)
    running.feed(6, running.stamp + 2 * 10**8)
    running.feed(7, running.stamp + 3 * 10**8)
    running.stamp += 4 * 10**8
    assert engine.cache.vision_length == 16 and engine.cache.compressions == 0
    running.feed(8, running.stamp)
    running.feed(9, running.stamp + 10**8)
    running.stamp += 2 * 10**8
    assert engine.cache.vision_length == 20  # at M: the next chunk compresses
    delta = _fault_pair(running, monkeypatch, engine.policy, "score", RuntimeError("injected policy fault"),
                        compresses=True)
    assert delta == {"model_error": 2}


@pytest.mark.parametrize("running", [{"layers_per_pass": 1}], indirect=True)
def test_exception_in_the_first_pass_of_a_multi_pass_compression_takes_the_chunk_out(running, monkeypatch):
    """Nothing is written before the first pass picks its tokens: the pair is undone exactly."""
    engine = running.node._engine
    assert engine.cache.layers_per_pass == 1 < engine.cache.num_layers
    while engine.cache.vision_length + 4 <= engine.cache.max_vision_tokens:
        running.feed(40, running.stamp)
        running.feed(41, running.stamp + 10**8)
        running.stamp += 2 * 10**8
    delta = _fault_pair(running, monkeypatch, engine.policy, "score", RuntimeError("injected fault in pass 0"),
                        compresses=True)
    assert delta == {"model_error": 2}


@pytest.mark.parametrize("running", [{"layers_per_pass": 1}], indirect=True)
def test_exception_in_a_later_pass_of_a_multi_pass_compression_restarts_the_stream(running, monkeypatch):
    """Once a pass compacted its layers they cannot be restored: the stream restarts (memory forgotten,
    PartialCompressionError), the pair is counted, the node goes on."""
    engine = running.node._engine
    assert engine.cache.layers_per_pass == 1 < engine.cache.num_layers
    while engine.cache.vision_length + 4 <= engine.cache.max_vision_tokens:
        running.feed(40, running.stamp)
        running.feed(41, running.stamp + 10**8)
        running.stamp += 2 * 10**8
    before = engine.counters
    real_score, calls = engine.policy.score, []

    def second_pass_fails(*args, **kwargs):
        calls.append(kwargs.get("layers"))
        if len(calls) == 2:
            raise RuntimeError("injected fault in pass 1")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(engine.policy, "score", second_pass_fails)
    running.feed(50, running.stamp)
    running.feed(51, running.stamp + 10**8)
    running.stamp += 2 * 10**8
    assert engine.counters.rejected_by_reason.get("model_error", 0) == before.rejected_by_reason.get("model_error", 0) + 2
    assert calls[:2] == [[0], [1]]  # layer 0 was compacted when layer 1's pass failed
    assert len(engine.cache.table) == 0 and engine.cache.vision_length == 0  # forgotten, not corrupt
    monkeypatch.setattr(engine.policy, "score", real_score)
    running.feed(52, running.stamp)
    running.feed(53, running.stamp + 10**8)
    assert len(engine.cache.table) == 1
    assert running.ask("service", question="What now?", max_new_tokens=2).success


@pytest.mark.parametrize("exc_type", [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError, MemoryError],
                         ids=["torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "MemoryError"])
@pytest.mark.parametrize("where", ["encode_patch", "prefill_patch", "score"])
def test_out_of_memory_while_ingesting_drops_the_pair_and_keeps_running(running, monkeypatch, exc_type, where):
    engine = running.node._engine
    obj = engine.policy if where == "score" else engine.adapter
    if where == "score":  # fill to M so that the faulty pair compresses
        while engine.cache.vision_length + 4 <= engine.cache.max_vision_tokens:
            running.feed(60, running.stamp)
            running.feed(61, running.stamp + 10**8)
            running.stamp += 2 * 10**8
    freed = []
    monkeypatch.setattr("infinipot_ros.engine.assistant.free_device_memory", lambda device: freed.append(device))
    delta = _fault_pair(running, monkeypatch, obj, where,
                        exc_type("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"), compresses=where == "score")
    assert delta == {"out_of_memory": 2}
    assert freed == [engine.adapter.device]  # the engine gave cached device memory back (empty_cache on CUDA)
    counts, _ = _status_counts(running)
    assert counts == {"out_of_memory": 2}
    assert running.node._state is EngineState.READY


def test_out_of_memory_while_answering_is_model_error(running, monkeypatch):
    engine = running.node._engine
    before = _state(engine)
    _inject_once(monkeypatch, engine.adapter, "generate", torch.OutOfMemoryError("CUDA out of memory (injected)"))
    for transport, ok in (("service", False), ("action", True)):
        res = running.ask(transport, question="What is there?", max_new_tokens=2)
        assert res.success == ok, res.error
        if not ok:
            assert res.error.startswith("MODEL_ERROR: out of memory while answering")
    assert _same_state(before, _state(engine))


def test_reasons_include_out_of_memory_in_the_status_order():
    assert "out_of_memory" in ENGINE_REJECT_REASONS
    assert REASON_ORDER.index("out_of_memory") > REASON_ORDER.index("model_error")


# ---------------------------------------------------------------- shutdown
@pytest.mark.parametrize("how", ["destroy_node", "rclpy_shutdown"])
def test_shutdown_during_an_answer_is_clean(tiny_adapter, tiny_model_dir, how, capfd, monkeypatch):
    """A goal decoding a long answer when the node is shut down: the answer stops at its next token,
    shutdown and destroy return in bounded time, no exception, no thread left behind."""
    ctx = rclpy.Context()  # its own context: the module's stays up
    rclpy.init(context=ctx)
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    engine = _engine(tiny_adapter, tiny_model_dir, max_new_tokens=4000, max_vision_tokens=200)
    monkeypatch.setattr(tiny_adapter, "eos_ids", set())  # the answer runs to max_new_tokens (about a minute)
    node = _node("/fault_down", engine, context=ctx)
    client = rclpy.create_node("infinipot_fault_down_client", context=ctx)
    action = ActionClient(client, AskAction, "/fault_down/ask_stream")
    srv = client.create_client(Ask, "/fault_down/ask")
    executor.add_node(node)
    executor.add_node(client)
    errors: list = []

    def spin():
        try:
            executor.spin()
        except Exception as exc:  # an exception escaping a callback ends spin(): that is the bug
            errors.append(exc)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: node._state is EngineState.READY, 30)
        for i in range(4):
            node._on_image(CAM, _image(_rgb(i), T0 + i * 10**8))
            assert node._worker.wait_idle(30)
        assert action.wait_for_server(timeout_sec=10) and srv.wait_for_service(timeout_sec=10)
        feedback: list = []
        goal = AskAction.Goal(question="Describe everything in detail, forever.", max_new_tokens=4000, timeout_s=300.0)
        handle = _result(action.send_goal_async(goal, feedback_callback=feedback.append))
        result_future = handle.get_result_async()
        assert _wait(lambda: len(feedback) >= 3, 60), "the answer did not start"
        waiting = srv.call_async(Ask.Request(question="and me?", timeout_s=300.0))
        assert _wait(lambda: node._worker.depths()["asks"] == 1, 10), (node._worker.depths(), waiting.done(),
                                                                        result_future.done(), len(feedback))
        worker_thread = node._worker._thread
        capfd.readouterr()
        t0 = time.monotonic()
        node.shutdown()
        assert not worker_thread.is_alive()
        assert _wait(result_future.done, 10)  # the goal ended (aborted, BUSY) instead of decoding on
        res = result_future.result()
        assert res.status == GoalStatus.STATUS_ABORTED and res.result.error.startswith("BUSY: assistant is shutting down")
        assert _wait(waiting.done, 10) and waiting.result().error.startswith("BUSY")
        if how == "rclpy_shutdown":
            rclpy.shutdown(context=ctx)
            executor.shutdown(timeout_sec=10)
            node.destroy_node()
        else:
            executor.remove_node(node)
            node.destroy_node()
        elapsed = time.monotonic() - t0
        assert elapsed < 15, elapsed
        assert node._engine is None and node._worker is None
        assert not errors, errors
        out = capfd.readouterr()
        assert "Traceback" not in out.err and "Exception" not in out.err, out.err[-3000:]
    finally:
        if rclpy.ok(context=ctx):
            executor.shutdown(timeout_sec=10)
            action.destroy()
            client.destroy_node()
            rclpy.shutdown(context=ctx)
        thread.join(10)
    assert not thread.is_alive()


def test_shutdown_while_a_goal_runs_then_destroy_without_waiting(tiny_adapter, tiny_model_dir, monkeypatch):
    """destroy_node right away (no shutdown first), with a goal decoding: bounded and clean."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    monkeypatch.setattr(tiny_adapter, "eos_ids", set())  # the answer runs to max_new_tokens (about a minute)
    node = _node("/fault_destroy", _engine(tiny_adapter, tiny_model_dir, max_new_tokens=4000, max_vision_tokens=200),
                 context=ctx)
    client = rclpy.create_node("infinipot_fault_destroy_client", context=ctx)
    action = ActionClient(client, AskAction, "/fault_destroy/ask_stream")
    executor.add_node(node)
    executor.add_node(client)
    errors: list = []

    def spin():
        try:
            executor.spin()
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: node._state is EngineState.READY, 30)
        for i in range(2):
            node._on_image(CAM, _image(_rgb(i), T0 + i * 10**8))
            assert node._worker.wait_idle(30)
        assert action.wait_for_server(timeout_sec=10)
        feedback: list = []
        handle = _result(action.send_goal_async(AskAction.Goal(question="Talk.", max_new_tokens=4000),
                                                feedback_callback=feedback.append))
        assert _wait(lambda: feedback, 60)
        t0 = time.monotonic()
        executor.remove_node(node)
        node.destroy_node()
        assert time.monotonic() - t0 < 15
        assert not errors, errors
    finally:
        executor.shutdown(timeout_sec=10)
        action.destroy()
        client.destroy_node()
        rclpy.shutdown(context=ctx)
        thread.join(10)
    assert not thread.is_alive() and not errors
