"""Random-weight Qwen2.5-VL models with the real shapes of the 3B and 7B checkpoints.

Real weights cannot always be downloaded (CI, air-gapped machines), but the
cost of streaming video through a model - vision encoding, prefill, KV bytes,
compression, decoding - depends on its shapes, not on its weights. This module
builds a ``Qwen2_5_VLForConditionalGeneration`` with the layer counts, widths,
heads, vision tower, window / full-attention blocks and M-RoPE settings of
``Qwen/Qwen2.5-VL-3B-Instruct`` or ``Qwen/Qwen2.5-VL-7B-Instruct``, seeded random
weights, and saves it with ``save_pretrained`` together with the embedded tiny
model's tokenizer, processors and chat template, so it loads through
:func:`infinipot_ros.models.load_adapter` like a downloaded checkpoint.

The one shape that differs from the real checkpoints is the **vocabulary**: it
is the tiny tokenizer's (2,048 entries instead of 151,936 / 152,064), so that
the tokenizer and the model agree and questions can be asked. That removes
0.31 B (3B, tied) / 1.09 B (7B, untied) embedding parameters and makes the
lm_head matmul per decoded token smaller; everything per frame is the real
model's. Answers are gibberish by design.

Public API: :class:`QwenVLShapes`, :data:`SHAPES`, :func:`shaped_config`,
:func:`build_shaped_qwen2_5_vl`.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

from .resolve import BUILTIN_PREFIX, resolve_model
from .tiny import TINY_MODEL_NAME

PathLike = Union[str, "os.PathLike[str]"]

#: Marker written last into a complete build directory.
MARKER_FILE = "infinipot_shapes.json"
#: Bump whenever the written files change for the same shapes, seed and dtype.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class QwenVLShapes:
    """The architecture numbers of one Qwen2.5-VL checkpoint (sizes in elements, not bytes).

    Attributes:
        name: short name used on the command line (``qwen2.5-vl-3b``).
        hf_id: the checkpoint these shapes are copied from.
        num_layers, hidden_size, intermediate_size: language model depth and widths.
        num_heads, num_kv_heads, head_dim: attention heads (query, key/value) and their width.
        vision_depth, vision_hidden_size, vision_intermediate_size, vision_heads:
            vision transformer depth, width, MLP width, heads.
        vision_out_hidden_size: width after the patch merger (= hidden_size).
        fullatt_block_indexes: vision blocks with full attention (the others are windowed).
        window_size: vision attention window (pixels).
        tokens_per_second: temporal M-RoPE positions per second of video.
        mrope_section: M-RoPE split of head_dim / 2 into (time, height, width).
        rope_theta: RoPE base.
        tie_word_embeddings: lm_head shares the input embedding matrix.
        real_vocab_size: the checkpoint's vocabulary (for reference; the build uses the tiny tokenizer's).
    """

    name: str
    hf_id: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vision_out_hidden_size: int
    tie_word_embeddings: bool
    real_vocab_size: int
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_intermediate_size: int = 3420
    vision_heads: int = 16
    fullatt_block_indexes: Tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 112
    tokens_per_second: int = 2
    mrope_section: Tuple[int, int, int] = (16, 24, 24)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128_000

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} != heads {self.num_heads} x head_dim {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} heads not divisible by {self.num_kv_heads} KV heads")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"{self.name}: mrope_section {self.mrope_section} must sum to head_dim / 2")
        if self.vision_out_hidden_size != self.hidden_size:
            raise ValueError(f"{self.name}: the vision merger must output hidden_size {self.hidden_size}")

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V per cached token, all layers: 2 x layers x KV heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * int(dtype_bytes)


#: Shapes by command-line name.
SHAPES: dict[str, QwenVLShapes] = {
    s.name: s
    for s in (
        QwenVLShapes(
            name="qwen2.5-vl-3b", hf_id="Qwen/Qwen2.5-VL-3B-Instruct", num_layers=36, hidden_size=2048,
            intermediate_size=11008, num_heads=16, num_kv_heads=2, head_dim=128, vision_out_hidden_size=2048,
            tie_word_embeddings=True, real_vocab_size=151_936,
        ),
        QwenVLShapes(
            name="qwen2.5-vl-7b", hf_id="Qwen/Qwen2.5-VL-7B-Instruct", num_layers=28, hidden_size=3584,
            intermediate_size=18944, num_heads=28, num_kv_heads=4, head_dim=128, vision_out_hidden_size=3584,
            tie_word_embeddings=False, real_vocab_size=152_064,
        ),
    )
}


def _tiny_dir() -> str:
    return resolve_model(BUILTIN_PREFIX + TINY_MODEL_NAME)


def shaped_config(shapes: QwenVLShapes, vocab_size: Optional[int] = None, tiny_dir: Optional[str] = None):
    """``Qwen2_5_VLConfig`` with ``shapes``, the tiny tokenizer's special-token ids and vocabulary.

    Args:
        vocab_size: override of the vocabulary (e.g. ``shapes.real_vocab_size`` to
            count the real checkpoint's parameters); default: the tiny tokenizer's.
        tiny_dir: a tiny-model build to take ids from; default: the embedded one
            (built on first use).
    """
    from transformers import Qwen2_5_VLConfig

    tiny = Qwen2_5_VLConfig.from_pretrained(tiny_dir or _tiny_dir(), trust_remote_code=False)
    tt = tiny.text_config
    text = dict(
        vocab_size=int(vocab_size or tt.vocab_size), hidden_size=shapes.hidden_size,
        intermediate_size=shapes.intermediate_size, num_hidden_layers=shapes.num_layers,
        num_attention_heads=shapes.num_heads, num_key_value_heads=shapes.num_kv_heads, hidden_act="silu",
        max_position_embeddings=shapes.max_position_embeddings, rms_norm_eps=shapes.rms_norm_eps,
        use_sliding_window=False, max_window_layers=shapes.num_layers, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": float(shapes.rope_theta),
                         "mrope_section": list(shapes.mrope_section)},
        bos_token_id=tt.bos_token_id, eos_token_id=tt.eos_token_id, pad_token_id=tt.pad_token_id,
    )
    vision = dict(
        depth=shapes.vision_depth, hidden_size=shapes.vision_hidden_size, hidden_act="silu",
        intermediate_size=shapes.vision_intermediate_size, num_heads=shapes.vision_heads, in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=shapes.tokens_per_second,
        window_size=shapes.window_size, out_hidden_size=shapes.vision_out_hidden_size,
        fullatt_block_indexes=list(shapes.fullatt_block_indexes), initializer_range=0.02,
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=shapes.tie_word_embeddings,
        image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id, vision_end_token_id=tiny.vision_end_token_id,
    )
    config._attn_implementation = "sdpa"
    return config


def _read_marker(directory: pathlib.Path) -> Optional[dict]:
    try:
        with open(directory / MARKER_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build_shaped_qwen2_5_vl(
    out_dir: PathLike,
    shapes: Union[str, QwenVLShapes],
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
) -> pathlib.Path:
    """Build a random-weight Qwen2.5-VL with ``shapes`` into ``out_dir``; returns its absolute path.

    The weights are drawn with ``torch.manual_seed(seed)`` on ``device`` directly in
    ``dtype`` (the caller's RNG state is restored afterwards): the same seed,
    device and dtype give the same weights. Files: ``config.json``,
    ``model*.safetensors`` (2 bytes per parameter in bf16: about 6.9 GB for the
    3B shapes, 16.6 GB for 7B), the tiny model's tokenizer / processor / chat
    template, and :data:`MARKER_FILE` last. The build goes into a temporary
    sibling directory renamed into place when complete. A complete build with
    the same shapes, seed and dtype is reused unless ``overwrite``.

    Args:
        out_dir: target directory (parents created).
        shapes: a :class:`QwenVLShapes` or a key of :data:`SHAPES`.
        dtype: "bfloat16", "float16" or "float32".
        device: where the weights are initialised ("cpu", "cuda", "cuda:N"); the
            files are the same format either way.

    Raises:
        KeyError: unknown shapes name.
        FileExistsError: ``out_dir`` is not empty and not a build of this module.
    """
    import torch
    import transformers
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    spec = SHAPES[shapes] if isinstance(shapes, str) else shapes
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[str(dtype)]
    out = pathlib.Path(out_dir).expanduser().absolute()
    want = {"recipe_version": RECIPE_VERSION, "shapes": asdict(spec), "seed": int(seed), "dtype": str(dtype)}
    marker = _read_marker(out)
    if marker is not None and not overwrite and all(marker.get(k) == v for k, v in json.loads(json.dumps(want)).items()):
        return out
    if out.exists() and marker is None and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists, is not empty and holds no {MARKER_FILE}; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tiny_dir = _tiny_dir()
    config = shaped_config(spec, tiny_dir=tiny_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        dev = torch.device(device)
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(dev):
            torch.manual_seed(int(seed))
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        AutoProcessor.from_pretrained(tiny_dir, local_files_only=True, trust_remote_code=False).save_pretrained(tmp)
        for extra in ("generation_config.json",):  # eos ids of the tiny tokenizer
            if (pathlib.Path(tiny_dir) / extra).is_file():
                shutil.copyfile(pathlib.Path(tiny_dir) / extra, tmp / extra)
        meta = dict(want, parameters=params, vocab_size=config.text_config.vocab_size,
                    transformers=transformers.__version__, torch=torch.__version__, device=str(dev))
        with open(tmp / MARKER_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
