"""The frame gate: sampling by stamp, one bad stamp dropped (memory kept), a sustained jump restarts."""
from __future__ import annotations

import pytest
import torch

from infinipot_ros.engine import EngineConfig, FrameGate, GateDecision, IngestStatus, StreamingAssistant

A, S, J, R, X = (GateDecision.ACCEPT, GateDecision.SKIP, GateDecision.JUMP_DROPPED, GateDecision.RESTART,
                 GateDecision.STALE)
SEC = 10**9


def test_sampling_uses_stamps_not_arrival():
    g = FrameGate(2.0)
    stamps = [int(i * 1e8) for i in range(30)]  # 10 fps for 3 s
    kept = [t for t in stamps if g.offer("cam", t) is A]
    assert kept == [int(i * 5e8) for i in range(6)]
    assert g.offer("cam", kept[-1]) is X  # duplicate
    assert g.offer("other", 0) is A  # cameras are independent
    every = FrameGate(0)
    assert [every.offer("c", t) for t in (1, 2, 2, 3)] == [A, A, X, A]


def test_one_bad_stamp_is_dropped_and_the_clock_kept():
    g = FrameGate(0, time_jump_s=5.0, time_jump_frames=3)
    assert [g.offer("c", t * SEC) for t in (100, 101, 3, 102, 103)] == [A, A, J, A, A]
    # two glitches in a row, then good stamps again: still no restart
    assert [g.offer("c", t * SEC) for t in (1, 2, 104)] == [J, J, A]
    assert g.last_stamp_ns("c") == 104 * SEC


def test_sustained_jump_restarts_every_camera():
    g = FrameGate(0, time_jump_s=5.0, time_jump_frames=3)
    g.offer("front", 100 * SEC)
    g.offer("rear", 100 * SEC)
    assert [g.offer("front", t * SEC) for t in (1, 2, 3)] == [J, J, R]
    assert g.last_stamp_ns("front") == 3 * SEC and g.last_stamp_ns("rear") is None
    assert g.offer("front", 4 * SEC) is A and g.offer("rear", 4 * SEC) is A


def test_small_backward_steps_are_stale_not_jumps():
    g = FrameGate(0, time_jump_s=5.0, time_jump_frames=1)
    g.offer("c", 100 * SEC)
    assert [g.offer("c", t) for t in (99 * SEC, 96 * SEC, 100 * SEC)] == [X, X, X]
    assert g.offer("c", 94 * SEC) is R  # beyond time_jump_s with time_jump_frames=1


def test_jump_rule_off_and_bad_settings():
    g = FrameGate(0, time_jump_s=0)
    g.offer("c", 100 * SEC)
    assert [g.offer("c", t * SEC) for t in (1, 2, 3, 4)] == [X, X, X, X]
    with pytest.raises(ValueError, match="time_jump_frames"):
        FrameGate(2.0, time_jump_frames=0)


def test_live_rate_change_restarts_slots_at_the_last_frame():
    g = FrameGate(1.0)
    assert [g.offer("c", int(t * 1e9)) for t in (0, 0.5, 1.0)] == [A, S, A]
    g.set_rate(4.0)
    assert [g.offer("c", int(t * 1e9)) for t in (1.1, 1.25, 1.5)] == [S, A, A]


def _engine(adapter, model_dir, **kw):
    cfg = EngineConfig(model=model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200, frame_rate_hz=0, **kw)
    return StreamingAssistant(cfg, adapter=adapter)


def _offer(engine, frame, stamp, camera="front"):
    decision = engine.admit(camera, stamp)
    if decision in (A, R):
        return decision, engine.ingest(camera, frame, stamp, epoch=engine.epoch)
    return decision, None


def _kv(engine):
    return [tuple(t.clone() for t in engine.cache.layer_kv(layer)) for layer in range(engine.cache.num_layers)]


def test_engine_keeps_its_memory_through_one_bad_stamp(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, time_jump_s=5.0, time_jump_frames=3)
    for f, s in zip(frames[:6], stamps[:6]):
        _offer(engine, f, s)
    before = _kv(engine)
    chunks = len(engine.cache.table)
    decision, result = _offer(engine, frames[6], stamps[0] - 3600 * SEC)  # a driver glitch: an hour back
    assert decision is J and result is None
    assert all(torch.equal(a, b) for old, new in zip(before, _kv(engine)) for a, b in zip(old, new))
    assert len(engine.cache.table) == chunks and engine.time_jumps == 0
    st = engine.stats(cameras=["front"])
    assert st.frames.stamp_dropped == 1 and st.cameras[0].frames.stamp_dropped == 1
    # the stream goes on where it was
    decision, result = _offer(engine, frames[6], stamps[6])
    assert decision is A and result.status is IngestStatus.BUFFERED
    assert engine.ask("What is there?").frames_in_context == 6


def test_engine_restarts_on_a_sustained_jump(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, time_jump_s=5.0, time_jump_frames=3)
    for f, s in zip(frames[:6], stamps[:6]):
        _offer(engine, f, s)
    epoch = engine.epoch
    back = [s - 3600 * SEC for s in stamps[6:9]]
    decisions = [_offer(engine, f, s)[0] for f, s in zip(frames[6:9], back)]
    assert decisions == [J, J, R]
    assert engine.time_jumps == 1 and engine.epoch == epoch + 1
    assert engine.stats().cache.vision_tokens == 0  # the old timeline is forgotten ...
    assert engine.stats().frames.stamp_dropped == 2
    # ... and a frame admitted before the restart but ingested after it is dropped, not mixed in
    late = engine.ingest("front", frames[9], stamps[9], epoch=epoch)
    assert late.status is IngestStatus.DROPPED and engine.stats().cache.vision_tokens == 0
