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
    """[B, H_kv, S, D] values -> [B, H_kv, S] float32 L2 norms.

    The cache computes these once, when a chunk is appended (a cached value
    never changes), and keeps them beside the token ids.
    """
    return torch.linalg.vector_norm(values.float(), dim=-1)


def kernel_for_layer(kernels: Sequence[Kernel], layer_idx: int, num_layers: int) -> Kernel:
    """Kernel of the layer group holding ``layer_idx`` (layers split evenly into len(kernels) groups)."""
    group = min(len(kernels) - 1, layer_idx * len(kernels) // max(1, num_layers))
    return tuple(kernels[group])  # type: ignore[return-value]


def check_kernel(kernel: Sequence[int]) -> Kernel:
    """The kernel as a tuple of 3 ints. Raises ValueError unless every size is odd and >= 1."""
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) != 3 or any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"pooling kernel sizes must be 3 odd ints >= 1, got {kernel}")
    return kernel  # type: ignore[return-value]


def pool_on_grid(scores: torch.Tensor, layout: VisionLayout, kernel: Kernel) -> torch.Tensor:
    """Average-pool per-token scores over each camera's (time, row, col) grid, at the cached tokens.

    Only tokens present in the cache count: a token's pooled score is the
    mean of the scores of the cached tokens inside its window (masked
    average), so evicted neighbours neither dilute nor inflate it. The time
    axis is the order of the camera's chunks that still have tokens in the
    cache; cameras never mix. A neighbour (t + dt, row + dr, col + dc) is the
    token of the camera's chunk at t + dt with that (row, col) on its own grid.

    How: per row (layer x batch, KV head), a padded "position plane" [chunks
    the row holds (at most S) + 1 empty, rows + 2 r_h, cols + 2 r_w] maps
    (chunk, row, col) to 1 + the token's slot (0 = absent), so every neighbour
    is one gather with no bounds checks (the padding and the empty plane
    answer "absent"). Work and transient memory are O(rows x min(S, chunks)
    x cells + S x window), whatever the number of chunks ever streamed. No
    host synchronisation.

    Args:
        scores: [N, H_kv, S] float scores (N = batch x layers).
        layout: source of each token (ids ascending per row, as the cache keeps them).
        kernel: odd window sizes (time, rows, cols); (1, 1, 1) returns scores.

    Returns:
        [N, H_kv, S] float32 pooled scores.

    Raises:
        ValueError: if a kernel size is even or < 1.
    """
    kernel = check_kernel(kernel)
    vals = scores.float()
    if kernel == (1, 1, 1):
        return vals
    n, h, s = scores.shape
    if s == 0:
        return vals
    kt, kh, kw = kernel
    rh, rw = kh // 2, kw // 2
    dev = scores.device
    lk = layout.lookup
    ci = layout.chunk  # [N, H, S], ascending along S
    rows, n_rec = n * h, lk.n_records
    n_planes = min(s, n_rec) + 1  # the chunks a row can hold, plus one empty plane for "no such chunk"
    row_id = torch.arange(rows, device=dev).view(n, h, 1)
    # Compact chunk index within the row (ids ascending -> chunk index ascending), and the map chunk -> plane.
    compact = torch.cat([torch.zeros_like(ci[..., :1]), (ci[..., 1:] != ci[..., :-1]).long()], -1).cumsum(-1)
    plane_of = torch.full((rows * (n_rec + 1),), n_planes - 1, dtype=torch.long, device=dev)
    plane_of.index_copy_(0, (row_id * (n_rec + 1) + ci).view(-1), compact.view(-1))
    hp = max(g[0] for g in lk.grid_per_slot) + 2 * rh
    wp = max(g[1] for g in lk.grid_per_slot) + 2 * rw
    cell = (layout.row + rh) * wp + (layout.col + rw)  # [N, H, S] padded cell of each token
    plane = torch.zeros(rows * n_planes * hp * wp, dtype=torch.int32, device=dev)
    plane.index_copy_(0, ((row_id * n_planes + compact) * (hp * wp) + cell).view(-1),
                      torch.arange(1, s + 1, dtype=torch.int32, device=dev).repeat(rows))
    # The camera's chunk at t + dt (one lookup per time offset, shared by the kh x kw cells).
    t_max = lk.by_slot_time.shape[1]
    nt = lk.t_local[ci].unsqueeze(-1) + (torch.arange(kt, device=dev) - kt // 2)  # [N, H, S, kt]
    nrec = lk.by_slot_time.reshape(-1).index_select(
        0, ((lk.slot[ci] * t_max).unsqueeze(-1) + nt.clamp(0, t_max - 1)).view(-1)).view(n, h, s, kt)
    nrec = torch.where((nt >= 0) & (nt < t_max) & (nrec >= 0), nrec, n_rec)  # n_rec -> the empty plane
    nplane = plane_of.index_select(0, (row_id.unsqueeze(-1) * (n_rec + 1) + nrec).view(-1)).view(n, h, s, kt)
    base = (row_id.unsqueeze(-1) * n_planes + nplane) * (hp * wp) + cell.unsqueeze(-1)  # [N, H, S, kt]
    spatial = ((torch.arange(kh, device=dev) - rh)[:, None] * wp + (torch.arange(kw, device=dev) - rw)).view(-1)
    slot1 = plane.index_select(0, (base.unsqueeze(-1) + spatial).view(-1)).view(n, h, -1).long()  # 1 + slot, 0 = absent
    total = F.pad(vals, (1, 0)).gather(2, slot1).view(n, h, s, -1).sum(-1)  # padded slot 0 holds 0
    return total / (slot1 > 0).view(n, h, s, -1).sum(-1)


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
                check_kernel(k)

    def van_scores(self, value_norms: torch.Tensor, layout: VisionLayout, layers: Sequence[int],
                   num_layers: int) -> torch.Tensor:
        """[N, H_kv, S] value norms pooled with each layer's kernel (layers may use different kernels).

        Rows are layer-major (N = len(layers) x B); consecutive layers sharing a
        kernel are pooled in one call, so the work is one call per kernel in
        use, whatever the number of layers.
        """
        if self.pool_kernels is None:
            return value_norms.float()
        b = value_norms.shape[0] // max(1, len(layers))
        runs: list[tuple[Kernel, int, int]] = []  # (kernel, first row, rows)
        for i, layer in enumerate(layers):
            kern = kernel_for_layer(self.pool_kernels, layer, num_layers)
            if runs and runs[-1][0] == kern:
                runs[-1] = (kern, runs[-1][1], runs[-1][2] + b)
            else:
                runs.append((kern, i * b, b))
        if len(runs) == 1:
            return pool_on_grid(value_norms, layout, runs[0][0])
        return torch.cat([
            pool_on_grid(value_norms.narrow(0, start, rows), layout.narrow(start, rows), kern)
            for kern, start, rows in runs
        ])

    def row_kernels(self, layers: Sequence[int], num_layers: int, batch: int) -> list[Kernel]:
        """The pooling kernel of every layer-major row (N = len(layers) x batch); (1, 1, 1) = none."""
        return [(1, 1, 1) if self.pool_kernels is None else kernel_for_layer(self.pool_kernels, layer, num_layers)
                for layer in layers for _ in range(batch)]

    def score(self, keys, value_norms, layout, *, layers, num_layers, keep):
        from . import triton_kernels  # imports this module: imported here, not at the top

        if triton_kernels.use_triton(value_norms.device):  # fused kernel on CUDA; the torch code is the reference
            kernels = self.row_kernels(layers, num_layers, value_norms.shape[0] // len(layers))
            return triton_kernels.fused_scores(None, value_norms, layout, None, kernels, tar=False)[1]
        return self.van_scores(value_norms, layout, layers, num_layers)


@dataclass
class PooledVaNPolicy(VaNPolicy):
    """VaN with layer-adaptive spatial pooling (the paper's "VaN + pool" ablation)."""

    name: ClassVar[str] = "van_pool"
    pool_kernels: Optional[Tuple[Kernel, ...]] = field(default=DEFAULT_POOL_KERNELS)
