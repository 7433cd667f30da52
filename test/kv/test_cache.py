"""CappedKVCache: the hard cap, in-place compression, transactions, scratch, budgets."""
from __future__ import annotations

import pytest
import torch

from infinipot_ros.kv import (
    POLICIES, CacheBudget, CacheStateError, CappedKVCache, PartialCompressionError, VisionChunk, make_policy,
)

L, H, D = 3, 2, 8
PREFIX = 5


def _write(cache, n, gen, layers=L):
    ks, vs = [], []
    for layer in range(layers):
        k = torch.randn(1, H, n, D, generator=gen)
        v = torch.randn(1, H, n, D, generator=gen)
        cache.update(layer, k, v)
        ks.append(k)
        vs.append(v)
    return ks, vs


def _stream(policy_name, m=40, chunks=12, grid=(3, 4), seed=0, check=None):
    gen = torch.Generator().manual_seed(seed)
    policy = make_policy(policy_name)
    budget = CacheBudget(max_vision_tokens=m) if policy is not None else CacheBudget()
    cache = CappedKVCache(L, H, D, budget=budget, policy=policy, reserve_tokens=16)
    with cache.prefix():
        _write(cache, PREFIX, gen)
    originals = {}  # global token id -> (layer -> (k [H, D], v [H, D]))
    for i in range(chunks):
        chunk = VisionChunk(*grid, stamp_ns=i * 10**9, end_stamp_ns=i * 10**9 + 5 * 10**8, num_frames=2)
        first = cache.table.next_token_id
        with cache.vision_chunk(chunk):
            ks, vs = _write(cache, chunk.num_tokens, gen)
        for t in range(chunk.num_tokens):
            originals[first + t] = [(ks[layer][0, :, t], vs[layer][0, :, t]) for layer in range(L)]
        if check is not None:
            check(cache, i)
    return cache, originals


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_never_more_than_m_vision_tokens_per_layer_and_head(name):
    m = 40

    def check(cache, i):
        for layer in range(L):
            k, v = cache.layer_kv(layer)
            assert k.shape[2] == v.shape[2] == cache.prefix_length + cache.vision_length
            assert cache.vision_length <= m
            assert cache.vision_token_ids(layer).shape == (1, H, cache.vision_length)
        st = cache.stats()
        assert st.kv_bytes <= st.kv_bytes_budget

    cache, _ = _stream(name, m=m, check=check)
    assert cache.compressions > 0
    assert cache.stats().target_vision_tokens == 30


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_kept_tokens_are_untouched_originals_in_order(name):
    cache, originals = _stream(name)
    for layer in range(L):
        k, v = cache.layer_kv(layer)
        ids = cache.vision_token_ids(layer)[0]  # [H, S_v]
        for h in range(H):
            row = ids[h].tolist()
            assert row == sorted(row) and len(set(row)) == len(row)
            for slot, tid in enumerate(row):
                ok, ov = originals[tid][layer]
                assert torch.equal(k[0, h, PREFIX + slot], ok[h])
                assert torch.equal(v[0, h, PREFIX + slot], ov[h])


def test_recent_frames_always_survive_tar_and_infinipot_v():
    for name in ("tar", "infinipot_v"):
        cache, _ = _stream(name, chunks=10)
        newest_first_id = cache.table.records[-1].first_token_id
        for layer in range(L):
            ids = cache.vision_token_ids(layer)[0]
            for h in range(H):
                assert (ids[h] >= newest_first_id).sum().item() == 12  # the whole newest chunk


def test_heads_keep_different_tokens_and_prefix_is_untouched():
    gen = torch.Generator().manual_seed(1)
    cache = CappedKVCache(L, H, D, budget=CacheBudget(max_vision_tokens=40), policy=make_policy("van"))
    with cache.prefix():
        pk, pv = _write(cache, PREFIX, gen)
    for i in range(8):
        with cache.vision_chunk(VisionChunk(3, 4)):
            _write(cache, 12, gen)
    ids = cache.vision_token_ids(0)[0]
    assert not torch.equal(ids[0], ids[1])
    k, v = cache.layer_kv(0)
    assert torch.equal(k[:, :, :PREFIX], pk[0]) and torch.equal(v[:, :, :PREFIX], pv[0])


def test_recent_policy_keeps_newest_and_uniform_spreads():
    cache, _ = _stream("recent", m=40, chunks=6)
    ids = cache.vision_token_ids(0)[0, 0].tolist()
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == 6 * 12 - 1
    cache, _ = _stream("uniform", m=40, chunks=4)  # one compression: 48 -> 30
    ids = cache.vision_token_ids(0)[0, 0].tolist()
    assert ids == [(i * 48) // 30 for i in range(30)]


def test_failed_forward_rolls_back_every_layer():
    cache, _ = _stream("infinipot_v", m=40, chunks=1)  # prefix + one 3x4 chunk
    gen = torch.Generator().manual_seed(1)
    before = [tuple(t.clone() for t in cache.layer_kv(layer)) for layer in range(L)]
    with pytest.raises(RuntimeError, match="boom"):
        with cache.vision_chunk(VisionChunk(3, 4)):
            _write(cache, 12, gen, layers=2)  # layer 2 never written
            raise RuntimeError("boom")
    with pytest.raises(CacheStateError):
        with cache.vision_chunk(VisionChunk(3, 4)):
            _write(cache, 12, gen, layers=2)  # forgot a layer: refused and rolled back
    assert len(cache.table) == 1 and cache.vision_length == 12
    for layer in range(L):
        k, v = cache.layer_kv(layer)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])


def _full_state(cache):
    return ([tuple(t.clone() for t in cache.layer_kv(layer)) for layer in range(L)],
            [cache.vision_token_ids(layer).clone() for layer in range(L)], cache.table.state_dict(),
            cache.vision_length, cache.compressions)


def _assert_same_state(cache, state):
    kv, ids, table, vision, compressions = state
    assert cache.vision_length == vision and cache.compressions == compressions
    for layer in range(L):
        k, v = cache.layer_kv(layer)
        assert torch.equal(k, kv[layer][0]) and torch.equal(v, kv[layer][1])
        assert torch.equal(cache.vision_token_ids(layer), ids[layer])
    now = cache.table.state_dict()
    assert now.keys() == table.keys() and all(torch.equal(now[k], table[k]) for k in now)


def _failing_score(cache, fail_on_call):
    real, calls = cache.policy.score, []

    def score(*args, **kwargs):
        calls.append(kwargs["layers"])
        if len(calls) == fail_on_call:
            raise RuntimeError("policy fault")
        return real(*args, **kwargs)

    cache.policy.score = score  # instance attribute: this cache's policy object only
    return calls


def test_failed_compression_takes_the_committed_chunk_out():
    """The compression a chunk triggers runs after the chunk's forward committed: if it raises before
    anything was written, the cache is exactly as before the chunk (K/V, ids, chunk table, counters)."""
    cache, _ = _stream("infinipot_v", m=40, chunks=3)  # 36 vision tokens: the next chunk compresses
    state = _full_state(cache)
    _failing_score(cache, 1)
    gen = torch.Generator().manual_seed(2)
    with pytest.raises(RuntimeError, match="policy fault"):
        with cache.vision_chunk(VisionChunk(3, 4, stamp_ns=9 * 10**9)):
            _write(cache, 12, gen)
    _assert_same_state(cache, state)
    with cache.vision_chunk(VisionChunk(3, 4, stamp_ns=10 * 10**9)):  # the next chunk goes in and compresses
        _write(cache, 12, gen)
    assert cache.compressions == 1 and cache.vision_length <= 40


def test_failure_after_a_pass_wrote_is_a_partial_compression_error():
    gen = torch.Generator().manual_seed(0)
    cache = CappedKVCache(L, H, D, budget=CacheBudget(max_vision_tokens=40), policy=make_policy("infinipot_v"),
                          reserve_tokens=16, layers_per_pass=1)
    with cache.prefix():
        _write(cache, PREFIX, gen)
    for i in range(3):
        with cache.vision_chunk(VisionChunk(3, 4, stamp_ns=i * 10**9)):
            _write(cache, 12, gen)
    state = _full_state(cache)
    calls = _failing_score(cache, 1)  # the first pass: nothing written, undone exactly
    with pytest.raises(RuntimeError, match="policy fault"):
        with cache.vision_chunk(VisionChunk(3, 4, stamp_ns=5 * 10**9)):
            _write(cache, 12, gen)
    _assert_same_state(cache, state)
    calls = _failing_score(cache, 2)  # layer 0 compacted, layer 1 fails: the layers now disagree
    with pytest.raises(PartialCompressionError, match="layer 1") as info:
        with cache.vision_chunk(VisionChunk(3, 4, stamp_ns=6 * 10**9)):
            _write(cache, 12, gen)
    assert calls[:2] == [[0], [1]] and isinstance(info.value.__cause__, RuntimeError)


def test_scratch_is_removed_and_blocks_vision():
    cache, _ = _stream("infinipot_v", m=40, chunks=1)  # prefix + one 3x4 chunk
    gen = torch.Generator().manual_seed(1)
    with cache.scratch():
        _write(cache, 7, gen)
        _write(cache, 1, gen)
        assert cache.get_seq_length() == PREFIX + 12 + 8
        assert cache.stats().scratch_tokens == 8
        with pytest.raises(CacheStateError):
            with cache.vision_chunk(VisionChunk(3, 4)):
                pass
        with pytest.raises(CacheStateError):
            cache.compress()
    assert [cache.get_seq_length(layer) for layer in range(L)] == [PREFIX + 12] * L


def test_chunk_larger_than_target_is_refused_clearly():
    gen = torch.Generator().manual_seed(0)
    cache = CappedKVCache(L, H, D, budget=CacheBudget(max_vision_tokens=16), policy=make_policy("tar"))
    with cache.prefix():
        _write(cache, PREFIX, gen)
    with pytest.raises(ValueError, match="max_pixels"):
        with cache.vision_chunk(VisionChunk(4, 4)):
            pass


def test_budget_in_megabytes_caps_resident_bytes():
    bpt = 2 * L * H * D * 4  # fp32
    assert bpt == 384
    budget = CacheBudget.from_megabytes(45 * bpt / 1e6)  # room for 45 tokens
    m, c = budget.resolve(bpt, PREFIX)
    assert (m, c) == (40, 30)
    with pytest.raises(ValueError, match="prefix"):
        CacheBudget.from_megabytes(4 * bpt / 1e6).resolve(bpt, PREFIX)
    with pytest.raises(ValueError):
        CacheBudget(max_vision_tokens=10, max_bytes=100)
    assert CacheBudget().resolve(bpt, PREFIX) == (None, None)


def test_uncapped_cache_grows_linearly_without_compressing():
    gen = torch.Generator().manual_seed(0)
    full = CappedKVCache(L, H, D, budget=CacheBudget(), policy=None)
    with full.prefix():
        _write(full, PREFIX, gen)
    sizes = []
    for i in range(30):
        with full.vision_chunk(VisionChunk(3, 4)):
            _write(full, 12, gen)
        sizes.append(full.stats().kv_bytes)
    assert full.compressions == 0
    assert all(b - a == 12 * full.bytes_per_token for a, b in zip(sizes, sizes[1:]))


def test_capped_cache_never_reallocates_in_steady_state():
    ptrs = set()

    def check(cache, i):
        if i >= 1:
            ptrs.add(cache.layer_kv(0)[0].data_ptr())

    _stream("infinipot_v", m=40, chunks=20, check=check)
    assert len(ptrs) == 1


def test_visibility_by_camera_and_time():
    gen = torch.Generator().manual_seed(0)
    cache = CappedKVCache(L, H, D, budget=CacheBudget(), policy=None)
    with cache.prefix():
        _write(cache, PREFIX, gen)
    for i in range(4):
        with cache.vision_chunk(VisionChunk(1, 2, camera=i % 2, stamp_ns=i * 100, end_stamp_ns=i * 100 + 50)):
            _write(cache, 2, gen)
    assert cache.visibility() is None
    vis = cache.visibility(cameras=[1])
    assert len(vis) == L and vis[0].shape == (1, H, PREFIX + 8)
    assert vis[0][0, 0].tolist() == [True] * PREFIX + [False, False, True, True, False, False, True, True]
    vis = cache.visibility(since_ns=120, until_ns=260)  # chunks 1 (100..150) and 2 (200..250)
    assert vis[2][0, 1, PREFIX:].tolist() == [False, False, True, True, True, True, False, False]


def test_stats_report_bytes_and_stamps():
    cache, _ = _stream("infinipot_v", m=40, chunks=12)
    st = cache.stats()
    assert st.bytes_per_token == 2 * L * H * D * 4
    assert st.kv_bytes == (PREFIX + st.vision_tokens) * st.bytes_per_token
    assert st.kv_bytes_budget == (PREFIX + 40) * st.bytes_per_token
    assert st.newest_stamp_ns == 11 * 10**9 + 5 * 10**8
    assert st.oldest_stamp_ns == cache.table.records[0].chunk.stamp_ns
    assert st.frames_in_cache == 2 * st.chunks_in_cache
    assert st.tokens_evicted == 12 * 12 - st.vision_tokens


def test_make_policy_names():
    assert make_policy("none") is None
    with pytest.raises(ValueError, match="unknown"):
        make_policy("h2o")
    pol = make_policy("infinipot_v", tar_ratio=0.25, recent_ratio=0.1)
    assert (pol.tar_ratio, pol.recent_ratio) == (0.25, 0.1)
    with pytest.raises(TypeError):  # settings are typed: a misspelt one is an error, not ignored
        make_policy("infinipot_v", tar_ration=0.25)
    # each method takes the settings it names, and only those
    assert make_policy("van").pool_kernels is None  # VaN alone: raw value norms
    assert make_policy("van_pool", pool_kernels=((1, 1, 1),) * 4).pool_kernels == ((1, 1, 1),) * 4
    assert make_policy("tar", recent_ratio=0.2).recent_ratio == 0.2
    assert make_policy("infinipot_v", pool_kernels=()).pool_kernels is None


@pytest.mark.parametrize("name", ["infinipot_v", "van_pool", "tar"])
def test_batched_layer_passes_equal_one_layer_at_a_time(name):
    results = []
    for per_pass in (1, 2, 12):
        gen = torch.Generator().manual_seed(3)
        cache = CappedKVCache(L, H, D, budget=CacheBudget(max_vision_tokens=40), policy=make_policy(name),
                              layers_per_pass=per_pass)
        with cache.prefix():
            _write(cache, PREFIX, gen)
        for i in range(9):
            with cache.vision_chunk(VisionChunk(3, 4, camera=i % 2)):
                _write(cache, 12, gen)
        results.append([cache.vision_token_ids(layer).clone() for layer in range(L)])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("name", ["infinipot_v", "tar", "van_pool"])
def test_compression_op_count_does_not_grow_with_layers(name):
    """All layers in one pass: a 16-layer cache compresses with the same operations as a 4-layer one."""
    from infinipot_ros.tools.bench import count_top_level_aten_ops  # the bench's counter, the same figure

    counts = {}
    for layers in (4, 16):
        gen = torch.Generator().manual_seed(0)
        cache = CappedKVCache(layers, H, D, budget=CacheBudget(max_vision_tokens=40), policy=make_policy(name))
        with cache.prefix():
            _write(cache, PREFIX, gen, layers=layers)
        for i in range(3):  # 36 tokens: under M, no compression yet
            with cache.vision_chunk(VisionChunk(3, 4, camera=i % 2)):
                _write(cache, 12, gen, layers=layers)
        counts[layers] = count_top_level_aten_ops(lambda: cache.compress(20))
        assert cache.vision_length == 20
    assert counts[4] == counts[16], counts
