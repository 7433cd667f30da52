"""Triton kernels (fused TaR + VaN scores, in-place compaction) against the torch references.

The kernels run on CPU tensors through Triton's interpreter: every test that
launches one takes the ``interpret`` fixture, which sets TRITON_INTERPRET=1
for that test only. triton_kernels wraps its kernels with triton.jit lazily,
once per mode, so this works whatever imported Triton (or this module)
first in the pytest process. Sizes are small: the interpreter is slow.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import pytest
import torch

from infinipot_ros.kv import (
    CacheBudget, CappedKVCache, ChunkTable, InfiniPotVPolicy, VisionChunk, gather_tokens, keep_topk, pool_on_grid,
    tar_similarity, value_norms,
)
from infinipot_ros.kv import triton_kernels as tk
from infinipot_ros.kv.van import DEFAULT_POOL_KERNELS

needs_triton = pytest.mark.skipif(not tk.AVAILABLE, reason=tk.UNAVAILABLE_REASON or "triton unavailable")

L, H = 4, 2  # 4 layers: one per pooling-kernel group, so all four kernels of DEFAULT_POOL_KERNELS are used
PREFIX = 3
# (camera, grid_h, grid_w): two cameras with chunks of different grids (partial places), and a
# third camera with a single 1x1 chunk (always its camera's recent chunk, so always kept: a
# token with no pooling neighbour). Camera 0 ends on a 2x4 chunk after 3x4 ones: places of row
# 2 have no recent token.
STREAM = [(0, 3, 4), (1, 2, 3), (0, 2, 4), (1, 2, 2), (0, 3, 4), (1, 2, 3), (2, 1, 1), (0, 3, 3), (1, 1, 3),
          (0, 3, 4), (1, 2, 3), (0, 3, 4), (1, 2, 2), (0, 2, 4)]


@pytest.fixture
def interpret(monkeypatch):
    """Run the kernels in Triton's CPU interpreter for this test; the torch/triton switch unset."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    assert tk.use_triton("cpu")


@contextlib.contextmanager
def _torch_kernels():
    """The cache's own compressions on the torch path, whatever the cache is wired to."""
    old = os.environ.get(tk.ENV_VAR)
    os.environ[tk.ENV_VAR] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ[tk.ENV_VAR]
        else:
            os.environ[tk.ENV_VAR] = old


def _cache_state(dtype=torch.float32, d=8, seed=0):
    """A CappedKVCache after a stream with several InfiniPot-V compressions, and its
    (keys, value norms, ids) of all layers, [L*B, H, S(, D)], layer-major."""
    with _torch_kernels():
        return _stream(dtype, d, seed)


def _stream(dtype, d, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = CappedKVCache(L, H, d, dtype=dtype, budget=CacheBudget(max_vision_tokens=44),
                          policy=InfiniPotVPolicy(), reserve_tokens=16)

    def write(n):
        ks, vs = [], []
        for layer in range(L):
            k = torch.randn(1, H, n, d, generator=gen).to(dtype)
            v = (torch.rand(1, H, n, d, generator=gen) * 2).to(dtype)
            cache.update(layer, k, v)
            ks.append(k)
            vs.append(v)
        return ks, vs

    with cache.prefix():
        write(PREFIX)
    for i, (cam, gh, gw) in enumerate(STREAM):
        with cache.vision_chunk(VisionChunk(gh, gw, camera=cam, stamp_ns=i, end_stamp_ns=i, num_frames=2)):
            write(gh * gw)
    assert cache.compressions >= 3
    s = cache.vision_length
    keys = torch.stack([cache.layer_kv(layer)[0][:, :, PREFIX:PREFIX + s] for layer in range(L)]).reshape(L, H, s, d)
    vals = torch.stack([cache.layer_kv(layer)[1][:, :, PREFIX:PREFIX + s] for layer in range(L)]).reshape(L, H, s, d)
    ids = torch.stack([cache.vision_token_ids(layer) for layer in range(L)]).reshape(L, H, s)
    return cache, keys, value_norms(vals), ids


def _strided(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as a non-contiguous view of a larger buffer."""
    if kind == "slice":  # [..., S, D] inside [..., S + 5, D + 3], offset (2, 1)
        pad = [(0, 0)] * (x.dim() - 2) + [(2, 3), (1, 2)] if x.dim() == 4 else [(0, 0)] * (x.dim() - 1) + [(2, 3)]
        big = torch.full([sz + a + b for sz, (a, b) in zip(x.shape, pad)], 7, dtype=x.dtype)
        view = big[tuple(slice(a, a + sz) for sz, (a, _) in zip(x.shape, pad))]
    elif kind == "transposed":  # D is the slow axis: stride(S) == 1
        big = torch.full((*x.shape[:2], x.shape[3], x.shape[2] + 4), 7, dtype=x.dtype)
        view = big.transpose(2, 3)[:, :, : x.shape[2]]
    else:
        raise ValueError(kind)
    view.copy_(x)
    assert not view.is_contiguous()
    return view


def _flags_like(proto, values):
    """Per-chunk recent flags of the type the chunk table uses (a CPU bool tensor)."""
    assert isinstance(proto, torch.Tensor)
    return torch.tensor(values, dtype=torch.bool)


def _row_kernels():
    return tk.row_kernels(DEFAULT_POOL_KERNELS, range(L), L, 1)


def _pool_reference(norms, layout, kernels):
    return torch.cat([pool_on_grid(norms[i:i + 1], layout.narrow(i, 1), k) for i, k in enumerate(kernels)])


# ------------------------------------------------------------------------------- fused_scores
@needs_triton
@pytest.mark.parametrize("kind", ["slice", "transposed"])
def test_fused_scores_match_torch_fp32_on_strided_views(interpret, kind):
    cache, keys, norms, ids = _cache_state()
    keys, norms, ids = _strided(keys, kind), _strided(norms, "slice"), _strided(ids, "slice")
    layout = cache.table.layout(ids)
    kernels = _row_kernels()
    assert sorted(set(kernels)) == sorted(set(DEFAULT_POOL_KERNELS))
    proto, _ = cache.table.recent_chunks(0.125)
    cams = torch.as_tensor(cache.table.column("camera")).tolist()
    flag_sets = [proto, cache.table.recent_chunks(0.4)[0],
                 _flags_like(proto, [c == 0 and i % 2 == 0 for i, c in enumerate(cams)])]  # camera 1: none recent
    pooled_ref = _pool_reference(norms, layout, kernels)
    for j, flags in enumerate(flag_sets):
        sim, pooled = tk.fused_scores(keys, norms, layout, flags, kernels, van=(j == 0))
        ref = tar_similarity(keys, layout, flags)
        assert sim.dtype == torch.float32 and sim.shape == ref.shape and sim.is_contiguous()
        assert (sim - ref).abs().max().item() < 1e-4
        assert ((ref == 0) == (sim == 0)).all()  # exactly 0 where no recent token shares the place
        assert (ref == 0).any() and (ref != 0).any()
        if j == 0:
            assert (pooled - pooled_ref).abs().max().item() < 1e-4
            pooled0 = pooled
        else:
            assert pooled is None
    # the data covers tokens without any cached neighbour (camera 2's 1x1 chunk, in the 3x3x3 rows too)
    lone = torch.as_tensor(cache.table.column("camera")).to(ids.device)[layout.chunk] == 2
    assert lone.any(-1).all()  # in every (layer, head) row
    assert torch.equal(pooled_ref[lone], norms[lone]) and torch.equal(pooled0[lone], norms[lone])
    # and pooling that changes the others: rows with a kernel > 1 differ from the raw norms
    assert not torch.allclose(pooled_ref[0], norms[0])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_scores_match_torch_half_keys(interpret, dtype):
    cache, keys, norms, ids = _cache_state(dtype=dtype, d=16, seed=1)
    assert keys.dtype == dtype
    keys = _strided(keys, "slice")
    layout = cache.table.layout(ids)
    flags, _ = cache.table.recent_chunks(0.3)
    kernels = _row_kernels()
    sim, pooled = tk.fused_scores(keys, norms, layout, flags, kernels)
    assert (sim - tar_similarity(keys, layout, flags)).abs().max().item() < 1e-3
    assert (pooled - _pool_reference(norms, layout, kernels)).abs().max().item() < 1e-3


@needs_triton
def test_fused_scores_by_hand_isolated_tokens_and_missing_places(interpret, monkeypatch):
    # Camera 0: a 3x3 chunk then a recent 2x2; camera 1: one recent 1x2 chunk. In row 1, token id 8
    # (chunk 0, (2, 2)) has no cached neighbour in any window and no recent token at its place (the
    # recent 2x2 grid has no (2, 2)).
    monkeypatch.setattr(tk, "_SCORES_BLOCK_S", 4)  # several programs per row
    table = ChunkTable()
    for cam, gh, gw in [(0, 3, 3), (0, 2, 2), (1, 1, 2)]:
        table.append(VisionChunk(gh, gw, camera=cam))
    # ids 0-8: chunk 0 (3x3), 9-12: chunk 1 (2x2), 13-14: chunk 2 (1x2)
    ids = torch.tensor([[[0, 1, 4, 9, 10, 12]], [[0, 2, 8, 9, 13, 14]]])  # [2 rows, 1 head, 6 tokens]
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 1, 6, 4, generator=gen)
    norms = torch.rand(2, 1, 6, generator=gen)
    layout = table.layout(ids)
    flags = _flags_like(table.recent_chunks(0.1)[0], [False, True, True])
    for kern in [(3, 3, 3), (1, 3, 3), (3, 1, 1), (1, 1, 3), (1, 1, 1)]:
        sim, pooled = tk.fused_scores(keys, norms, layout, flags, [kern, kern])
        assert (sim - tar_similarity(keys, layout, flags)).abs().max().item() < 1e-5
        assert (pooled - _pool_reference(norms, layout, [kern, kern])).abs().max().item() < 1e-5
        assert pooled[1, 0, 2].item() == pytest.approx(norms[1, 0, 2].item())  # id 8: alone in its window
        assert sim[1, 0, 2].item() == 0.0
    # tar / van alone, and nothing asked
    sim, pooled = tk.fused_scores(keys, None, layout, flags, None, van=False)
    assert pooled is None and torch.allclose(sim, tar_similarity(keys, layout, flags), atol=1e-5)
    sim, pooled = tk.fused_scores(None, norms, layout, None, [(3, 3, 3)] * 2, tar=False)
    assert sim is None and torch.allclose(pooled, _pool_reference(norms, layout, [(3, 3, 3)] * 2), atol=1e-5)
    assert tk.fused_scores(keys, norms, layout, flags, [(1, 1, 1)] * 2, tar=False, van=False) == (None, None)


@needs_triton
def test_fused_scores_validates_arguments(interpret):
    table = ChunkTable()
    table.append(VisionChunk(2, 2))
    layout = table.layout(torch.arange(4).view(1, 1, 4))
    keys, norms, flags = torch.randn(1, 1, 4, 8), torch.rand(1, 1, 4), _flags_like(table.recent_chunks(0.5)[0], [True])
    with pytest.raises(ValueError, match="one pooling kernel per row"):
        tk.fused_scores(keys, norms, layout, flags, [(3, 3, 3)] * 2)
    with pytest.raises(ValueError, match="odd"):
        tk.fused_scores(keys, norms, layout, flags, [(2, 3, 3)])
    with pytest.raises(ValueError, match="keys"):
        tk.fused_scores(keys[:, :, :3], norms, layout, flags, [(1, 1, 1)])
    with pytest.raises(ValueError, match="flags"):
        tk.fused_scores(keys, norms, layout, _flags_like(flags, [True, False]), [(1, 1, 1)])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tk.fused_scores(keys.double(), norms, layout, flags, [(1, 1, 1)])
    empty = table.layout(torch.zeros(1, 1, 0, dtype=torch.long))
    sim, pooled = tk.fused_scores(keys[:, :, :0], norms[:, :, :0], empty, flags, [(3, 3, 3)])
    assert sim.shape == pooled.shape == (1, 1, 0)


def _assert_same_topk_but_ties(scores_ref, scores_got, idx_ref, idx_got, k, tol=1e-6):
    """Equal kept sets, except where the k-th score ties (within tol) with the scores that swapped."""
    for row in zip(*torch.nonzero((idx_ref != idx_got).any(-1), as_tuple=True)):
        ref_row, got_row = scores_ref[row], scores_got[row]
        a, b = set(idx_ref[row].tolist()), set(idx_got[row].tolist())
        boundary_ref = torch.sort(ref_row, descending=True).values[k - 1]
        boundary_got = torch.sort(got_row, descending=True).values[k - 1]
        for i in a ^ b:  # every swapped token sits at the boundary in both score vectors
            assert abs(ref_row[i] - boundary_ref) <= tol and abs(got_row[i] - boundary_got) <= tol, (row, i)


@needs_triton
@pytest.mark.parametrize("seed", [0, 2])
def test_same_kept_set_as_the_infinipot_v_policy(interpret, seed, monkeypatch):
    cache, keys, norms, ids = _cache_state(seed=seed)
    layout = cache.table.layout(ids)
    s = ids.shape[-1]
    keep = (2 * s) // 3
    policy = InfiniPotVPolicy()
    with monkeypatch.context() as m:  # the policy's torch reference path
        m.setenv(tk.ENV_VAR, "torch")
        final_policy = policy.score(keys, norms, layout, layers=list(range(L)), num_layers=L, keep=keep)
    # under the interpreter the policy itself dispatches to the fused kernel
    final_policy_triton = policy.score(keys, norms, layout, layers=list(range(L)), num_layers=L, keep=keep)

    # The policy's recipe (Sec. 4.4) on either path's (similarity, pooled norms).
    flags, n_recent = cache.table.recent_chunks(policy.recent_ratio)
    recent_tok = torch.as_tensor(flags)[layout.chunk]
    n_tar = min(keep, max(n_recent, int(policy.tar_ratio * keep)))

    def final(sim, pooled):
        tar = torch.where(recent_tok, float("inf"), -sim)
        chosen = keep_topk(tar, n_tar)
        return tar, chosen, pooled.scatter(2, chosen, float("inf"))

    kernels = tk.row_kernels(policy.pool_kernels, range(L), L, 1)
    sim_ref, pooled_ref = tar_similarity(keys, layout, flags), _pool_reference(norms, layout, kernels)
    tar_ref, chosen_ref, final_ref = final(sim_ref, pooled_ref)
    assert torch.equal(final_ref, final_policy)  # the recipe is the policy's
    sim_got, pooled_got = tk.fused_scores(keys, norms, layout, flags, kernels)
    tar_got, chosen_got, final_got = final(sim_got, pooled_got)
    # TaR's choice: equal but for ties at its boundary
    _assert_same_topk_but_ties(tar_ref, tar_got, chosen_ref, chosen_got, n_tar)
    # VaN's fill given the same TaR choice: equal but for ties at its boundary
    fill_got = pooled_got.scatter(2, chosen_ref, float("inf"))
    idx_ref, idx_got = keep_topk(final_ref, keep), keep_topk(fill_got, keep)
    _assert_same_topk_but_ties(final_ref, fill_got, idx_ref, idx_got, keep)
    if torch.equal(chosen_ref, chosen_got):  # then the Triton path's final kept set is exactly that one
        assert torch.equal(keep_topk(final_got, keep), idx_got)
    assert torch.equal(final_policy_triton, final_got)  # the policy's Triton path is this recipe on the kernel


# ------------------------------------------------------------------------------------ compact_
def _buffers(gen, cap, d):
    """Cache-like buffers [L, B, H, cap(, D)]: bf16 K, fp32 V, fp32 norms, int64 ids."""
    k = torch.randn(2, 1, H, cap, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(2, 1, H, cap, d, generator=gen)
    norms = torch.rand(2, 1, H, cap, generator=gen)
    ids = torch.randint(0, 10**6, (2, 1, H, cap), generator=gen)
    return [k, v, norms, ids]


@needs_triton
@pytest.mark.parametrize("pattern", ["random", "shift", "identity", "tail"])
def test_compact_matches_gather_in_place_on_strided_views(interpret, monkeypatch, pattern):
    monkeypatch.setattr(tk, "_COMPACT_BLOCK_S", 16)  # several blocks per row
    gen = torch.Generator().manual_seed(7)
    cap, p, s, d = 160, 5, 150, 12
    keep = {"random": 100, "shift": 147, "identity": s, "tail": 40}[pattern]
    bufs = _buffers(gen, cap, d)
    before = [b.clone() for b in bufs]
    n = 2 * 1
    views = [b[:, :, :, p:p + s].reshape(n, H, s, d) if b.dim() == 5 else b[:, :, :, :s].reshape(n, H, s)
             for b in bufs]
    assert not any(v.is_contiguous() for v in views)
    if pattern == "random":
        idx = keep_topk(torch.rand(n, H, s, generator=gen), keep)
    elif pattern == "shift":  # drop 3 tokens near the front: every source is 1-3 slots ahead of its target
        idx = torch.cat([torch.arange(2), torch.arange(5, s)]).expand(n, H, keep).clone()
    elif pattern == "identity":
        idx = keep_topk(torch.zeros(n, H, s), s)
    else:  # keep only the newest tokens
        idx = torch.arange(s - keep, s).expand(n, H, keep).clone()
    expected = [gather_tokens(v, idx) for v in views]
    out = tk.compact_(views, idx, keep)
    for o, v, e in zip(out, views, expected):
        assert o.shape == e.shape and torch.equal(o, e) and torch.equal(v[:, :, :keep], e)
    # nothing else in the buffers moved (prefix, tokens >= keep, spare capacity)
    for b, b0, e in zip(bufs, before, expected):
        want = b0.clone()
        if b.dim() == 5:
            want[:, :, :, p:p + keep] = e.view(2, 1, H, keep, d)
        else:
            want[:, :, :, :keep] = e.view(2, 1, H, keep)
        assert torch.equal(b, want)


@needs_triton
def test_compact_validates_arguments(interpret):
    x = torch.randn(2, 2, 10, 4)
    idx = torch.arange(6).expand(2, 2, 6).clone()
    with pytest.raises(ValueError, match="twice"):
        tk.compact_([x, x], idx, 6)
    with pytest.raises(ValueError, match="broadcast"):
        tk.compact_([torch.randn(1, 2, 10).expand(2, 2, 10)], idx, 6)
    with pytest.raises(ValueError, match="S >= "):
        tk.compact_([x[:, :, :5]], idx, 6)
    with pytest.raises(ValueError, match="idx"):
        tk.compact_([x], idx, 7)
    assert tk.compact_([x], idx, 0)[0].shape == (2, 2, 0, 4)


# --------------------------------------------------------------------------------- dispatch
@needs_triton
def test_use_triton_honours_the_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    assert tk.use_triton("cuda") is True  # a CUDA device needs no GPU to answer
    assert tk.use_triton("cpu") is False  # compiled Triton cannot run CPU tensors
    monkeypatch.setenv(tk.ENV_VAR, "torch")
    assert tk.use_triton("cuda") is False and tk.use_triton(torch.device("cpu")) is False
    monkeypatch.setenv(tk.ENV_VAR, "triton")
    assert tk.use_triton("cuda") is True
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tk.use_triton("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.use_triton("cpu") is True
    monkeypatch.setenv(tk.ENV_VAR, "auto")
    assert tk.use_triton("cpu") is True
    monkeypatch.setenv(tk.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=tk.ENV_VAR):
        tk.use_triton("cuda")
    # Triton missing: auto falls back, triton is an error naming the reason
    monkeypatch.setattr(tk, "AVAILABLE", False)
    monkeypatch.setattr(tk, "UNAVAILABLE_REASON", "triton could not be imported: test")
    monkeypatch.setenv(tk.ENV_VAR, "auto")
    assert tk.use_triton("cuda") is False and tk.use_triton("cpu") is False
    monkeypatch.setenv(tk.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="could not be imported"):
        tk.use_triton("cuda")


def test_import_without_triton_does_not_fail(monkeypatch):
    # A private copy of the module, imported while `import triton` fails.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("infinipot_ros.kv._triton_kernels_without_triton", tk.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.AVAILABLE is False and "triton" in mod.UNAVAILABLE_REASON
    monkeypatch.delenv(mod.ENV_VAR, raising=False)
    assert mod.use_triton("cuda") is False and mod.interpreting() is False
    monkeypatch.setenv(mod.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="could not be imported"):
        mod.use_triton("cuda")
    table = ChunkTable()
    table.append(VisionChunk(1, 2))
    layout = table.layout(torch.arange(2).view(1, 1, 2))
    with pytest.raises(RuntimeError, match="unavailable"):
        mod.fused_scores(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2), layout, None, [(1, 1, 1)])
    with pytest.raises(RuntimeError, match="unavailable"):
        mod.compact_([torch.zeros(1, 1, 2)], torch.zeros(1, 1, 1, dtype=torch.long), 1)


# ------------------------------------------------------------------- compiled mode (no GPU needed)
def _compile(fn, types, consts, num_warps):
    """triton.compile of one kernel for sm_90 (front end, LLVM and ptxas; nothing runs)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn).parameters)
    sig = {nm: ("constexpr" if nm in consts else types.get(nm, "i32")) for nm in names}
    src = ASTSource(fn=tk._jit(fn), signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@needs_triton
def test_kernels_compile_for_the_gpu_and_compaction_has_its_barrier(monkeypatch, tmp_path):
    import triton

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("Triton's NVIDIA backend is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled mode
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ptrs = {"vn_ptr": "*fp32", "ids_ptr": "*i64", "tab_ptr": "*i64", "bst_ptr": "*i64", "aux_ptr": "*i64",
            "tar_ptr": "*fp32", "van_ptr": "*fp32", "k_sn": "i64", "k_sh": "i64"}
    cols = dict(C_FIRST=0, C_GH=1, C_GW=2, C_SLOT=3, C_T=4, LOG_S=12, LOG_R=6, BLOCK_S=128)
    for kdt, tar, van, bd in (("bf16", True, True, 8), ("fp32", False, True, 4)):
        k = _compile(tk._fused_scores_kernel, {"keys_ptr": f"*{kdt}", **ptrs},
                     dict(cols, DO_TAR=tar, DO_VAN=van, BLOCK_D=bd), 4)
        assert k.asm["cubin"]
    for tdt in ("bf16", "i64"):
        k = _compile(tk._compact_kernel, {"t_ptr": f"*{tdt}", "idx_ptr": "*i64", "t_sn": "i64"},
                     dict(BLOCK_S=256, BLOCK_W=32), 8)
        # In-place safety in the machine code: every store of a token block comes after a
        # barrier that follows all the loads before it.
        loaded_since_barrier = False
        events = [e for e in k.asm["ptx"].split() if e.startswith(("ld.global", "st.global", "bar.sync"))]
        assert any(e.startswith("st.global") for e in events)
        for e in events:
            if e.startswith("ld.global"):
                loaded_since_barrier = True
            elif e.startswith("bar.sync"):
                loaded_since_barrier = False
            else:
                assert not loaded_since_barrier, "a store may overtake a load of the same block"


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    assert tk.use_triton("cuda")
    cache, keys, norms, ids = _cache_state(dtype=torch.bfloat16, d=64, seed=3)
    big = torch.zeros(L, H, keys.shape[2] + 6, 80, dtype=keys.dtype, device="cuda")
    big[:, :, 3:3 + keys.shape[2], 8:72] = keys.cuda()
    keys, norms, ids = big[:, :, 3:3 + keys.shape[2], 8:72], norms.cuda(), ids.cuda()  # keys: a strided view
    layout = cache.table.layout(ids)
    flags, _ = cache.table.recent_chunks(0.3)
    kernels = _row_kernels()
    sim, pooled = tk.fused_scores(keys, norms, layout, flags, kernels)
    assert (sim - tar_similarity(keys, layout, flags)).abs().max().item() < 1e-3
    assert (pooled - _pool_reference(norms, layout, kernels)).abs().max().item() < 1e-4
    # compaction with many blocks per row (races would show here)
    gen = torch.Generator().manual_seed(0)
    s, keep, d = 5000, 3700, 128
    buf = torch.randn(3, 2, s + 64, d, generator=gen).to(torch.bfloat16).cuda()
    view = buf[:, :, 32:32 + s]
    norms = torch.rand(3, 2, s + 8, generator=gen).cuda()[:, :, :s]
    for idx in (keep_topk(torch.rand(3, 2, s, generator=gen), keep).cuda(),
                torch.cat([torch.arange(3), torch.arange(s - keep + 3, s)]).expand(3, 2, keep).contiguous().cuda()):
        want = [gather_tokens(view, idx), gather_tokens(norms, idx)]
        tk.compact_([view, norms], idx, keep)
        assert torch.equal(view[:, :, :keep], want[0]) and torch.equal(norms[:, :, :keep], want[1])


# ------------------------------------------------------------------------------ the cache, end to end
def test_cache_compressing_through_the_kernels_keeps_what_the_torch_path_keeps(interpret):
    """The whole compression (fused scores + in-place compaction) wired into CappedKVCache."""
    assert tk.use_triton("cpu")
    cache_t, keys_t, norms_t, ids_t = _stream(torch.float32, 8, 3)  # Triton path (interpreter)
    ref, keys_r, norms_r, ids_r = _cache_state(seed=3)  # torch path, same stream
    assert cache_t.compressions == ref.compressions >= 3
    agree = (ids_t == ids_r).float().mean().item()
    assert agree > 0.97, agree  # equal but for near-ties (fp32 summation order)
    # kept tokens are the untouched originals: where the ids agree, K and norms agree exactly
    same = ids_t == ids_r
    assert torch.equal(keys_t[same], keys_r[same]) and torch.equal(norms_t[same], norms_r[same])
    # and ids stay ascending per row (what the in-place compaction relies on)
    assert bool((ids_t[..., 1:] > ids_t[..., :-1]).all())
