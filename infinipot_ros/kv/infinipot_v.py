"""InfiniPot-V: TaR selects first, value norms fill the rest (Sec. 4.4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Tuple


from . import triton_kernels
from .policy import ScoringPolicy
from .selection import keep_topk
from .tar import TaRPolicy
from .van import DEFAULT_POOL_KERNELS, Kernel, VaNPolicy


@dataclass
class InfiniPotVPolicy(ScoringPolicy):
    """TaR + VaN, the full InfiniPot-V compression.

    Based on InfiniPot-V (Kim et al., NeurIPS 2025), Sec. 4. Per layer and KV
    head: TaR keeps every token of the recent frames plus the past tokens
    least similar to them, ``max(r p, floor(tar_ratio * keep))`` tokens in
    all; those get +inf; the remaining slots go to the highest layer-adaptive
    pooled value norms. The cache then keeps the top ``keep`` in original order.

    Args:
        tar_ratio: alpha, share of the target chosen by TaR (paper: 0.5).
        recent_ratio: share of the cached frames treated as recent (paper: 1/8).
        pool_kernels: VaN pooling kernel per layer group; None = no pooling.
    """

    name: ClassVar[str] = "infinipot_v"
    settings_fields: ClassVar[Tuple[str, ...]] = ("tar_ratio", "recent_ratio", "pool_kernels")
    tar_ratio: float = 0.5
    recent_ratio: float = 0.125
    pool_kernels: Optional[Tuple[Kernel, ...]] = field(default=DEFAULT_POOL_KERNELS)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tar_ratio <= 1.0:
            raise ValueError(f"tar_ratio must be in [0, 1], got {self.tar_ratio}")
        self._tar = TaRPolicy(recent_ratio=self.recent_ratio)
        self._van = VaNPolicy(pool_kernels=self.pool_kernels)
        self.pool_kernels = self._van.pool_kernels

    def score(self, keys, value_norms, layout, *, layers, num_layers, keep):
        if triton_kernels.use_triton(keys.device):
            # One fused launch for TaR similarity and the layer-adaptive pooled norms (torch code = reference).
            kernels = self._van.row_kernels(layers, num_layers, keys.shape[0] // len(layers))
            sim, van = triton_kernels.fused_scores(keys, value_norms, layout, self._tar.recent_chunks(layout)[0],
                                                   kernels)
            tar, n_recent = self._tar.tar_scores(keys, layout, sim=sim)
        else:
            tar, n_recent = self._tar.tar_scores(keys, layout)
            van = self._van.van_scores(value_norms, layout, layers, num_layers)
        n_tar = min(keep, max(n_recent, int(self.tar_ratio * keep)))
        chosen = keep_topk(tar, n_tar)
        return van.scatter(2, chosen, float("inf"))  # out of place: van may be the cached norms
