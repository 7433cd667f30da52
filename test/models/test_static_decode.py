"""The static-shape decode step: same greedy answers as the dynamic path, one graph under torch.compile.

The step attends over the cache's whole capacity with an ``allowed`` mask, so
its tensor shapes never change from token to token: that is what a CUDA
graph needs (captured on CUDA, test_cuda.py) and what ``torch.compile``
proves on CPU here (fullgraph=True: no graph break; one graph for all steps:
no recompilation).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from infinipot_ros.kv import CacheBudget, VisionChunk, make_policy


def _stream(adapter, frames, *, budget=CacheBudget(), policy=None, cameras=(0,)):
    cache = adapter.new_cache(budget=budget, policy=policy)
    adapter.prefill_prefix(cache)
    k = 0
    for i in range(0, len(frames) - 1, 2):
        patch = adapter.encode_patch(frames[i : i + 2])
        cam = cameras[k % len(cameras)]
        chunk = VisionChunk(patch.grid_h, patch.grid_w, camera=cam, stamp_ns=i * 10**9, end_stamp_ns=i * 10**9 + 1,
                            num_frames=2)
        adapter.prefill_patch(cache, patch, chunk, seconds=i * 0.5)
        k += 1
    return cache


@contextlib.contextmanager
def _mode(adapter, mode, backend=None):
    saved = adapter.decode_mode, adapter.compile_backend, adapter._static_step
    adapter.decode_mode, adapter.compile_backend, adapter._static_step = mode, backend, None
    try:
        yield
    finally:
        adapter.decode_mode, adapter.compile_backend, adapter._static_step = saved


def _answer(adapter, cache, mode, question="What is happening?", n=12, **kw):
    with _mode(adapter, mode):
        return adapter.generate(cache, question, max_new_tokens=n, **kw)


def _snapshot(cache):
    return [tuple(t.clone() for t in cache.layer_kv(layer)) for layer in range(cache.num_layers)]


def test_static_step_answers_token_for_token_like_dynamic(tiny_adapter, vtest_frames):
    cache = _stream(tiny_adapter, vtest_frames[0][:8])
    before = _snapshot(cache)
    dyn = _answer(tiny_adapter, cache, "dynamic", n=16)
    static = _answer(tiny_adapter, cache, "eager", n=16)
    assert len(dyn.token_ids) == 16 and static.token_ids == dyn.token_ids and static.text == dyn.text
    # the answer is removed again: the cache is exactly as before (the step wrote only scratch slots)
    after = _snapshot(cache)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))


def test_static_step_honours_visibility_after_compressions(tiny_adapter, vtest_frames):
    # Capped cache (several compressions: tokens differ per layer/head), two cameras, an answer
    # restricted to one camera and a time window: the allowed mask must equal the dynamic path's masks.
    cache = _stream(tiny_adapter, vtest_frames[0], budget=CacheBudget(max_vision_tokens=160),
                    policy=make_policy("infinipot_v"), cameras=(0, 1))
    assert cache.compressions >= 2
    for visible in (cache.visibility(cameras=[1]), cache.visibility(since_ns=6 * 10**9), None):
        dyn = _answer(tiny_adapter, cache, "dynamic", visible=visible)
        static = _answer(tiny_adapter, cache, "eager", visible=visible)
        assert static.token_ids == dyn.token_ids
    # the mask matters: camera 1 alone gives another answer than all cameras (else this test proves nothing)
    assert (_answer(tiny_adapter, cache, "eager", visible=cache.visibility(cameras=[1]), n=8).token_ids
            != _answer(tiny_adapter, cache, "eager", n=8).token_ids)


def test_step_compiles_fullgraph_once_for_32_steps(tiny_adapter, vtest_frames):
    import torch._dynamo as dynamo

    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's captured FX graph, run as is
        graphs.append(gm)
        return gm.forward

    cache = _stream(tiny_adapter, vtest_frames[0][:6])
    ref = _answer(tiny_adapter, cache, "dynamic", n=33)
    dynamo.reset()
    dynamo.utils.counters.clear()
    with _mode(tiny_adapter, "compile", counting_backend):
        got = tiny_adapter.generate(cache, "What is happening?", max_new_tokens=33)
        # a second answer reuses the same compiled step (same buffers, same shapes)
        again = tiny_adapter.generate(cache, "What is happening?", max_new_tokens=33)
    assert got.token_ids == ref.token_ids == again.token_ids and len(ref.token_ids) == 33
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for 64 decode steps (recompilation)"
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_streamed_text_pieces_are_whole_characters(tiny_adapter, vtest_frames):
    cache = _stream(tiny_adapter, vtest_frames[0][:4])
    pieces, counts = [], []
    ans = _answer(tiny_adapter, cache, "eager", n=40,
                  on_token=lambda piece, n: pieces.append(piece) or counts.append(n))
    assert counts[: len(ans.token_ids)] == list(range(1, len(ans.token_ids) + 1))  # once per token
    joined = "".join(pieces)
    assert joined.strip() == ans.text
    full = tiny_adapter.tokenizer.decode(ans.token_ids, skip_special_tokens=True)
    assert joined == full
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in full


def test_bad_decode_mode_is_refused(tiny_model_dir):
    from infinipot_ros.models import load_adapter

    with pytest.raises(ValueError, match="decode_mode"):
        load_adapter(tiny_model_dir, device="cpu", dtype="float32", decode_mode="fast")
