"""TaR: temporal-axis redundancy (InfiniPot-V, Sec. 4.2).

A past token that still looks like what the camera shows now (high cosine
similarity of its key with the recent frames' keys at the same spatial
index) is redundant; one that differs holds information only the past has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .layout import VisionLayout
from .policy import ScoringPolicy


def tar_similarity(keys: torch.Tensor, spatial_key: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of every token's key to the recent keys at the same place.

    ``sim[b, h, i] = mean over recent tokens j with spatial_key[j] == spatial_key[i]
    of cos(K[i], K[j])``, computed in fp32 as the dot product of the normalised
    key with the mean of the normalised recent keys at that spatial index.

    Args:
        keys: [B, H_kv, S, D] cached keys.
        spatial_key: [B, H_kv, S] int64 id of (camera, row, col).
        recent: [B, H_kv, S] bool, tokens of the recent frames.

    Returns:
        [B, H_kv, S] float32 similarity in [-1, 1]; 0 where no recent token
        shares the spatial index (nothing to be redundant with).
    """
    b, h, s, d = keys.shape
    kn = F.normalize(keys.float(), dim=-1)
    _, inv = torch.unique(spatial_key, return_inverse=True)
    groups = int(inv.max()) + 1 if inv.numel() else 0
    w = recent.to(kn.dtype)
    sums = kn.new_zeros(b, h, groups, d)
    sums.scatter_add_(2, inv.unsqueeze(-1).expand(-1, -1, -1, d), kn * w.unsqueeze(-1))
    counts = kn.new_zeros(b, h, groups)
    counts.scatter_add_(2, inv, w)
    mean = sums / counts.clamp(min=1.0).unsqueeze(-1)
    ref = torch.gather(mean, 2, inv.unsqueeze(-1).expand(-1, -1, -1, d))
    sim = (kn * ref).sum(-1)
    has_ref = torch.gather(counts, 2, inv) > 0
    return torch.where(has_ref, sim, torch.zeros_like(sim))


@dataclass
class TaRPolicy(ScoringPolicy):
    """TaR alone: keep the recent frames, then the past tokens least like them.

    Based on InfiniPot-V (Kim et al., NeurIPS 2025), Sec. 4.2. Score = -sim
    for past tokens, +inf for tokens of the r most recent frames.

    Args:
        recent_ratio: share of the cached frames treated as recent (paper: 1/8).
    """

    name: ClassVar[str] = "tar"
    recent_ratio: float = 0.125

    def __post_init__(self) -> None:
        if not 0.0 < self.recent_ratio < 1.0:
            raise ValueError(f"recent_ratio must be in (0, 1), got {self.recent_ratio}")

    def tar_scores(self, keys: torch.Tensor, layout: VisionLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, H_kv, S] TaR score with +inf on recent tokens, [B, H_kv, S] recent mask)."""
        recent = layout.recent_mask(self.recent_ratio)
        sim = tar_similarity(keys, layout.spatial_key(), recent)
        score = torch.where(recent, torch.full_like(sim, float("inf")), -sim)
        return score, recent

    def score(self, keys, values, layout, *, layer_idx, num_layers, keep):
        return self.tar_scores(keys, layout)[0]
