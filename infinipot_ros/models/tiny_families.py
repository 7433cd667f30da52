"""Builders of the tiny offline models of the other families: Qwen2-VL, Qwen3-VL and LLaVA-OneVision.

Each is the real transformers architecture (``Qwen2VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``)
with a small configuration, seeded random
weights (initializer range 0.1, so value norms and key similarities differ
between tokens) and the project's offline byte-level BPE tokenizer and chat
template (:mod:`.tiny`). Written with ``save_pretrained`` and loaded back with
the Auto classes, as real checkpoints are; no download, no GPU.

Shared with the tiny Qwen2.5-VL (:mod:`.tiny`): the tokenizer (same corpus,
same special-token ids), the chat template, the build directory protocol
(:func:`~.tiny.build_atomically`: file lock, temporary directory, marker file
written last, one ``os.replace``, refusal to replace a directory that is not a
build). What differs:

* ``tiny-qwen2-vl``: Qwen2-VL vision tower (full attention in every block,
  LayerNorm + GELU blocks, LayerNorm + MLP merger; no window attention, no
  ``tokens_per_second``), 14-pixel patches, a ``Qwen2VLProcessor``.
* ``tiny-qwen3-vl``: Qwen3-VL vision tower (learned position grid resampled
  per frame, DeepStack mergers on both blocks), 16-pixel patches, text stack
  with q/k RMS norms and interleaved M-RoPE, a ``Qwen3VLProcessor`` (frame
  timestamps as text) with a ``Qwen3VLVideoProcessor``.
* ``tiny-llava-onevision``: SigLIP vision tower (no pooling head, 14-pixel
  patches on a 182 x 182 input: a 13 x 13 patch grid, pooled 2x2 bilinear to
  7 x 7 = 49 tokens per video frame, as the released 384 x 384 input gives
  27 x 27 -> 14 x 14), a 2-layer GELU projector and a Qwen2 text stack (plain
  1-D RoPE); the tokenizer gains ``<image>`` and ``<video>`` after the Qwen
  specials (as in llava-onevision-qwen2), the chat template renders LLaVA-OV's
  prompt layout (:data:`LLAVA_OV_CHAT_TEMPLATE`), a ``LlavaOnevisionProcessor``.

Public API: :data:`TINY_QWEN2_VL`, :data:`TINY_QWEN3_VL`, :data:`TINY_LLAVA_ONEVISION`, :data:`BUILDERS`,
:func:`build_tiny_qwen2_vl`, :func:`build_tiny_qwen3_vl`, :func:`build_tiny_llava_onevision`.
"""
from __future__ import annotations

import pathlib
from typing import Callable

from . import tiny
from .tiny import PathLike

TINY_QWEN2_VL = "tiny-qwen2-vl"
TINY_QWEN3_VL = "tiny-qwen3-vl"
TINY_LLAVA_ONEVISION = "tiny-llava-onevision"

#: Bump a family's version whenever anything that changes its written files changes.
RECIPE_VERSIONS = {TINY_QWEN2_VL: 1, TINY_QWEN3_VL: 1, TINY_LLAVA_ONEVISION: 1}

_INIT_RANGE = 0.1  # value norms / key similarities vary per token (see docs/models-offline)

# Text stack shared by both families: hidden 128, 4 layers, 4 query / 2 KV heads, head_dim 32.
_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, hidden_act="silu", max_position_embeddings=32768,
             initializer_range=_INIT_RANGE, rms_norm_eps=1e-6, use_cache=True, attention_dropout=0.0,
             dtype="float32")


def build_tiny_qwen2_vl(out_dir: PathLike, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Build the tiny Qwen2-VL (model, tokenizer, processors, template) into ``out_dir``.

    Same contract as :func:`~infinipot_ros.models.tiny.build_tiny_qwen2_5_vl`
    (atomic, locked, a no-op when a complete build of this recipe version and
    seed is there; same seed -> byte-identical weights).

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty directory without a marker file.
        NotADirectoryError: ``out_dir`` is a file.
        OSError: on file-system errors.
    """
    return _build(out_dir, TINY_QWEN2_VL, seed, overwrite, _write_qwen2_vl)


def build_tiny_qwen3_vl(out_dir: PathLike, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Build the tiny Qwen3-VL into ``out_dir``; contract as :func:`build_tiny_qwen2_vl`."""
    return _build(out_dir, TINY_QWEN3_VL, seed, overwrite, _write_qwen3_vl)


def build_tiny_llava_onevision(out_dir: PathLike, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Build the tiny LLaVA-OneVision into ``out_dir``; contract as :func:`build_tiny_qwen2_vl`."""
    return _build(out_dir, TINY_LLAVA_ONEVISION, seed, overwrite, _write_llava_onevision)


#: Builtin name (after ``builtin:``) -> builder(out_dir, seed=0, overwrite=False).
BUILDERS: dict[str, Callable[..., pathlib.Path]] = {
    TINY_QWEN2_VL: build_tiny_qwen2_vl,
    TINY_QWEN3_VL: build_tiny_qwen3_vl,
    TINY_LLAVA_ONEVISION: build_tiny_llava_onevision,
}


# --------------------------------------------------------------------------- #
# Build directory protocol (:func:`.tiny.build_atomically`, keyed by recipe name)
# --------------------------------------------------------------------------- #
def _build(out_dir: PathLike, recipe: str, seed: int, overwrite: bool,
           write: Callable[[pathlib.Path, int], None]) -> pathlib.Path:
    seed = int(seed)

    def write_all(directory: pathlib.Path) -> None:
        write(directory, seed)
        tiny.write_marker(directory, recipe, RECIPE_VERSIONS[recipe], seed)

    return tiny.build_atomically(out_dir, is_complete=lambda d: _is_complete(d, recipe, seed), write=write_all,
                                 overwrite=overwrite)


def _is_complete(directory: pathlib.Path, recipe: str, seed: int) -> bool:
    marker = tiny.read_marker(directory)
    if marker is None or marker.get("recipe") != recipe or marker.get("seed") != seed \
            or marker.get("recipe_version") != RECIPE_VERSIONS[recipe]:
        return False
    return all((directory / name).is_file() for name in tiny.REQUIRED_FILES)


def _save(directory: pathlib.Path, model_cls, config, processor, tokenizer, seed: int) -> None:
    """Seeded fp32 CPU init of ``model_cls(config)``, generation config, then save model and processor."""
    import torch
    import transformers

    with tiny._fork_rng(torch), tiny._float32_on_cpu(torch):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    text = config.text_config
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)


def _token_ids(tokenizer) -> dict:
    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    return dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


def _text_config(tokenizer, rope_parameters: dict, **extra) -> dict:
    eot, eos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    return dict(_TEXT, vocab_size=len(tokenizer), rope_parameters=rope_parameters, bos_token_id=eot,
                eos_token_id=eos, pad_token_id=eot, **extra)


# --------------------------------------------------------------------------- #
# Qwen2-VL
# --------------------------------------------------------------------------- #
def _write_qwen2_vl(directory: pathlib.Path, seed: int) -> None:
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tokenizer = tiny._build_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2VLConfig(
        # mrope_section sums to head_dim / 2 = 16 (temporal, height, width), as [16, 24, 24] does for 128.
        text_config=_text_config(tokenizer, {"rope_type": "default", "rope_theta": 1000000.0,
                                             "mrope_section": [4, 6, 6]},
                                 use_sliding_window=False, max_window_layers=4),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, hidden_act="quick_gelu", mlp_ratio=2,
                           num_heads=4, in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, initializer_range=_INIT_RANGE),
        tie_word_embeddings=True,  # as in Qwen2-VL-2B-Instruct
        bos_token_id=eot, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=eot,
        dtype="float32", **_token_ids(tokenizer),
    )
    config._attn_implementation = "sdpa"
    # Pixel bounds of Qwen2-VL-2B-Instruct's preprocessor_config.json (as the tiny Qwen2.5-VL's).
    common = dict(min_pixels=tiny.MIN_PIXELS, max_pixels=tiny.MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                  merge_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**common), chat_template=tiny.CHAT_TEMPLATE)
    _save(directory, Qwen2VLForConditionalGeneration, config, processor, tokenizer, seed)


# --------------------------------------------------------------------------- #
# Qwen3-VL
# --------------------------------------------------------------------------- #
#: Pixel bounds of Qwen3-VL-2B-Instruct's processor files: images 64K..16M pixels,
#: videos 4K..24M pixels for the whole clip (the Qwen3-VL video resize budgets
#: all frames together; the adapter budgets one temporal patch).
QWEN3_IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
QWEN3_VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


def _write_qwen3_vl(directory: pathlib.Path, seed: int) -> None:
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tokenizer = tiny._build_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3VLConfig(
        # Interleaved M-RoPE: frequency j rotates by the temporal, height or width id in turn;
        # mrope_section [6, 5, 5] sums to head_dim / 2 = 16, in the ratio of the real [24, 20, 20].
        text_config=_text_config(tokenizer, {"rope_type": "default", "rope_theta": 5000000.0,
                                             "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                                 attention_bias=False),
        # DeepStack on both blocks: their merged features are added to decoder layers 0 and 1.
        vision_config=dict(depth=2, hidden_size=64, hidden_act="gelu_pytorch_tanh", intermediate_size=128,
                           num_heads=4, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=128, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
                           initializer_range=_INIT_RANGE),
        tie_word_embeddings=True,  # as in Qwen3-VL-2B/4B-Instruct
        dtype="float32", **_token_ids(tokenizer),
    )
    config.text_config.bos_token_id = eot
    config._attn_implementation = "sdpa"
    # Qwen3-VL normalises pixels with mean = std = 0.5 (its processor files), not the CLIP values of Qwen2-VL.
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(QWEN3_IMAGE_SIZE), **common),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=dict(QWEN3_VIDEO_SIZE), **common),
        chat_template=tiny.CHAT_TEMPLATE,
    )
    _save(directory, Qwen3VLForConditionalGeneration, config, processor, tokenizer, seed)


# --------------------------------------------------------------------------- #
# LLaVA-OneVision
# --------------------------------------------------------------------------- #
#: Square input side of the tiny SigLIP tower (13 x 13 patches of 14 px; the released models: 384 = 27 x 14 + 6).
LLAVA_OV_IMAGE_SIZE = 182

#: LLaVA-OneVision's prompt layout (llava-onevision-qwen2-*-hf): ``<|im_start|>{role}\n``, then the turn's
#: images, videos (one ``<video>`` each, which the processor expands) and texts in that order, ``<|im_end|>\n``.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_llava_onevision(directory: pathlib.Path, seed: int) -> None:
    from tokenizers import AddedToken
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    tokenizer = tiny._build_tokenizer()
    # <image>, <video> right after the Qwen specials (151646, 151647 in llava-onevision-qwen2).
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or tokenizer.additional_special_tokens)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")],
                         special_tokens=True)
    tokenizer.add_special_tokens({"additional_special_tokens": extra + ["<image>", "<video>"]})
    tokenizer.chat_template = LLAVA_OV_CHAT_TEMPLATE
    image_id, video_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    if (image_id, video_id) != (len(tokenizer) - 2, len(tokenizer) - 1):
        raise RuntimeError(f"<image>/<video> got ids {image_id}/{video_id}, expected the last two of {len(tokenizer)}")
    side = LLAVA_OV_IMAGE_SIZE
    config = LlavaOnevisionConfig(
        text_config=dict(_text_config(tokenizer, {"rope_type": "default", "rope_theta": 1000000.0},
                                      use_sliding_window=False, max_window_layers=4, tie_word_embeddings=True),
                         model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=side,
                           vision_use_head=False),
        image_token_index=image_id, video_token_index=video_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1,  # as llava-onevision-qwen2-0.5b-ov-hf
        image_grid_pinpoints=[[side * i, side * j] for i in range(1, 4) for j in range(1, 4)],
        tie_word_embeddings=True,  # as llava-onevision-qwen2-0.5b-ov-hf (Qwen2-0.5B)
        dtype="float32",
    )
    config._attn_implementation = "sdpa"
    size = {"height": side, "width": side}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=dict(size), image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=dict(size)),
        num_image_tokens=(side // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
    )
    _save(directory, LlavaOnevisionForConditionalGeneration, config, processor, tokenizer, seed)
