"""VaN: value-norm importance (InfiniPot-V, Sec. 4.3).

Tokens whose value vectors have a large L2 norm carry the semantics the
model attends to; the score needs no attention weights, so the model keeps
running with SDPA / FlashAttention. Important tokens cluster in space, so the
norm map is average-pooled over the (time, row, column) grid before ranking,
wider in shallow layers and not at all in the deepest (layer-adaptive pooling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .layout import VisionLayout
from .policy import ScoringPolicy

Kernel = Tuple[int, int, int]

#: Pooling kernel (time, rows, cols) per quarter of the decoder layers:
#: 3-D pooling in the first quarter, 2-D in the second, 1-D in the third,
#: none in the last (InfiniPot-V Sec. 4.3, layer-adaptive pooling).
DEFAULT_POOL_KERNELS: tuple[Kernel, ...] = ((3, 3, 3), (1, 3, 3), (1, 1, 3), (1, 1, 1))


def value_norms(values: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, S, D] values -> [B, H_kv, S] float32 L2 norms."""
    return torch.linalg.vector_norm(values.float(), dim=-1)


def kernel_for_layer(kernels: Sequence[Kernel], layer_idx: int, num_layers: int) -> Kernel:
    """Kernel of the layer group holding ``layer_idx`` (layers split evenly into len(kernels) groups)."""
    group = min(len(kernels) - 1, layer_idx * len(kernels) // max(1, num_layers))
    return tuple(kernels[group])  # type: ignore[return-value]


def pool_on_grid(scores: torch.Tensor, layout: VisionLayout, kernel: Kernel) -> torch.Tensor:
    """Average-pool per-token scores over each camera's (time, row, col) grid.

    Only tokens present in the cache count: the mean is taken over the
    kernel's window restricted to cached tokens (masked average), so evicted
    neighbours neither dilute nor inflate a score. The time axis is the order
    of the camera's chunks that still have tokens in the cache; cameras are
    pooled independently (one channel each). No host synchronisation.

    Args:
        scores: [N, H_kv, S] float scores (N = batch x layers).
        layout: source of each token ([N, H_kv, S] tensors).
        kernel: odd window sizes (time, rows, cols); (1, 1, 1) returns scores.

    Returns:
        [N, H_kv, S] float32 pooled scores.

    Raises:
        ValueError: if a kernel size is even or < 1.
    """
    if any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"pooling kernel sizes must be odd and >= 1, got {kernel}")
    if tuple(kernel) == (1, 1, 1):
        return scores.float()
    n, h, s = scores.shape
    t_max = max(layout.frames_per_slot)
    r_max = max(g[0] for g in layout.grid_per_slot)
    c_max = max(g[1] for g in layout.grid_per_slot)
    grid = scores.new_zeros(n * h, len(layout.grid_per_slot), t_max, r_max, c_max, dtype=torch.float32)
    mask = torch.zeros_like(grid)
    bh = torch.arange(n * h, device=scores.device).view(n, h, 1).expand(n, h, s)
    where = (bh, layout.camera_slot, layout.t_local, layout.row, layout.col)
    grid.index_put_(where, scores.float())
    mask.index_put_(where, torch.ones_like(grid[0, 0, 0, 0, 0]).expand(n, h, s))
    # Zero-pad explicitly (avg_pool3d refuses inputs smaller than the kernel even with padding);
    # zeros are harmless: the masked mean divides by the pooled presence mask.
    kt, kh, kw = kernel
    pad = (kw // 2, kw // 2, kh // 2, kh // 2, kt // 2, kt // 2)
    num = F.avg_pool3d(F.pad(grid, pad), kernel, stride=1)
    den = F.avg_pool3d(F.pad(mask, pad), kernel, stride=1)
    return (num / den.clamp(min=1e-12))[where]


@dataclass
class VaNPolicy(ScoringPolicy):
    """VaN alone: keep the tokens with the largest (optionally pooled) value norms.

    Based on InfiniPot-V (Kim et al., NeurIPS 2025), Sec. 4.3.

    Args:
        pool_kernels: pooling kernel per layer group (see
            :data:`DEFAULT_POOL_KERNELS`); None = raw value norms, no pooling.
    """

    name: ClassVar[str] = "van"
    pool_kernels: Optional[Tuple[Kernel, ...]] = None

    def __post_init__(self) -> None:
        if self.pool_kernels is not None:
            self.pool_kernels = tuple(tuple(int(x) for x in k) for k in self.pool_kernels)  # type: ignore[assignment]
            if not self.pool_kernels or any(len(k) != 3 for k in self.pool_kernels):
                raise ValueError(f"pool_kernels must be a non-empty list of (t, h, w), got {self.pool_kernels}")
            for k in self.pool_kernels:
                if any(x < 1 or x % 2 == 0 for x in k):
                    raise ValueError(f"pooling kernel sizes must be odd and >= 1, got {k}")

    def layer_groups(self, num_layers: int) -> list[list[int]]:
        """Consecutive layers sharing a pooling kernel (scored together)."""
        if self.pool_kernels is None:
            return [list(range(num_layers))]
        groups: dict = {}
        for layer in range(num_layers):
            groups.setdefault(kernel_for_layer(self.pool_kernels, layer, num_layers), []).append(layer)
        return sorted(groups.values())

    def van_scores(self, values: torch.Tensor, layout: VisionLayout, layers: Sequence[int], num_layers: int) -> torch.Tensor:
        """[N, H_kv, S] value norms, pooled with the kernel of ``layers`` (all in one group)."""
        norms = value_norms(values)
        if self.pool_kernels is None:
            return norms
        kernels = {kernel_for_layer(self.pool_kernels, layer, num_layers) for layer in layers}
        if len(kernels) != 1:
            raise ValueError(f"layers {list(layers)} use different pooling kernels {kernels}; score them apart")
        return pool_on_grid(norms, layout, kernels.pop())

    def score(self, keys, values, layout, *, layers, num_layers, keep):
        return self.van_scores(values, layout, layers, num_layers)


@dataclass
class PooledVaNPolicy(VaNPolicy):
    """VaN with layer-adaptive spatial pooling (the paper's "VaN + pool" ablation)."""

    name: ClassVar[str] = "van_pool"
    pool_kernels: Optional[Tuple[Kernel, ...]] = field(default=DEFAULT_POOL_KERNELS)
