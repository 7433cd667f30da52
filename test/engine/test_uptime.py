"""Unbounded uptime: the engine re-bases temporal M-RoPE positions past cache.rebase_position_threshold."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from infinipot_ros.engine import EngineConfig, StreamingAssistant

HOUR_NS = 3600 * 10**9


def _engine(adapter, model_dir, **kw):
    kw.setdefault("max_pixels", 64 * 28 * 28)
    return StreamingAssistant(EngineConfig(model=model_dir, device="cpu", dtype="float32", **kw), adapter=adapter)


def _feed_patch(engine, frames, k, start_ns, camera="front"):
    """Ingest frames k, k+1 (mod len) as one patch whose first frame is stamped ``start_ns`` (0.5 s apart)."""
    n = len(frames)
    engine.ingest(camera, frames[k % n], start_ns)
    return engine.ingest(camera, frames[(k + 1) % n], start_ns + 500_000_000)


def test_threshold_setting_is_validated():
    assert EngineConfig().rebase_position_threshold == 16384
    EngineConfig(rebase_position_threshold=0)
    with pytest.raises(ValueError, match="rebase_position_threshold"):
        EngineConfig(rebase_position_threshold=500)


def test_positions_after_rebase_are_get_rope_index_positions_of_the_shifted_stream(
        tiny_adapter, tiny_model_dir, vtest_frames):
    """After a re-base, cached chunks, the next chunk and the question sit where the model's own
    ``get_rope_index`` puts a one-shot video of the cached frames (text: max position + 1)."""
    frames, _ = vtest_frames
    ad = tiny_adapter
    # "recent" keeps about the newest 1.5 chunks; patches 1000 s apart are 2000 temporal positions apart
    engine = _engine(ad, tiny_model_dir, policy="recent", max_vision_tokens=110, rebase_position_threshold=8192)
    p = engine.cache.prefix_length
    t0 = 1_700_000_000 * 10**9
    for i in range(5):  # t = P, P+2000, ..., P+8000 <= 8192: no re-base yet
        assert _feed_patch(engine, frames, 2 * i, t0 + i * 1000 * 10**9).status == "ingested"
    assert engine.cache.rebases == 0
    assert engine.cache.table.column("position").tolist()[-1] == p + 8000
    cached_before = engine.cache.table.column("chunk_id").tolist()
    assert cached_before == [3, 4]
    # patch 5 would be at P + 10000 > 8192: the oldest cached chunk (3) moves to P, nothing clamped
    assert _feed_patch(engine, frames, 10, t0 + 5 * 1000 * 10**9).status == "ingested"
    cache = engine.cache
    assert cache.rebases == 1 and cache.last_rebase.delta == 6000 and cache.last_rebase.clamped_chunks == 0
    assert engine._origin_ns == t0 + 3000 * 10**9  # the stream clock moved by 6000 / (2 positions/s)

    # the same frames as one video, patches 1000 s apart
    video = np.stack([frames[6], frames[7], frames[8], frames[9], frames[10], frames[11]])
    inputs = ad.processor(text=[ad._render("What is happening?")], videos=[video], return_tensors="pt",
                          videos_kwargs=dict(ad._video_kwargs))
    pos, _ = ad.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], None,
                                           inputs["video_grid_thw"], torch.tensor([1000.0]), inputs["attention_mask"])
    is_video = inputs["input_ids"][0] == ad.model.config.video_token_id
    ref = pos[:, 0, is_video].view(3, 3, -1)  # [axis, patch, token]
    table = cache.table
    assert table.column("chunk_id").tolist() == [4, 5]  # chunk 3 (moved to P) was evicted after patch 5
    for row, cid in enumerate(table.column("chunk_id").tolist()):
        patch = cid - 3
        assert table.column("position")[row] == ref[0, patch, 0]
        assert table.column("max_position")[row] == ref[:, patch].max()
        gh, gw = int(table.column("grid_h")[row]), int(table.column("grid_w")[row])
        assert torch.equal(ad.chunk_positions(p, (int(table.column("stamp")[row]) - engine._origin_ns) / 1e9, gh, gw),
                           ref[:, patch])
    assert ad.next_text_position(cache) == int(ref.max()) + 1  # the question continues after the shifted video
    ans = engine.ask("What is happening?", max_new_tokens=3)
    assert ans.generated_tokens == 3
    # later chunks continue on the moved clock: 2000 positions per 1000 s
    _feed_patch(engine, frames, 12, t0 + 6 * 1000 * 10**9)
    assert engine.cache.table.column("position").tolist()[-1] == p + 6000


def test_72_hour_stream_stays_under_the_threshold_and_keeps_answering(tiny_adapter, tiny_model_dir, vtest_frames):
    """24 patches over 72 h (hours apart, some seconds apart) with the default threshold and InfiniPot-V:
    every chunk stays in [P, T], questions keep getting answers; without re-basing positions reach ~518k."""
    frames, _ = vtest_frames
    t0 = 1_700_000_000 * 10**9
    gaps_s = [0] + [int(4.5 * 3600) if i % 3 else 2 for i in range(1, 24)]  # 16 gaps of 4.5 h, 7 of 2 s
    stamps = [int(x) for x in np.cumsum(gaps_s) * 10**9 + t0]
    assert 72 * HOUR_NS <= stamps[-1] - stamps[0] < 73 * HOUR_NS
    engine = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=160)
    never = _engine(tiny_adapter, tiny_model_dir, policy="infinipot_v", max_vision_tokens=160,
                    rebase_position_threshold=0)
    limit = engine.config.rebase_position_threshold
    p = engine.cache.prefix_length
    for i, stamp in enumerate(stamps):
        assert _feed_patch(engine, frames, 2 * i, stamp).status == "ingested"
        _feed_patch(never, frames, 2 * i, stamp)
        positions = engine.cache.table.column("position")
        assert int(positions.min()) >= p and int(engine.cache.table.column("max_position").max()) <= limit
        assert engine.cache.vision_length <= 160
        if i % 6 == 5:
            ans = engine.ask("What is happening?", max_new_tokens=3)
            assert ans.generated_tokens == 3 and ans.newest_stamp_ns == stamp + 500_000_000
    assert engine.cache.rebases >= 10 and engine.stats().cache.rebases == engine.cache.rebases
    assert never.cache.rebases == 0 and tiny_adapter.next_text_position(never.cache) > 500_000
    assert tiny_adapter.next_text_position(engine.cache) <= limit + 1
    assert engine.ask("What did you see?", max_new_tokens=3).generated_tokens == 3


def test_clamped_rebase_keeps_old_memories_at_the_prefix_end(tiny_adapter, tiny_model_dir, vtest_frames):
    """An uncapped cache spans the whole stream: a re-base puts the next chunk at P + T/2 and stops the
    chunks older than that at P (never before the prefix)."""
    frames, _ = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir, policy="none", rebase_position_threshold=4096)
    p = engine.cache.prefix_length
    t0 = 10**18
    for i, s in enumerate([0, 600, 1900, 2100]):  # t = P, P+1200, P+3800, then P+4200 > 4096 -> re-base
        _feed_patch(engine, frames, 2 * i, t0 + s * 10**9)
    ev = engine.cache.last_rebase
    assert engine.cache.rebases == 1 and ev.delta == 4200 - 2048 and ev.clamped_chunks == 2
    assert engine.cache.table.column("position").tolist() == [p, p, p + 3800 - ev.delta, p + 2048]
    assert ev.min_position == p
    assert engine.ask("What is happening?", max_new_tokens=2).generated_tokens == 2


def test_snapshot_after_a_rebase_restores_the_moved_clock(tiny_adapter, tiny_model_dir, vtest_frames, tmp_path):
    frames, _ = vtest_frames
    kw = dict(policy="recent", max_vision_tokens=110, rebase_position_threshold=2048)
    a = _engine(tiny_adapter, tiny_model_dir, **kw)
    t0 = 10**18
    for i in range(4):
        _feed_patch(a, frames, 2 * i, t0 + i * 600 * 10**9)
    assert a.cache.rebases >= 1
    a.save_memory(str(tmp_path / "m.safetensors"))
    b = _engine(tiny_adapter, tiny_model_dir, **kw)
    b.load_memory(str(tmp_path / "m.safetensors"))
    assert b._origin_ns == a._origin_ns
    for e in (a, b):
        _feed_patch(e, frames, 8, t0 + 4 * 600 * 10**9 + 10**9)
    assert torch.equal(a.cache.table.column("position"), b.cache.table.column("position"))
    ka, kb = a.cache.layer_kv(1)[0], b.cache.layer_kv(1)[0]
    assert (ka - kb).abs().max().item() < 1e-5
