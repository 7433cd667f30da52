"""CUDA parity (skipped without a GPU): the same stream gives the same logits and cap on CUDA as on CPU."""
from __future__ import annotations

import pytest
import torch

from infinipot_ros.kv import CacheBudget, CappedKVCache, VisionChunk, make_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _stream_logits(adapter, frames, budget=CacheBudget(), policy=None):
    cache = adapter.new_cache(budget=budget, policy=policy)
    adapter.prefill_prefix(cache)
    out = []
    for k in range(0, len(frames) - 1, 2):
        patch = adapter.encode_patch(frames[k : k + 2])
        chunk = VisionChunk(patch.grid_h, patch.grid_w, stamp_ns=k * 500_000_000, num_frames=2)
        out.append(adapter.prefill_patch(cache, patch, chunk, return_logits=True, seconds=k * 0.5).float().cpu())
    return cache, torch.cat(out)


@pytest.fixture(scope="module")
def cuda_adapter(tiny_model_dir):
    from infinipot_ros.models import load_adapter

    return load_adapter(tiny_model_dir, device="cuda", dtype="float32", max_pixels=64 * 28 * 28)


def test_cuda_fp32_logits_match_cpu(tiny_adapter, cuda_adapter, vtest_frames):
    frames = vtest_frames[0][:8]
    _, cpu = _stream_logits(tiny_adapter, frames)
    # cuDNN convolutions (the vision patch embedding) default to TF32 on Ampere+; compare true fp32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _, gpu = _stream_logits(cuda_adapter, frames)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (cpu - gpu).abs().max().item() < 1e-3


def test_cuda_compression_keeps_same_tokens_as_cpu(tiny_adapter, cuda_adapter, vtest_frames):
    frames = vtest_frames[0]
    budget = CacheBudget(max_vision_tokens=160)
    c_cpu, _ = _stream_logits(tiny_adapter, frames, budget, make_policy("infinipot_v"))
    c_gpu, _ = _stream_logits(cuda_adapter, frames, budget, make_policy("infinipot_v"))
    assert c_gpu.compressions == c_cpu.compressions >= 2
    agree = [
        (c_cpu.vision_token_ids(layer) == c_gpu.vision_token_ids(layer).cpu()).float().mean().item()
        for layer in range(c_cpu.num_layers)
    ]
    # fp32 rounding may flip near-ties in a few scores; the kept sets must be nearly identical
    assert min(agree) > 0.95, agree


def test_cuda_bf16_cache_capped_and_answers(tiny_model_dir, vtest_frames):
    from infinipot_ros.models import load_adapter

    adapter = load_adapter(tiny_model_dir, device="cuda", dtype="bfloat16", max_pixels=64 * 28 * 28)
    cache, _ = _stream_logits(adapter, vtest_frames[0], CacheBudget(max_vision_tokens=160), make_policy("infinipot_v"))
    assert cache.vision_length <= 160 and cache.stats().dtype == "bfloat16"
    assert cache.stats().bytes_per_token == 2 * 4 * 2 * 32 * 2
    ans = adapter.generate(cache, "What is happening?", max_new_tokens=4)
    assert len(ans.token_ids) == 4


def test_kv_core_runs_on_cuda_like_cpu():
    gen = torch.Generator().manual_seed(0)
    caches = {}
    for dev in ("cpu", "cuda"):
        cache = CappedKVCache(2, 2, 16, device=dev, budget=CacheBudget(max_vision_tokens=40),
                              policy=make_policy("infinipot_v"))
        gen.manual_seed(0)
        with cache.prefix():
            for layer in range(2):
                cache.update(layer, torch.randn(1, 2, 3, 16, generator=gen).to(dev),
                             torch.randn(1, 2, 3, 16, generator=gen).to(dev))
        for i in range(10):
            with cache.vision_chunk(VisionChunk(3, 4)):
                for layer in range(2):
                    cache.update(layer, torch.randn(1, 2, 12, 16, generator=gen).to(dev),
                                 torch.randn(1, 2, 12, 16, generator=gen).to(dev))
        caches[dev] = cache
    for layer in range(2):
        assert torch.equal(caches["cpu"].vision_token_ids(layer), caches["cuda"].vision_token_ids(layer).cpu())


def test_cuda_graph_decode_answers_like_dynamic(cuda_adapter, vtest_frames):
    """The decode step captured as a CUDA graph gives the dynamic path's greedy tokens, answer after answer."""
    cache, _ = _stream_logits(cuda_adapter, vtest_frames[0], CacheBudget(max_vision_tokens=160), make_policy("infinipot_v"))
    saved = cuda_adapter.decode_mode, cuda_adapter._static_step
    try:
        cuda_adapter.decode_mode, cuda_adapter._static_step = "dynamic", None
        ref = cuda_adapter.generate(cache, "What is happening?", max_new_tokens=24).token_ids
        cuda_adapter.decode_mode, cuda_adapter._static_step = "cuda_graph", None
        first = cuda_adapter.generate(cache, "What is happening?", max_new_tokens=24).token_ids
        assert cuda_adapter._static_step._graph is not None, "capture failed (fell back to eager)"
        again = cuda_adapter.generate(cache, "What is happening?", max_new_tokens=24).token_ids
        assert first == ref == again and len(ref) == 24
        vis = cache.visibility(since_ns=4 * 500_000_000)
        cuda_adapter.decode_mode, cuda_adapter._static_step = "dynamic", None
        ref_vis = cuda_adapter.generate(cache, "What is happening?", max_new_tokens=12, visible=vis).token_ids
        cuda_adapter.decode_mode, cuda_adapter._static_step = "cuda_graph", None
        assert cuda_adapter.generate(cache, "What is happening?", max_new_tokens=12, visible=vis).token_ids == ref_vis
    finally:
        cuda_adapter.decode_mode, cuda_adapter._static_step = saved


def test_cuda_compression_uses_the_triton_kernels_and_stays_capped(cuda_adapter, vtest_frames):
    from infinipot_ros.kv import triton_kernels

    assert triton_kernels.use_triton("cuda")
    cache, _ = _stream_logits(cuda_adapter, vtest_frames[0], CacheBudget(max_vision_tokens=160), make_policy("infinipot_v"))
    assert cache.compressions >= 2 and cache.vision_length <= 160
    for layer in range(cache.num_layers):
        ids = cache.vision_token_ids(layer)
        assert bool((ids[..., 1:] > ids[..., :-1]).all())
