"""TaR: temporal-axis redundancy (InfiniPot-V, Sec. 4.2).

A past token that still looks like what the camera shows now (high cosine
similarity of its key with the recent frames' keys at the same spatial
index) is redundant; one that differs holds information only the past has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F

from . import triton_kernels
from .layout import VisionLayout
from .policy import ScoringPolicy


def tar_similarity(keys: torch.Tensor, layout: VisionLayout, recent: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of every token's key to the recent keys at the same place.

    ``sim[n, h, i] = mean over recent tokens j at the place of i (same camera,
    row, col) of cos(K[i], K[j])``, computed in fp32 as the dot product of the
    normalised key with the mean of the normalised recent keys at that place
    (InfiniPot-V Sec. 4.2). The per-place reference is built once per call by
    looking up, for every place, the recent chunks' tokens in each row's
    ascending ids (a few hundred lookups per row): no scatter over all
    tokens, no host synchronisation.

    Args:
        keys: [N, H_kv, S, D] cached keys (N = batch x layers), any float dtype, may be strided.
        layout: source of every token (ids ascending per row).
        recent: [R] bool CPU tensor per chunk of the table: the recent frames
            (e.g. from :meth:`ChunkTable.recent_chunks`).

    Returns:
        [N, H_kv, S] float32 similarity in [-1, 1]; 0 where no recent token
        shares the place (nothing to be redundant with).
    """
    n, h, s, d = keys.shape
    if s == 0:
        return keys.new_zeros(n, h, 0, dtype=torch.float32)
    refs = layout.table.place_references(recent).to(keys.device)  # [P, r] ids, -1 = none
    n_places, r = refs.shape
    ids = layout.token_ids.contiguous()
    wanted = refs.reshape(1, 1, -1).expand(n, h, -1).contiguous()
    pos = torch.searchsorted(ids, wanted).clamp_(max=s - 1)  # [N, H, P * r]
    found = ids.gather(2, pos) == wanted
    ref_keys = F.normalize(keys.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, d)).float(), dim=-1)
    count = found.view(n, h, n_places, r).sum(-1)  # [N, H, P]
    ref = (ref_keys * found.unsqueeze(-1)).view(n, h, n_places, r, d).sum(3) / count.clamp(min=1).unsqueeze(-1)
    # Row gather of each token's place reference: [N*H*P, D] rows, one D-vector copy per token.
    place, _ = layout.spatial_index()
    rows = (place + (torch.arange(n * h, device=keys.device) * n_places).view(n, h, 1)).view(-1)
    ref_tok = ref.reshape(-1, d).index_select(0, rows).view(n, h, s, d)
    k = keys.float()
    # cos = <k, mean of unit recent keys> / |k|: one division per token, not per element
    sim = (k * ref_tok).sum(-1) / torch.linalg.vector_norm(k, dim=-1).clamp(min=1e-12)
    return torch.where(count.view(-1).index_select(0, rows).view(n, h, s) > 0, sim, 0.0)


@dataclass
class TaRPolicy(ScoringPolicy):
    """TaR alone: keep the recent frames, then the past tokens least like them.

    Based on InfiniPot-V (Kim et al., NeurIPS 2025), Sec. 4.2. Score = -sim
    for past tokens, +inf for tokens of the r most recent frames.

    Args:
        recent_ratio: share of the cached frames treated as recent (paper: 1/8).
    """

    name: ClassVar[str] = "tar"
    settings_fields: ClassVar[Tuple[str, ...]] = ("recent_ratio",)
    recent_ratio: float = 0.125

    def __post_init__(self) -> None:
        if not 0.0 < self.recent_ratio < 1.0:
            raise ValueError(f"recent_ratio must be in (0, 1), got {self.recent_ratio}")

    def tar_scores(self, keys: torch.Tensor, layout: VisionLayout, *,
                   sim: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
        """([N, H_kv, S] TaR score with +inf on recent tokens, recent tokens per head).

        ``sim`` (from the fused kernel) skips computing :func:`tar_similarity`;
        it must have been computed with :meth:`recent_chunks`' flags.
        """
        flags, n_recent = self.recent_chunks(layout)
        if sim is None:
            sim = tar_similarity(keys, layout, flags)
        recent = flags.to(keys.device)[layout.chunk]
        return torch.where(recent, float("inf"), -sim), n_recent

    def recent_chunks(self, layout: VisionLayout) -> tuple[torch.Tensor, int]:
        """([R] bool CPU flags of the recent chunks, recent tokens per head) for this policy's ratio."""
        return layout.table.recent_chunks(self.recent_ratio)

    def score(self, keys, value_norms, layout, *, layers, num_layers, keep):
        sim = None
        if triton_kernels.use_triton(keys.device):  # fused kernel on CUDA; this file's torch code is the reference
            sim, _ = triton_kernels.fused_scores(keys, None, layout, self.recent_chunks(layout)[0], None, van=False)
        return self.tar_scores(keys, layout, sim=sim)[0]
