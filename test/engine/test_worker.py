"""StreamWorker: latest frame wins, questions first, timeouts and back-pressure."""
from __future__ import annotations

import threading
import time

import pytest
import torch

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


def _kv(engine):
    return [tuple(t.clone() for t in engine.cache.layer_kv(layer)) for layer in range(engine.cache.num_layers)]


def test_cancel_stops_within_one_token_and_leaves_the_cache(engine, vtest_frames):
    from infinipot_ros.engine import AskErrorCode

    frames, stamps = vtest_frames
    for f, s in zip(frames[:6], stamps[:6]):
        engine.ingest("front", f, s)
    before = _kv(engine)
    worker = StreamWorker(engine).start()
    seen = []
    try:
        def on_token(piece, n):
            seen.append(n)
            if n == 3:
                job.cancel()  # as the action's cancel callback does, from another thread

        job = worker.submit_ask("Describe everything in detail.", max_new_tokens=64, on_token=on_token)
        with pytest.raises(AskError) as err:
            job.future.result(30)
        assert err.value.code is AskErrorCode.CANCELED and "after 3 tokens" in err.value.message
        assert seen == [1, 2, 3]  # no token decoded after the cancel
        after = _kv(engine)
        assert all(torch.equal(a, b) for la, lb in zip(before, after) for a, b in zip(la, lb))
        # a cancelled question still waiting never runs
        worker_job = worker.submit_ask("never?", on_token=lambda p, n: seen.append(-1))
        worker.withdraw(worker_job)
        with pytest.raises(AskError) as err:
            worker_job.future.result(5)
        assert err.value.code is AskErrorCode.CANCELED and -1 not in seen
    finally:
        worker.stop()


def test_continuous_questions_cannot_starve_the_cameras(engine, vtest_frames):
    """Questions are served first, but each camera still gets a frame about every max_ingest_gap_s / 2."""
    frames, stamps = vtest_frames
    engine.update_settings(max_ingest_gap_s=0.4, max_pending_asks=8, max_new_tokens=8)
    worker = StreamWorker(engine).start()
    stop = threading.Event()

    def asker():
        while not stop.is_set():
            try:
                worker.ask("What is happening?", timeout_s=30, max_new_tokens=8)
            except AskError:
                pass

    askers = [threading.Thread(target=asker) for _ in range(3)]
    for t in askers:
        t.start()
    try:
        t_end = time.monotonic() + 6.0
        i = 0
        while time.monotonic() < t_end:  # two cameras at 20 Hz each, stamps always newer
            for cam in ("front", "rear"):
                worker.submit_frame(cam, frames[i % len(frames)], stamps[0] + i * 50_000_000)
            i += 1
            time.sleep(0.05)
    finally:
        stop.set()
        for t in askers:
            t.join(30)
        worker.stop()
    st = engine.stats(cameras=["front", "rear"])
    ingested = {c.camera: c.frames.ingested for c in st.cameras}
    # ~6 s at one frame per camera every >= 0.2 s (half the gap): both cameras advance, neither starves the other
    assert ingested["front"] >= 8 and ingested["rear"] >= 8, ingested
    assert abs(ingested["front"] - ingested["rear"]) <= 2, ingested


@pytest.mark.parametrize("exc, reason", [(RuntimeError("injected outside the engine's own guard"), "model_error"),
                                         (torch.OutOfMemoryError("CUDA out of memory (injected)"), "out_of_memory")],
                         ids=["runtime-error", "out-of-memory"])
def test_an_exception_escaping_ingest_is_counted_and_the_worker_goes_on(engine, vtest_frames, monkeypatch, exc, reason):
    """The worker's own guard: an exception that escapes StreamingAssistant.ingest (injected into it)
    drops that frame, counts it under its reason, and the next frames are ingested."""
    frames, stamps = vtest_frames
    real, raised = engine.ingest, []

    def ingest(*args, **kwargs):
        if not raised:
            raised.append(1)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "ingest", ingest)
    seen = []
    worker = StreamWorker(engine, on_ingest=seen.append).start()
    try:
        for f, s in zip(frames[:3], stamps[:3]):
            worker.submit_frame("front", f, s)
            assert worker.wait_idle(30)
        counters = engine.stats().frames
        assert counters.rejected_by_reason == {reason: 1} and counters.rejected == 1
        assert counters.ingested == 2
        assert seen[0].status.value == "rejected" and seen[0].error.startswith(reason)
        assert worker._thread.is_alive()
    finally:
        worker.stop()


def test_stop_ends_a_running_answer_at_its_next_token(engine, vtest_frames, monkeypatch):
    frames, stamps = vtest_frames
    for f, s in zip(frames[:2], stamps[:2]):
        engine.ingest("front", f, s)
    monkeypatch.setattr(engine.adapter, "eos_ids", set())  # would decode all max_new_tokens
    engine.update_settings(max_new_tokens=120)
    worker = StreamWorker(engine).start()
    tokens = []
    job = worker.submit_ask("Talk.", max_new_tokens=120, on_token=lambda piece, n: tokens.append(n))
    assert _wait_for(lambda: len(tokens) >= 2, 30)
    worker.stop()
    assert not worker._thread.is_alive()
    with pytest.raises(AskError) as err:
        job.future.result(1)
    assert err.value.code == "BUSY" and "shutting down" in err.value.message
    assert tokens[-1] < 120
    depths = worker.depths()
    assert depths["asks"] == depths["frames"] == depths["notes"] == 0 and depths["asks_max"] == 1


def _wait_for(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False
