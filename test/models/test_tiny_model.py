"""Tests of the embedded tiny Qwen2.5-VL builder (infinipot_ros.models.tiny) and builtin name resolution.

The model is built once per module into a temporary directory and loaded back
through the same transformers entry points real weights use (AutoConfig,
AutoProcessor, Qwen2_5_VLForConditionalGeneration.from_pretrained).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch

from infinipot_ros.models import resolve, tiny
from infinipot_ros.tools import build_tiny_model

transformers = pytest.importorskip("transformers")

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VIDEO_TURN = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happened?"}]},
]


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _video(seed: int = 0) -> np.ndarray:
    """4 random RGB frames, 336 x 448, uint8 (T, H, W, C)."""
    return np.random.default_rng(seed).integers(0, 256, size=(4, 336, 448, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    return tiny.build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / tiny.TINY_MODEL_NAME, seed=0)


@pytest.fixture(scope="module")
def processor(built):
    return transformers.AutoProcessor.from_pretrained(built)


@pytest.fixture(scope="module")
def model(built):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(built).eval()


@pytest.fixture(scope="module")
def video_inputs(processor):
    text = processor.apply_chat_template(VIDEO_TURN, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], videos=[_video()], return_tensors="pt", cap_pixels_per_frame=False)


def test_files_and_marker(built):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                 tiny.MARKER_FILE):
        assert (built / name).is_file(), name
    marker = json.loads((built / tiny.MARKER_FILE).read_text())
    assert marker["recipe"] == tiny.TINY_MODEL_NAME
    assert marker["recipe_version"] == tiny.RECIPE_VERSION
    assert marker["seed"] == 0
    # nothing but the build itself next to it (temp dirs renamed/removed)
    siblings = sorted(p.name for p in built.parent.iterdir() if not p.name.endswith(".lock"))
    assert siblings == [tiny.TINY_MODEL_NAME]
    assert 2_000_000 < (built / "model.safetensors").stat().st_size < 10_000_000


def test_config_numbers(built, processor):
    config = transformers.AutoConfig.from_pretrained(built)
    assert type(config).__name__ == "Qwen2_5_VLConfig"
    text = config.text_config
    assert text.hidden_size == 128
    assert text.num_hidden_layers == 4
    assert text.num_attention_heads == 4
    assert text.num_key_value_heads == 2
    assert text.intermediate_size == 256
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == 32
    rope = text.rope_parameters
    assert rope["mrope_section"] == [4, 6, 6]
    assert sum(rope["mrope_section"]) == head_dim // 2
    assert rope["rope_theta"] == 1_000_000.0
    assert text.max_position_embeddings == 32768
    assert text.rms_norm_eps == 1e-6
    assert text.sliding_window is None
    assert text.vocab_size == len(processor.tokenizer) == 2048
    vision = config.vision_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (2, 64, 4, 128)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert vision.window_size == 112
    assert list(vision.fullatt_block_indexes) == [1]
    assert vision.out_hidden_size == text.hidden_size
    assert vision.tokens_per_second == 2
    assert text.initializer_range == vision.initializer_range == 0.1


def test_special_token_ids_match_config(built, processor):
    config = transformers.AutoConfig.from_pretrained(built)
    tok = processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    assert ids == list(range(tiny.BPE_VOCAB_SIZE, tiny.BPE_VOCAB_SIZE + len(SPECIALS)))
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert processor.video_token_id == config.video_token_id
    assert processor.image_token_id == config.image_token_id
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == config.text_config.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == config.text_config.pad_token_id
    assert config.text_config.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_token is None
    for token, token_id in zip(SPECIALS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    generation = transformers.GenerationConfig.from_pretrained(built)
    assert config.text_config.eos_token_id in generation.eos_token_id
    assert generation.do_sample is False


def test_chat_template_video_turn(processor):
    text = processor.apply_chat_template(VIDEO_TURN, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happened?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text.count("<|video_pad|>") == 1
    # the tokenizer carries the same template
    assert processor.tokenizer.apply_chat_template(VIDEO_TURN, add_generation_prompt=True, tokenize=False) == text
    multi = [
        {"role": "system", "content": "Watch the robot camera."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A cup."},
    ]
    rendered = processor.apply_chat_template(multi, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nWatch the robot camera.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\nA cup.<|im_end|>\n"
    )


def test_processor_video_grid(processor, video_inputs, model):
    grid = video_inputs["video_grid_thw"]
    assert grid.tolist() == [[2, 24, 32]]
    assert tuple(video_inputs["pixel_values_videos"].shape) == (2 * 24 * 32, 3 * 2 * 14 * 14)
    ids = video_inputs["input_ids"][0]
    is_video = (ids == model.config.video_token_id).to(torch.int8)
    assert int(is_video.sum()) == 2 * 24 * 32 // 4
    # exactly one contiguous run of video tokens, framed by vision_start / vision_end
    assert int((is_video[1:] - is_video[:-1]).abs().sum()) == 2
    first = int(is_video.argmax())
    last = first + int(is_video.sum()) - 1
    assert int(ids[first - 1]) == model.config.vision_start_token_id
    assert int(ids[last + 1]) == model.config.vision_end_token_id


def test_forward_finite_logits(model, video_inputs):
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(**video_inputs).logits
    seq = video_inputs["input_ids"].shape[1]
    assert tuple(logits.shape) == (1, seq, 2048)
    assert bool(torch.isfinite(logits).all())
    assert float(logits.std()) > 0.1


def test_value_norms_differ_between_tokens(model, video_inputs):
    values = {}
    handles = [
        layer.self_attn.v_proj.register_forward_hook(
            lambda _mod, _args, out, i=i: values.__setitem__(i, out.detach())
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with torch.no_grad():
            model(**video_inputs)
    finally:
        for handle in handles:
            handle.remove()
    is_video = video_inputs["input_ids"][0] == model.config.video_token_id
    assert sorted(values) == [0, 1, 2, 3]
    for layer_idx, value in values.items():
        norms = value[0, is_video].view(-1, 2, 32).norm(dim=-1)  # [video tokens, kv heads]
        ratio = norms.std(dim=0) / norms.mean(dim=0)
        assert bool((ratio > 0.05).all()), (layer_idx, ratio.tolist())


def test_tokenizer_roundtrip(processor):
    tok = processor.tokenizer
    sentence = "The red robot picks up 3 blue cups at 12:30, then turns left!"
    ids = tok.encode(sentence, add_special_tokens=False)
    assert tok.decode(ids) == sentence
    assert len(ids) < len(sentence) // 2  # merges learned: mostly whole words
    assert tok.tokenize(" robot") == ["Ġrobot"]
    other = "naïve café ✓ 東京"  # outside the corpus: byte-level fallback still round-trips
    assert tok.decode(tok.encode(other, add_special_tokens=False)) == other
    assert max(tok.encode(other, add_special_tokens=False)) < tiny.BPE_VOCAB_SIZE


def test_second_build_is_noop(built):
    marker = built / tiny.MARKER_FILE
    weights = built / "model.safetensors"
    before = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns, weights.stat().st_ino)
    assert tiny.build_tiny_qwen2_5_vl(built, seed=0) == built
    after = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns, weights.stat().st_ino)
    assert after == before


def test_cli_same_seed_byte_identical_and_force(built, tmp_path, capsys):
    out = tmp_path / "again"
    assert build_tiny_model.main(["--out", str(out), "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _sha256(out / "model.safetensors") == _sha256(built / "model.safetensors")
    assert _sha256(out / "tokenizer.json") == _sha256(built / "tokenizer.json")
    inode = (out / "model.safetensors").stat().st_ino
    assert build_tiny_model.main(["--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").stat().st_ino != inode  # really rebuilt
    assert _sha256(out / "model.safetensors") == _sha256(built / "model.safetensors")


def test_different_seed_differs(built, tmp_path):
    out = tiny.build_tiny_qwen2_5_vl(tmp_path / "seed1", seed=1)
    assert _sha256(out / "model.safetensors") != _sha256(built / "model.safetensors")
    # the tokenizer does not depend on the seed
    assert _sha256(out / "tokenizer.json") == _sha256(built / "tokenizer.json")
    assert json.loads((out / tiny.MARKER_FILE).read_text())["seed"] == 1


def test_incomplete_build_is_replaced(built, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(built, out)
    (out / "model.safetensors").unlink()  # as if a non-atomic writer had crashed
    stale = tmp_path / ".model.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    tiny.build_tiny_qwen2_5_vl(out, seed=0)
    assert _sha256(out / "model.safetensors") == _sha256(built / "model.safetensors")
    assert not stale.exists()


def test_refuses_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_qwen2_5_vl(foreign, overwrite=True)
    assert build_tiny_model.main(["--out", str(foreign), "--force"]) == 1
    assert "refusing" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_resolve_model(built, tmp_path):
    with pytest.raises(ValueError, match="builtin:tiny-qwen2.5-vl"):
        resolve.resolve_model("builtin:nope")
    assert resolve.resolve_model(str(built)) == os.path.realpath(built)
    assert resolve.resolve_model("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    # builtin name -> <cache>/models/<name>; a complete build already there is reused
    cache = tmp_path / "cache"
    target = cache / "models" / tiny.TINY_MODEL_NAME
    shutil.copytree(built, target)
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert resolve.resolve_model(resolve.BUILTIN_PREFIX + tiny.TINY_MODEL_NAME, cache_dir=cache) == str(target)
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve.BUILTIN_MODELS[0] == resolve.BUILTIN_PREFIX + tiny.TINY_MODEL_NAME


#: sha256 of the generated tokenizer corpus ("\n"-joined lines): the data file and the generator
#: together must keep giving this text, or the tokenizer (and every tiny model) changes.
CORPUS_SHA256 = "bcccb65b42d869fd92ed2864f207dcb6c1983ee535b8aabed1d8d305bae51c31"


def test_corpus_is_package_data_and_unchanged():
    data = resources.files("infinipot_ros.models").joinpath(tiny.CORPUS_FILE)
    assert data.is_file(), f"{tiny.CORPUS_FILE} missing from the installed package"
    setup_py = (pathlib.Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert '"infinipot_ros.models": ["data/*.json"]' in setup_py
    lines = tiny._corpus()
    assert len(lines) == 12312
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == CORPUS_SHA256


def test_concurrent_builders_make_one_complete_build(built, tmp_path):
    """Two processes building one target at once: both succeed, one build is published, no temp dir left."""
    out = tmp_path / "shared" / tiny.TINY_MODEL_NAME
    code = ("import sys, os; from infinipot_ros.models import tiny; p = tiny.build_tiny_qwen2_5_vl(sys.argv[1]); "
            "st = os.stat(p / tiny.MARKER_FILE); print(st.st_ino, st.st_mtime_ns)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    seen = {r[0].strip().splitlines()[-1] for r in results}
    assert len(seen) == 1, f"the second builder replaced the first one's build: {seen}"
    assert tiny._is_complete_build(out, 0)
    assert _sha256(out / "model.safetensors") == _sha256(built / "model.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == [f".{out.name}.lock", out.name]


def test_stale_temp_dir_is_never_the_build_and_is_cleaned(built, tmp_path):
    """A crashed builder's staging directory (even holding a complete copy) is not used, and is removed."""
    out = tmp_path / "model"
    stale = tmp_path / ".model.tmp-crashed"
    shutil.copytree(built, stale / "new")
    assert resolve.looks_like_hf_id(str(out)) is False
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve.check_model_dir(out)
    tiny.build_tiny_qwen2_5_vl(out, seed=0)
    assert tiny._is_complete_build(out, 0) and not stale.exists()


def test_failed_build_keeps_the_previous_one(built, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(built, out)
    before = _sha256(out / "model.safetensors")

    def broken(directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        tiny.build_atomically(out, is_complete=lambda d: False, write=broken)
    assert _sha256(out / "model.safetensors") == before and tiny._is_complete_build(out, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("INFINIPOT_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("INFINIPOT_CACHE_DIR")
    assert tiny.default_cache_dir() == tmp_path / "xdg" / "infinipot_ros"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.default_cache_dir() == tmp_path / "home" / ".cache" / "infinipot_ros"
