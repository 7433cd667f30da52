"""The other model families (Qwen2-VL, Qwen3-VL, LLaVA-OneVision): the Qwen2.5-VL fidelity tests, specifics, registry.

Each family's tiny model is built once per module through its ``builtin:`` name
(into a temporary cache directory) and loaded with ``load_adapter``: the same
path real weights take. Fidelity, as for Qwen2.5-VL: streaming chunk prefill
equals transformers' one-shot prefill of the same frames, the cap holds at
every frame, camera / time masking is exact, and a budget larger than the
stream answers token for token like the uncompressed cache.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from infinipot_ros.engine import EngineConfig, StreamingAssistant
from infinipot_ros.kv import CacheBudget, ChunkTable, VisionChunk, make_policy
from infinipot_ros.models import BUILTIN_MODELS, FAMILIES, adapter_class, load_adapter, resolve_model

FAMILY_BUILTINS = {"qwen2_vl": "builtin:tiny-qwen2-vl", "qwen3_vl": "builtin:tiny-qwen3-vl",
                   "llava_onevision": "builtin:tiny-llava-onevision"}
# 576x768 frames -> a 6 x 9 merged grid (54 tokens) per frame pair for the Qwen families (14 px patches under
# 64 * 28^2 pixels, 16 px patches under 64 * 32^2 pixels); LLaVA-OneVision: every frame resized to 182 x 182,
# 13 x 13 patches pooled to 7 x 7 (49 tokens per frame) whatever max_pixels.
MAX_PIXELS = {"qwen2_vl": 64 * 28 * 28, "qwen3_vl": 64 * 32 * 32, "llava_onevision": 64 * 28 * 28}
TOKENS_PER_CHUNK = {"qwen2_vl": 54, "qwen3_vl": 54, "llava_onevision": 49}
FPS = 2.0  # vtest_frames are sampled every 0.5 s
QUESTION = "What is happening?"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    """family -> build directory, built through ``resolve_model("builtin:...")`` into a temporary cache."""
    cache = tmp_path_factory.mktemp("cache")
    return {fam: resolve_model(name, cache_dir=cache) for fam, name in FAMILY_BUILTINS.items()}


@pytest.fixture(scope="module")
def adapters(family_dirs):
    return {fam: load_adapter(d, device="cpu", dtype="float32", max_pixels=MAX_PIXELS[fam])
            for fam, d in family_dirs.items()}


@pytest.fixture(params=sorted(FAMILY_BUILTINS))
def family(request):
    return request.param


def _stream(adapter, frames, *, budget=CacheBudget(), policy=None, return_logits=False, cameras=None, period=1):
    """Prefill chunks of ``frames_per_patch`` frames (Qwen: pairs, LLaVA-OneVision: single frames); chunk j is
    stamped j * period * frames_per_patch / FPS seconds on camera cameras[j]."""
    cache = adapter.new_cache(budget=budget, policy=policy)
    adapter.prefill_prefix(cache)
    logits = []
    fpp = adapter.frames_per_patch
    for j, k in enumerate(range(0, len(frames) - fpp + 1, fpp)):
        patch = adapter.encode_patch(frames[k : k + fpp])
        t0 = j * period * fpp / FPS
        chunk = VisionChunk(patch.grid_h, patch.grid_w, camera=0 if cameras is None else cameras[j],
                            stamp_ns=int(t0 * 1e9), end_stamp_ns=int((t0 + (fpp - 1) / FPS) * 1e9), num_frames=fpp)
        out = adapter.prefill_patch(cache, patch, chunk, return_logits=return_logits, seconds=t0)
        if return_logits:
            logits.append(out)
    return cache, (torch.cat(logits) if return_logits else None)


def _one_shot_inputs(adapter, frames, question=QUESTION):
    """The processor's inputs for the same frames as one video sampled at FPS (Qwen3-VL: with its metadata)."""
    kwargs = {} if _is_llava(adapter) else dict(adapter._video_kwargs)
    if adapter.model.config.model_type == "qwen3_vl":
        from transformers.video_utils import VideoMetadata

        # the Qwen3-VL resize budgets the whole clip: scale the one-patch budget to len(frames) frames
        kwargs["size"] = {k: v * len(frames) // adapter.frames_per_patch for k, v in kwargs["size"].items()}
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=FPS,
                                                  frames_indices=list(range(len(frames))))]
    return adapter.processor(text=[adapter._render(question)], videos=[np.stack(frames)], return_tensors="pt",
                             videos_kwargs=kwargs)


def _is_llava(adapter) -> bool:
    return adapter.model.config.model_type == "llava_onevision"


def _text_positions(adapter, n, start):
    """Position ids of n text tokens from ``start``: [n] (LLaVA-OneVision, 1-D RoPE) or [3, n] (M-RoPE)."""
    pos = torch.arange(n) + start
    return pos if _is_llava(adapter) else pos.expand(3, -1)


def _scratch_embeds(adapter, ids):
    """Embeddings of scratch ids as ``generate`` forms them (LLaVA-OneVision: the first is image_newline)."""
    if _is_llava(adapter):
        return adapter._scratch_embeds(ids)
    return adapter.model.get_input_embeddings()(torch.tensor(ids))


def _engine(adapter, model_dir, family, **kw):
    kw.setdefault("max_pixels", MAX_PIXELS[family])
    return StreamingAssistant(EngineConfig(model=model_dir, device="cpu", dtype="float32", **kw), adapter=adapter)


def _feed(engine, frames, stamps, camera="front"):
    return [engine.ingest(camera, f, s) for f, s in zip(frames, stamps)]


# --------------------------------------------------------------------------- fidelity
def test_chunked_prefill_equals_one_shot_prefill(adapters, family, vtest_frames):
    """Logits of every streamed token (Qwen3-VL: timestamps and vision start/end too) and of the question that
    follows (LLaVA-OneVision: the video's closing image_newline first) == transformers' one-shot."""
    adapter = adapters[family]
    frames = vtest_frames[0][:8]
    cache, stream = _stream(adapter, frames, return_logits=True)
    inputs = _one_shot_inputs(adapter, frames)
    with torch.inference_mode():
        ref = adapter.model(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    q_ids = adapter.question_ids(QUESTION)
    assert ids[: len(adapter.prefix_ids)].tolist() == adapter.prefix_ids
    assert ids[len(ids) - len(q_ids):].tolist() == q_ids
    if family == "qwen3_vl":  # everything between prefix and question is streamed, in the processor's order
        ref_stream = ref[len(adapter.prefix_ids): len(ids) - len(q_ids)]
        assert ref_stream.shape[0] == 4 * (54 + 2) + sum(len(adapter.group_ids(j, _chunk(j))[0]) - 1 for j in range(4))
    elif family == "llava_onevision":  # one chunk per frame; the video's last <video> token is its image_newline
        ref_stream = ref[ids == adapter.model.config.video_token_id]
        assert ref_stream.shape[0] == 8 * 49 + 1
        ref_stream = ref_stream[:-1]
    else:
        ref_stream = ref[ids == adapter.model.config.video_token_id]
        assert ref_stream.shape[0] == 4 * 54
    assert ref_stream.shape == stream.shape
    err = (ref_stream - stream).abs().max().item()
    with cache.scratch(), torch.inference_mode():
        q_logits = adapter._forward(cache, _scratch_embeds(adapter, q_ids),
                                    _text_positions(adapter, len(q_ids), adapter.next_text_position(cache)),
                                    logits="all")
    q_err = (ref[len(ids) - len(q_ids):] - q_logits).abs().max().item()
    print(f"\n{family}: streaming vs one-shot max |diff| = {err:.3g} over {tuple(stream.shape)} logits, "
          f"question {q_err:.3g} over {tuple(q_logits.shape)}")
    assert err < 1e-4, f"{family}: streaming vs one-shot logits differ by {err}"
    assert q_err < 1e-4, f"{family}: question logits after the stream differ from the one-shot's by {q_err}"
    assert stream.std(0).mean() > 1e-2  # not trivially equal: the logits vary


def _chunk(j):
    return VisionChunk(6, 9, stamp_ns=int(j * 1e9), end_stamp_ns=int((j + 0.5) * 1e9), num_frames=2)


def test_qwen2_vl_temporal_ids_are_seconds(adapters, vtest_frames):
    """At 2 Hz the temporal ids are transformers' patch indices; at other rates they follow stream time (1 id/s)."""
    adapter = adapters["qwen2_vl"]
    frames = vtest_frames[0][:8]
    inputs = _one_shot_inputs(adapter, frames)
    pos, _ = adapter.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], None,
                                                inputs["video_grid_thw"], inputs["attention_mask"])
    video = inputs["input_ids"][0] == adapter.model.config.video_token_id
    p = len(adapter.prefix_ids)
    mine = torch.cat([adapter.chunk_positions(p, float(j), 6, 9) for j in range(4)], dim=1)
    assert torch.equal(pos[:, 0, video], mine)
    assert mine[0].unique().tolist() == [p, p + 1, p + 2, p + 3]
    # a 3 s pause leaves a gap of 3 ids; two cameras in the same second share the id
    assert adapter.chunk_positions(p, 4.0 + 3.0, 6, 9)[0, 0] == p + 7
    assert adapter.chunk_positions(p, 2.4, 6, 9)[0, 0] == adapter.chunk_positions(p, 2.9, 6, 9)[0, 0] == p + 2


def test_qwen3_vl_positions_and_ids_match_the_processor(adapters, vtest_frames):
    """Streamed token ids and M-RoPE ids (from the chunk table) == the processor's ids and get_rope_index."""
    adapter = adapters["qwen3_vl"]
    frames = vtest_frames[0][:8]
    cache, _ = _stream(adapter, frames)
    inputs = _one_shot_inputs(adapter, frames)
    ids = inputs["input_ids"][0]
    pos, _ = adapter.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], None,
                                                inputs["video_grid_thw"], inputs["attention_mask"])
    p, video_id = len(adapter.prefix_ids), adapter.model.config.video_token_id
    streamed_ids, streamed_pos = [], []
    records = cache.table.records
    assert [r.chunk.num_frames for r in records] == [0, 2, 0] * 4  # timestamp, frame, vision end per group
    for j in range(4):
        before, after = adapter.group_ids(j * 2 / FPS, records[3 * j + 1].chunk)
        streamed_ids += before + [video_id] * 54 + after
        t, f, e = (records[3 * j + i].chunk for i in range(3))
        assert (t.grid_w, e.grid_w) == (len(before), len(after))
        streamed_pos += [torch.arange(t.position, t.max_position + 1).expand(3, -1),
                         adapter.patch_positions(f.position, f.grid_h, f.grid_w),
                         torch.arange(e.position, e.max_position + 1).expand(3, -1)]
    n = len(streamed_ids)
    assert ids[p : p + n].tolist() == streamed_ids
    assert torch.equal(pos[:, 0, p : p + n], torch.cat(streamed_pos, dim=1))
    text = adapter.tokenizer.decode(ids[p : p + n].tolist()).replace("<|video_pad|>", "")
    assert text == "".join(f"<{j + 0.25:.1f} seconds><|vision_start|><|vision_end|>" for j in range(4))
    assert adapter.next_text_position(cache) == int(pos[0, 0, p + n])  # the question continues the ids


def test_qwen3_vl_deepstack_reaches_the_logits(adapters, vtest_frames):
    """Without its DeepStack features a patch's logits move far from the one-shot's: the test above is not vacuous."""
    import dataclasses

    adapter = adapters["qwen3_vl"]
    frames = vtest_frames[0][:2]
    _, with_deep = _stream(adapter, frames, return_logits=True)
    patch = adapter.encode_patch(frames)
    assert len(patch.deepstack) == 2 and patch.deepstack[0].shape == patch.embeds.shape
    cache = adapter.new_cache(budget=CacheBudget(), policy=None)
    adapter.prefill_prefix(cache)
    zeroed = dataclasses.replace(patch, deepstack=tuple(torch.zeros_like(d) for d in patch.deepstack))
    chunk = VisionChunk(patch.grid_h, patch.grid_w, end_stamp_ns=int(1e9 / FPS), num_frames=2)
    without = adapter.prefill_patch(cache, zeroed, chunk, return_logits=True)
    assert (with_deep - without).abs().max() > 1e-2
    with pytest.raises(ValueError, match="DeepStack"):
        adapter.prefill_patch(cache, dataclasses.replace(patch, deepstack=()), chunk)


def test_answer_equals_full_sequence_greedy_decoding(adapters, family, vtest_frames):
    """Decoding from the cache equals greedy decoding of the whole sequence in one forward."""
    adapter = adapters[family]
    frames = vtest_frames[0][:6]
    cache, _ = _stream(adapter, frames)
    answer = adapter.generate(cache, QUESTION, max_new_tokens=6)
    assert len(answer.token_ids) == 6
    q_ids = adapter.question_ids(QUESTION)
    start = adapter.next_text_position(cache)
    seq = q_ids + answer.token_ids[:-1]
    fresh, _ = _stream(adapter, frames)
    embeds = _scratch_embeds(adapter, seq)
    with torch.inference_mode():
        logits = adapter._forward(fresh, embeds, _text_positions(adapter, len(seq), start), logits="all")
    assert logits[len(q_ids) - 1 :].argmax(-1).tolist() == answer.token_ids


def test_cap_holds_at_every_frame(adapters, family_dirs, family, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(adapters[family], family_dirs[family], family, policy="infinipot_v", max_vision_tokens=200)
    for res in _feed(engine, frames, stamps):
        assert res.status in ("buffered", "ingested")
        st = engine.stats().cache
        assert st.vision_tokens <= 200 and st.kv_bytes <= st.kv_bytes_budget
    assert engine.cache.compressions >= 2
    assert engine.stats().frames.ingested == len(frames)
    ans = engine.ask(QUESTION, max_new_tokens=4)
    assert ans.generated_tokens == 4 and ans.newest_stamp_ns == stamps[-1]
    assert ans.frames_in_context == engine.stats().cache.frames_in_cache


def test_budget_larger_than_stream_answers_like_uncompressed(adapters, family_dirs, family, vtest_frames):
    frames, stamps = vtest_frames
    capped = _engine(adapters[family], family_dirs[family], family, policy="infinipot_v", max_vision_tokens=100_000)
    full = _engine(adapters[family], family_dirs[family], family, policy="none")
    _feed(capped, frames, stamps)
    _feed(full, frames, stamps)
    assert capped.cache.compressions == 0
    for q in (QUESTION, "How many people are walking?"):
        a, b = capped.ask(q, max_new_tokens=12), full.ask(q, max_new_tokens=12)
        assert a.generated_tokens > 0
        assert a.answer == b.answer and a.generated_tokens == b.generated_tokens


def test_masked_tokens_do_not_reach_the_answer(adapters, family, vtest_frames):
    """Noise in masked K/V (another camera's frames and, for Qwen3-VL, their timestamps) changes the logits by 0."""
    adapter = adapters[family]
    cache, _ = _stream(adapter, vtest_frames[0][:8], cameras=[0, 1] * 4)
    visible = cache.visibility(cameras=[1])
    p = cache.prefix_length
    ids = cache.vision_token_ids(0)[0, 0]
    rows = cache.table.chunk_index(ids)
    cams = cache.table.column("camera")[rows]
    assert torch.equal(visible[0][0, 0, p : p + ids.numel()], cams == 1)  # every record of camera 1, text included
    q = adapter.question_ids(QUESTION)
    embeds = _scratch_embeds(adapter, q)
    pos = _text_positions(adapter, len(q), adapter.next_text_position(cache))

    def answer_logits():
        with cache.scratch(), torch.inference_mode():
            return adapter._forward(cache, embeds, pos, visible=visible)

    ref = answer_logits()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for layer in range(cache.num_layers):
            k, v = cache.layer_kv(layer)
            hidden = ~visible[layer]
            assert 0 < int(hidden.sum()) < hidden.numel()
            k[hidden] += torch.randn(int(hidden.sum()), k.shape[-1], generator=gen) * 5
            v[hidden] += torch.randn(int(hidden.sum()), v.shape[-1], generator=gen) * 5
    assert torch.equal(answer_logits(), ref)
    with torch.inference_mode():
        k, v = cache.layer_kv(0)
        v[visible[0] & (torch.arange(v.shape[2]) >= p)] += 5.0
    assert (answer_logits() - ref).abs().max() > 1e-3


def test_camera_and_time_filters(adapters, family_dirs, family, vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(adapters[family], family_dirs[family], family, policy="none")
    _feed(engine, frames[:4], stamps[:4], camera="front")
    _feed(engine, frames[4:8], stamps[4:8], camera="rear")
    assert engine.ask("hi", max_new_tokens=1).frames_in_context == 8
    front = engine.ask("hi", cameras=["front"], max_new_tokens=1)
    assert front.frames_in_context == 4 and front.newest_stamp_ns == stamps[3]
    late = engine.ask("hi", since_ns=stamps[6], max_new_tokens=1)
    assert late.frames_in_context == 2 and late.oldest_stamp_ns == stamps[6]
    assert late.context_tokens < front.context_tokens


# --------------------------------------------------------------------------- Qwen3-VL timestamps in the cache
def test_qwen3_vl_timestamps_kept_only_with_their_frame(adapters, family_dirs, vtest_frames):
    """After compressions, in every layer and KV head a cached timestamp / vision end has a token of its frame."""
    from infinipot_ros.models.qwen3_vl import FrameTextPolicy, frame_partners

    frames, stamps = vtest_frames
    engine = _engine(adapters["qwen3_vl"], family_dirs["qwen3_vl"], "qwen3_vl", policy="infinipot_v",
                     max_vision_tokens=200)
    _feed(engine, frames, stamps)
    cache = engine.cache
    assert isinstance(cache.policy, FrameTextPolicy) and cache.compressions >= 2
    partner, _, pending = frame_partners(cache.table)
    assert not pending.any()
    text = cache.table.column("num_frames") == 0
    kept_text = 0
    for layer in range(cache.num_layers):
        rows = cache.table.chunk_index(cache.vision_token_ids(layer))[0]  # [H, S] table row per cached token
        for head in range(rows.shape[0]):
            held = set(rows[head].tolist())
            texts = [r for r in held if text[r]]
            kept_text += len(texts)
            assert all(int(partner[r]) in held for r in texts), (layer, head)
    assert kept_text > 0
    # the newest group's timestamp and vision end are kept whole everywhere (its frame is recent)
    newest = list(range(len(cache.table) - 3, len(cache.table)))
    for layer in range(cache.num_layers):
        rows = cache.table.chunk_index(cache.vision_token_ids(layer))[0]
        for r in newest:
            assert ((rows == r).sum(-1) == cache.table.records[r].chunk.num_tokens).all()


def test_frame_text_policy_scores_text_just_below_its_frame():
    from infinipot_ros.kv import ScoringPolicy
    from infinipot_ros.models.qwen3_vl import FrameTextPolicy, frame_partners

    table = ChunkTable()
    for j in range(3):  # groups: timestamp (3 tokens), frame 2 x 2, vision end; the third frame not yet written
        kw = dict(camera=0, stamp_ns=j * 10**9, end_stamp_ns=j * 10**9 + 5 * 10**8)
        table.append(VisionChunk(1, 3, num_frames=0, **kw))
        if j < 2:
            table.append(VisionChunk(2, 2, num_frames=2, **kw))
            table.append(VisionChunk(1, 1, num_frames=0, **kw))
    partner, is_end, pending = frame_partners(table)
    assert partner.tolist() == [1, -1, 1, 4, -1, 4, -1]
    assert is_end.tolist() == [False, False, True, False, False, True, False]
    assert pending.tolist() == [False] * 6 + [True]
    # wrapped-policy score of every token id (text ids get scores too: they must be replaced)
    inner_scores = torch.tensor([9.0, 9, 9, 1, 5, 2, 3, 9, 9, 9, 9, 4, 7, 6, 2, 9, 9, 9, 9])

    class Fixed(ScoringPolicy):
        def score(self, keys, value_norms, layout, **kw):
            assert layout.table.column("camera").tolist() == [1, 0, 2, 1, 0, 2, 1]  # text set apart
            return inner_scores[layout.token_ids]

    def scores(ids):
        ids = torch.tensor(ids).view(1, 1, -1)
        s = ids.shape[-1]
        return FrameTextPolicy(Fixed()).score(torch.zeros(1, 1, s, 2), torch.zeros(1, 1, s), table.layout(ids),
                                              layers=[0], num_layers=1, keep=4)[0, 0]

    def below(x):
        return torch.nextafter(torch.tensor(x), torch.tensor(float("-inf"))).item()

    out = scores(list(range(table.next_token_id)))
    assert out[:3].tolist() == [below(5.0)] * 3 and out[7].item() == below(5.0)  # group 0: best frame token 5
    assert out[8:11].tolist() == [below(7.0)] * 3 and out[15].item() == below(7.0)  # group 1: 7
    assert out[16:].tolist() == [below(float("inf"))] * 3  # its frame is being written: above every finite score
    assert torch.equal(out[3:7], inner_scores[3:7]) and torch.equal(out[11:15], inner_scores[11:15])
    # in a row that holds none of frame 0's tokens its timestamp and vision end score -inf
    out = scores([0, 1, 2, 7, 8, 9, 10, 11, 12])
    assert out[:4].tolist() == [float("-inf")] * 4 and out[4:7].tolist() == [below(7.0)] * 3


@pytest.mark.parametrize("fam", ["qwen3_vl", "llava_onevision"])
def test_snapshot_roundtrip(adapters, family_dirs, vtest_frames, tmp_path, fam):
    """Memory saves and loads (Qwen3-VL: with timestamp records, cameras in range; LLaVA-OneVision: one-frame
    chunks at 1-D positions), answering identically."""
    frames, stamps = vtest_frames
    kw = dict(policy="infinipot_v", max_vision_tokens=200)
    engine = _engine(adapters[fam], family_dirs[fam], fam, **kw)
    _feed(engine, frames[:8], stamps[:8])
    before = engine.ask(QUESTION, max_new_tokens=6)
    engine.save_memory(str(tmp_path / "mem.safetensors"))
    restored = _engine(adapters[fam], family_dirs[fam], fam, **kw)
    restored.load_memory(str(tmp_path / "mem.safetensors"))
    after = restored.ask(QUESTION, max_new_tokens=6)
    assert after.answer == before.answer and after.frames_in_context == before.frames_in_context == 8


def test_qwen3_vl_encode_patch_rejects_bad_frames(adapters, vtest_frames):
    adapter = adapters["qwen3_vl"]
    f = vtest_frames[0][0]
    with pytest.raises(ValueError, match="2 frames"):
        adapter.encode_patch([f])
    with pytest.raises(ValueError, match="differ"):
        adapter.encode_patch([f, f[:100]])
    with pytest.raises(ValueError, match="uint8"):
        adapter.encode_patch([f.astype(np.float32)] * 2)


# --------------------------------------------------------------------------- registry
def test_load_adapter_picks_the_family_by_model_type(adapters, family_dirs):
    from infinipot_ros.models.llava_onevision import LlavaOneVisionAdapter
    from infinipot_ros.models.qwen2_vl import Qwen2VLAdapter
    from infinipot_ros.models.qwen3_vl import Qwen3VLAdapter

    assert type(adapters["qwen2_vl"]) is Qwen2VLAdapter and type(adapters["qwen3_vl"]) is Qwen3VLAdapter
    assert type(adapters["llava_onevision"]) is LlavaOneVisionAdapter
    for fam, d in family_dirs.items():
        assert json.loads((pathlib.Path(d) / "config.json").read_text())["model_type"] == fam
        assert adapter_class(fam) is type(adapters[fam])
    assert set(FAMILIES) == {"qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision"}
    assert set(FAMILY_BUILTINS.values()) < set(BUILTIN_MODELS)


def test_unsupported_family_and_unknown_builtin_fail_clearly(tmp_path):
    other = tmp_path / "idefics"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    supported = r"supported: qwen2_5_vl, qwen2_vl, qwen3_vl, llava_onevision\)"
    with pytest.raises(ValueError, match=r"'idefics3'.*" + supported):
        load_adapter(str(other), device="cpu")
    with pytest.raises(ValueError, match=supported):
        adapter_class("smolvlm")
    with pytest.raises(ValueError, match="builtin:tiny-qwen2-vl.*builtin:tiny-qwen3-vl.*builtin:tiny-llava-onevision"):
        resolve_model("builtin:tiny-llava")


@pytest.mark.parametrize("fam,hub_id", [("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"),
                                        ("qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct"),
                                        ("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")])
def test_hf_id_loads_from_the_local_hub_cache(family_dirs, fam, hub_id, tmp_path, monkeypatch):
    """An HF id resolves offline through the hub cache to its family (the tiny files stand in for the weights)."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in pathlib.Path(family_dirs[fam]).iterdir():
        os.symlink(f, snap / f.name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    adapter = load_adapter(hub_id, device="cpu", dtype="float32", max_pixels=MAX_PIXELS[fam], local_files_only=True)
    assert type(adapter) is adapter_class(fam) and adapter.model_id == hub_id


def test_adapters_have_every_attribute_of_qwen2_5_vl(tiny_adapter, adapters):
    """The Qwen families repeat the Qwen2.5-VL constructor: none of its attributes may be missing (drift guard);
    LLaVA-OneVision (its own class) has every attribute of the ModelAdapter interface."""
    base = set(vars(tiny_adapter))
    for fam, adapter in adapters.items():
        if fam.startswith("qwen"):
            assert base <= set(vars(adapter)), (fam, sorted(base - set(vars(adapter))))
    from infinipot_ros.models import ModelAdapter

    llava = adapters["llava_onevision"]
    for name in ModelAdapter.__annotations__:
        assert getattr(llava, name) is not None, name


# --------------------------------------------------------------------------- LLaVA-OneVision
def test_llava_onevision_chunks_are_frames_in_token_order(adapters, vtest_frames):
    """One chunk per frame, its 7 x 7 pooled grid; 1-D positions continue token by token (the one-shot ids)."""
    adapter = adapters["llava_onevision"]
    assert adapter.frames_per_patch == 1 and adapter.max_chunk_tokens() == 49
    frames = vtest_frames[0][:4]
    cache, _ = _stream(adapter, frames)
    p = len(adapter.prefix_ids)
    records = [r.chunk for r in cache.table.records]
    assert [(c.grid_h, c.grid_w, c.num_frames) for c in records] == [(7, 7, 1)] * 4
    assert [(c.position, c.max_position) for c in records] == [(p + 49 * j, p + 49 * j + 48) for j in range(4)]
    assert adapter.next_text_position(cache) == p + 4 * 49
    inputs = _one_shot_inputs(adapter, frames)
    ids = inputs["input_ids"][0]
    assert ids[p : p + 4 * 49 + 1].tolist() == [adapter.model.config.video_token_id] * (4 * 49 + 1)
    q = adapter.question_ids(QUESTION)
    assert q[0] == adapter.model.config.video_token_id and ids[p + 4 * 49 :].tolist() == q
    with pytest.raises(ValueError, match="1 frame"):
        adapter.encode_patch(frames[:2])
    with pytest.raises(ValueError, match="uint8"):
        adapter.encode_patch([frames[0].astype(np.float32)])


def test_llava_onevision_newline_reaches_the_answer(adapters, vtest_frames):
    """The question's first slot carries image_newline, not the <video> embedding: it changes the logits."""
    adapter = adapters["llava_onevision"]
    cache, _ = _stream(adapter, vtest_frames[0][:2])
    q = adapter.question_ids(QUESTION)
    pos = _text_positions(adapter, len(q), adapter.next_text_position(cache))
    with cache.scratch(), torch.inference_mode():
        right = adapter._forward(cache, _scratch_embeds(adapter, q), pos)
    with cache.scratch(), torch.inference_mode():
        wrong = adapter._forward(cache, adapter.model.get_input_embeddings()(torch.tensor(q)), pos)
    assert (right - wrong).abs().max() > 1e-2
    # the static decode step (default) and the growing-view path answer alike
    static = adapter.generate(cache, QUESTION, max_new_tokens=8)
    adapter.decode_mode = "dynamic"
    try:
        dynamic = adapter.generate(cache, QUESTION, max_new_tokens=8)
    finally:
        adapter.decode_mode = "auto"
    assert static.token_ids == dynamic.token_ids and len(static.token_ids) == 8


def test_llava_onevision_rebase_rotates_every_pair(adapters, vtest_frames):
    """After ``rebase`` the layer-0 keys are those a prefill at the shifted 1-D positions writes (layer-0 keys
    depend only on the token and its position); chunks stop at P; the prefix is untouched."""
    adapter = adapters["llava_onevision"]
    frames = vtest_frames[0][:4]
    p = len(adapter.prefix_ids)
    cache, _ = _stream(adapter, frames)  # chunks at P, P + 49, P + 98, P + 147
    prefix_k = cache.layer_kv(0)[0][:, :, :p].clone()
    before = cache.layer_kv(0)[0].clone()
    event = adapter.rebase(cache, 60)
    assert cache.rebases == 1 and (event.delta, event.clamped_chunks, event.min_position) == (60, 2, p)
    shifted = [p, p, p + 38, p + 87]
    assert cache.table.column("position").tolist() == shifted
    assert cache.table.column("max_position").tolist() == [s + 48 for s in shifted]
    assert adapter.next_text_position(cache) == p + 136
    ref = adapter.new_cache(budget=CacheBudget(), policy=None)
    adapter.prefill_prefix(ref)
    with torch.inference_mode():
        for frame, start in zip(frames, shifted):
            patch = adapter.encode_patch([frame])
            with ref.vision_chunk(VisionChunk(7, 7, position=start, max_position=start + 48)):
                adapter._forward(ref, patch.embeds, torch.arange(49) + start, logits="none")
    k, v = cache.layer_kv(0)
    k_ref, v_ref = ref.layer_kv(0)
    assert torch.equal(k[:, :, :p], prefix_k)
    assert (k - k_ref).abs().max().item() < 1e-4
    assert (before - k_ref).abs().max().item() > 1e-2  # the keys did move: the check can fail
    assert torch.equal(v, v_ref)
    # the engine's entry point: the next chunk (at P + 136) passes T = 150: delta = max(0, 136 - 75) = 61
    assert adapter.rebase_positions(cache, 0.0, 0) == 0 and cache.rebases == 1
    assert adapter.plan_rebase(cache, p + 136, 150) == p + 136 - p - 75
    assert adapter.rebase_positions(cache, 0.0, 150) == 0  # the stream clock never moves
    assert cache.rebases == 2 and adapter.next_text_position(cache) == p + 75
    with pytest.raises(ValueError, match="prefix"):
        adapter.plan_rebase(cache, 10**6, 2 * p - 1)


def test_llava_onevision_real_video_through_the_engine(vtest_path, tmp_path, monkeypatch):
    """vtest.avi through ``StreamingAssistant`` loading ``builtin:tiny-llava-onevision`` by name: the cap holds at
    every frame, positions are re-based under the threshold, and the answer sees the frames in the cache."""
    from infinipot_ros.tools.video import iter_video

    monkeypatch.setenv("INFINIPOT_CACHE_DIR", str(tmp_path))
    threshold = 1024
    engine = StreamingAssistant(EngineConfig(
        model="builtin:tiny-llava-onevision", device="cpu", dtype="float32", policy="infinipot_v",
        max_vision_tokens=300, frame_rate_hz=5.0, rebase_position_threshold=threshold))
    assert engine.adapter.model_id == "builtin:tiny-llava-onevision"
    ingested = 0
    for _, stamp, frame in iter_video(vtest_path, max_frames=80):
        res = engine.offer("front", frame, stamp)
        if res is None:
            continue
        assert res.status == "ingested" and res.chunk_tokens == 49
        ingested += 1
        st = engine.stats().cache
        assert st.vision_tokens <= 300 and st.kv_bytes <= st.kv_bytes_budget
        assert engine.cache.table.column("position").max() <= threshold
    assert ingested == 40 and engine.stats().frames.ingested == 40
    assert engine.cache.compressions >= 5 and engine.cache.rebases >= 1
    ans = engine.ask(QUESTION, max_new_tokens=6)
    assert ans.generated_tokens == 6 and ans.answer
    assert ans.frames_in_context == engine.stats().cache.frames_in_cache <= 40


def test_llava_onevision_note_continues_the_positions(adapters, vtest_frames):
    """A note is a 1 x k text chunk at the next positions; the next frame continues after it."""
    from infinipot_ros.kv import NOTE_CAMERA

    adapter = adapters["llava_onevision"]
    cache, _ = _stream(adapter, vtest_frames[0][:1])
    p = len(adapter.prefix_ids)
    ids = adapter.note_ids("the door is red", 0.5)
    assert adapter.tokenizer.decode(ids) == "\nNote at 0.5 s: the door is red\n"
    adapter.prefill_note(cache, ids, VisionChunk(1, len(ids), camera=NOTE_CAMERA, num_frames=0), seconds=0.5)
    patch = adapter.encode_patch(vtest_frames[0][1:2])
    adapter.prefill_patch(cache, patch, VisionChunk(7, 7, stamp_ns=10**9, num_frames=1), seconds=1.0)
    k = len(ids)
    assert [(c.position, c.max_position) for c in (r.chunk for r in cache.table.records)] == [
        (p, p + 48), (p + 49, p + 48 + k), (p + 49 + k, p + 97 + k)]
    with pytest.raises(ValueError, match="text chunk"):
        adapter.prefill_note(cache, ids, VisionChunk(1, len(ids), camera=0, num_frames=0))
