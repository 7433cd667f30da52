"""Baseline policies the engine runs through the same code path (InfiniPot-V Sec. 5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .policy import ScoringPolicy


@dataclass
class RecentPolicy(ScoringPolicy):
    """Keep the newest tokens only (a sliding window, StreamingLLM-like).

    The cache holds vision tokens in stream order, so the score is the slot
    index: the last ``keep`` slots win.
    """

    name: ClassVar[str] = "recent"

    def score(self, keys, value_norms, layout, *, layers, num_layers, keep):
        b, h, s, _ = keys.shape
        return torch.arange(s, device=keys.device, dtype=torch.float32).expand(b, h, s).clone()


@dataclass
class UniformPolicy(ScoringPolicy):
    """Keep ``keep`` tokens evenly spaced over the cached vision tokens.

    Slots floor(i * S / keep), i = 0..keep-1, score 1, all others 0. The
    cache is in stream order, so this samples the past uniformly in time.
    """

    name: ClassVar[str] = "uniform"

    def score(self, keys, value_norms, layout, *, layers, num_layers, keep):
        b, h, s, _ = keys.shape
        scores = torch.zeros(b, h, s, device=keys.device, dtype=torch.float32)
        if keep > 0:
            idx = (torch.arange(keep, device=keys.device) * s) // keep
            scores[..., idx] = 1.0
        return scores
