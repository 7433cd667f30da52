"""Hostile camera input (issue 9, item 2): every class has a documented outcome (docs/robustness.md),
a reason counter in CacheStatus / CameraStatus / diagnostics, a throttled log line, and a
rejected frame leaves the KV cache (K/V tensors, token ids, chunk table) exactly as it was.

Most classes go through the real node's image callback (``AssistantNode._on_image``, real
rclpy messages, real conversion, the real worker and tiny model) without DDS in between, so
each case is deterministic and fast; one test publishes hostile messages over DDS to the
running node and reads the CacheStatus arrays from the topic. Engine-only classes (NaN/inf
arrays, a model error inside prefill) call the engine directly.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np
import pytest
import rclpy
import torch
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from infinipot_ros.engine import EngineConfig, EngineState, FrameGate, GateDecision, IngestStatus, StreamingAssistant
from infinipot_ros.engine.stats import ENGINE_REJECT_REASONS, FrameRejectReason
from infinipot_ros.msg import CacheStatus
from infinipot_ros.ros import conversions as conv
from infinipot_ros.ros.node import STATUS_QOS, AssistantNode
from infinipot_ros.ros.stamps import ns_to_time
from infinipot_ros.ros.status import REASON_ORDER, rejected_arrays, to_cache_status, to_diagnostics
from infinipot_ros.srv import Ask

pytestmark = pytest.mark.ros

CAM = "/hostile_cam/image_raw"
CCAM = "/hostile_cam/image_raw/compressed"
UNSUBSCRIBED = "/hostile_cam/other/image_raw"
H, W = 56, 64  # every accepted frame has this size (a pair of them is one chunk)


# ------------------------------------------------------------------ the rig
def _wait(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


class Rig:
    """A running node on an injected engine (tiny model), its executor thread and a client node."""

    def __init__(self, node: AssistantNode, client, executor) -> None:
        self.node, self.client, self.executor = node, client, executor
        self.engine: StreamingAssistant = node._engine
        self.results: list = []  # every IngestResult the worker produced
        worker = node._worker
        original = worker.on_ingest

        def record(result):
            self.results.append(result)
            original(result)

        worker.on_ingest = record
        self.statuses: list = []
        client.create_subscription(CacheStatus, "/infinipot/status", self.statuses.append, STATUS_QOS)
        self.last_stamp = 0

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def newest_accepted(self) -> int:
        return max(self.engine.gate.last_stamp_ns(c) or 0 for c in (CAM, CCAM))

    def next_stamp(self) -> int:
        """A stamp after every one used so far, at the node clock (so neither stale nor future)."""
        self.last_stamp = max(self.now_ns(), self.last_stamp + 1_000_000, self.newest_accepted() + 1_000_000)
        return self.last_stamp

    def zero_stamp_image(self) -> Image:
        """A frame without a stamp, sent once the node clock (its receive time) is past every accepted stamp."""
        assert _wait(lambda: self.now_ns() > self.newest_accepted() + 1_000_000, 3)
        return _image(stamp_ns=0)

    def feed(self, camera: str, msg) -> None:
        """The node's own image callback, then wait for its worker."""
        self.node._on_image(camera, msg)
        assert self.node._worker.wait_idle(30)


@pytest.fixture(scope="module")
def rig(tiny_adapter, tiny_model_dir):
    rclpy.init()
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200, frame_rate_hz=0.0, time_jump_s=5.0)
    engine = StreamingAssistant(cfg, adapter=tiny_adapter)
    node = AssistantNode(engine=engine, parameter_overrides=[
        Parameter("stream.image_topics", value=[CAM, CCAM]),
        Parameter("status.period_s", value=0.2),
    ])
    client = rclpy.create_node("infinipot_hostile_client")
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    executor.add_node(client)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: node._state is EngineState.READY and node._worker is not None, 30), node._state
        r = Rig(node, client, executor)
        frame = _rgb()
        for _ in range(4):  # two chunks in the cache before any hostile input
            r.feed(CAM, _image(frame, r.next_stamp()))
        assert engine.counters.ingested == 4 and len(engine.cache.table) == 2
        yield r
    finally:
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        client.destroy_node()
        rclpy.shutdown()
        thread.join(5)


# ------------------------------------------------------------- message makers
def _rgb(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """A smooth RGB test frame [h, w, 3] uint8 (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _image(frame: Optional[np.ndarray] = None, stamp_ns: int = 0, *, encoding: str = "rgb8",
           height: Optional[int] = None, width: Optional[int] = None, step: Optional[int] = None,
           data: Optional[bytes] = None, bigendian: int = 0) -> Image:
    """A real sensor_msgs/Image; fields default to those of ``frame`` as rgb8."""
    frame = _rgb() if frame is None else frame
    msg = Image(encoding=encoding, is_bigendian=bigendian)
    msg.height = frame.shape[0] if height is None else height
    msg.width = frame.shape[1] if width is None else width
    msg.step = frame.shape[1] * 3 if step is None else step
    msg.data = frame.tobytes() if data is None else data
    msg.header.stamp = ns_to_time(stamp_ns)
    return msg


def _compressed(fmt: str, data: bytes, stamp_ns: int = 0) -> CompressedImage:
    msg = CompressedImage(format=fmt, data=data)
    msg.header.stamp = ns_to_time(stamp_ns)
    return msg


def _jpeg(frame: np.ndarray, gray: bool = False) -> bytes:
    img = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY if gray else cv2.COLOR_RGB2BGR)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def _padded(frame: np.ndarray, pad: int) -> bytes:
    rows = np.zeros((frame.shape[0], frame.shape[1] * 3 + pad), np.uint8)
    rows[:, : frame.shape[1] * 3] = frame.reshape(frame.shape[0], -1)
    rows[:, frame.shape[1] * 3:] = 0xAB  # padding bytes that must never show up in the pixels
    return rows.tobytes()


def _mono16(frame: np.ndarray, bigendian: bool) -> bytes:
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    return gray.astype(">u2" if bigendian else "<u2").tobytes()


def _rgb16(frame: np.ndarray, bigendian: bool) -> bytes:
    return (frame.astype(np.uint16) * 257).astype(">u2" if bigendian else "<u2").tobytes()


def _forged_png(width: int, height: int) -> bytes:
    data = bytearray(_png(_rgb(8, 8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


# ------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """One class of hostile input.

    make(rig) returns (camera topic, message); expected: "reject:<reason>" (counted under
    that reason, cache unchanged), "accept" (converted and handed to the engine), or
    "stamp_dropped" (the time-jump glitch rule: counted as frames_stamp_dropped).
    pixels: for accepted cases, the RGB the node must see (compared exactly).
    """

    name: str
    make: Callable
    expected: str
    pixels: Optional[Callable] = None


FRAME = _rgb()
GRAY_FRAME = np.repeat(cv2.cvtColor(FRAME, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
NAN = np.full((H, W), np.nan, np.float32)
INF = np.full((H, W, 3), np.inf, np.float64)
BIG = 2**31

CASES = [
    # --- encodings
    Case("unknown encoding", lambda r: (CAM, _image(encoding="RGB8", stamp_ns=r.next_stamp())), "reject:unsupported_encoding"),
    Case("unknown encoding yuv420", lambda r: (CAM, _image(encoding="yuv420", stamp_ns=r.next_stamp())), "reject:unsupported_encoding"),
    Case("empty encoding", lambda r: (CAM, _image(encoding="", stamp_ns=r.next_stamp())), "reject:unsupported_encoding"),
    Case("depth 16UC1", lambda r: (CAM, _image(encoding="16UC1", step=W * 2, data=bytes(H * W * 2), stamp_ns=r.next_stamp())),
         "reject:depth_image"),
    Case("generic 8UC2", lambda r: (CAM, _image(encoding="8UC2", step=W * 2, data=bytes(H * W * 2), stamp_ns=r.next_stamp())),
         "reject:depth_image"),
    Case("NaN in 32FC1", lambda r: (CAM, _image(encoding="32FC1", step=W * 4, data=NAN.tobytes(), stamp_ns=r.next_stamp())),
         "reject:float_image"),
    Case("inf in 64FC3", lambda r: (CAM, _image(encoding="64FC3", step=W * 24, data=INF.tobytes(), stamp_ns=r.next_stamp())),
         "reject:float_image"),
    # --- data length
    Case("data one byte short", lambda r: (CAM, _image(data=FRAME.tobytes()[:-1], stamp_ns=r.next_stamp())), "reject:truncated"),
    Case("data half", lambda r: (CAM, _image(data=FRAME.tobytes()[: H * W * 3 // 2], stamp_ns=r.next_stamp())), "reject:truncated"),
    Case("data empty", lambda r: (CAM, _image(data=b"", stamp_ns=r.next_stamp())), "reject:truncated"),
    Case("data longer", lambda r: (CAM, _image(data=FRAME.tobytes() + bytes(1000), stamp_ns=r.next_stamp())), "accept",
         lambda: FRAME),
    # --- step and sizes
    Case("step one byte too small", lambda r: (CAM, _image(step=W * 3 - 1, stamp_ns=r.next_stamp())), "reject:step_too_small"),
    Case("step zero", lambda r: (CAM, _image(step=0, stamp_ns=r.next_stamp())), "reject:step_too_small"),
    Case("row padding", lambda r: (CAM, _image(step=W * 3 + 13, data=_padded(FRAME, 13), stamp_ns=r.next_stamp())), "accept",
         lambda: FRAME),
    Case("step huge", lambda r: (CAM, _image(step=2**32 - 1, stamp_ns=r.next_stamp())), "reject:truncated"),
    Case("height zero", lambda r: (CAM, _image(height=0, data=b"", stamp_ns=r.next_stamp())), "reject:zero_size"),
    Case("width zero", lambda r: (CAM, _image(width=0, stamp_ns=r.next_stamp())), "reject:zero_size"),
    Case("2^31 rows declared", lambda r: (CAM, _image(height=BIG, stamp_ns=r.next_stamp())), "reject:truncated"),
    Case("2^32-1 columns declared", lambda r: (CAM, _image(encoding="mono8", width=2**32 - 1, height=1, step=2**32 - 1, stamp_ns=r.next_stamp())),
         "reject:truncated"),
    Case("odd width yuv422", lambda r: (CAM, _image(encoding="yuv422", width=W - 1, step=(W - 1) * 2, stamp_ns=r.next_stamp())),
         "reject:odd_size"),
    Case("odd height nv12", lambda r: (CAM, _image(encoding="nv12", height=H - 1, step=W, stamp_ns=r.next_stamp())),
         "reject:odd_size"),
    Case("tiny 8x8", lambda r: (CAM, _image(_rgb(8, 8), r.next_stamp())), "reject:frame_too_small"),
    Case("one row 1x4096", lambda r: (CAM, _image(_rgb(1, 4096), r.next_stamp())), "reject:frame_too_small"),
    Case("aspect 202:1 wide", lambda r: (CAM, _image(_rgb(28, 28 * 202), r.next_stamp())), "reject:aspect_ratio"),
    Case("aspect 1:202 tall", lambda r: (CAM, _image(_rgb(28 * 202, 28), r.next_stamp())), "reject:aspect_ratio"),
    # --- byte order
    Case("big-endian mono16", lambda r: (CAM, _image(encoding="mono16", step=W * 2, data=_mono16(FRAME, True), bigendian=1,
                                                     stamp_ns=r.next_stamp())), "accept", lambda: GRAY_FRAME),
    Case("big-endian rgb16", lambda r: (CAM, _image(encoding="rgb16", step=W * 6, data=_rgb16(FRAME, True), bigendian=1,
                                                    stamp_ns=r.next_stamp())), "accept", lambda: FRAME),
    Case("big-endian flag on rgb8", lambda r: (CAM, _image(bigendian=1, stamp_ns=r.next_stamp())), "accept", lambda: FRAME),
    # --- CompressedImage payloads
    Case("garbage jpeg", lambda r: (CCAM, _compressed("jpeg", bytes(range(256)) * 8, r.next_stamp())), "reject:undecodable"),
    Case("truncated jpeg", lambda r: (CCAM, _compressed("jpeg", _jpeg(FRAME)[:-200], r.next_stamp())), "reject:undecodable"),
    Case("truncated png", lambda r: (CCAM, _compressed("png", _png(FRAME)[:-40], r.next_stamp())), "reject:undecodable"),
    Case("jpeg header only", lambda r: (CCAM, _compressed("jpeg", _jpeg(FRAME)[:300], r.next_stamp())), "reject:undecodable"),
    Case("empty payload", lambda r: (CCAM, _compressed("jpeg", b"", r.next_stamp())), "reject:empty_data"),
    Case("png labelled jpeg", lambda r: (CCAM, _compressed("jpeg", _png(FRAME), r.next_stamp())), "accept", lambda: FRAME),
    Case("jpeg labelled png", lambda r: (CCAM, _compressed("png", _jpeg(FRAME, gray=True), r.next_stamp())), "accept",
         lambda: cv2.cvtColor(cv2.imdecode(np.frombuffer(_jpeg(FRAME, gray=True), np.uint8), cv2.IMREAD_UNCHANGED),
                              cv2.COLOR_GRAY2RGB)),
    Case("gif payload labelled jpeg", lambda r: (CCAM, _compressed("jpeg", b"GIF89a" + bytes(200), r.next_stamp())),
         "reject:undecodable"),
    Case("unsupported format bmp", lambda r: (CCAM, _compressed("bmp", cv2.imencode(".bmp", FRAME)[1].tobytes(), r.next_stamp())),
         "reject:unsupported_format"),
    Case("empty format", lambda r: (CCAM, _compressed("", _jpeg(FRAME), r.next_stamp())), "reject:unsupported_format"),
    Case("compressedDepth", lambda r: (CCAM, _compressed("16UC1; compressedDepth png", bytes(12) + _png(FRAME), r.next_stamp())),
         "reject:depth_image"),
    Case("png header claims 100000x100000", lambda r: (CCAM, _compressed("png", _forged_png(100_000, 100_000), r.next_stamp())),
         "reject:too_large"),
    # --- header stamps (the frame gate; node clock = system time here)
    Case("stamp zero", lambda r: (CAM, r.zero_stamp_image()), "accept", lambda: FRAME),
    Case("stamp duplicated", lambda r: (CAM, _image(stamp_ns=r.engine.gate.last_stamp_ns(CAM))), "reject:stale_stamp"),
    Case("stamp 1 s backwards", lambda r: (CAM, _image(stamp_ns=r.engine.gate.last_stamp_ns(CAM) - 10**9)),
         "reject:stale_stamp"),
    Case("stamp 60 s backwards, once", lambda r: (CAM, _image(stamp_ns=r.engine.gate.last_stamp_ns(CAM) - 60 * 10**9)),
         "stamp_dropped"),
    Case("stamp 1 day in the future", lambda r: (CAM, _image(stamp_ns=r.now_ns() + 86_400 * 10**9)), "reject:future_stamp"),
    Case("stamp year 2106 (sec 2^32-1)", lambda r: (CAM, _image(stamp_ns=(2**32 - 1) * 10**9)), "reject:future_stamp"),
    Case("stamp after the future one", lambda r: (CAM, _image(stamp_ns=r.next_stamp())), "accept", lambda: FRAME),
    Case("stamp 1 s in the future", lambda r: (CAM, _image(stamp_ns=r.now_ns() + 10**9)), "accept", lambda: FRAME),
    Case("stamp negative", lambda r: (CAM, _negative_stamp()), "reject:bad_stamp"),
]


def _negative_stamp() -> Image:
    msg = _image()
    msg.header.stamp.sec = -5
    return msg


def _state(engine: StreamingAssistant) -> dict:
    """What a rejected frame must not change: K/V, token ids, norms, chunk table, pending frames."""
    state = engine.cache.state_dict()
    state["pending"] = {c: (f.copy(), s) for c, (f, s) in engine._pending.items()}
    return state


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, t in before.items():
        if key == "pending":
            assert t.keys() == after[key].keys()
            for cam, (frame, stamp) in t.items():
                assert stamp == after[key][cam][1] and np.array_equal(frame, after[key][cam][0]), cam
        else:
            assert torch.equal(t, after[key]), key


def _reason_delta(before: dict, after: dict) -> dict:
    return {r: after.get(r, 0) - before.get(r, 0) for r in set(before) | set(after) if after.get(r, 0) != before.get(r, 0)}


def _camera_status(msg: CacheStatus, camera: str):
    return next(c for c in msg.cameras if c.camera_id == camera)


def _counts(msg) -> dict:
    """reason -> count of a CacheStatus or CameraStatus."""
    return dict(zip(msg.rejected_reasons, msg.rejected_counts))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_class(rig, case):
    engine, node = rig.engine, rig.node
    camera, msg = case.make(rig)
    before_total, before_cam = engine.counters, engine.camera_stats([camera])[0].frames
    state_before = _state(engine)
    n_results = len(rig.results)
    time_jumps = engine.time_jumps
    rig.feed(camera, msg)
    after_total, after_cam = engine.counters, engine.camera_stats([camera])[0].frames
    delta = _reason_delta(before_total.rejected_by_reason, after_total.rejected_by_reason)
    assert delta == _reason_delta(before_cam.rejected_by_reason, after_cam.rejected_by_reason)
    assert after_total.received == before_total.received + 1
    assert after_total.rejected == sum(after_total.rejected_by_reason.values())
    assert engine.time_jumps == time_jumps  # nothing here restarts the stream
    kind, _, reason = case.expected.partition(":")
    if kind == "reject":
        assert delta == {reason: 1}, delta
        assert after_total.rejected == before_total.rejected + 1
        _assert_same_state(state_before, _state(engine))
        # CacheStatus (all cameras and this camera) and /diagnostics carry the count under the reason
        stats = node.stats()
        status = to_cache_status(stats, ns_to_time(rig.now_ns()))
        assert list(status.rejected_reasons) == rejected_arrays(after_total.rejected_by_reason)[0]
        counts = dict(zip(status.rejected_reasons, status.rejected_counts))
        assert counts[reason] == after_total.rejected_by_reason[reason]
        assert sum(status.rejected_counts) == status.frames_rejected
        cam_status = _camera_status(status, camera)
        assert dict(zip(cam_status.rejected_reasons, cam_status.rejected_counts))[reason] == \
            after_cam.rejected_by_reason[reason]
        diag = {kv.key: kv.value for kv in to_diagnostics(stats, status.header.stamp, "n").status[0].values}
        assert diag[f"frames_rejected.{reason}"] == str(after_total.rejected_by_reason[reason])
    elif kind == "accept":
        assert delta == {} and after_total.rejected == before_total.rejected
        assert after_total.sampled == before_total.sampled + 1
        new = rig.results[n_results:]
        assert len(new) == 1 and new[0].status in (IngestStatus.BUFFERED, IngestStatus.INGESTED), new
        assert np.array_equal(conv.message_to_rgb(msg), case.pixels())
    else:
        assert case.expected == "stamp_dropped"
        assert delta == {} and after_total.stamp_dropped == before_total.stamp_dropped + 1
        assert after_total.sampled == before_total.sampled
        _assert_same_state(state_before, _state(engine))


def test_cases_cover_every_reason_and_enough_classes():
    reasons = {c.expected.partition(":")[2] for c in CASES if c.expected.startswith("reject:")}
    # every conversion reason is met through the node except bad_message (a field of the wrong
    # type: a real rclpy message refuses it on assignment; test_conversions covers it with
    # duck-typed messages); the engine reasons missing here have their own tests below
    assert set(conv.REJECT_REASONS) - reasons == {"bad_message"}
    assert set(ENGINE_REJECT_REASONS) - reasons == {"invalid_frame", "resolution_changed", "model_error", "out_of_memory"}
    assert len(CASES) >= 40
    assert not set(conv.REJECT_REASONS) & set(ENGINE_REJECT_REASONS)
    assert REASON_ORDER == conv.REJECT_REASONS + ENGINE_REJECT_REASONS


def test_far_future_stamp_does_not_poison_the_gate(rig):
    """Before the fix one frame stamped a day ahead moved the camera clock: every later frame was a
    jump back, and the third one restarted the stream (memory forgotten)."""
    engine = rig.engine
    chunks = len(engine.cache.table)
    time_jumps = engine.time_jumps
    rig.feed(CAM, _image(stamp_ns=rig.now_ns() + 86_400 * 10**9))
    before = engine.counters
    for _ in range(4):  # one more pair: ingested, no jump, no restart
        rig.feed(CAM, _image(stamp_ns=rig.next_stamp()))
    after = engine.counters
    assert engine.time_jumps == time_jumps
    assert after.stamp_dropped == before.stamp_dropped and after.rejected == before.rejected
    assert after.sampled == before.sampled + 4
    assert len(engine.cache.table) >= min(chunks + 1, 2)  # a chunk was added (compression may merge)
    # the refused stamp is not the camera's "newest" (a case above accepted one 1 s ahead)
    assert engine.camera_stats([CAM])[0].newest_stamp_ns <= rig.now_ns() + engine.gate.max_future_ns


def test_unforeseen_conversion_error_is_one_rejected_frame(rig, monkeypatch):
    """A converter or cv_bridge error that is not an ImageConversionError (a bug, a backend surprise) must
    not escape into the executor: the frame is counted as bad_message, the cache unchanged, the next
    frame ingests."""
    engine = rig.engine
    before_state, before = _state(engine), dict(engine.counters.rejected_by_reason)

    def broken(msg, **kwargs):
        raise KeyError("unforeseen")

    monkeypatch.setattr("infinipot_ros.ros.node.message_to_rgb", broken)
    rig.feed(CAM, _image(stamp_ns=rig.next_stamp()))
    monkeypatch.undo()
    assert _reason_delta(before, engine.counters.rejected_by_reason) == {"bad_message": 1}
    _assert_same_state(before_state, _state(engine))
    sampled = engine.counters.sampled
    rig.feed(CAM, _image(stamp_ns=rig.next_stamp()))
    assert engine.counters.sampled == sampled + 1


def test_log_lines_are_throttled(rig, capfd):
    """100 hostile frames of one class: 100 counted, at most one log line per 5 s (rclpy throttle)."""
    time.sleep(5.2)  # the cases above logged from the same call site: let the throttle window pass
    capfd.readouterr()
    before = rig.engine.counters.rejected_by_reason.get("truncated", 0)
    for _ in range(100):
        rig.feed(CAM, _image(data=b"\x00" * 10, stamp_ns=rig.next_stamp()))
    assert rig.engine.counters.rejected_by_reason["truncated"] == before + 100
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "frame rejected (truncated)" in line]
    assert len(lines) == 1, err[-2000:]
    assert CAM in lines[0] and "needs step*height" in lines[0]


def test_resolution_change_inside_a_pair_through_the_node(rig):
    engine = rig.engine
    if CAM in engine._pending:  # start from a complete pair
        rig.feed(CAM, _image(stamp_ns=rig.next_stamp()))
    assert CAM not in engine._pending
    rig.feed(CAM, _image(stamp_ns=rig.next_stamp()))  # first of a pair: buffered
    state = _state(engine)
    cache_only = {k: v for k, v in state.items() if k != "pending"}
    before = engine.counters
    other = _rgb(H + 28, W, seed=3)  # another resolution
    rig.feed(CAM, _image(other, rig.next_stamp()))
    after = engine.counters
    assert _reason_delta(before.rejected_by_reason, after.rejected_by_reason) == {"resolution_changed": 1}
    now = _state(engine)
    _assert_same_state(cache_only, {k: v for k, v in now.items() if k != "pending"})
    assert np.array_equal(now["pending"][CAM][0], other)  # the new size starts the next pair
    rig.feed(CAM, _image(other, rig.next_stamp()))  # and pairs normally
    assert engine.counters.ingested == after.ingested + 2
    status = to_cache_status(rig.node.stats(), ns_to_time(rig.now_ns()))
    assert "resolution_changed" in _camera_status(status, CAM).rejected_reasons


def test_hostile_messages_over_dds_show_up_in_cache_status(rig):
    """Real publishers on the subscribed topics (and one the node does not subscribe to); the
    counts by reason arrive on /infinipot/status; an ask naming an unknown camera is BAD_REQUEST."""
    client, node = rig.client, rig.node
    pub = client.create_publisher(Image, CAM, qos_profile_sensor_data)
    cpub = client.create_publisher(CompressedImage, CCAM, qos_profile_sensor_data)
    other = client.create_publisher(Image, UNSUBSCRIBED, qos_profile_sensor_data)
    ask = client.create_client(Ask, "/ask")
    assert _wait(lambda: pub.get_subscription_count() > 0 and cpub.get_subscription_count() > 0, 10)
    assert other.get_subscription_count() == 0
    assert ask.wait_for_service(timeout_sec=10)
    assert _wait(lambda: rig.statuses, 5)
    base = rig.statuses[-1]
    base_counts, base_cam = _counts(base), _counts(_camera_status(base, CAM))
    sends = [
        (pub, lambda s: _image(encoding="16UC1", step=W * 2, data=bytes(H * W * 2), stamp_ns=s), "depth_image"),
        (pub, lambda s: _image(data=b"", stamp_ns=s), "truncated"),
        (pub, lambda s: _image(_rgb(8, 8), s), "frame_too_small"),
        (cpub, lambda s: _compressed("jpeg", b"not a jpeg at all" * 4, s), "undecodable"),
        (cpub, lambda s: _compressed("png", b"", s), "empty_data"),
        (pub, lambda s: _image(stamp_ns=rig.now_ns() + 3600 * 10**9), "future_stamp"),
    ]
    expected: dict = {}
    received_before = node.stats().frames.received
    for publisher, make, reason in sends:
        publisher.publish(make(rig.next_stamp()))
        other.publish(_image(stamp_ns=rig.next_stamp()))  # nobody listens: never received
        expected[reason] = expected.get(reason, 0) + 1
        time.sleep(0.15)  # sensor-data QoS: depth 1

    def arrived():
        if not rig.statuses:
            return False
        counts = _counts(rig.statuses[-1])
        return all(counts.get(r, 0) - base_counts.get(r, 0) == n for r, n in expected.items())

    assert _wait(arrived, 15), (list(rig.statuses[-1].rejected_reasons), list(rig.statuses[-1].rejected_counts))
    last = rig.statuses[-1]
    assert sum(last.rejected_counts) == last.frames_rejected
    assert list(last.rejected_reasons) == sorted(last.rejected_reasons, key=REASON_ORDER.index)
    cam = _counts(_camera_status(last, CAM))
    for reason in ("depth_image", "truncated", "frame_too_small", "future_stamp"):
        assert cam[reason] - base_cam.get(reason, 0) == expected[reason], reason
    assert UNSUBSCRIBED not in [c.camera_id for c in last.cameras]
    assert node.stats().frames.received == received_before + len(sends)
    # a question naming a camera the node has never seen
    fut = ask.call_async(Ask.Request(question="what is there?", camera_ids=[UNSUBSCRIBED]))
    assert _wait(fut.done, 30)
    res = fut.result()
    assert not res.success and res.error.startswith("BAD_REQUEST") and "unknown camera" in res.error
    for p in (pub, cpub, other):
        client.destroy_publisher(p)
    client.destroy_client(ask)


# ------------------------------------------------------------- engine level
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record) -> None:
        self.records.append(record)


@pytest.fixture()
def engine_log():
    """Records of the engine's logger (attached to it directly: the ``launch`` package, imported in
    this process, installs a logger class that does not propagate to pytest's caplog)."""
    from infinipot_ros.engine import assistant

    handler = _Records()
    assistant.log.addHandler(handler)
    try:
        yield handler
    finally:
        assistant.log.removeHandler(handler)


@pytest.fixture()
def engine(tiny_adapter, tiny_model_dir):
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200, frame_rate_hz=0.0)
    e = StreamingAssistant(cfg, adapter=tiny_adapter)
    for i in range(4):
        assert e.offer("cam", FRAME, 10**18 + i * 10**8) is not None
    assert len(e.cache.table) == 2
    return e


@pytest.mark.parametrize("frame, reason", [
    (np.full((H, W, 3), np.nan, np.float32), "invalid_frame"),
    (np.full((H, W, 3), np.inf, np.float64), "invalid_frame"),
    (FRAME.astype(np.uint16), "invalid_frame"),
    (FRAME[..., 0], "invalid_frame"),
    (np.dstack([FRAME, FRAME[..., :1]]), "invalid_frame"),
    (FRAME.tolist(), "invalid_frame"),
    (_rgb(27, 200), "frame_too_small"),
    (_rgb(28, 28 * 201 + 1), "aspect_ratio"),
], ids=["nan-float32", "inf-float64", "uint16", "mono-2d", "rgba", "list", "27px", "aspect-201"])
def test_engine_rejects_unusable_arrays(engine, engine_log, frame, reason):
    state = _state(engine)
    camera = f"cam-{reason}-{id(frame)}"  # the throttle key is (camera, reason): a fresh camera logs once
    for i in range(3):
        res = engine.offer(camera, frame, 2 * 10**18 + i)
        assert res.status is IngestStatus.REJECTED and res.error
    c = engine.camera_stats([camera])[0].frames
    assert c.rejected_by_reason == {reason: 3} and c.rejected == 3
    _assert_same_state(state, _state(engine))
    lines = [r.getMessage() for r in engine_log.records if reason in r.getMessage()]
    assert len(lines) == 1 and camera in lines[0], lines


def test_engine_accepts_200_to_1(engine):
    for i in range(2):
        res = engine.offer("wide", _rgb(28, 28 * 200), 3 * 10**18 + i)
    assert res.status is IngestStatus.INGESTED


def test_model_error_inside_prefill_rolls_back_and_is_counted(engine, monkeypatch, engine_log):
    """A fault injected after layer 0 of the prefill has written its K/V: the transaction rolls it back."""
    state = _state(engine)
    cache = engine.cache
    real_update = cache.update
    calls = []

    def failing_update(layer_idx, key_states, value_states, *args, **kwargs):
        calls.append(layer_idx)
        if layer_idx >= 1:
            raise RuntimeError("injected fault in layer 1")
        return real_update(layer_idx, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(cache, "update", failing_update)
    cam = "cam-fault"  # a camera of its own: the engine's log throttle is keyed by (camera, reason)
    assert engine.offer(cam, FRAME, 10**18 + 10**9).status is IngestStatus.BUFFERED
    res = engine.offer(cam, FRAME, 10**18 + 11 * 10**8)
    assert res.status is IngestStatus.REJECTED and "injected fault" in res.error
    assert 0 in calls and 1 in calls  # layer 0 really wrote before the fault
    monkeypatch.undo()
    state["pending"] = {}  # the pair was consumed
    _assert_same_state(state, _state(engine))
    assert engine.counters.rejected_by_reason == {"model_error": 2}
    assert any("model_error" in r.getMessage() and r.levelno == logging.ERROR for r in engine_log.records)
    # and the stream goes on
    engine.offer(cam, FRAME, 10**18 + 12 * 10**8)
    assert engine.offer(cam, FRAME, 10**18 + 13 * 10**8).status is IngestStatus.INGESTED


def test_stamp_classes_in_the_engine_gate(engine):
    """The engine's own rules without the node: a zero stamp is a time like any other (the node
    replaces it by the receive time), a duplicate or older one is stale, a negative one bad; the
    future check needs the caller's clock (now_ns)."""
    now = 10**18 + 10**9
    assert engine.admit("cam", 10**18 + 3 * 10**8).value == "stale"  # duplicate of the last accepted
    assert engine.admit("cam", -1).value == "invalid"
    assert engine.admit("cam", now + 6 * 10**9, now_ns=now).value == "future"
    assert engine.admit("cam", now + 6 * 10**9).value == "accept"  # no clock given: no future check
    assert engine.admit("zero", 0).value == "accept" and engine.admit("zero", 0).value == "stale"
    c = engine.counters.rejected_by_reason
    assert c == {"stale_stamp": 2, "bad_stamp": 1, "future_stamp": 1}
    assert FrameRejectReason("stale_stamp") is FrameRejectReason.STALE_STAMP


def test_without_a_clock_a_far_future_stamp_would_restart_the_stream():
    """Why the node passes its clock: the gate alone takes a day-ahead stamp, and the next three
    correct frames are then jumps back; the third restarts the stream (the memory is forgotten)."""
    t = 10**18
    blind, guarded = FrameGate(0.0, 5.0, 3), FrameGate(0.0, 5.0, 3)
    for gate in (blind, guarded):
        assert gate.offer("c", t, now_ns=t) is GateDecision.ACCEPT
    assert blind.offer("c", t + 86_400 * 10**9) is GateDecision.ACCEPT
    assert guarded.offer("c", t + 86_400 * 10**9, now_ns=t) is GateDecision.FUTURE
    later = [t + i * 10**8 for i in (1, 2, 3)]
    assert [blind.offer("c", s).value for s in later] == ["jump_dropped", "jump_dropped", "restart"]
    assert [guarded.offer("c", s, now_ns=s).value for s in later] == ["accept"] * 3
    assert guarded.max_future_s == 5.0 and FrameGate(0.0, 0.0).max_future_s == 5.0  # the default when the rule is off


def test_counters_need_a_reason(engine):
    with pytest.raises(ValueError, match="reason"):
        engine.count_frames("cam", rejected=1)
    engine.count_frames("cam", rejected=2, reason="truncated")
    engine.count_frames("cam", received=1)
    total = engine.counters
    assert total.rejected == 2 and total.rejected_by_reason == {"truncated": 2}
    copy = engine.camera_stats(["cam"])[0].frames
    copy.reject("undecodable")
    assert engine.counters.rejected_by_reason == {"truncated": 2}  # stats are copies
