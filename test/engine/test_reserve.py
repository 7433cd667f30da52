"""KV memory is what it says: the reserve is sized from the largest chunk and the longest answer.

Reserved slots = prefix + M + max(largest chunk, longest question + answer): a
chunk being prefilled and a question/answer never coexist in the cache, so
the reserved bytes stay within budget + one chunk + one answer, and the
buffers never move while streaming and answering at the limits.
"""
from __future__ import annotations

import pytest

from infinipot_ros.engine import AskError, EngineConfig, StreamingAssistant


def _engine(adapter, model_dir, **kw):
    kw.setdefault("max_pixels", 64 * 28 * 28)
    return StreamingAssistant(EngineConfig(model=model_dir, device="cpu", dtype="float32", **kw), adapter=adapter)


def test_auto_reserve_bounds_reserved_bytes_and_never_reallocates(tiny_adapter, tiny_model_dir, vtest_frames):
    frames, stamps = vtest_frames
    eng = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200,
                  max_new_tokens=24, max_question_tokens=16)
    chunk = tiny_adapter.max_chunk_tokens()
    assert chunk == 64  # 64*28*28 pixels -> at most 64 merged tokens per temporal patch
    template = len(tiny_adapter.question_ids(""))
    answer = template + 16 + 24
    assert eng.reserve_tokens == max(chunk, answer)
    # the longest question the engine accepts (16 tokens)
    extra = lambda q: len(tiny_adapter.question_ids(q)) - template  # noqa: E731
    longest = max((("people " * k) + "?" for k in range(1, 40) if extra(("people " * k) + "?") <= 16), key=extra)
    assert extra(longest) >= 14
    buffers = set()
    for f, s in zip(frames, stamps):
        eng.ingest("front", f, s)
        st = eng.stats().cache
        if st.capacity_tokens:
            buffers.add(eng.cache.buffers()[0].data_ptr())
        # a question of the longest allowed length, the longest answer, after every frame
        ask = eng.ask(longest, max_new_tokens=24) if st.chunks_in_cache else None
        if ask is not None:
            assert ask.generated_tokens <= 24
        st = eng.stats().cache
        per_token = st.bytes_per_token
        assert st.kv_bytes_reserved <= st.kv_bytes_budget + (chunk + answer) * per_token
        assert st.kv_bytes_reserved == (st.prefix_tokens + 200 + eng.reserve_tokens) * per_token
    assert eng.cache.compressions >= 2
    assert len(buffers) == 1, "the KV buffers were reallocated while streaming and answering"


def test_explicit_reserve_is_honoured(tiny_adapter, tiny_model_dir, vtest_frames):
    eng = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200, reserve_tokens=500)
    frames, stamps = vtest_frames
    eng.ingest("front", frames[0], stamps[0])
    eng.ingest("front", frames[1], stamps[1])
    st = eng.stats().cache
    assert eng.reserve_tokens == 500
    assert st.capacity_tokens == st.prefix_tokens + 200 + 500


def test_requests_beyond_the_reserved_answer_are_refused(tiny_adapter, tiny_model_dir, vtest_frames):
    eng = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=200,
                  max_new_tokens=24, max_question_tokens=16)
    frames, stamps = vtest_frames
    for f, s in zip(frames[:4], stamps[:4]):
        eng.ingest("front", f, s)
    with pytest.raises(AskError, match="max_new_tokens must be in") as err:
        eng.ask("What is happening?", max_new_tokens=25)
    assert err.value.code == "BAD_REQUEST"
    with pytest.raises(AskError, match="tokens, more than max_question_tokens") as err:
        eng.ask("people " * 40)
    assert err.value.code == "BAD_REQUEST"
    assert eng.ask("What is happening?").generated_tokens > 0  # 0 = the configured default, allowed
