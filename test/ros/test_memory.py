"""Memory that survives a restart, over real rclpy: save_memory, a new node from the snapshot, the same logits."""
from __future__ import annotations

import os
import threading
import time

import pytest
import rclpy
import torch
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from infinipot_ros.engine import EngineConfig, StreamingAssistant
from infinipot_ros.msg import CacheStatus
from infinipot_ros.ros.node import STATUS_QOS, AssistantNode
from infinipot_ros.srv import Ask, SaveMemory
from infinipot_ros.tools.replay import rgb_to_image_msg

CAM = "/mem_cam/image_raw"
QUESTION = "What happened in the scene?"


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


class Running:
    """One node (fresh engine on the shared tiny model) + a client, spun on one executor thread."""

    def __init__(self, adapter, model_dir, snapshot_path, **cfg):
        cfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                           policy="infinipot_v", max_vision_tokens=120, frame_rate_hz=0, max_new_tokens=16,
                           snapshot_path=snapshot_path, **cfg)
        self.node = AssistantNode(engine=StreamingAssistant(cfg, adapter=adapter), parameter_overrides=[
            Parameter("stream.image_topics", value=[CAM]), Parameter("status.period_s", value=0.2)])
        self.client = rclpy.create_node("infinipot_memory_client")
        self.statuses: list = []
        self.client.create_subscription(CacheStatus, "/infinipot/status", self.statuses.append, STATUS_QOS)
        self.pub = self.client.create_publisher(Image, CAM, qos_profile_sensor_data)
        self.ask = self.client.create_client(Ask, "/ask")
        self.save = self.client.create_client(SaveMemory, "/save_memory")
        self.executor = MultiThreadedExecutor(num_threads=4)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        assert self.save.wait_for_service(timeout_sec=10) and self.ask.wait_for_service(timeout_sec=10)
        assert _wait(lambda: self.node._engine is not None and self.node._ingesting, 30)

    def close(self):
        self.node.shutdown()
        self.executor.shutdown()
        self.node.destroy_node()
        self.client.destroy_node()
        self.thread.join(5)


@pytest.fixture()
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


def _logits(engine, question=QUESTION):
    """[n, vocab] logits of the question prefilled on the engine's cache (the cache is unchanged)."""
    adapter, cache = engine.adapter, engine.cache
    ids = adapter.question_ids(question)
    start = adapter.next_text_position(cache)
    with torch.inference_mode(), cache.scratch():
        embeds = adapter.model.get_input_embeddings()(torch.tensor(ids))
        pos = (torch.arange(len(ids)) + start).expand(3, -1)
        return adapter._forward(cache, embeds, pos, logits="all").clone()


def test_save_restart_same_logits(ros, tiny_adapter, tiny_model_dir, vtest_frames, tmp_path):
    frames, stamps = vtest_frames
    path = str(tmp_path / "memory" / "scene.safetensors")
    a = Running(tiny_adapter, tiny_model_dir, path)
    try:
        for f, s in zip(frames[:12], stamps[:12]):
            a.pub.publish(rgb_to_image_msg(f, s, "cam"))
            time.sleep(0.12)
        assert _wait(lambda: a.node.stats().frames.ingested == 12, 60), a.node.stats().frames
        assert a.node._worker.wait_idle(30)
        assert a.node._engine.cache.compressions >= 1
        res = _result(a.save.call_async(SaveMemory.Request(path="")))  # "" = cache.snapshot_path
        assert res.success and res.error == "" and res.path == os.path.abspath(path) and res.frames > 0
        before = _logits(a.node._engine)
        answer = _result(a.ask.call_async(Ask.Request(question=QUESTION, max_new_tokens=16)))
        assert answer.success
        assert _wait(lambda: a.statuses[-1].last_saved.sec > 0, 5)
    finally:
        a.close()

    b = Running(tiny_adapter, tiny_model_dir, path)  # a restarted node: configure loads the snapshot
    try:
        assert b.node._engine.memory_source.startswith("snapshot ") and f"({res.frames} frames)" in \
            b.node._engine.memory_source
        assert _wait(lambda: b.statuses and b.statuses[-1].memory_source.startswith("snapshot"), 5)
        assert torch.equal(_logits(b.node._engine), before)
        again = _result(b.ask.call_async(Ask.Request(question=QUESTION, max_new_tokens=16)))
        assert again.success and again.answer == answer.answer
        assert (again.frames_in_context, again.oldest_frame_stamp, again.newest_frame_stamp) == \
            (answer.frames_in_context, answer.oldest_frame_stamp, answer.newest_frame_stamp)
        # frames older than the restored memory are not mixed into it
        b.pub.publish(rgb_to_image_msg(frames[0], stamps[0], "cam"))
        time.sleep(0.3)
        assert b.node.stats().frames.ingested == 0 and torch.equal(_logits(b.node._engine), before)
    finally:
        b.close()


def test_refused_snapshot_starts_empty_and_says_so(ros, tiny_adapter, tiny_model_dir, vtest_frames, tmp_path):
    path = tmp_path / "scene.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a snapshot}")
    n = Running(tiny_adapter, tiny_model_dir, str(path))
    try:
        assert n.node._engine.memory_source.startswith("snapshot refused:")
        assert str(path) in n.node._engine.memory_source
        assert _wait(lambda: n.statuses and n.statuses[-1].memory_source.startswith("snapshot refused"), 5)
        assert n.statuses[-1].state == CacheStatus.STATE_READY and n.statuses[-1].vision_tokens == 0
        # a save request without any path configured or given is a bad request, not a traceback
        n.node._engine.config.snapshot_path = ""
        n.node.config.snapshot_path = ""
        res = _result(n.save.call_async(SaveMemory.Request(path="")))
        assert not res.success and res.error.startswith("BAD_REQUEST")
    finally:
        n.close()


def test_autosave_writes_the_snapshot_periodically(ros, tiny_adapter, tiny_model_dir, vtest_frames, tmp_path):
    frames, stamps = vtest_frames
    path = tmp_path / "auto.safetensors"
    n = Running(tiny_adapter, tiny_model_dir, str(path), autosave_s=0.3)
    try:
        for f, s in zip(frames[:4], stamps[:4]):
            n.pub.publish(rgb_to_image_msg(f, s, "cam"))
            time.sleep(0.12)
        assert _wait(lambda: n.node.stats().frames.ingested == 4, 60)
        from infinipot_ros.engine.snapshot import snapshot_info

        assert _wait(lambda: path.exists() and snapshot_info(str(path)).frames == 4, 10)
        assert not list(tmp_path.glob("*.tmp*"))  # atomic: no temporary file left behind
    finally:
        n.close()
