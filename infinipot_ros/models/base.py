"""What the streaming engine needs from a multimodal LLM: one adapter per model family.

An adapter owns every touch point with transformers for its family: loading,
the prompt template, vision encoding of a temporal patch, position ids
(M-RoPE for Qwen), chunked prefill onto a :class:`~infinipot_ros.kv.CappedKVCache`
and greedy/sampled decoding from it. The engine never imports transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..kv import CappedKVCache, VisionChunk


@dataclass
class EncodedPatch:
    """Vision tokens of one temporal patch, ready to prefill.

    Attributes:
        embeds: [n, hidden] vision embeddings after the spatial merge (model dtype/device).
        grid_h, grid_w: merged token grid; n = grid_h * grid_w.
    """

    embeds: torch.Tensor
    grid_h: int
    grid_w: int

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w


@dataclass
class Answer:
    """Result of :meth:`ModelAdapter.generate`."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    context_tokens: int = 0  # cached tokens visible to the answer (per layer and head, mean over layers)
    stopped_by: str = "eos"  # "eos", "max_new_tokens" or "cancelled"
    ttft_s: float = 0.0  # question prefill + first token (s)
    decode_tok_s: float = 0.0  # tokens per second after the first (0 with fewer than 2 tokens)


#: Called with each new piece of answer text as it is decoded; return False to stop.
#: ``on_token(piece, tokens_so_far)`` after every decoded token (piece may be ""); False stops.
TokenCallback = Callable[[str, int], Optional[bool]]


class ModelAdapter:
    """Interface the engine drives. See :class:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter`."""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    frames_per_patch: int  # camera frames per temporal patch (Qwen2.5-VL: 2)

    def new_cache(self, **cache_kwargs) -> CappedKVCache:
        """An empty cache shaped for this model (kwargs go to CappedKVCache)."""
        return CappedKVCache(
            self.num_layers, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device, **cache_kwargs
        )

    def max_chunk_tokens(self) -> int:
        """Most vision tokens one temporal patch can have at this adapter's resolution cap."""
        raise NotImplementedError

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the scratch text that carries ``question`` (template included)."""
        raise NotImplementedError

    def prefill_prefix(self, cache: CappedKVCache) -> int:
        """Write the protected prefix (system prompt .. first vision-start token); returns its length."""
        raise NotImplementedError

    def encode_patch(self, frames: Sequence[np.ndarray]) -> EncodedPatch:
        """Vision-encode ``frames_per_patch`` RGB uint8 frames [H, W, 3] of one camera."""
        raise NotImplementedError

    def prefill_patch(
        self,
        cache: CappedKVCache,
        patch: EncodedPatch,
        chunk: VisionChunk,
        return_logits: bool = False,
        *,
        seconds: float = 0.0,
    ) -> Optional[torch.Tensor]:
        """Prefill one encoded patch onto the cache (compressing if it fills); optional [n, vocab] logits.

        ``seconds``: time of the patch's first frame since the stream's first frame
        (header stamps), which the adapter turns into temporal positions.
        """
        raise NotImplementedError

    def rebase_positions(self, cache: CappedKVCache, seconds: float, threshold: int) -> int:
        """Re-base the cached stream's positions if a chunk ``seconds`` into the stream would pass ``threshold``.

        Returns how far (ns) the stream clock's origin must move forward; 0 when nothing was done.
        Default: never (a family without re-basing; see the Qwen2.5-VL adapter for the rule).
        """
        return 0

    def note_ids(self, text: str, seconds: float = 0.0) -> list[int]:
        """Token ids of a text event (note) ``seconds`` into the stream, as the model reads it."""
        raise NotImplementedError

    def prefill_note(self, cache: CappedKVCache, ids: Sequence[int], chunk: VisionChunk, *,
                     seconds: float = 0.0) -> None:
        """Prefill a note's ids (from :meth:`note_ids`) as a 1 x k text chunk (camera ``NOTE_CAMERA``)."""
        raise NotImplementedError

    def generate(
        self,
        cache: CappedKVCache,
        question: str,
        *,
        max_new_tokens: int,
        visible: Optional[list[torch.Tensor]] = None,
        on_token: Optional[TokenCallback] = None,
        temperature: float = 0.0,
    ) -> Answer:
        """Answer ``question`` from the cache; the cache is left exactly as before."""
        raise NotImplementedError
