"""Qwen2.5-VL adapter: streaming prefill with explicit M-RoPE positions onto a capped KV cache.

All transformers touch points for the Qwen2.5-VL family are here; tested
against transformers 5.17 and 5.24 (the ``past_key_values`` -> ``cache``
keyword rename of 5.2x is handled by signature inspection).

Prompt layout (the model's own chat template, split at the video):

    <|im_start|>system ... <|im_start|>user\\n<|vision_start|>   <- protected prefix, positions 0..P-1
    [temporal patch 0][temporal patch 1] ...                      <- vision chunks, 3-D M-RoPE
    <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n   <- scratch: question + answer

M-RoPE positions of a chunk whose first frame is ``s`` seconds after the
stream's first frame (grid rows x cols after the 2x2 merge): temporal
``P + floor(s * tokens_per_second)``, height ``P + row``, width ``P + col``,
which is what the model's ``get_rope_index`` gives a video sampled at the
same instants. Text after the video starts at max(position) + 1.

Re-basing (unbounded uptime): temporal positions grow with stream time (2 per
second for Qwen2.5-VL). When the next chunk's temporal position would pass a
threshold T, :meth:`Qwen2_5_VLAdapter.rebase_positions` moves the stream down
by delta: every cached vision token's temporal position t becomes
max(t - delta, P) (its key's temporal rotary section is rotated by the
difference, :mod:`infinipot_ros.kv.rope`; height/width do not move), and the
engine moves its stream clock by delta / tokens_per_second, so later chunks
and questions continue from the shifted positions exactly as ``get_rope_index``
positions a video made of the cached chunks. The protected prefix (positions
0..P-1) never moves: the stream stays at or above P, after it.
delta = max(t_min - P, t_next - P - T // 2): the oldest cached chunk moves to
P; if the cache spans more than T / 2 positions, the next chunk moves to
P + T / 2 instead and chunks older than that are clamped to P. See
:meth:`Qwen2_5_VLAdapter.plan_rebase`.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..kv import NOTE_CAMERA, CappedKVCache, VisionChunk
from ..kv.cache import RebaseEvent
from ..kv.rope import TEMPORAL, section_pairs
from .base import Answer, EncodedPatch, ModelAdapter, TokenCallback
from .detokenize import IncrementalDetokenizer
from .static_decode import ALLOWED_KW, DECODE_MODES, StaticDecodeStep, static_step_attention

#: Name under which the masked SDPA attention is registered with transformers.
ATTN_IMPLEMENTATION = "infinipot_sdpa"
_VISIBLE_KW = "infinipot_visible"

DEFAULT_SYSTEM_PROMPT = (
    "You are the visual assistant of a robot. You see the robot's camera stream as a video. "
    "Answer questions about what the cameras have seen, briefly and factually."
)


def _masked_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with an optional per-layer, per-KV-head visibility mask over cached tokens.

    ``kwargs[_VISIBLE_KW]`` (when given) is a list, one entry per decoder
    layer, of [B, H_kv, S0] bool: which of the first S0 cached tokens the
    queries may see (tokens after S0, the question and answer, are visible).
    It is combined with the causal mask and handed to transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    allowed = kwargs.pop(ALLOWED_KW, None)
    if allowed is not None:  # the static decode step: one query over the whole capacity
        return static_step_attention(module, query, key, value, allowed[module.layer_idx], kwargs.get("scaling")), None
    visible = kwargs.pop(_VISIBLE_KW, None)
    layer_idx = getattr(module, "layer_idx", None)
    if visible is not None and layer_idx is not None:
        vis = visible[layer_idx]
        b, h_q, q_len, _ = query.shape
        kv_len = key.shape[2]
        if vis.shape[-1] < kv_len:
            pad = vis.new_ones(vis.shape[0], vis.shape[1], kv_len - vis.shape[-1])
            vis = torch.cat([vis, pad], dim=-1)
        mask = vis.repeat_interleave(h_q // vis.shape[1], dim=1)[:, :, None, :]  # [B, H_q, 1, kv]
        causal = _causal_mask(q_len, kv_len, query.device)
        mask = mask & causal
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            mask = mask & attention_mask
        attention_mask = mask
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, q, kv] bool: query i (the last q of kv tokens) sees keys 0 .. kv-q+i."""
    past = kv_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None] + past
    return (torch.arange(kv_len, device=device)[None, :] <= q_idx)[None, None]


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _masked_sdpa)


_VIEW_CLASSES: dict[str, type] = {}


def _make_cache_view(store: CappedKVCache):
    """A transformers ``Cache`` whose layers write into ``store``.

    Only ``update`` and ``get_seq_length`` are used: the adapter always
    passes position ids and ready masks, so transformers never sizes masks
    from the cache.
    """
    if not _VIEW_CLASSES:
        from transformers.cache_utils import Cache, CacheLayerMixin

        class _StoreLayer(CacheLayerMixin):
            is_sliding = False
            is_compileable = False

            def __init__(self, store: CappedKVCache, idx: int) -> None:
                super().__init__()
                self.store = store
                self.idx = idx
                self.is_initialized = True

            def lazy_initialization(self, key_states, value_states) -> None:
                pass  # storage belongs to the store

            def update(self, key_states, value_states, *args, **kwargs):
                self.keys, self.values = self.store.update(self.idx, key_states, value_states)
                return self.keys, self.values

            def get_mask_sizes(self, *args, **kwargs):
                raise RuntimeError("infinipot: attention masks come from the adapter, not the cache")

            def get_seq_length(self, *args, **kwargs) -> int:
                return self.store.get_seq_length(self.idx)

            def get_max_length(self) -> int:
                return -1

        _VIEW_CLASSES["layer"] = _StoreLayer
        _VIEW_CLASSES["cache"] = Cache
    layer_cls, cache_cls = _VIEW_CLASSES["layer"], _VIEW_CLASSES["cache"]
    return cache_cls(layers=[layer_cls(store, i) for i in range(store.num_layers)])


class Qwen2_5_VLAdapter(ModelAdapter):
    """Qwen2.5-VL (and the tiny test model of the same architecture) for streaming.

    Args:
        model_path: local directory or HF id (already resolved; see ``load_adapter``).
        device: torch device ("cpu", "cuda", "cuda:0").
        dtype: model and KV dtype (bf16 on CUDA, fp32 on CPU by default).
        max_pixels: cap on pixels per frame after resizing (multiples of 28x28).
        min_pixels: floor on pixels per frame; None keeps the processor's.
        system_prompt: system message of the chat template.
        local_files_only: never contact the hub.
        allow_pickle: also load pickle weights (``pytorch_model.bin``) when there are no
            safetensors; False = safetensors only. Code in the model repository never runs
            (``trust_remote_code=False``).
        decode_mode: how answer tokens are decoded (see
            :data:`~infinipot_ros.models.static_decode.DECODE_MODES`): "auto" = a
            static-shape step, captured as a CUDA graph on CUDA; "eager" = the
            static step without graphs; "compile" = the static step through
            ``torch.compile(fullgraph=True)``; "dynamic" = the growing-view path
            (the reference the static step is tested against).
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_pixels: int = 256 * 28 * 28,
        min_pixels: Optional[int] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        local_files_only: bool = True,
        decode_mode: str = "auto",
        allow_pickle: bool = False,
    ) -> None:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.compile_backend: Any = None  # torch.compile backend of decode_mode "compile" (None = inductor)
        self._static_step: Optional[StaticDecodeStep] = None

        _register_attention()
        self.model_id = str(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_path,
            dtype=dtype,
            attn_implementation=ATTN_IMPLEMENTATION,
            local_files_only=local_files_only,
            use_safetensors=None if allow_pickle else True,  # None: safetensors if present, else pickle
            trust_remote_code=False,
        ).to(self.device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=local_files_only,
                                                       trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer

        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        vis_cfg = cfg.vision_config
        self.num_layers = text_cfg.num_hidden_layers
        self.num_kv_heads = text_cfg.num_key_value_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        self.layer_types = list(getattr(text_cfg, "layer_types", None) or ["full_attention"] * self.num_layers)
        self.frames_per_patch = int(vis_cfg.temporal_patch_size)
        self.spatial_merge = int(vis_cfg.spatial_merge_size)
        self.tokens_per_second = float(getattr(vis_cfg, "tokens_per_second", 1.0) or 1.0)
        self.max_pixels = int(max_pixels)
        self.min_pixels = min_pixels
        self.system_prompt = system_prompt

        self._lm = self.model.model.language_model
        self.rope_inv_freq, self.mrope_section = self._rotary_layout(text_cfg)
        self._cache_kw = "cache" if "cache" in inspect.signature(self._lm.forward).parameters else "past_key_values"
        self._video_kwargs = self._video_processor_kwargs()
        self._prefix_text, self._suffix_template = self._split_template()
        self._prefix_ids = self._encode(self._prefix_text)
        self.eos_ids = self._eos_ids()
        # Ids the tokenizer can decode; embedding rows beyond it (padding of real checkpoints) are never sampled.
        self.num_decodable = min(len(self.tokenizer), int(self.model.config.text_config.vocab_size
                                                          if hasattr(self.model.config, "text_config")
                                                          else self.model.config.vocab_size))

    def _rotary_layout(self, text_cfg) -> tuple[torch.Tensor, tuple[int, ...]]:
        """([D/2] float32 CPU rotary frequencies theta_i in rad/position, M-RoPE sections in pairs) of the LM.

        From the model's own rotary embedding when it exposes them (transformers 5.x:
        ``rotary_emb.inv_freq`` / ``mrope_section``), else from the config (default RoPE).
        """
        rope = dict(getattr(text_cfg, "rope_parameters", None) or getattr(text_cfg, "rope_scaling", None) or {})
        emb = getattr(self._lm, "rotary_emb", None)
        section = getattr(emb, "mrope_section", None) or rope.get("mrope_section")
        inv_freq = getattr(emb, "inv_freq", None)
        if inv_freq is None:
            base = float(rope.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0)))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self._rope_type = str(getattr(emb, "rope_type", None) or rope.get("rope_type", "default"))
        inv_freq = inv_freq.detach().to("cpu", torch.float32).clone()
        if section is None or sum(int(x) for x in section) != inv_freq.numel():
            raise RuntimeError(f"{self.model_id}: M-RoPE sections {section} do not cover the "
                               f"{inv_freq.numel()} rotary frequency pairs")
        return inv_freq, tuple(int(x) for x in section)

    # ------------------------------------------------------------- templates
    def _render(self, question: str) -> str:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _split_template(self) -> tuple[str, str]:
        marker = "\x00QUESTION\x00"
        text = self._render(marker)
        pad = self._video_token()
        if text.count(pad) != 1 or text.count(marker) != 1:
            raise RuntimeError(f"chat template of {self.model_id} does not render one video then the question")
        prefix, rest = text.split(pad)
        if not prefix.endswith(self._vision_start_token()):
            raise RuntimeError("chat template: expected <|vision_start|> right before the video")
        return prefix, rest

    def _video_token(self) -> str:
        return getattr(self.processor, "video_token", None) or "<|video_pad|>"

    def _vision_start_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.model.config.vision_start_token_id)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> set[int]:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the scratch text for ``question`` (vision end .. assistant turn start)."""
        return self._encode(self._suffix_template.replace("\x00QUESTION\x00", question))

    @property
    def prefix_ids(self) -> list[int]:
        return list(self._prefix_ids)

    # ------------------------------------------------------------------ vision
    def _video_processor_kwargs(self) -> dict[str, Any]:
        vp = self.processor.video_processor
        size = dict(getattr(vp, "size", {}) or {})
        size["longest_edge"] = self.max_pixels
        if self.min_pixels is not None:
            size["shortest_edge"] = self.min_pixels
        size["shortest_edge"] = min(size.get("shortest_edge", 3136), self.max_pixels)
        kwargs: dict[str, Any] = {"size": size, "do_sample_frames": False}
        valid = getattr(vp, "valid_kwargs", None)
        if valid is not None and "cap_pixels_per_frame" in getattr(valid, "__annotations__", {}):
            kwargs["cap_pixels_per_frame"] = False  # our frames are capped by max_pixels alone
        return kwargs

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Merged token grid (rows, cols) a height x width frame gives; no model call."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        vp = self.processor.video_processor
        factor = int(getattr(vp, "patch_size", 14)) * self.spatial_merge
        h, w = smart_resize(
            height, width, factor=factor, min_pixels=self._video_kwargs["size"]["shortest_edge"], max_pixels=self.max_pixels
        )
        return h // factor, w // factor

    def max_chunk_tokens(self) -> int:
        """Upper bound of merged tokens per temporal patch: max_pixels / (patch x merge)^2 (smart_resize keeps h x w <= max_pixels)."""
        factor = int(getattr(self.processor.video_processor, "patch_size", 14)) * self.spatial_merge
        return max(1, self.max_pixels // (factor * factor))

    @torch.inference_mode()
    def encode_patch(self, frames: Sequence[np.ndarray]) -> EncodedPatch:
        """Vision-encode one temporal patch.

        Args:
            frames: ``frames_per_patch`` RGB uint8 arrays [H, W, 3], same size.

        Returns:
            EncodedPatch with embeds [n, hidden] in the model dtype.

        Raises:
            ValueError: wrong frame count, shapes or dtype.
        """
        if len(frames) != self.frames_per_patch:
            raise ValueError(f"a temporal patch has {self.frames_per_patch} frames, got {len(frames)}")
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"frames of one patch differ in size: {sorted(shapes)}")
        shape = shapes.pop()
        if len(shape) != 3 or shape[2] != 3 or frames[0].dtype != np.uint8:
            raise ValueError(f"frames must be RGB uint8 [H, W, 3], got {shape} {frames[0].dtype}")
        video = np.stack(frames)  # [T, H, W, 3]
        out = self.processor.video_processor(videos=[video], return_tensors="pt", **self._video_kwargs)
        grid = out["video_grid_thw"]
        pixels = out["pixel_values_videos"].to(self.device, self.model.model.visual.dtype)
        feats = self.model.model.get_video_features(pixels, grid.to(self.device))
        feats = getattr(feats, "pooler_output", feats)
        embeds = feats[0] if isinstance(feats, (tuple, list)) else feats
        t, gh, gw = (int(x) for x in grid[0])
        m = self.spatial_merge
        return EncodedPatch(embeds.to(self.dtype), gh // m, gw // m)

    # --------------------------------------------------------------- positions
    def chunk_positions(self, prefix_len: int, seconds: float, grid_h: int, grid_w: int) -> torch.Tensor:
        """[3, n] M-RoPE position ids (temporal, height, width) of one chunk, row-major."""
        t = prefix_len + int(math.floor(seconds * self.tokens_per_second + 1e-6))
        rows = torch.arange(grid_h).repeat_interleave(grid_w) + prefix_len
        cols = torch.arange(grid_w).repeat(grid_h) + prefix_len
        return torch.stack([torch.full_like(rows, t), rows, cols])

    @staticmethod
    def next_text_position(cache: CappedKVCache) -> int:
        """First position after everything cached: max(position) + 1 (prefix only: its length)."""
        top = cache.table.max_position()
        return cache.prefix_length if top is None else top + 1

    # ---------------------------------------------------------------- re-base
    def plan_rebase(self, cache: CappedKVCache, next_position: int, threshold: int) -> int:
        """How far to move the stream down before a chunk at temporal position ``next_position``; 0 = not needed.

        Needed when ``next_position`` > ``threshold`` (T; 0 = never). Then, with P the
        prefix length and t_min the smallest temporal position of a cached chunk,
        delta = max(t_min - P, next_position - P - T // 2): the oldest cached chunk
        lands at P (the prefix's end; nothing clamped), unless the cached chunks
        span more than T / 2 positions, in which case the next chunk lands at
        P + T // 2 and older chunks stop at P (:meth:`rebase`). Either way the next
        chunk lands at or below P + T // 2 < T.

        Raises:
            ValueError: a threshold that leaves no room after the prefix (P >= T - T // 2).
        """
        if threshold <= 0 or next_position <= threshold:
            return 0
        p = cache.prefix_length
        if p >= threshold - threshold // 2:
            raise ValueError(f"rebase_position_threshold={threshold} leaves no room after the {p}-token prefix: "
                             f"it must be more than twice the prefix length")
        lowest = cache.table.column("position")
        t_min = int(lowest.min()) if lowest.numel() else next_position
        return max(t_min - p, next_position - p - threshold // 2)

    def rebase(self, cache: CappedKVCache, delta: int) -> RebaseEvent:
        """Move the cached stream down by ``delta`` temporal positions, in place; the prefix stays.

        A chunk at temporal position t moves to max(t - delta, P) (P = prefix length):
        its tokens' keys are rotated by -(its shift) x theta_i in the temporal
        section of M-RoPE only (:func:`~infinipot_ros.kv.rope.section_pairs` of
        ``mrope_section``); height and width positions (P + row, P + col) stay. The
        caller moves its stream clock by ``delta`` (:meth:`rebase_positions` gives it in ns).

        Raises:
            ValueError: delta < 0.
            NotImplementedError: a rotary scaling whose frequencies depend on the sequence length.
        """
        if delta < 0:
            raise ValueError(f"rebase moves positions down only, got delta={delta}")
        if self._rope_type.startswith("dynamic") or self._rope_type == "longrope":
            raise NotImplementedError(f"re-basing needs fixed rotary frequencies, not rope_type={self._rope_type!r}")
        p, table = cache.prefix_length, cache.table
        per_chunk = torch.clamp(table.column("position") - p, min=0).clamp(max=delta)
        fixed = p + torch.maximum(table.column("grid_h"), table.column("grid_w")) - 1
        return cache.rebase(per_chunk, inv_freq=self.rope_inv_freq, pairs=section_pairs(self.mrope_section, TEMPORAL),
                            fixed_max_position=fixed, stream_delta=delta,
                            text=table.column("camera") == NOTE_CAMERA)

    def rebase_positions(self, cache: CappedKVCache, seconds: float, threshold: int) -> int:
        """Re-base the stream if a chunk ``seconds`` after the stream origin would pass ``threshold``.

        Args:
            seconds: time of the next chunk's first frame since the stream clock's origin (s).
            threshold: T, largest temporal position a chunk may get (0 = never re-base).

        Returns:
            How far the stream clock's origin must move forward (ns): delta / tokens_per_second;
            0 when nothing was done. The caller must apply it before computing the chunk's seconds.
        """
        nxt = int(self.chunk_positions(cache.prefix_length, seconds, 1, 1)[0, 0])
        delta = self.plan_rebase(cache, nxt, threshold)
        if delta <= 0:
            return 0
        self.rebase(cache, delta)
        return int(round(delta * 1e9 / self.tokens_per_second))

    # --------------------------------------------------------------- forwards
    def _forward(
        self,
        cache: CappedKVCache,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        *,
        visible: Optional[list[torch.Tensor]] = None,
        logits: str = "last",
    ) -> Optional[torch.Tensor]:
        """One forward of [n, hidden] embeddings at [3, n] positions, appending to the cache.

        Returns [n, vocab] ("all") or [vocab] ("last") float32 logits, or None ("none").
        """
        n = embeds.shape[0]
        past = cache.get_seq_length()
        mask = None if past == 0 or n == 1 else _causal_mask(n, past + n, self.device)
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds[None].to(self.dtype),
            "position_ids": positions.to(self.device)[:, None, :],
            "attention_mask": {lt: mask for lt in set(self.layer_types)},
            self._cache_kw: _make_cache_view(cache),
            "use_cache": True,
        }
        if visible is not None:
            kwargs[_VISIBLE_KW] = visible
        out = self._lm(**kwargs)
        hidden = out.last_hidden_state[0]
        if logits == "none":
            return None
        if logits == "last":
            hidden = hidden[-1:]
        result = self.model.lm_head(hidden).float()
        return result[-1] if logits == "last" else result

    @torch.inference_mode()
    def prefill_prefix(self, cache: CappedKVCache) -> int:
        ids = torch.tensor(self._prefix_ids, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        pos = torch.arange(len(ids)).expand(3, -1)
        with cache.prefix():
            self._forward(cache, embeds, pos, logits="none")
        return len(ids)

    @torch.inference_mode()
    def prefill_patch(
        self,
        cache: CappedKVCache,
        patch: EncodedPatch,
        chunk: VisionChunk,
        return_logits: bool = False,
        *,
        seconds: float = 0.0,
    ) -> Optional[torch.Tensor]:
        """Prefill one encoded patch as a chunk; the cache compresses itself if it fills.

        Args:
            cache: the stream's cache (prefix written).
            patch: output of :meth:`encode_patch`.
            chunk: its metadata (camera, stamps); grid must match the patch.
            return_logits: return [n, vocab] logits of the chunk's tokens (tests).
            seconds: time of the patch's first frame since the stream's first frame (header stamps).
        """
        if (chunk.grid_h, chunk.grid_w) != (patch.grid_h, patch.grid_w):
            raise ValueError(f"chunk grid {chunk.grid_h}x{chunk.grid_w} != patch grid {patch.grid_h}x{patch.grid_w}")
        pos = self.chunk_positions(cache.prefix_length, seconds, patch.grid_h, patch.grid_w)
        chunk = dataclasses.replace(chunk, position=int(pos[0, 0]), max_position=int(pos.max()))
        with cache.vision_chunk(chunk):
            return self._forward(cache, patch.embeds, pos, logits="all" if return_logits else "none")

    # ------------------------------------------------------------------ notes
    def note_text(self, text: str, seconds: float) -> str:
        """How a note reads in the stream: the video is closed, the note said, the video reopened
        (Qwen2.5-VL's template for text between two videos); ``seconds`` since the stream's start."""
        end = self.tokenizer.convert_ids_to_tokens(self.model.config.vision_end_token_id)
        return f"{end}Note at {seconds:.1f} s: {text}{self._vision_start_token()}"

    def note_ids(self, text: str, seconds: float = 0.0) -> list[int]:
        """Token ids of a note (see :meth:`note_text`)."""
        return self._encode(self.note_text(text, seconds))

    def note_start(self, cache: CappedKVCache, seconds: float) -> int:
        """First position of a note ``seconds`` into the stream: the temporal position a frame at that
        time gets (notes sit on the stream's timeline like frames; re-basing moves them alike)."""
        return int(self.chunk_positions(cache.prefix_length, seconds, 1, 1)[0, 0])

    @torch.inference_mode()
    def prefill_note(self, cache: CappedKVCache, ids: Sequence[int], chunk: VisionChunk, *,
                     seconds: float = 0.0) -> None:
        """Prefill a note's token ids as a text chunk (1 x k, camera NOTE_CAMERA); compresses if the cache fills.

        Text positions: ``note_start + i`` on all three M-RoPE axes (1-D text, as Qwen2.5-VL's
        ``get_rope_index`` gives text). The chunk's grid must be 1 x len(ids).

        Raises:
            ValueError: empty ids, or a chunk that is not the note's 1 x k text chunk.
        """
        n = len(ids)
        if n == 0 or (chunk.grid_h, chunk.grid_w) != (1, n) or chunk.camera != NOTE_CAMERA or chunk.num_frames:
            raise ValueError(f"a note of {n} tokens needs a 1 x {n} text chunk of camera NOTE_CAMERA, got {chunk}")
        start = self.note_start(cache, seconds)
        pos = (torch.arange(n) + start).expand(3, -1)
        chunk = dataclasses.replace(chunk, position=start, max_position=start + n - 1)
        embeds = self.model.get_input_embeddings()(torch.tensor(list(ids), device=self.device))
        with cache.vision_chunk(chunk):
            self._forward(cache, embeds, pos, logits="none")

    def _decode_step(self, cache: CappedKVCache) -> StaticDecodeStep:
        """The static decode step bound to ``cache``'s buffers (built again, and re-captured, if they changed)."""
        step = self._static_step
        if step is None or not step.bound_to(cache):
            layer_types = set(self.layer_types)

            def forward(embeds, position_ids, view, allowed):
                out = self._lm(inputs_embeds=embeds, position_ids=position_ids,
                               attention_mask={lt: None for lt in layer_types},
                               use_cache=True, **{self._cache_kw: view, ALLOWED_KW: allowed})
                return out.last_hidden_state

            step = StaticDecodeStep(
                cache, forward=forward, embed=self.model.get_input_embeddings(),
                head=lambda h: self.model.lm_head(h).float(),
                positions=lambda p: p.view(1, 1, 1).expand(3, 1, 1),  # text: the same id on the 3 M-RoPE rows
                mode=self.decode_mode, compile_backend=self.compile_backend,
            )
            self._static_step = step
        return step

    @torch.inference_mode()
    def generate(
        self,
        cache: CappedKVCache,
        question: str,
        *,
        max_new_tokens: int = 128,
        visible: Optional[list[torch.Tensor]] = None,
        on_token: Optional[TokenCallback] = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Answer:
        """Answer from the cache; question and answer tokens are removed afterwards.

        The question is prefilled in one forward; answer tokens are decoded
        by the static-shape step (see ``decode_mode``) and turned into text
        incrementally (:class:`IncrementalDetokenizer`: a piece never ends
        inside a UTF-8 character). Greedy decoding by default (repeatable
        answers); ``temperature`` > 0 samples with a generator seeded by ``seed``.

        Args:
            visible: per-layer [B, H_kv, S] bool from ``cache.visibility``; None = all.
            on_token: called after every decoded token with (new text piece, "" while a
                UTF-8 character is incomplete; tokens so far); returning False stops
                before the next token is decoded (``stopped_by == "cancelled"``).

        Raises:
            ValueError: empty question.
        """
        t0 = time.perf_counter()
        q_ids = self.question_ids(question)
        if not q_ids:
            raise ValueError("empty question")
        start = self.next_text_position(cache)
        embed = self.model.get_input_embeddings()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        out_ids: list[int] = []
        stopped = "max_new_tokens"
        context = cache.get_seq_length()
        if visible is not None:
            context = int(round(sum(int(v[0].sum()) for v in visible) / (len(visible) * visible[0].shape[1])))
        t_first = t0
        with cache.scratch():
            # Room for the whole answer before decoding starts: buffers never move mid-answer.
            cache.ensure_capacity(cache.get_seq_length() + len(q_ids) + max_new_tokens)
            ids = torch.tensor(q_ids, device=self.device)
            pos = (torch.arange(len(q_ids)) + start).expand(3, -1)
            logits = self._forward(cache, embed(ids), pos, visible=visible)
            next_pos = start + len(q_ids)
            step = None if self.decode_mode == "dynamic" else self._decode_step(cache)
            if step is not None:
                step.begin(visible)
            for i in range(max_new_tokens):
                logits = logits[: self.num_decodable]
                if temperature > 0:
                    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
                    tok = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    tok = int(torch.argmax(logits))
                if i == 0:
                    t_first = time.perf_counter()
                if tok in self.eos_ids:
                    stopped = "eos"
                    break
                out_ids.append(tok)
                piece = detok.push(tok)
                if on_token is not None and on_token(piece, len(out_ids)) is False:
                    stopped = "cancelled"
                    break
                if i + 1 == max_new_tokens:
                    break
                if step is not None:
                    logits = step(tok, next_pos)
                else:
                    logits = self._forward(cache, embed(torch.tensor([tok], device=self.device)),
                                           torch.full((3, 1), next_pos), visible=visible)
                next_pos += 1
        tail = detok.flush()
        if on_token is not None and tail and stopped != "cancelled":
            on_token(tail, len(out_ids))
        t_end = time.perf_counter()
        ttft = (t_first - t0) if max_new_tokens > 0 else 0.0
        tps = (len(out_ids) - 1) / (t_end - t_first) if len(out_ids) > 1 and t_end > t_first else 0.0
        return Answer(text=detok.text.strip(), token_ids=out_ids, context_tokens=context, stopped_by=stopped,
                      ttft_s=ttft, decode_tok_s=tps)
