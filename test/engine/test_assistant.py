"""StreamingAssistant on real video: the cap, answers, errors, and thread safety."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from infinipot_ros.engine import AskError, EngineConfig, StreamingAssistant


def _engine(adapter, model_dir, **kw):
    kw.setdefault("max_pixels", 64 * 28 * 28)
    return StreamingAssistant(EngineConfig(model=model_dir, device="cpu", dtype="float32", **kw), adapter=adapter)


def _feed(engine, frames, stamps, camera="front"):
    return [engine.ingest(camera, f, s) for f, s in zip(frames, stamps)]


def test_budget_larger_than_stream_answers_like_uncompressed(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    capped = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=100_000)
    full = _engine(tiny_adapter, tiny_model_dir, policy="none")
    _feed(capped, frames, stamps)
    _feed(full, frames, stamps)
    assert capped.cache.compressions == 0
    for q in ("What is happening?", "How many people are walking?"):
        a, b = capped.ask(q, max_new_tokens=12), full.ask(q, max_new_tokens=12)
        assert a.generated_tokens > 0
        assert a.answer == b.answer and a.generated_tokens == b.generated_tokens


def test_kv_stays_under_budget_on_real_video(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200)
    sizes = []
    for res in _feed(engine, frames, stamps):
        st = engine.stats().cache
        assert st.vision_tokens <= 200
        assert st.kv_bytes <= st.kv_bytes_budget
        sizes.append(st.kv_bytes)
        assert res.status in ("buffered", "ingested")
    assert engine.cache.compressions >= 2
    assert engine.stats().frames.ingested == len(frames)
    ans = engine.ask("What is happening?", max_new_tokens=4)
    assert ans.frames_in_context == engine.stats().cache.frames_in_cache
    assert ans.newest_stamp_ns == stamps[-1]


def test_uncompressed_kv_grows_linearly(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="none")
    sizes = []
    for f, t in zip(frames, stamps):
        if engine.ingest("front", f, t).status == "ingested":
            sizes.append(engine.stats().cache.kv_bytes)
    assert len(sizes) == len(frames) // 2
    steps = {b - a for a, b in zip(sizes, sizes[1:])}
    assert steps == {54 * engine.cache.bytes_per_token}


def test_bad_frames_are_rejected_counted_and_harmless(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200)
    _feed(engine, frames[:2], stamps[:2])
    before = engine.stats().cache
    bad = [
        frames[2].astype(np.float32),  # dtype
        frames[2][:, :, 0],  # mono
        np.zeros((10, 10, 3), np.uint8),  # tiny
        "not a frame",
    ]
    for b in bad:
        res = engine.ingest("front", b, stamps[2])
        assert res.status == "rejected" and res.error
    assert engine.stats().frames.rejected == len(bad)
    after = engine.stats().cache
    assert (after.tokens, after.chunks_in_cache) == (before.tokens, before.chunks_in_cache)
    # and the stream goes on
    _feed(engine, frames[2:4], stamps[2:4])
    assert engine.stats().cache.chunks_in_cache == before.chunks_in_cache + 1


def test_ask_errors_have_codes(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200)
    with pytest.raises(AskError) as err:
        engine.ask("What is happening?")
    assert err.value.code == "NO_FRAMES"
    _feed(engine, frames[:4], stamps[:4])
    cases = [
        (dict(question=""), "BAD_REQUEST"),
        (dict(question="x" * 5000), "BAD_REQUEST"),
        (dict(question="hi", cameras=["rear"]), "BAD_REQUEST"),
        (dict(question="hi", since_ns=5, until_ns=4), "BAD_REQUEST"),
        (dict(question="hi", max_new_tokens=10**6), "BAD_REQUEST"),
        (dict(question="hi", since_ns=stamps[-1] + 10**9), "NO_FRAMES"),
    ]
    for kwargs, code in cases:
        with pytest.raises(AskError) as err:
            engine.ask(**kwargs)
        assert err.value.code == code, kwargs


def test_camera_and_time_filters(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="none")
    _feed(engine, frames[:4], stamps[:4], camera="front")
    _feed(engine, frames[4:8], stamps[4:8], camera="rear")
    assert engine.ask("hi", max_new_tokens=1).frames_in_context == 8
    front = engine.ask("hi", cameras=["front"], max_new_tokens=1)
    assert front.frames_in_context == 4 and front.newest_stamp_ns == stamps[3]
    late = engine.ask("hi", since_ns=stamps[6], max_new_tokens=1)
    assert late.frames_in_context == 2 and late.oldest_stamp_ns == stamps[6]
    assert late.context_tokens < front.context_tokens


def test_ingest_and_ask_from_two_threads(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=150)
    _feed(engine, frames[:2], stamps[:2])
    errors, answers = [], []

    def asker():
        try:
            for _ in range(6):
                answers.append(engine.ask("What is happening?", max_new_tokens=3))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=asker)
    t.start()
    for _ in range(2):
        _feed(engine, frames[2:], [s + 10**10 * _ for s in stamps[2:]])
    t.join(60)
    assert not errors and len(answers) == 6
    st = engine.stats().cache
    assert st.scratch_tokens == 0 and st.vision_tokens <= 150
    for layer in range(engine.cache.num_layers):
        assert engine.cache.get_seq_length(layer) == st.prefix_tokens + st.vision_tokens


def test_reset_empties_the_stream(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200)
    _feed(engine, frames[:5], stamps[:5])
    engine.reset()
    st = engine.stats().cache
    assert st.vision_tokens == 0 and st.chunks_in_cache == 0 and st.prefix_tokens > 0
    with pytest.raises(AskError):
        engine.ask("anything?")
