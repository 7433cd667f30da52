"""CappedKVCache.state_dict / load_state_dict: exact round trips, refusals, a smaller budget on load."""
from __future__ import annotations

import pytest
import torch

from infinipot_ros.kv import CacheBudget, CacheStateError, CappedKVCache, ChunkTable, VisionChunk, make_policy

L, H, D = 3, 2, 8
PREFIX = 5
GRID = (3, 4)


def _cache(m=40, policy="infinipot_v", layers=L, heads=H, head_dim=D, dtype=torch.float32, prefix_seed=0,
           prefix_len=PREFIX, device="cpu"):
    """A cache with its prefix written from ``prefix_seed`` (the same seed = the same "system prompt")."""
    pol = make_policy(policy)
    budget = CacheBudget(max_vision_tokens=m) if pol is not None else CacheBudget()
    cache = CappedKVCache(layers, heads, head_dim, dtype=dtype, device=device, budget=budget, policy=pol,
                          reserve_tokens=16)
    gen = torch.Generator().manual_seed(prefix_seed)
    with cache.prefix():
        for layer in range(layers):
            k = torch.randn(1, heads, prefix_len, head_dim, generator=gen).to(device, dtype)
            cache.update(layer, k, torch.randn(1, heads, prefix_len, head_dim, generator=gen).to(device, dtype))
    return cache


def _stream(cache, chunks, seed, start=0, cameras=2):
    """Append ``chunks`` chunks (random K/V from ``seed``), alternating cameras, stamps from chunk ``start``."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(start, start + chunks):
        chunk = VisionChunk(*GRID, camera=i % cameras, stamp_ns=i * 10**9, end_stamp_ns=i * 10**9 + 5 * 10**8,
                            num_frames=2, position=PREFIX + i, max_position=PREFIX + i + 3)
        with cache.vision_chunk(chunk):
            for layer in range(cache.num_layers):
                n = chunk.num_tokens
                shape = (1, cache.num_kv_heads, n, cache.head_dim)
                k = torch.randn(shape, generator=gen).to(cache.device, cache.dtype)
                cache.update(layer, k, torch.randn(shape, generator=gen).to(cache.device, cache.dtype))
    return cache


def _assert_states_equal(a: dict, b: dict, timing=True):
    """Every tensor equal; ``timing=False`` skips the wall time (ms) of the last compression."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        x, y = a[name], b[name]
        if name == "last_compression" and not timing:
            x, y = x[[0, 1, 3]], y[[0, 1, 3]]
        assert torch.equal(x, y), f"{name} differs"


def _snapshot(cache) -> dict:
    """Everything observable about a cache's memory (for 'unchanged' checks)."""
    st = cache.state_dict()
    st["_len"] = torch.tensor([cache.get_seq_length(i) for i in range(cache.num_layers)])
    st["_capacity"] = torch.tensor(cache.capacity)
    return st


def test_round_trip_after_several_compressions_is_exact():
    src = _stream(_cache(), chunks=12, seed=1)
    assert src.compressions >= 3 and src.vision_length <= 40
    state = src.state_dict()
    for name, t in state.items():
        assert t.device.type == "cpu" and t.is_contiguous(), name
    assert state["keys"].shape == (L, 1, H, PREFIX + src.vision_length, D)
    assert state["token_ids"].shape == (L, 1, H, src.vision_length)

    dst = _cache()
    dst.load_state_dict(state)
    _assert_states_equal(dst.state_dict(), state)
    for layer in range(L):
        for a, b in zip(dst.layer_kv(layer), src.layer_kv(layer)):
            assert torch.equal(a, b)
        assert torch.equal(dst.vision_token_ids(layer), src.vision_token_ids(layer))
    assert dst.table.records == src.table.records
    assert dst.table.next_token_id == src.table.next_token_id
    s1, s2 = dst.stats(), src.stats()
    assert s1 == s2  # every count, stamp, last compression ms and the capacity
    assert dst.visibility([1], since_ns=3 * 10**9) is not None
    for a, b in zip(dst.visibility([1], since_ns=3 * 10**9), src.visibility([1], since_ns=3 * 10**9)):
        assert torch.equal(a, b)

    # the restored cache goes on exactly like the original: same compressions, same kept tokens
    _stream(src, chunks=7, seed=2, start=12)
    _stream(dst, chunks=7, seed=2, start=12)
    assert src.compressions > state["compressions"].item()
    _assert_states_equal(dst.state_dict(), src.state_dict(), timing=False)


def test_export_is_a_copy():
    cache = _stream(_cache(), chunks=5, seed=3)
    state = cache.state_dict()
    keys = state["keys"].clone()
    ids = state["token_ids"].clone()
    cols = state["table.first"].clone()
    _stream(cache, chunks=4, seed=4, start=5)  # compresses in place
    assert torch.equal(state["keys"], keys) and torch.equal(state["token_ids"], ids)
    assert torch.equal(state["table.first"], cols)


@pytest.mark.parametrize("kw, what", [
    ({"layers": L + 1}, "L="), ({"heads": H * 2}, "H_kv="), ({"head_dim": D * 2}, "D="),
    ({"dtype": torch.bfloat16}, "bfloat16"),
])
def test_geometry_mismatch_raises_and_leaves_cache_unchanged(kw, what):
    state = _stream(_cache(), chunks=6, seed=5).state_dict()
    other = _stream(_cache(**kw), chunks=2, seed=6)
    before = _snapshot(other)
    with pytest.raises(CacheStateError, match=what):
        other.load_state_dict(state)
    _assert_states_equal(_snapshot(other), before)


def test_other_prefix_raises_and_leaves_cache_unchanged():
    state = _stream(_cache(), chunks=6, seed=5).state_dict()
    other = _stream(_cache(prefix_seed=9), chunks=2, seed=6)  # same length, another "system prompt"
    before = _snapshot(other)
    with pytest.raises(CacheStateError, match="prefix K differs"):
        other.load_state_dict(state)
    _assert_states_equal(_snapshot(other), before)
    longer = _cache(prefix_len=PREFIX + 1)
    with pytest.raises(CacheStateError, match=f"saved prefix has {PREFIX} tokens, this cache's {PREFIX + 1}"):
        longer.load_state_dict(state)


def test_prefix_within_rounding_is_accepted_and_restored_exactly():
    state = _stream(_cache(), chunks=6, seed=5).state_dict()
    dst = _cache()
    keys = state["keys"].clone()
    keys[..., :PREFIX, :] *= 1 + 1e-6  # another machine's rounding
    state["keys"] = keys
    dst.load_state_dict(state)
    assert torch.equal(dst.state_dict()["keys"], keys)


def test_missing_or_inconsistent_tensors_raise():
    state = _stream(_cache(), chunks=6, seed=5).state_dict()
    dst = _cache()
    before = _snapshot(dst)
    for name in ("keys", "value_norms", "table.first", "table.next_token_id"):
        broken = {k: v for k, v in state.items() if k != name}
        with pytest.raises(CacheStateError, match=name.split(".")[-1]):
            dst.load_state_dict(broken)
    broken = dict(state, token_ids=state["token_ids"].flip(-1))
    with pytest.raises(CacheStateError, match="ascending"):
        dst.load_state_dict(broken)
    broken = dict(state, **{"table.next_token_id": torch.tensor(0)})
    with pytest.raises(CacheStateError, match="behind"):
        dst.load_state_dict(broken)
    broken = dict(state, vision_length=state["vision_length"] - 1)
    with pytest.raises(CacheStateError, match="does not fit"):
        dst.load_state_dict(broken)
    _assert_states_equal(_snapshot(dst), before)
    fresh = CappedKVCache(L, H, D, budget=CacheBudget(max_vision_tokens=40), policy=make_policy("tar"))
    with pytest.raises(CacheStateError, match="prefix"):
        fresh.load_state_dict(state)
    with pytest.raises(CacheStateError, match="prefix"):
        fresh.state_dict()


def test_smaller_budget_compresses_on_load_and_keeps_steady_capacity():
    src = _stream(_cache(m=60), chunks=10, seed=7)
    assert src.vision_length > 20
    state = src.state_dict()
    dst = _cache(m=20)
    steady = dst.capacity
    dst.load_state_dict(state)
    assert dst.vision_length == dst.target_vision_tokens == 15
    assert dst.compressions == src.compressions + 1
    assert dst.capacity == steady
    kept = dst.vision_token_ids(0)[0]  # kept tokens are a subset of the saved ones, in order
    saved = state["token_ids"][0, 0]
    for h in range(H):
        assert torch.isin(kept[h], saved[h].to(kept.device)).all()
        assert kept[h].tolist() == sorted(kept[h].tolist())
    # and the cap holds from then on
    _stream(dst, chunks=4, seed=8, start=10)
    assert dst.vision_length <= 20


def test_uncapped_source_loads_into_capped_cache():
    src = _stream(_cache(policy="none"), chunks=8, seed=9)
    assert src.compressions == 0 and src.vision_length == 8 * 12
    state = src.state_dict()
    ref = torch.linalg.vector_norm(state["values"][..., PREFIX:, :].float(), dim=-1)
    assert torch.allclose(state["value_norms"], ref, rtol=0, atol=1e-6)
    dst = _cache(m=40)
    dst.load_state_dict(state)
    assert dst.vision_length == 30 and dst.compressions == 1
    back = _cache(policy="none")  # and into an uncapped one: the whole stream, grown as needed
    back.load_state_dict(state)
    assert back.vision_length == 96 and back.capacity >= PREFIX + 96
    assert torch.equal(back.state_dict()["keys"], state["keys"])


def test_chunk_table_round_trip_and_validation():
    table = ChunkTable(capacity=2)
    for i in range(5):
        table.append(VisionChunk(2, 3, camera=i % 2, stamp_ns=i, num_frames=2, position=i, max_position=i + 2))
    state = table.state_dict()
    other = ChunkTable()
    other.load_state_dict(state)
    assert other.records == table.records and other.next_token_id == table.next_token_id == 30
    rec = other.append(VisionChunk(2, 3))
    assert (rec.chunk_id, rec.first_token_id) == (5, 30)
    with pytest.raises(ValueError, match="lengths"):
        other.load_state_dict(dict(state, camera=state["camera"][:-1]))
    with pytest.raises(ValueError, match="stream order"):
        other.load_state_dict(dict(state, first=state["first"].flip(0)))
    assert len(other) == 6  # unchanged by the refused loads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_state_loads_into_a_cuda_cache_and_exports_back_to_cpu():
    src = _stream(_cache(), chunks=12, seed=1)
    state = src.state_dict()
    dst = _cache(device="cuda")
    dst.load_state_dict(state)
    assert dst._keys.device.type == "cuda" and dst.table.next_token_id == src.table.next_token_id
    back = dst.state_dict()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in back.values())
    _assert_states_equal(back, state)
    small = _cache(m=20, device="cuda")  # compression on load runs on the device (Triton where available)
    small.load_state_dict(state)
    assert small.vision_length == 15 and small.compressions == src.compressions + 1
