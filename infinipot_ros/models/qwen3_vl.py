"""Qwen3-VL adapter: frame timestamps as text, interleaved M-RoPE and DeepStack in a streaming prefill.

Based on Qwen3-VL (Qwen Team, 2025) as implemented by transformers 5.x
(``Qwen3VLForConditionalGeneration``, ``Qwen3VLProcessor``); tested against
transformers 5.24. Shared with Qwen2.5-VL / Qwen2-VL (inherited): the chat
template split (system .. ``<|vision_start|>`` protected, ``<|vision_end|>`` +
question as scratch), masked SDPA, the static decode step, generation.

Prompt layout, as transformers' ``Qwen3VLProcessor`` expands a video (it
replaces the template's ``<|video_pad|>`` and keeps the outer pair)::

    <|im_start|>system ... <|im_start|>user\\n<|vision_start|>          <- protected prefix
    <0.2 seconds><|vision_start|>[patch 0]<|vision_end|>                 <- frame group 0
    <1.2 seconds><|vision_start|>[patch 1]<|vision_end|> ...             <- frame group 1, ...
    <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n          <- scratch

What differs from Qwen2.5-VL, and how the stream handles it:

* **Time is text.** Each temporal patch (2 frames) is preceded by its time,
  ``f"<{t:.1f} seconds>"`` with t the mean of its first and last frame's time,
  the processor's rule. Here t is measured from the stream's first frame
  (header stamps): ``seconds`` of :meth:`prefill_patch` for the first frame,
  ``chunk.end_stamp_ns - chunk.stamp_ns`` for the last.
* **Positions are token order.** M-RoPE ids carry no time: text tokens count
  up one by one; a patch of grid rows x cols starting at id ``s`` gets
  temporal ``s``, height ``s + row``, width ``s + col`` (each temporal patch is
  placed like an image), and the next token continues at ``s + max(rows, cols)``
  (``get_rope_index`` of Qwen3-VL). A frame group therefore starts at the
  cache's max(position) + 1. The text stack rotates the three ids
  *interleaved* over the frequencies (``mrope_interleaved``): nothing to do
  here beyond passing [3, 1, n] ids.
* **DeepStack.** The vision tower returns, besides the merged tokens, one
  feature per DeepStack block; the text stack adds feature i to the hidden
  states of the patch's tokens after decoder layer i. Those features belong
  to the patch: :meth:`encode_patch` keeps them in the :class:`DeepStackPatch`
  and the patch's forward passes them with a mask of its vision tokens, so
  the chunk's K/V equal the one-shot forward's (tested; without them the
  patch's logits move far from the one-shot's).
* **Vision tower**: 16-pixel patches, a learned position grid resampled to
  each frame, per-frame attention; the video resize budgets all frames of a
  clip together, so one temporal patch gets ``frames_per_patch x max_pixels``.

The frame group in the cache (timestamps kept with their frames). The cache's
chunk table describes a chunk as a grid of vision tokens (TaR compares tokens
at the same grid place, VaN pools over it), so a frame group is written as
three consecutive table records of the same camera and stamps:

* T: the timestamp text + ``<|vision_start|>`` (a 1 x k "grid", ``num_frames`` 0),
* F: the patch's vision tokens (grid_h x grid_w, ``num_frames`` 2),
* E: ``<|vision_end|>`` (1 x 1, ``num_frames`` 0),

each its own forward (the same causal computation as one forward of the
group). T and E carry the frame's camera and stamps, so camera / time
filtering at answer time shows or hides them exactly with their frames, and
they are counted in the cap M like every cached token.

Compression (:class:`FrameTextPolicy`, wrapping the configured policy):
timestamp tokens are scored *with their frame*, in the spirit of InfiniPot-V
(query-agnostic, per layer and KV head, no extra budget): in each layer and
head a text token scores just below the best score its own frame's tokens
have there, so it is kept while, and only while, its frame's best token is
kept: in every layer and head it is evicted at the latest by the compression
that evicts its frame's last token there, never kept without its frame; the
frames of the recent window are protected, so their timestamps are too. A
position-free alternative, protecting every timestamp, would let them pile up
over an endless stream until they crowd out the frames. The wrapped policy
scores the frame tokens with the text records set apart as their own
pseudo-cameras, so TaR never compares a frame token with a timestamp and VaN
never pools over one; the one coupling left is that InfiniPot-V's TaR share
(alpha x C) counts the text tokens it picked (those of the recent window and
a few past ones) before they are re-scored.

Re-basing positions for unbounded uptime (Qwen2.5-VL's temporal shift) is not
available here (:meth:`Qwen3VLAdapter.rebase_positions`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

from ..kv import NOTE_CAMERA, CappedKVCache, ChunkTable, ScoringPolicy, VisionChunk, VisionLayout
from .base import EncodedPatch
from .qwen2_5_vl import _VISIBLE_KW, DEFAULT_SYSTEM_PROMPT, _causal_mask, _make_cache_view
from .qwen2_vl import Qwen2VLAdapter

#: Most tokens a timestamp can take, ``<`` digits ``.`` digit `` seconds`` ``>`` up to 10^7 s
#: (digits are single tokens in Qwen tokenizers), plus ``<|vision_start|>``.
MAX_TIMESTAMP_TOKENS = 16


@dataclass
class DeepStackPatch(EncodedPatch):
    """Vision tokens of one temporal patch plus its DeepStack features.

    Attributes:
        deepstack: one [n, hidden] tensor per DeepStack block of the vision tower
            (model dtype/device), added after decoder layers 0, 1, ... to the patch's tokens.
    """

    deepstack: tuple = field(default_factory=tuple)


def timestamp_text(seconds: float, duration_s: float) -> str:
    """The text Qwen3-VL puts before a temporal patch: the mean of its first and last frame's time, 0.1 s.

    Args:
        seconds: time of the patch's first frame since the stream's first frame (s).
        duration_s: time from its first to its last frame (s).
    """
    first, last = seconds, seconds + duration_s
    return f"<{(first + last) / 2:.1f} seconds>"


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (and the tiny test model of the same architecture) for streaming.

    Args:
        model_path, device, dtype, system_prompt, local_files_only, decode_mode, allow_pickle:
            as :class:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter`.
        max_pixels: cap on pixels per frame after resizing (multiples of 32 x 32: 16-pixel
            patches, 2x2 merge); the clip budget handed to the video processor is
            ``frames_per_patch`` times it.
        min_pixels: floor on pixels per frame; None keeps the processor's clip floor.
    """

    model_class_name = "Qwen3VLForConditionalGeneration"

    def __init__(
        self,
        model_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_pixels: int = 256 * 32 * 32,
        min_pixels: Optional[int] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        local_files_only: bool = True,
        decode_mode: str = "auto",
        allow_pickle: bool = False,
    ) -> None:
        self._load(model_path, device=device, dtype=dtype, max_pixels=max_pixels, min_pixels=min_pixels,
                   system_prompt=system_prompt, local_files_only=local_files_only, decode_mode=decode_mode,
                   allow_pickle=allow_pickle)
        cfg = self.model.config
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)

    # ------------------------------------------------------------ re-basing
    def rebase_positions(self, cache: CappedKVCache, seconds: float, threshold: int) -> int:
        """Never re-bases: returns 0 (no stream-clock shift).

        Qwen3-VL's positions count tokens, not seconds, and its M-RoPE sections are
        interleaved, so the temporal re-basing of Qwen2.5-VL / Qwen2-VL (rotate the
        temporal section by a time shift) does not apply: positions here grow by
        (timestamp + patch span + 2) per frame group, without bound.
        """
        return 0

    def rebase(self, cache: CappedKVCache, delta: int):
        """Not available for Qwen3-VL (see :meth:`rebase_positions`).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("Qwen3-VL positions count tokens and interleave the M-RoPE sections: "
                                  "temporal re-basing does not apply")

    # ------------------------------------------------------------------ cache
    def new_cache(self, **cache_kwargs) -> CappedKVCache:
        """An empty cache for this model; its policy (if any) is wrapped in :class:`FrameTextPolicy`."""
        policy = cache_kwargs.get("policy")
        if policy is not None and not isinstance(policy, FrameTextPolicy):
            cache_kwargs["policy"] = FrameTextPolicy(policy)
        return super().new_cache(**cache_kwargs)

    # ------------------------------------------------------------------ vision
    def _patch_factor(self) -> int:
        return int(getattr(self.processor.video_processor, "patch_size", 16)) * self.spatial_merge

    def _video_processor_kwargs(self) -> dict[str, Any]:
        """Size bounds for one temporal patch: the Qwen3-VL resize budgets all frames of a clip together."""
        vp = self.processor.video_processor
        t = self.frames_per_patch
        clip_min = int((getattr(vp, "size", None) or {}).get("shortest_edge", 4096))
        per_frame_min = min(self.min_pixels if self.min_pixels is not None else clip_min // t, self.max_pixels)
        kwargs: dict[str, Any] = {"size": {"longest_edge": self.max_pixels * t, "shortest_edge": per_frame_min * t},
                                  "do_sample_frames": False}
        valid = getattr(vp, "valid_kwargs", None)
        if valid is not None and "cap_pixels_per_frame" in getattr(valid, "__annotations__", {}):
            kwargs["cap_pixels_per_frame"] = False
        return kwargs

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Merged token grid (rows, cols) a height x width frame gives; no model call."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        factor = self._patch_factor()
        size = self._video_kwargs["size"]
        h, w = smart_resize(self.frames_per_patch, height, width, temporal_factor=self.frames_per_patch,
                            factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return h // factor, w // factor

    def max_chunk_tokens(self) -> int:
        """Most tokens one forward appends: a patch (<= max_pixels / (patch x merge)^2 per frame) or a timestamp."""
        factor = self._patch_factor()
        return max(MAX_TIMESTAMP_TOKENS, self.max_pixels // (factor * factor))

    @torch.inference_mode()
    def encode_patch(self, frames: Sequence[np.ndarray]) -> DeepStackPatch:
        """Vision-encode one temporal patch: merged tokens and DeepStack features.

        Args:
            frames: ``frames_per_patch`` RGB uint8 arrays [H, W, 3], same size.

        Returns:
            DeepStackPatch with embeds [n, hidden] and one [n, hidden] feature per DeepStack block.

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
        out = self.processor.video_processor(videos=[np.stack(frames)], return_tensors="pt", **self._video_kwargs)
        grid = out["video_grid_thw"].to(self.device)
        pixels = out["pixel_values_videos"].to(self.device, self.model.model.visual.dtype)
        feats = self.model.model.get_video_features(pixels, grid)
        embeds = feats.pooler_output[0]
        deepstack = tuple(f[0].to(self.dtype) for f in feats.deepstack_features)
        _, gh, gw = (int(x) for x in grid[0])
        m = self.spatial_merge
        return DeepStackPatch(embeds.to(self.dtype), gh // m, gw // m, deepstack=deepstack)

    # --------------------------------------------------------------- positions
    def group_ids(self, seconds: float, chunk: VisionChunk) -> tuple[list[int], list[int]]:
        """(text before, text after) token ids of a frame group: timestamp + <|vision_start|>, <|vision_end|>."""
        duration = max(0, chunk.end_stamp_ns - chunk.stamp_ns) / 1e9
        return self._encode(timestamp_text(seconds, duration)) + [self.vision_start_id], [self.vision_end_id]

    def note_text(self, text: str, seconds: float) -> str:
        """A note between two frame groups (each group opens and closes its own vision block)."""
        return f"Note at {seconds:.1f} s: {text}"

    def note_start(self, cache: CappedKVCache, seconds: float) -> int:
        """Qwen3-VL positions count tokens: a note continues after everything cached."""
        return self.next_text_position(cache)

    def chunk_positions(self, prefix_len: int, seconds: float, grid_h: int, grid_w: int) -> torch.Tensor:
        """Not for Qwen3-VL: its positions follow the cached tokens, not time (see :meth:`patch_positions`).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("Qwen3-VL positions count tokens: see patch_positions and next_text_position")

    @staticmethod
    def patch_positions(start: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """[3, n] M-RoPE ids of a patch placed at ``start``: (start, start + row, start + col), row-major."""
        rows = torch.arange(grid_h).repeat_interleave(grid_w) + start
        cols = torch.arange(grid_w).repeat(grid_h) + start
        return torch.stack([torch.full_like(rows, start), rows, cols])

    # --------------------------------------------------------------- forwards
    def _forward(
        self,
        cache: CappedKVCache,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        *,
        visible: Optional[list[torch.Tensor]] = None,
        logits: str = "last",
        deepstack: Sequence[torch.Tensor] = (),
    ) -> Optional[torch.Tensor]:
        """One forward of [n, hidden] embeddings at [3, n] positions, appending to the cache.

        ``deepstack``: the patch's DeepStack features when all n tokens are its vision tokens.
        The Qwen3-VL text stack builds its mask itself from what it is given, so the causal
        mask over cache + new tokens is passed as a 4-D tensor (kept as is), not per layer type.

        Returns [n, vocab] ("all") or [vocab] ("last") float32 logits, or None ("none").
        """
        n = embeds.shape[0]
        past = cache.get_seq_length()
        mask = None if past == 0 or n == 1 else _causal_mask(n, past + n, self.device)
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds[None].to(self.dtype),
            "position_ids": positions.to(self.device)[:, None, :],
            "attention_mask": mask,
            self._cache_kw: _make_cache_view(cache),
            "use_cache": True,
        }
        if deepstack:
            kwargs["visual_pos_masks"] = torch.ones(1, n, dtype=torch.bool, device=self.device)
            kwargs["deepstack_visual_embeds"] = [d.to(self.dtype) for d in deepstack]
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
    def prefill_patch(
        self,
        cache: CappedKVCache,
        patch: EncodedPatch,
        chunk: VisionChunk,
        return_logits: bool = False,
        *,
        seconds: float = 0.0,
    ) -> Optional[torch.Tensor]:
        """Prefill one frame group (timestamp, patch, vision end) as three records of ``chunk``'s camera and stamps.

        Args:
            cache: the stream's cache (prefix written).
            patch: output of :meth:`encode_patch` (a :class:`DeepStackPatch`).
            chunk: its metadata (camera, stamps); grid must match the patch.
            return_logits: return [k + n + 1, vocab] logits of the group's tokens in order (tests).
            seconds: time of the patch's first frame since the stream's first frame (header stamps).

        Raises:
            ValueError: grid mismatch, or a patch without DeepStack features when the model has them.
        """
        if (chunk.grid_h, chunk.grid_w) != (patch.grid_h, patch.grid_w):
            raise ValueError(f"chunk grid {chunk.grid_h}x{chunk.grid_w} != patch grid {patch.grid_h}x{patch.grid_w}")
        deepstack = tuple(getattr(patch, "deepstack", ()))
        n_deep = len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", ()) or ())
        if len(deepstack) != n_deep:
            raise ValueError(f"patch has {len(deepstack)} DeepStack features, the model {n_deep}: use encode_patch")
        before, after = self.group_ids(seconds, chunk)
        embed = self.model.get_input_embeddings()
        start = self.next_text_position(cache)
        text = dataclasses.replace(chunk, num_frames=0)
        pieces = []
        # T: timestamp + <|vision_start|>, one position each.
        t_pos = (torch.arange(len(before)) + start).expand(3, -1)
        pieces.append((dataclasses.replace(text, grid_h=1, grid_w=len(before), position=start,
                                           max_position=start + len(before) - 1),
                       embed(torch.tensor(before, device=self.device)), t_pos, ()))
        # F: the patch, placed like an image at the next id.
        p0 = start + len(before)
        f_pos = self.patch_positions(p0, patch.grid_h, patch.grid_w)
        pieces.append((dataclasses.replace(chunk, position=p0, max_position=int(f_pos.max())),
                       patch.embeds, f_pos, deepstack))
        # E: <|vision_end|> at p0 + max(rows, cols).
        e0 = p0 + max(patch.grid_h, patch.grid_w)
        pieces.append((dataclasses.replace(text, grid_h=1, grid_w=len(after), position=e0,
                                           max_position=e0 + len(after) - 1),
                       embed(torch.tensor(after, device=self.device)), (torch.arange(len(after)) + e0).expand(3, -1),
                       ()))
        out = []
        for record, embeds, pos, deep in pieces:
            with cache.vision_chunk(record):
                out.append(self._forward(cache, embeds, pos, logits="all" if return_logits else "none",
                                         deepstack=deep))
        return torch.cat(out) if return_logits else None


@dataclass
class FrameTextPolicy(ScoringPolicy):
    """Scores a stream whose frame groups carry text records (timestamps) with their frames.

    Wraps a frame policy (InfiniPot-V, TaR, VaN, ...). Records with
    ``num_frames == 0`` are text: each belongs to the adjacent frame record of
    the same camera and stamps (the one before it for ``<|vision_end|>``, the
    one after it for the timestamp). Scoring:

    1. the wrapped policy scores every token, on a copy of the chunk table in
       which text records are moved to pseudo-cameras (one for timestamps, one
       for ends, per camera), so frame tokens are compared (TaR) and pooled
       (VaN) with frame tokens only;
    2. each text token then gets, per layer and KV head, the best score of its
       frame's tokens in that row, rounded one float step down (so it loses a
       tie against its frame's token): kept only while its frame's best token
       is kept. A timestamp whose frame is still being written scores +inf; one
       whose frame has no token in that row scores -inf.

    Args:
        inner: the frame policy.
    """

    name: ClassVar[str] = "frame_text"
    inner: ScoringPolicy = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.inner, ScoringPolicy):
            raise TypeError(f"FrameTextPolicy wraps a ScoringPolicy, got {type(self.inner).__name__}")

    def score(self, keys, value_norms, layout, *, layers, num_layers, keep):
        table = layout.table
        text = (table.column("num_frames") == 0) & (table.column("camera") != NOTE_CAMERA)  # [R] timestamps, ends
        if not bool(text.any()):
            return self.inner.score(keys, value_norms, layout, layers=layers, num_layers=num_layers, keep=keep)
        device = keys.device
        partner, is_end, pending = frame_partners(table)
        # 1. the wrapped policy, text records set apart as pseudo-cameras
        state = table.state_dict()
        cam = state["camera"]
        base = int(cam.max()) + 1
        state["camera"] = torch.where(text, base + 2 * cam + is_end.long(), cam)
        scoring = ChunkTable()
        scoring.load_state_dict(state)
        apart = VisionLayout(layout.token_ids, scoring, scoring.lookup(device))
        scores = self.inner.score(keys, value_norms, apart, layers=layers, num_layers=num_layers, keep=keep).float()
        # 2. text tokens: just below their frame's best token in the same row
        rec = layout.chunk  # [N, H, S] table row of each token
        tok_text = text.to(device)[rec]
        n, h, _ = scores.shape
        neg = torch.tensor(float("-inf"), device=device)
        best = torch.full((n, h, len(table)), float("-inf"), device=device)
        best.scatter_reduce_(2, rec, torch.where(tok_text, neg, scores), reduce="amax", include_self=True)
        tok_partner = partner.to(device)[rec]
        frame_best = best.gather(2, tok_partner.clamp(min=0))
        fallback = torch.where(pending.to(device)[rec], float("inf"), float("-inf"))
        frame_best = torch.where(tok_partner >= 0, frame_best, fallback)
        text_score = torch.nextafter(frame_best, neg.expand_as(frame_best))
        return torch.where(tok_text, text_score, scores)


def frame_partners(table: ChunkTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every record of ``table``, the row of the frame record it belongs to (host side).

    A text record (``num_frames == 0``) belongs to the frame record next to it (one chunk id
    apart, same camera, same stamps): the following one for a timestamp, the preceding one for
    a vision end.

    Returns:
        (partner [R] int64: the frame's row, or -1 for frame records and text without a cached
        frame; is_end [R] bool: the text follows its frame; pending [R] bool: the newest record
        is a timestamp whose frame is not written yet).
    """
    frames = table.column("num_frames")
    cam, stamp, end, cid = (table.column(c) for c in ("camera", "stamp", "end_stamp", "chunk_id"))
    r = frames.shape[0]
    text = (frames == 0) & (cam != NOTE_CAMERA)  # notes are no frame's text
    partner = torch.full((r,), -1, dtype=torch.long)
    is_end = torch.zeros(r, dtype=torch.bool)
    if r > 1:
        same = (cam[1:] == cam[:-1]) & (stamp[1:] == stamp[:-1]) & (end[1:] == end[:-1]) & (cid[1:] == cid[:-1] + 1)
        rows = torch.arange(r)
        # timestamp at j, its frame at j + 1
        ts = torch.zeros(r, dtype=torch.bool)
        ts[:-1] = text[:-1] & ~text[1:] & same
        partner = torch.where(ts, rows + 1, partner)
        # vision end at j, its frame at j - 1
        ve = torch.zeros(r, dtype=torch.bool)
        ve[1:] = text[1:] & ~text[:-1] & same
        partner = torch.where(ve, rows - 1, partner)
        is_end = ve
    pending = torch.zeros(r, dtype=torch.bool)
    if r and bool(text[-1]) and partner[-1] < 0:
        pending[-1] = True
    return partner, is_end, pending
