"""Re-basing M-RoPE positions: the key rotation against transformers' rotary, and invisibility to the model.

RoPE: Su et al. 2021; M-RoPE: Qwen2-VL paper (temporal / height / width sections).
"""
from __future__ import annotations

import pytest
import torch

from infinipot_ros.kv import CacheBudget, VisionChunk
from infinipot_ros.kv.rope import HEIGHT, TEMPORAL, WIDTH, section_pairs, shift_rotary_keys_


def _stream(adapter, frames, seconds_per_patch=1.0, seconds=None):
    """Uncapped cache with the frames prefilled as patches ``seconds_per_patch`` apart (or at ``seconds``)."""
    cache = adapter.new_cache(budget=CacheBudget(), policy=None)
    adapter.prefill_prefix(cache)
    for i, k in enumerate(range(0, len(frames) - 1, 2)):
        s = seconds[i] if seconds is not None else i * seconds_per_patch
        patch = adapter.encode_patch(frames[k : k + 2])
        chunk = VisionChunk(patch.grid_h, patch.grid_w, stamp_ns=int(s * 1e9), num_frames=2)
        adapter.prefill_patch(cache, patch, chunk, seconds=s)
    return cache


def _rotary(adapter, keys, positions):
    """transformers' own M-RoPE of [B, H, S, D] pre-rotary keys at [3, B, S] positions."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    cos, sin = adapter._lm.rotary_emb(keys, positions)
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


# ------------------------------------------------------------------ the rotation
def test_section_pairs_follow_the_mrope_layout():
    assert section_pairs([16, 24, 24], TEMPORAL) == [(0, 16)]
    assert section_pairs([16, 24, 24], HEIGHT) == [(16, 40)]
    assert section_pairs([16, 24, 24], WIDTH) == [(40, 64)]
    assert section_pairs([2, 3, 3, 1], TEMPORAL) == [(0, 2), (8, 9)]
    with pytest.raises(ValueError):
        section_pairs([16, 24, 24], 3)


@pytest.mark.parametrize("per_token", [False, True])
def test_shift_equals_transformers_rotary_at_the_shifted_position(tiny_adapter, per_token):
    """A key rotated at (t, h, w) and shifted by delta equals the key rotated at (t - delta, h, w)."""
    gen = torch.Generator().manual_seed(0)
    h_kv, s, d = tiny_adapter.num_kv_heads, 40, tiny_adapter.head_dim
    raw = torch.randn(1, h_kv, s, d, generator=gen)
    pos = torch.stack([torch.randint(500, 1500, (1, s), generator=gen), torch.randint(0, 30, (1, s), generator=gen),
                       torch.randint(0, 30, (1, s), generator=gen)])
    groups = torch.randint(0, 3, (s,), generator=gen)
    table = torch.tensor([0, 123, 480])
    delta = table[groups] if per_token else torch.full((s,), 321)
    shifted = pos.clone()
    shifted[0, 0] -= delta
    with torch.no_grad():
        cached, want = _rotary(tiny_adapter, raw, pos), _rotary(tiny_adapter, raw, shifted)
    pairs = section_pairs(tiny_adapter.mrope_section, TEMPORAL)
    buf = torch.zeros(2, 1, h_kv, s + 8, d)  # a strided view of a bigger buffer, other layer/slots untouched
    buf[1, :, :, 4 : 4 + s] = cached
    if per_token:
        index = groups.view(1, 1, 1, s).expand(1, 1, h_kv, s).contiguous()
        shift_rotary_keys_(buf[1:, :, :, 4 : 4 + s], table, tiny_adapter.rope_inv_freq, pairs, index=index)
    else:
        shift_rotary_keys_(buf[1:, :, :, 4 : 4 + s], 321, tiny_adapter.rope_inv_freq, pairs)
    err = (buf[1, :, :, 4 : 4 + s] - want).abs().max().item()
    assert err < 1e-4, err
    assert not buf[0].any() and not buf[1, :, :, :4].any() and not buf[1, :, :, 4 + s :].any()
    # the check can fail: the height section, or the opposite sign, is wrong
    for wrong_pairs, wrong_delta in ((pairs + section_pairs(tiny_adapter.mrope_section, HEIGHT), 321), (pairs, -321)):
        k = cached[None].clone()
        shift_rotary_keys_(k, wrong_delta, tiny_adapter.rope_inv_freq, wrong_pairs)
        assert (k[0] - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shift_in_place_in_16_bit(tiny_adapter, dtype):
    """16-bit keys are rotated in fp32 and written back: within the dtype's rounding of the fp32 result."""
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 1, 2, 50, tiny_adapter.head_dim, generator=gen)
    pairs = section_pairs(tiny_adapter.mrope_section, TEMPORAL)
    ref = keys.clone()
    shift_rotary_keys_(ref, 7000, tiny_adapter.rope_inv_freq, pairs)
    low = keys.to(dtype)
    shift_rotary_keys_(low, 7000, tiny_adapter.rope_inv_freq, pairs)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max().item() < 4 * torch.finfo(dtype).eps * ref.abs().max().item()


def test_shift_refuses_bad_arguments(tiny_adapter):
    keys = torch.zeros(1, 1, 2, 4, tiny_adapter.head_dim)
    with pytest.raises(ValueError):
        shift_rotary_keys_(keys[0], 1, tiny_adapter.rope_inv_freq)  # not [L, B, H, S, D]
    with pytest.raises(ValueError):
        shift_rotary_keys_(keys, torch.tensor([1]), tiny_adapter.rope_inv_freq)  # a table without index
    with pytest.raises(ValueError):
        shift_rotary_keys_(keys, 1, tiny_adapter.rope_inv_freq, [(0, 99)])


# --------------------------------------------- invisibility to the model (test 1)
def _question_and_answer(adapter, cache, question, start, t_offset, steps):
    """Logits of the question prefill ([n, vocab]) and of ``steps`` greedy tokens, text at (t - t_offset, h, w)."""
    embed = adapter.model.get_input_embeddings()
    q_ids = adapter.question_ids(question)
    logits, tokens = [], []
    with cache.scratch(), torch.inference_mode():
        pos = (torch.arange(len(q_ids)) + start).expand(3, -1).clone()
        pos[0] -= t_offset
        out = adapter._forward(cache, embed(torch.tensor(q_ids)), pos, logits="all")
        logits.append(out)
        nxt = start + len(q_ids)
        for _ in range(steps):
            tok = int(out[-1].argmax())
            tokens.append(tok)
            pos = torch.full((3, 1), nxt)
            pos[0] -= t_offset
            out = adapter._forward(cache, embed(torch.tensor([tok])), pos, logits="all")
            logits.append(out)
            nxt += 1
    return torch.cat(logits), tokens


def _shift_everything(adapter, cache, delta, pairs):
    """Rotate every cached key (prefix included) by -delta in ``pairs``: a uniform shift of all cached tokens."""
    keys, _ = cache.buffers()
    shift_rotary_keys_(keys[..., : cache.get_seq_length(), :], delta, adapter.rope_inv_freq, pairs)


def _check_shift_is_invisible(adapter, frames, seconds_per_patch, delta, atol):
    a = _stream(adapter, frames, seconds_per_patch=seconds_per_patch)
    b = _stream(adapter, frames, seconds_per_patch=seconds_per_patch)
    start = adapter.next_text_position(a)
    _shift_everything(adapter, b, delta, section_pairs(adapter.mrope_section, TEMPORAL))
    la, ta = _question_and_answer(adapter, a, "What is happening?", start, 0, 8)
    lb, tb = _question_and_answer(adapter, b, "What is happening?", start, delta, 8)
    err = (la - lb).abs().max().item()
    print(f"positions up to {start}, delta={delta}: max |logits diff| = {err:.3g}")
    assert err < atol, err
    assert ta == tb and la.std() > 1e-2


@pytest.mark.parametrize("delta", [37, 500, -300])
def test_uniform_temporal_shift_leaves_logits_and_answers_unchanged(tiny_adapter, vtest_frames, delta):
    """Rotary attention sees only relative positions: moving every token (cached and new) by delta in the
    temporal section gives the same question logits and the same greedy answer (fp32, atol 1e-4).

    Positions stay below ~700 here: transformers computes the angles p x theta in fp32, whose rounding
    (~p x 6e-8 rad) alone moves these logits by ~1e-4 once positions reach ~5000 (see the next test)."""
    _check_shift_is_invisible(tiny_adapter, vtest_frames[0][:8], 100.0, delta, 1e-4)


@pytest.mark.parametrize("delta", [5000, 50000])
def test_uniform_shift_is_exact_with_float64_rotary_angles(tiny_adapter, vtest_frames, monkeypatch, delta):
    """With the model's rotary angles computed in float64, the shift is invisible to ~1e-5 at any
    position and delta: what remains above is transformers' fp32 angle rounding, not the rotation."""
    rot = tiny_adapter._lm.rotary_emb

    def forward64(x, position_ids):
        freqs = position_ids.expand(3, -1, -1)[..., None].double() * rot.inv_freq.double()
        cos, sin = rot.recomposition_frequencies(freqs.cos()), rot.recomposition_frequencies(freqs.sin())
        return cos.to(x.dtype), sin.to(x.dtype)

    monkeypatch.setattr(rot, "forward", forward64)
    _check_shift_is_invisible(tiny_adapter, vtest_frames[0][:8], 900.0, delta, 2e-5)


@pytest.mark.parametrize("broken", ["height section too", "wrong sign"])
def test_broken_rotation_changes_the_logits(tiny_adapter, vtest_frames, broken):
    """The check above is sensitive: rotating the height section too, or by +delta, moves the logits."""
    frames = vtest_frames[0][:8]
    a = _stream(tiny_adapter, frames, seconds_per_patch=900.0)
    b = _stream(tiny_adapter, frames, seconds_per_patch=900.0)
    start, delta = tiny_adapter.next_text_position(a), 5000
    pairs = section_pairs(tiny_adapter.mrope_section, TEMPORAL)
    if broken == "height section too":
        _shift_everything(tiny_adapter, b, delta, pairs + section_pairs(tiny_adapter.mrope_section, HEIGHT))
    else:
        _shift_everything(tiny_adapter, b, -delta, pairs)
    la, _ = _question_and_answer(tiny_adapter, a, "What is happening?", start, 0, 0)
    lb, _ = _question_and_answer(tiny_adapter, b, "What is happening?", start, delta, 0)
    assert (la - lb).abs().max().item() > 1e-2


# ---------------------------------------------- the adapter's re-base (prefix fixed)
def test_rebase_moves_stream_keys_to_the_shifted_positions(tiny_adapter, vtest_frames):
    """After ``adapter.rebase`` the layer-0 keys of the stream are those a prefill at the shifted temporal
    positions writes (layer 0 keys depend only on the token and its position); the prefix is untouched."""
    frames = vtest_frames[0][:8]
    p = len(tiny_adapter.prefix_ids)
    cache = _stream(tiny_adapter, frames, seconds_per_patch=100.0)  # t = P, P+200, P+400, P+600
    prefix_k = cache.layer_kv(0)[0][:, :, :p].clone()
    event = tiny_adapter.rebase(cache, 150)
    assert cache.rebases == 1 and cache.last_rebase is event
    assert (event.delta, event.clamped_chunks, event.min_position) == (150, 1, p)  # the first chunk stops at P
    assert cache.table.column("position").tolist() == [p, p + 50, p + 250, p + 450]
    ref = _stream(tiny_adapter, frames, seconds=[0.0, 25.0, 125.0, 225.0])
    assert torch.equal(cache.table.column("position"), ref.table.column("position"))
    assert torch.equal(cache.table.column("max_position"), ref.table.column("max_position"))
    assert tiny_adapter.next_text_position(cache) == tiny_adapter.next_text_position(ref) == p + 451
    k, v = cache.layer_kv(0)
    k_ref, v_ref = ref.layer_kv(0)
    assert torch.equal(k[:, :, :p], prefix_k)
    assert (k - k_ref).abs().max().item() < 1e-4
    assert torch.equal(v, v_ref)
    answer = tiny_adapter.generate(cache, "What is happening?", max_new_tokens=4)
    assert len(answer.token_ids) == 4


def test_plan_rebase_rule(tiny_adapter, vtest_frames):
    p = len(tiny_adapter.prefix_ids)
    cache = _stream(tiny_adapter, vtest_frames[0][:4], seconds_per_patch=1000.0)  # t = P, P + 2000
    assert tiny_adapter.plan_rebase(cache, 5000, 0) == 0  # 0 = never
    assert tiny_adapter.plan_rebase(cache, 4096, 4096) == 0  # at the threshold: not past it
    assert tiny_adapter.plan_rebase(cache, p + 4100, 4096) == 4100 - 2048  # span > T/2: next at P + T/2
    cache2 = _stream(tiny_adapter, vtest_frames[0][:4], seconds=[1000.0, 1001.0])  # t = P + 2000, P + 2002
    assert tiny_adapter.plan_rebase(cache2, p + 2004, 2048) == 2000  # oldest chunk to P, nothing clamped
    with pytest.raises(ValueError, match="prefix"):
        tiny_adapter.plan_rebase(cache2, 10**6, 2 * p - 1)
    # the engine's entry point: returns how far the clock moves (ns) = delta / tokens_per_second
    assert tiny_adapter.rebase_positions(cache2, 1002.0, 2048) == int(2000 / tiny_adapter.tokens_per_second * 1e9)
    assert cache2.table.column("position").tolist() == [p, p + 2]
    assert tiny_adapter.rebase_positions(cache2, 2.0, 2048) == 0
