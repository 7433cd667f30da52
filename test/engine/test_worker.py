"""StreamWorker: latest frame wins, questions first, timeouts and back-pressure."""
from __future__ import annotations

import pytest

from infinipot_ros.engine import AskError, EngineConfig, StreamingAssistant, StreamWorker


@pytest.fixture()
def engine(tiny_adapter, tiny_model_dir):
    cfg = EngineConfig(model=tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                       policy="infinipot_v", max_vision_tokens=200)
    return StreamingAssistant(cfg, adapter=tiny_adapter)


def test_latest_frame_wins_and_drops_are_counted(engine, vtest_frames):
    frames, stamps = vtest_frames
    seen = []
    worker = StreamWorker(engine, on_ingest=seen.append)
    for f, s in zip(frames[:5], stamps[:5]):  # worker not started: all but the newest are dropped
        worker.submit_frame("front", f, s)
    worker.submit_frame("rear", frames[0], stamps[0])
    assert engine.stats().frames.dropped == 4
    worker.start()
    try:
        assert worker.wait_idle(30)
        assert sorted((r.camera, r.stamp_ns) for r in seen) == [("front", stamps[4]), ("rear", stamps[0])]
    finally:
        worker.stop()


def test_questions_are_served_before_frames(engine, vtest_frames):
    frames, stamps = vtest_frames
    worker = StreamWorker(engine)
    worker.submit_frame("front", frames[0], stamps[0])
    future = worker.submit_ask("What is happening?", max_new_tokens=2).future
    worker.start()
    try:
        with pytest.raises(AskError) as err:
            future.result(30)
        assert err.value.code == "NO_FRAMES"  # the question ran before the frame
        for f, s in zip(frames[1:6], stamps[1:6]):
            worker.submit_frame("front", f, s)
            assert worker.wait_idle(30)
        res = worker.ask("What is happening?", timeout_s=30, max_new_tokens=2)
        assert res.frames_in_context == 6
    finally:
        worker.stop()


def test_timeout_and_busy(engine):
    engine.update_settings(max_pending_asks=1)
    worker = StreamWorker(engine)  # not started: nothing is served
    with pytest.raises(AskError) as err:
        worker.ask("hello?", timeout_s=0.05)
    assert err.value.code == "TIMEOUT"
    first = worker.submit_ask("one?").future
    second = worker.submit_ask("two?").future
    with pytest.raises(AskError) as err:
        second.result(1)
    assert err.value.code == "BUSY"
    worker.stop()
    with pytest.raises(AskError) as err:
        first.result(1)
    assert err.value.code == "BUSY" and "shutting down" in err.value.message


def test_timed_out_question_is_not_run_later(engine, vtest_frames):
    frames, stamps = vtest_frames
    calls = []
    worker = StreamWorker(engine)
    with pytest.raises(AskError):
        worker.ask("late?", timeout_s=0.01, on_token=lambda piece, n: calls.append(piece))
    worker.submit_frame("front", frames[0], stamps[0])
    worker.start()
    try:
        assert worker.wait_idle(30)
        assert calls == [] and worker.idle
    finally:
        worker.stop()
