"""Streaming prefill and decoding of the Qwen2.5-VL adapter against transformers' own one-shot path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from infinipot_ros.kv import CacheBudget, VisionChunk, make_policy


def _stream(adapter, frames, *, budget=CacheBudget(), policy=None, fps=2.0, return_logits=False):
    cache = adapter.new_cache(budget=budget, policy=policy)
    adapter.prefill_prefix(cache)
    logits = []
    for k in range(0, len(frames) - 1, 2):
        patch = adapter.encode_patch(frames[k : k + 2])
        chunk = VisionChunk(patch.grid_h, patch.grid_w, stamp_ns=int(k / fps * 1e9), num_frames=2)
        out = adapter.prefill_patch(cache, patch, chunk, return_logits=return_logits, seconds=k / fps)
        if return_logits:
            logits.append(out)
    return cache, (torch.cat(logits) if return_logits else None)


def _one_shot_inputs(adapter, frames, question="What is happening?", fps=2.0):
    proc = adapter.processor
    text = adapter._render(question)
    inputs = proc(text=[text], videos=[np.stack(frames)], return_tensors="pt",
                  videos_kwargs=dict(adapter._video_kwargs))
    # Frames are sampled at `fps`: a temporal patch of 2 frames spans 2 / fps seconds.
    inputs["second_per_grid_ts"] = torch.tensor([2.0 / fps])
    return inputs


def test_chunked_prefill_equals_one_shot_prefill(tiny_adapter, vtest_frames):
    frames = vtest_frames[0][:8]
    _, stream_logits = _stream(tiny_adapter, frames, return_logits=True)
    inputs = _one_shot_inputs(tiny_adapter, frames)
    with torch.inference_mode():
        ref = tiny_adapter.model(**inputs).logits[0]
    video = inputs["input_ids"][0] == tiny_adapter.model.config.video_token_id
    ref_video = ref[video]
    gh, gw = tiny_adapter.patch_grid(*frames[0].shape[:2])
    assert (gh, gw) == (6, 9)  # 576x768 under 64*28*28 pixels -> 168x252 -> 6x9 merged tokens
    assert ref_video.shape == stream_logits.shape == (4 * gh * gw, tiny_adapter.model.config.text_config.vocab_size)
    err = (ref_video - stream_logits).abs().max().item()
    assert err < 1e-4, f"streaming vs one-shot logits differ by {err}"
    # and it is not trivially equal: the vision tokens' logits vary
    assert stream_logits.std(0).mean() > 1e-2


def test_chunk_positions_match_models_rope_index(tiny_adapter, vtest_frames):
    frames = vtest_frames[0][:8]
    inputs = _one_shot_inputs(tiny_adapter, frames, fps=2.0)
    pos, _ = tiny_adapter.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], None, inputs["video_grid_thw"],
        inputs["second_per_grid_ts"], inputs["attention_mask"],
    )
    video = inputs["input_ids"][0] == tiny_adapter.model.config.video_token_id
    p = len(tiny_adapter.prefix_ids)
    gh, gw = tiny_adapter.patch_grid(*frames[0].shape[:2])
    mine = torch.cat([tiny_adapter.chunk_positions(p, k * 1.0, gh, gw) for k in range(4)], dim=1)
    assert torch.equal(pos[:, 0, video], mine)
    assert mine[0].unique().tolist() == [p, p + 2, p + 4, p + 6]  # 2 tokens/s, 1 s per patch


def test_answer_equals_full_sequence_greedy_decoding(tiny_adapter, vtest_frames):
    """Decoding from the cache (scratch) equals greedy decoding over the whole sequence in one forward."""
    frames = vtest_frames[0][:6]
    cache, _ = _stream(tiny_adapter, frames)
    answer = tiny_adapter.generate(cache, "What is happening?", max_new_tokens=6)
    assert len(answer.token_ids) == 6
    # Rebuild: prefix + vision (through a fresh cache) + question + answer tokens, positions as the adapter uses.
    q_ids = tiny_adapter.question_ids("What is happening?")
    start = tiny_adapter.next_text_position(cache)
    seq = q_ids + answer.token_ids[:-1]
    fresh, _ = _stream(tiny_adapter, frames)
    embeds = tiny_adapter.model.get_input_embeddings()(torch.tensor(seq))
    with torch.inference_mode():
        logits = tiny_adapter._forward(fresh, embeds, (torch.arange(len(seq)) + start).expand(3, -1), logits="all")
    greedy = logits[len(q_ids) - 1 :].argmax(-1).tolist()
    assert greedy == answer.token_ids


def test_ask_leaves_cache_exactly_as_before(tiny_adapter, vtest_frames):
    cache, _ = _stream(tiny_adapter, vtest_frames[0][:6])
    before = [tuple(t.clone() for t in cache.layer_kv(layer)) for layer in range(cache.num_layers)]
    tiny_adapter.generate(cache, "Where are the people walking?", max_new_tokens=5)
    for layer in range(cache.num_layers):
        k, v = cache.layer_kv(layer)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])


def test_masked_tokens_do_not_reach_the_answer(tiny_adapter, vtest_frames):
    """Noise in masked K/V changes the answer's logits by exactly 0; noise in visible K/V changes them."""
    frames, _ = vtest_frames
    cache = tiny_adapter.new_cache(budget=CacheBudget(), policy=None)
    tiny_adapter.prefill_prefix(cache)
    for k in range(0, 8, 2):
        patch = tiny_adapter.encode_patch(frames[k : k + 2])
        chunk = VisionChunk(patch.grid_h, patch.grid_w, camera=(k // 2) % 2, stamp_ns=k * 10**9, num_frames=2)
        tiny_adapter.prefill_patch(cache, patch, chunk, seconds=float(k))
    visible = cache.visibility(cameras=[1])
    q = tiny_adapter.question_ids("What is happening?")
    embeds = tiny_adapter.model.get_input_embeddings()(torch.tensor(q))
    start = tiny_adapter.next_text_position(cache)
    pos = (torch.arange(len(q)) + start).expand(3, -1)

    def answer_logits():
        with cache.scratch(), torch.inference_mode():
            return tiny_adapter._forward(cache, embeds, pos, visible=visible)

    ref = answer_logits()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # the cache's buffers are inference tensors
        for layer in range(cache.num_layers):
            k, v = cache.layer_kv(layer)
            hidden = ~visible[layer]  # [1, H, S]
            assert 0 < int(hidden.sum()) < hidden.numel()
            k[hidden] += torch.randn(int(hidden.sum()), k.shape[-1], generator=gen) * 5
            v[hidden] += torch.randn(int(hidden.sum()), v.shape[-1], generator=gen) * 5
    assert torch.equal(answer_logits(), ref)
    with torch.inference_mode():
        k, v = cache.layer_kv(0)
        v[visible[0] & (torch.arange(v.shape[2]) >= cache.prefix_length)] += 5.0
    assert (answer_logits() - ref).abs().max() > 1e-3


@pytest.mark.parametrize("policy", ["infinipot_v", "recent"])
def test_compressed_stream_keeps_positions_and_answers(tiny_adapter, vtest_frames, policy):
    frames, _ = vtest_frames
    cache, _ = _stream(tiny_adapter, frames, budget=CacheBudget(max_vision_tokens=160), policy=make_policy(policy))
    assert cache.compressions >= 2 and cache.vision_length <= 160
    # the next text position follows the newest frame, which survives every compression
    assert tiny_adapter.next_text_position(cache) == cache.table.records[-1].chunk.max_position + 1
    answer = tiny_adapter.generate(cache, "What is happening?", max_new_tokens=4)
    assert len(answer.token_ids) == 4


def test_encode_patch_rejects_bad_frames(tiny_adapter, vtest_frames):
    f = vtest_frames[0][0]
    with pytest.raises(ValueError, match="2 frames"):
        tiny_adapter.encode_patch([f])
    with pytest.raises(ValueError, match="differ"):
        tiny_adapter.encode_patch([f, f[:100]])
    with pytest.raises(ValueError, match="uint8"):
        tiny_adapter.encode_patch([f.astype(np.float32)] * 2)
