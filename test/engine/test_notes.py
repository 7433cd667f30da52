"""Text events (notes) in the stream: how TaR / VaN treat them, positions, fidelity, cap, filters, refusals.

A note is a 1 x k text chunk of camera NOTE_CAMERA (kv/layout.py): its own slot, never recent,
passing camera filters, hidden by time windows outside its stamp.
"""
from __future__ import annotations

import math

import pytest
import torch

from infinipot_ros.engine import EngineConfig, IngestStatus, StreamingAssistant
from infinipot_ros.engine.worker import StreamWorker
from infinipot_ros.kv import NOTE_CAMERA, CacheBudget, ChunkTable, TaRPolicy, VaNPolicy, VisionChunk, tar_similarity

S = 1_000_000_000
FACT = "The robot's name is Zorblax."


def _layout(chunks):
    table = ChunkTable()
    for c in chunks:
        table.append(c)
    ids = torch.arange(table.next_token_id).expand(1, 1, -1)
    return table.layout(ids)


# ----------------------------------------------------------- kv: TaR and VaN
def _frames_and_note():
    # 4 frames of a 2x2 camera, a 1x3 note between frames 1 and 2
    frame = lambda i: VisionChunk(2, 2, camera=0, stamp_ns=i * S, end_stamp_ns=i * S, num_frames=2)  # noqa: E731
    note = VisionChunk(1, 3, camera=NOTE_CAMERA, stamp_ns=int(1.5 * S), end_stamp_ns=int(1.5 * S), num_frames=0)
    return [frame(0), frame(1), note, frame(2), frame(3)]


def test_a_note_is_its_own_slot_and_never_recent():
    lay = _layout(_frames_and_note())
    slots = lay.camera_slot[0, 0].tolist()
    assert len(slots) == 4 * 4 + 3
    note_slots = set(slots[8:11])
    frame_slots = set(slots[:8] + slots[11:])
    assert len(note_slots) == 1 and len(frame_slots) == 1 and not note_slots & frame_slots
    flags, n_recent = lay.table.recent_chunks(0.9)  # r = round(0.9 * 16 / 4) = 4 frames: all of them, not the note
    assert flags.tolist() == [True, True, False, True, True] and n_recent == 16
    # a second note is yet another slot: notes are never compared with each other
    two = _layout(_frames_and_note() + [VisionChunk(1, 3, camera=NOTE_CAMERA, stamp_ns=4 * S, num_frames=0)])
    s2 = two.camera_slot[0, 0].tolist()
    assert s2[8] != s2[-1]


def test_tar_never_finds_a_note_redundant():
    lay = _layout(_frames_and_note())
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 19, 8)
    keys[..., 8:11, :] = keys[..., 15:16, :]  # note keys equal to a recent frame's key: still not "redundant"
    flags, _ = lay.table.recent_chunks(0.5)
    sim = tar_similarity(keys, lay, flags)
    assert torch.equal(sim[0, 0, 8:11], torch.zeros(3))
    assert sim[0, 0, :8].abs().sum() > 0  # past frame tokens do have references
    score = TaRPolicy(recent_ratio=0.5).score(keys, None, lay, layers=[0], num_layers=1, keep=10)
    assert torch.equal(score[0, 0, 8:11], torch.zeros(3))  # -sim = 0: above past tokens that repeat the present


def test_van_pools_a_note_over_its_own_tokens_only():
    lay = _layout(_frames_and_note())
    norms = torch.rand(1, 1, 19) + 0.5
    pol = VaNPolicy(pool_kernels=((3, 3, 3),) * 4)
    base = pol.van_scores(norms, lay, [0], 1)
    changed = norms.clone()
    changed[..., :8] *= 10.0  # frame tokens around the note
    changed[..., 11:] *= 10.0
    after = pol.van_scores(changed, lay, [0], 1)
    assert torch.allclose(base[0, 0, 8:11], after[0, 0, 8:11])
    # along its row: the middle token averages all three, the ends their two neighbours
    n = norms[0, 0, 8:11]
    assert base[0, 0, 9].item() == pytest.approx(n.mean().item(), rel=1e-5)
    assert base[0, 0, 8].item() == pytest.approx(n[:2].mean().item(), rel=1e-5)


def test_qwen3_frame_text_policy_leaves_notes_to_the_frame_policy():
    """Qwen3-VL's timestamps follow their frame; a note is no frame's text: the wrapped policy scores it."""
    from infinipot_ros.models.qwen3_vl import FrameTextPolicy

    ts = VisionChunk(1, 2, camera=0, stamp_ns=S, end_stamp_ns=S, num_frames=0)
    fr = VisionChunk(2, 2, camera=0, stamp_ns=S, end_stamp_ns=S, num_frames=2)
    end = VisionChunk(1, 1, camera=0, stamp_ns=S, end_stamp_ns=S, num_frames=0)
    note = VisionChunk(1, 3, camera=NOTE_CAMERA, stamp_ns=S, end_stamp_ns=S, num_frames=0)
    lay = _layout([ts, fr, end, note])
    norms = torch.rand(1, 1, 10) + 1.0
    keys = torch.randn(1, 1, 10, 4)
    score = FrameTextPolicy(VaNPolicy(pool_kernels=None)).score(keys, norms, lay, layers=[0], num_layers=1, keep=6)
    assert torch.equal(score[0, 0, 7:], norms[0, 0, 7:])  # the note: its own value norms
    best = norms[0, 0, 2:6].max()
    assert bool((score[0, 0, :2] < best).all()) and score[0, 0, :2].max() == torch.nextafter(best, torch.tensor(-1.0))


def test_camera_filters_keep_notes_time_windows_do_not():
    table = ChunkTable()
    for c in _frames_and_note():
        table.append(c)
    assert table.select([0]).tolist() == [True] * 5
    assert table.select([1]).tolist() == [False, False, True, False, False]
    assert table.select(None, since_ns=2 * S).tolist() == [False, False, False, True, True]
    assert table.select(None, since_ns=S, until_ns=2 * S).tolist() == [False, True, True, True, False]


# ------------------------------------------------------- model: positions, fidelity
def test_note_positions_and_streaming_equals_one_shot(tiny_adapter, vtest_frames):
    """Prefix, patch, note, patch prefilled chunk by chunk == one forward of the same sequence at the
    same positions; the note's positions are the stream-time position + i on all three axes."""
    a = tiny_adapter
    frames = vtest_frames[0][:4]
    cache = a.new_cache(budget=CacheBudget(), policy=None)
    a.prefill_prefix(cache)
    p1 = a.encode_patch(frames[:2])
    a.prefill_patch(cache, p1, VisionChunk(p1.grid_h, p1.grid_w, num_frames=2), seconds=0.0)
    ids = a.note_ids(FACT, 1.5)
    assert a.tokenizer.decode(ids).count("Zorblax") == 1
    a.prefill_note(cache, ids, VisionChunk(1, len(ids), camera=NOTE_CAMERA, stamp_ns=int(1.5 * S), num_frames=0),
                   seconds=1.5)
    rec = cache.table.records[-1]
    start = int(a.chunk_positions(cache.prefix_length, 1.5, 1, 1)[0, 0])
    assert (rec.chunk.position, rec.chunk.max_position) == (start, start + len(ids) - 1)
    p2 = a.encode_patch(frames[2:4])
    stream_logits = a.prefill_patch(cache, p2, VisionChunk(p2.grid_h, p2.grid_w, num_frames=2), seconds=2.0,
                                    return_logits=True)
    # one shot
    embed = a.model.get_input_embeddings()
    prefix = torch.tensor(a.prefix_ids)
    parts = [embed(prefix), p1.embeds, embed(torch.tensor(ids)), p2.embeds]
    pos = [torch.arange(len(prefix)).expand(3, -1),
           a.chunk_positions(len(prefix), 0.0, p1.grid_h, p1.grid_w),
           (torch.arange(len(ids)) + start).expand(3, -1),
           a.chunk_positions(len(prefix), 2.0, p2.grid_h, p2.grid_w)]
    with torch.inference_mode():
        out = a._lm(inputs_embeds=torch.cat(parts)[None], position_ids=torch.cat(pos, 1)[:, None, :], use_cache=False)
        ref = a.model.lm_head(out.last_hidden_state[0, -p2.num_tokens:]).float()
    err = (ref - stream_logits).abs().max().item()
    assert err < 1e-4, err
    # the note matters: without it the second patch's logits differ
    cache2 = a.new_cache(budget=CacheBudget(), policy=None)
    a.prefill_prefix(cache2)
    a.prefill_patch(cache2, p1, VisionChunk(p1.grid_h, p1.grid_w, num_frames=2), seconds=0.0)
    no_note = a.prefill_patch(cache2, p2, VisionChunk(p2.grid_h, p2.grid_w, num_frames=2), seconds=2.0,
                              return_logits=True)
    assert (no_note - stream_logits).abs().max().item() > 1e-3


def test_rebase_moves_a_note_on_every_axis(tiny_adapter, vtest_frames):
    """After a re-base the note's layer-0 keys are those a prefill at the shifted 1-D positions writes."""
    a = tiny_adapter
    frames = vtest_frames[0][:4]

    def build(t_note, t2):
        cache = a.new_cache(budget=CacheBudget(), policy=None)
        a.prefill_prefix(cache)
        p1 = a.encode_patch(frames[:2])
        a.prefill_patch(cache, p1, VisionChunk(p1.grid_h, p1.grid_w, num_frames=2), seconds=0.0)
        ids = a.note_ids(FACT, 0.0)
        a.prefill_note(cache, ids, VisionChunk(1, len(ids), camera=NOTE_CAMERA, num_frames=0), seconds=t_note)
        p2 = a.encode_patch(frames[2:4])
        a.prefill_patch(cache, p2, VisionChunk(p2.grid_h, p2.grid_w, num_frames=2), seconds=t2)
        return cache

    cache = build(100.0, 200.0)
    a.rebase(cache, 150)  # tokens per second 2: note at P+200 -> P+50, last patch P+400 -> P+250
    ref = build(25.0, 125.0)
    assert torch.equal(cache.table.column("position"), ref.table.column("position"))
    assert torch.equal(cache.table.column("max_position"), ref.table.column("max_position"))
    k, _ = cache.layer_kv(0)
    k_ref, _ = ref.layer_kv(0)
    assert (k - k_ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------ engine
@pytest.fixture()
def engine(tiny_adapter):
    return StreamingAssistant(EngineConfig(max_vision_tokens=160, frame_rate_hz=0, max_note_tokens=48),
                              adapter=tiny_adapter)


def _state(engine):
    return {k: v.clone() for k, v in engine.cache.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_notes_are_compressed_under_the_cap_and_counted(engine, vtest_frames):
    frames, stamps = vtest_frames
    m = engine.cache.max_vision_tokens
    r = engine.add_note(FACT, stamps[0])
    assert r.status is IngestStatus.INGESTED and r.chunk_tokens == len(engine.adapter.note_ids(FACT, 0.0))
    for rnd in range(3):
        for f, s in zip(frames, stamps):
            engine.offer("cam", f, s + rnd * 2 * S)
            assert engine.cache.vision_length <= m
        engine.add_note(f"round {rnd} done", stamps[-1] + rnd * 2 * S)
    st = engine.stats()
    assert st.cache.compressions >= 5
    assert (st.notes.received, st.notes.ingested, st.notes.rejected) == (4, 4, 0)
    assert 1 <= st.notes.in_cache <= 4
    table = engine.cache.table
    held = table.column("row0_tokens")[table.column("camera") == NOTE_CAMERA]
    assert st.notes.tokens_in_cache == int(held.sum()) > 0
    ans = engine.ask("What is the robot's name?", max_new_tokens=3)
    assert ans.generated_tokens == 3 and engine.cache.vision_length <= m


def test_bad_notes_are_rejected_and_leave_the_cache_as_it_was(engine, vtest_frames):
    frames, stamps = vtest_frames
    for f, s in zip(frames[:4], stamps[:4]):
        engine.offer("cam", f, s)
    before = _state(engine)
    for text, stamp in [("", stamps[3]), ("   \n ", stamps[3]), ("a\x00b", stamps[3]), (FACT, -5),
                        ("word " * 200, stamps[3]), (None, stamps[3])]:
        r = engine.add_note(text, stamp)
        assert r.status is IngestStatus.REJECTED and r.error, (text, r)
        assert _same(before, _state(engine))
    st = engine.stats().notes
    assert (st.received, st.rejected, st.ingested) == (6, 6, 0)
    assert "max_note_tokens" in engine.add_note("word " * 200, stamps[3]).error


def test_questions_see_notes_by_time_window_not_camera(engine, vtest_frames):
    frames, stamps = vtest_frames
    for f, s in zip(frames[:4], stamps[:4]):
        engine.offer("cam", f, s)
    engine.add_note(FACT, stamps[4])
    for f, s in zip(frames[4:8], stamps[4:8]):
        engine.offer("cam", f, s)

    def logits(**kw):
        visible = engine.cache.visibility(**kw)
        with engine.cache.scratch():
            ids = engine.adapter.question_ids("Name?")
            start = engine.adapter.next_text_position(engine.cache)
            embed = engine.adapter.model.get_input_embeddings()
            return engine.adapter._forward(engine.cache, embed(torch.tensor(ids)),
                                           (torch.arange(len(ids)) + start).expand(3, -1), visible=visible)

    cam = engine.camera_index("cam")
    with torch.inference_mode():
        everything = logits()
        same_camera = logits(cameras=[cam])
        before_note = logits(until_ns=stamps[3])
    assert torch.equal(everything, same_camera)  # the camera filter does not hide the note
    assert not torch.equal(everything, before_note)
    res = engine.ask("Name?", until_ns=stamps[3], max_new_tokens=1)
    assert res.newest_stamp_ns == stamps[3]


def test_worker_takes_a_note_before_a_later_question(engine, vtest_frames):
    frames, stamps = vtest_frames
    worker = StreamWorker(engine).start()
    try:
        for f, s in zip(frames[:4], stamps[:4]):
            worker.submit_frame("cam", f, s)
        assert worker.wait_idle(30)
        worker.submit_note(FACT, stamps[3] + 1)
        res = worker.ask("Name?", timeout_s=30, max_new_tokens=1, since_ns=stamps[3] + 1)
        assert res.frames_in_context == 0 and res.oldest_stamp_ns == stamps[3] + 1  # only the note is in view
        assert engine.stats().notes.ingested == 1
    finally:
        worker.stop()


def test_notes_survive_a_snapshot(engine, vtest_frames, tmp_path, tiny_adapter):
    frames, stamps = vtest_frames
    engine.add_note(FACT, stamps[0])
    for f, s in zip(frames[:6], stamps[:6]):
        engine.offer("cam", f, s)
    engine.save_memory(tmp_path / "m.safetensors")
    other = StreamingAssistant(engine.config, adapter=tiny_adapter)
    other.load_memory(tmp_path / "m.safetensors")
    assert other.note_stats().in_cache == 1
    a = engine.ask("What is the robot's name?", max_new_tokens=4)
    b = other.ask("What is the robot's name?", max_new_tokens=4)
    assert a.answer == b.answer


def test_note_only_stream_answers(engine):
    assert engine.add_note(FACT, 5 * S).status is IngestStatus.INGESTED
    res = engine.ask("What is the robot's name?", max_new_tokens=2)
    assert res.frames_in_context == 0 and res.oldest_stamp_ns == res.newest_stamp_ns == 5 * S
    assert math.isfinite(res.latency_s)
