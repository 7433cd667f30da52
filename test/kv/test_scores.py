"""TaR and VaN scores against values computed by hand on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from infinipot_ros.kv import (
    ChunkTable, InfiniPotVPolicy, TaRPolicy, VaNPolicy, VisionChunk, keep_topk, pool_on_grid, tar_similarity,
    value_norms,
)
from infinipot_ros.kv.van import kernel_for_layer


def _layout(chunks, n_heads=1):
    """Layout of a cache holding every token of ``chunks`` in order, same for all heads."""
    table = ChunkTable()
    for c in chunks:
        table.append(c)
    ids = torch.arange(table.next_token_id).expand(1, n_heads, -1)
    return table.layout(ids)


def test_tar_similarity_single_recent_frame_by_hand():
    # Two chunks of 1x2 tokens; chunk 1 is recent. D = 2.
    keys = torch.tensor([[[[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0]]]])
    lay = _layout([VisionChunk(1, 2), VisionChunk(1, 2)])
    sim = tar_similarity(keys, lay, torch.tensor([False, True]))  # chunk 1 is recent
    # token 0 (0,0) vs recent (0,0)=(1,0): cos 1; token 1 (0,1)=(0,2) vs (1,1): cos = 2/(2*sqrt2)
    expected = torch.tensor([1.0, 1 / math.sqrt(2), 1.0, 1.0])
    assert torch.allclose(sim[0, 0], expected, atol=1e-6)


def test_tar_similarity_is_mean_over_recent_frames():
    # Three chunks of 1x1; the last two are recent: past key (1,0) vs recent (1,0) and (0,5).
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]]]])
    lay = _layout([VisionChunk(1, 1)] * 3)
    sim = tar_similarity(keys, lay, torch.tensor([False, True, True]))
    assert sim[0, 0, 0].item() == pytest.approx(0.5)  # mean(cos=1, cos=0)


def test_tar_similarity_per_head_and_no_reference():
    # Head 1 has opposite keys: cos -1. A token whose spatial index has no recent token gets 0.
    k_head0 = [[1.0, 0.0], [5.0, 5.0], [2.0, 0.0]]
    k_head1 = [[-1.0, 0.0], [5.0, 5.0], [2.0, 0.0]]
    keys = torch.tensor([[k_head0, k_head1]])
    table = ChunkTable()
    table.append(VisionChunk(1, 2))  # tokens 0 (0,0), 1 (0,1)
    table.append(VisionChunk(1, 1))  # token 2 (0,0), recent
    lay = table.layout(torch.arange(3).expand(1, 2, 3))
    sim = tar_similarity(keys, lay, torch.tensor([False, True]))
    assert sim[0, 0].tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert sim[0, 1].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_tar_policy_scores_minus_similarity_and_protects_recent():
    keys = torch.tensor([[[[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 1.0]]]])
    lay = _layout([VisionChunk(1, 2), VisionChunk(1, 2)])
    # recent_ratio 0.25 of 2 pseudo-frames rounds to 1 (at least one) recent frame.
    score = TaRPolicy(recent_ratio=0.25).score(keys, value_norms(keys), lay, layers=[0], num_layers=1, keep=3)
    assert score[0, 0, 0].item() == pytest.approx(-1.0)
    assert score[0, 0, 1].item() == pytest.approx(-1 / math.sqrt(2))
    assert torch.isinf(score[0, 0, 2:]).all() and (score[0, 0, 2:] > 0).all()
    # so the past token that differs from now (token 1) is kept before the redundant one
    assert keep_topk(score, 3)[0, 0].tolist() == [1, 2, 3]


def test_recent_frames_count_is_ratio_of_cached_frames():
    lay = _layout([VisionChunk(1, 4)] * 16)  # 16 frames of 4 tokens
    mask = lay.recent_mask(0.125)  # 1/8 of 16 frames = 2 frames
    assert mask[0, 0].sum().item() == 8
    assert mask[0, 0, -8:].all()


def test_value_norms_by_hand():
    values = torch.tensor([[[[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]]]])
    assert value_norms(values)[0, 0].tolist() == pytest.approx([5.0, 0.0, math.sqrt(2)])


def test_pooling_masked_average_on_grid_by_hand():
    # One 3x3 frame, scores 1..9 row-major. 2-D (1,3,3) pooling:
    #   centre = mean(1..9) = 5; corner (0,0) = mean(1,2,4,5) = 3.
    lay = _layout([VisionChunk(3, 3)])
    scores = torch.arange(1.0, 10.0).reshape(1, 1, 9)
    pooled = pool_on_grid(scores, lay, (1, 3, 3))
    assert pooled[0, 0, 4].item() == pytest.approx(5.0)
    assert pooled[0, 0, 0].item() == pytest.approx(3.0)
    # Evicted neighbours do not count: drop token 4 (score 5) -> corner = mean(1,2,4) = 7/3
    ids = torch.tensor([[[0, 1, 2, 3, 5, 6, 7, 8]]])
    table = ChunkTable()
    table.append(VisionChunk(3, 3))
    pooled = pool_on_grid(scores[..., [0, 1, 2, 3, 5, 6, 7, 8]], table.layout(ids), (1, 3, 3))
    assert pooled[0, 0, 0].item() == pytest.approx(7 / 3)


def test_pooling_3d_spans_time_and_1x1x1_is_identity():
    lay = _layout([VisionChunk(1, 1)] * 3)
    scores = torch.tensor([[[3.0, 6.0, 9.0]]])
    assert pool_on_grid(scores, lay, (3, 1, 1))[0, 0].tolist() == pytest.approx([4.5, 6.0, 7.5])
    assert torch.equal(pool_on_grid(scores, lay, (1, 1, 1)), scores)
    with pytest.raises(ValueError):
        pool_on_grid(scores, lay, (2, 1, 1))


def test_layer_adaptive_kernel_schedule():
    kernels = ((3, 3, 3), (1, 3, 3), (1, 1, 3), (1, 1, 1))
    got = [kernel_for_layer(kernels, i, 36) for i in (0, 8, 9, 17, 18, 26, 27, 35)]
    assert got == [(3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3), (1, 1, 3), (1, 1, 3), (1, 1, 1), (1, 1, 1)]


def test_infinipot_v_keeps_tar_choice_then_top_values():
    # 4 chunks of 1x1 token; last is recent. keep=2, tar_ratio=0.5 -> TaR picks 1 (the recent one).
    # Remaining slot: the largest value norm among the past -> token 1.
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]]])
    values = torch.tensor([[[[1.0, 0.0], [9.0, 0.0], [2.0, 0.0], [0.1, 0.0]]]])
    lay = _layout([VisionChunk(1, 1)] * 4)
    pol = InfiniPotVPolicy(tar_ratio=0.5, recent_ratio=0.2, pool_kernels=None)
    scores = pol.score(keys, value_norms(values), lay, layers=[0], num_layers=1, keep=2)
    assert keep_topk(scores, 2)[0, 0].tolist() == [1, 3]
    # With tar_ratio=1 TaR picks both: recent + the past token least like it (all equal -> earliest).
    keys2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]]])
    pol = InfiniPotVPolicy(tar_ratio=1.0, recent_ratio=0.2, pool_kernels=None)
    scores = pol.score(keys2, value_norms(values), lay, layers=[0], num_layers=1, keep=2)
    assert keep_topk(scores, 2)[0, 0].tolist() == [1, 3]


def test_van_policy_validates_kernels():
    with pytest.raises(ValueError):
        VaNPolicy(pool_kernels=((2, 3, 3),))
    with pytest.raises(ValueError):
        InfiniPotVPolicy(tar_ratio=1.5)
    with pytest.raises(ValueError):
        TaRPolicy(recent_ratio=0.0)


def _compressed_cache(seed, policy="infinipot_v", cameras=2):
    """A real CappedKVCache after several compressions: 2 cameras, chunks of two grid sizes, partial chunks."""
    from infinipot_ros.kv import CacheBudget, CappedKVCache, make_policy

    gen = torch.Generator().manual_seed(seed)
    cache = CappedKVCache(2, 2, 8, budget=CacheBudget(max_vision_tokens=60), policy=make_policy(policy))
    with cache.prefix():
        for layer in range(2):
            cache.update(layer, torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen))
    for i in range(14):
        grid = (3, 4) if i % 3 else (2, 5)
        with cache.vision_chunk(VisionChunk(*grid, camera=i % cameras)):
            for layer in range(2):
                n = grid[0] * grid[1]
                cache.update(layer, torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen))
    assert cache.compressions >= 3
    return cache


def _token_sources(cache, ids_row):
    """(camera, t_local, row, col) of every token id of a row, by brute force over the table's records."""
    recs = cache.table.records
    order = {}
    for r in recs:
        order.setdefault(r.chunk.camera, []).append(r.chunk_id)
    out = []
    for tid in ids_row.tolist():
        rec = max((r for r in recs if r.first_token_id <= tid), key=lambda r: r.first_token_id)
        local = tid - rec.first_token_id
        out.append((rec.chunk.camera, order[rec.chunk.camera].index(rec.chunk_id), local // rec.chunk.grid_w,
                    local % rec.chunk.grid_w))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 3, 3), (1, 1, 3), (5, 3, 1)])
def test_pooling_equals_brute_force_masked_mean_on_a_compressed_cache(seed, kernel):
    cache = _compressed_cache(seed)
    ids = cache._token_ids[:, 0, :, : cache.vision_length]  # [L, H, S]: L as the N axis
    scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed))
    pooled = pool_on_grid(scores, cache.table.layout(ids), kernel)
    kt, kh, kw = kernel
    for n in range(ids.shape[0]):
        for h in range(ids.shape[1]):
            src = _token_sources(cache, ids[n, h])
            for i, (cam, t, r, c) in enumerate(src):
                near = [j for j, (cam2, t2, r2, c2) in enumerate(src)
                        if cam2 == cam and abs(t2 - t) <= kt // 2 and abs(r2 - r) <= kh // 2 and abs(c2 - c) <= kw // 2]
                expected = scores[n, h, near].mean().item()
                assert pooled[n, h, i].item() == pytest.approx(expected, abs=1e-6), (n, h, i)


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_similarity_equals_brute_force_on_a_compressed_cache(seed):
    cache = _compressed_cache(seed)
    p, s = cache.prefix_length, cache.vision_length
    keys = cache._keys[:, 0, :, p : p + s]  # [L, H, S, D] strided view, as the cache scores it
    ids = cache._token_ids[:, 0, :, :s]
    flags, _ = cache.table.recent_chunks(0.3)
    assert 0 < int(flags.sum()) < len(cache.table)
    recent_ids = {r.chunk_id for r, f in zip(cache.table.records, flags.tolist()) if f}
    chunk_of = {}
    for r in cache.table.records:
        for t in range(r.chunk.num_tokens):
            chunk_of[r.first_token_id + t] = r.chunk_id
    sim = tar_similarity(keys, cache.table.layout(ids), flags)
    for n in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            src = _token_sources(cache, ids[n, h])
            for i, (cam, _, r, c) in enumerate(src):
                ref = [j for j, (cam2, _, r2, c2) in enumerate(src)
                       if (cam2, r2, c2) == (cam, r, c) and chunk_of[int(ids[n, h, j])] in recent_ids]
                cos = [torch.nn.functional.cosine_similarity(keys[n, h, i], keys[n, h, j], dim=0).item() for j in ref]
                expected = sum(cos) / len(cos) if cos else 0.0
                assert sim[n, h, i].item() == pytest.approx(expected, abs=1e-5), (n, h, i)
