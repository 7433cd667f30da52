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


def tar_similarity(keys: torch.Tensor, place: torch.Tensor, n_places: int, recent: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of every token's key to the recent keys at the same place.

    ``sim[n, h, i] = mean over recent tokens j with place[j] == place[i] of
    cos(K[i], K[j])``, computed in fp32 as the dot product of the normalised
    key with the mean of the normalised recent keys at that place (InfiniPot-V
    Sec. 4.2). No host synchronisation: ``n_places`` sizes the per-place sums.

    Args:
        keys: [N, H_kv, S, D] cached keys (N = batch x layers).
        place: [N, H_kv, S] int64 dense id in [0, n_places) of (camera, row, col),
            e.g. from :meth:`VisionLayout.spatial_index`.
        n_places: number of distinct place ids.
        recent: [N, H_kv, S] bool, tokens of the recent frames.

    Returns:
        [N, H_kv, S] float32 similarity in [-1, 1]; 0 where no recent token
        shares the place (nothing to be redundant with).
    """
    n, h, s, d = keys.shape
    kn = F.normalize(keys.float(), dim=-1)
    w = recent.to(kn.dtype)
    # Row indices into [N * H * n_places] per-place accumulators (row ops, not per-element gathers).
    rows = (place + (torch.arange(n * h, device=place.device) * n_places).view(n, h, 1)).reshape(-1)
    sums = kn.new_zeros(n * h * n_places, d).index_add_(0, rows, (kn * w.unsqueeze(-1)).reshape(-1, d))
    counts = kn.new_zeros(n * h * n_places).index_add_(0, rows, w.reshape(-1))
    mean = sums / counts.clamp(min=1.0).unsqueeze(-1)
    sim = (kn.reshape(-1, d) * mean.index_select(0, rows)).sum(-1).view(n, h, s)
    has_ref = counts.index_select(0, rows).view(n, h, s) > 0
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

    def tar_scores(self, keys: torch.Tensor, layout: VisionLayout) -> tuple[torch.Tensor, int]:
        """([N, H_kv, S] TaR score with +inf on recent tokens, recent tokens per head)."""
        recent, n_recent = layout.recent_selection(self.recent_ratio)
        place, n_places = layout.spatial_index()
        sim = tar_similarity(keys, place, n_places, recent)
        score = torch.where(recent, torch.full_like(sim, float("inf")), -sim)
        return score, n_recent

    def score(self, keys, values, layout, *, layers, num_layers, keep):
        return self.tar_scores(keys, layout)[0]
