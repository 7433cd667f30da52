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
from .policy import Kernel, PolicySettings, ScoringPolicy


#: Pooling kernel (time, rows, cols) per quarter of the decoder layers:
#: 3-D pooling in the first quarter, 2-D in the second, 1-D in the third,
#: none in the last (InfiniPot-V Sec. 4.3, layer-adaptive pooling).
DEFAULT_POOL_KERNELS: tuple[Kernel, ...] = PolicySettings().pool_kernels  # type: ignore[assignment]


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
    the row holds + 1 empty, rows + 2 r_h, cols + 2 r_w] maps (chunk, row,
    col) to 1 + the token's slot (0 = absent), so every neighbour is one
    gather with no bounds checks (the padding and the empty plane answer
    "absent"). Work and transient memory are O(rows x chunks held x cells +
    S x window), whatever the number of chunks ever streamed (on CPU the
    planes are sized to the chunks the rows actually hold; elsewhere to the
    bound min(S, chunks), known on the host). No device synchronisation.

    Args:
        scores: [N, H_kv, S] float scores (N = batch x layers).
        layout: source of each token (ids ascending per row, as the cache keeps them).
        kernel: odd window sizes (time, rows, cols); (1, 1, 1) returns scores.

    Returns:
        [N, H_kv, S] float32 pooled scores.

    Raises:
        ValueError: if a kernel size is even or < 1.
    """
    return pool_runs(scores, layout, [(check_kernel(kernel), 0, scores.shape[0])])


def pool_runs(scores: torch.Tensor, layout: VisionLayout, runs: Sequence[tuple[Kernel, int, int]]) -> torch.Tensor:
    """:func:`pool_on_grid` with a kernel per run of rows, sharing one position plane.

    Args:
        scores: [N, H_kv, S] float scores.
        layout: source of each token (ids ascending per row).
        runs: (kernel, first row, number of rows) covering the N axis in order
            (layer-adaptive pooling: one run per layer group).

    Returns:
        [N, H_kv, S] float32 pooled scores.
    """
    vals = scores.float()
    n, h, s = scores.shape
    pooled = [(check_kernel(k), start, rows) for k, start, rows in runs]
    if s == 0 or all(k == (1, 1, 1) for k, _, _ in pooled):
        return vals
    # Only the rows of pooled runs get a plane (rows [lo, hi) of N); runs are contiguous and ordered.
    lo = min(start for k, start, _ in pooled if k != (1, 1, 1))
    hi = max(start + rows for k, start, rows in pooled if k != (1, 1, 1))
    rh = max(k[1] for k, _, _ in pooled) // 2
    rw = max(k[2] for k, _, _ in pooled) // 2
    dev = scores.device
    lk = layout.lookup
    ci = layout.chunk  # [N, H, S], ascending along S
    n_rec = lk.n_records
    row_id = (torch.arange(n * h, device=dev) - lo * h).view(n, h, 1)  # plane row of (n, h); rows < lo unused
    # Compact chunk index within the row (ids ascending -> chunk index ascending), and the map chunk -> plane.
    compact = torch.cat([torch.zeros_like(ci[..., :1]), (ci[..., 1:] != ci[..., :-1]).long()], -1).cumsum(-1)
    if dev.type == "cpu":  # reading a CPU tensor is no device sync: size the planes to the rows' real chunk count
        n_planes = int(compact[lo:hi, :, -1].max()) + 2
    else:  # the bound, known on the host: the chunks a row can hold
        n_planes = min(s, n_rec) + 1
    # (+ 1: one empty plane, the last, answers "no such chunk")
    plane_of = torch.full(((hi - lo) * h * (n_rec + 1),), n_planes - 1, dtype=torch.long, device=dev)
    plane_of.index_copy_(0, (row_id[lo:hi] * (n_rec + 1) + ci[lo:hi]).view(-1), compact[lo:hi].reshape(-1))
    hp = max(g[0] for g in lk.grid_per_slot) + 2 * rh
    wp = max(g[1] for g in lk.grid_per_slot) + 2 * rw
    cell = (layout.row + rh) * wp + (layout.col + rw)  # [N, H, S] padded cell of each token
    slot_dtype = torch.int16 if s < 2**15 - 1 else torch.int32
    plane = torch.zeros((hi - lo) * h * n_planes * hp * wp, dtype=slot_dtype, device=dev)
    plane.index_copy_(0, ((row_id[lo:hi] * n_planes + compact[lo:hi]) * (hp * wp) + cell[lo:hi]).reshape(-1),
                      torch.arange(1, s + 1, dtype=slot_dtype, device=dev).repeat((hi - lo) * h))
    padded = F.pad(vals, (1, 0))  # slot 0 holds 0: what an absent neighbour adds
    t_local, slot = lk.t_local[ci], lk.slot[ci] * lk.by_slot_time.shape[1]
    out = []
    for (kt, kh, kw), start, rows in pooled:
        if (kt, kh, kw) == (1, 1, 1):
            out.append(vals.narrow(0, start, rows))
            continue
        sl = slice(start, start + rows)
        # The camera's chunk at t + dt (one lookup per time offset, shared by the kh x kw cells).
        t_max = lk.by_slot_time.shape[1]
        nt = t_local[sl].unsqueeze(-1) + (torch.arange(kt, device=dev) - kt // 2)  # [rows, H, S, kt]
        nrec = lk.by_slot_time.reshape(-1).index_select(
            0, (slot[sl].unsqueeze(-1) + nt.clamp(0, t_max - 1)).view(-1)).view(nt.shape)
        nrec = torch.where((nt >= 0) & (nt < t_max) & (nrec >= 0), nrec, n_rec)  # n_rec -> the empty plane
        rid = row_id[sl].unsqueeze(-1)
        nplane = plane_of.index_select(0, (rid * (n_rec + 1) + nrec).view(-1)).view(nt.shape)
        base = (rid * n_planes + nplane) * (hp * wp) + cell[sl].unsqueeze(-1)  # [rows, H, S, kt]
        spatial = ((torch.arange(kh, device=dev) - kh // 2)[:, None] * wp
                   + (torch.arange(kw, device=dev) - kw // 2)).view(-1)
        slot1 = plane.index_select(0, (base.unsqueeze(-1) + spatial).view(-1)).view(rows, h, -1).long()  # 0 = absent
        total = padded[sl].gather(2, slot1).view(rows, h, s, -1).sum(-1)
        out.append(total / (slot1 > 0).view(rows, h, s, -1).sum(-1))
    return out[0] if len(out) == 1 else torch.cat(out)


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
        kernel form one run of rows, all runs share one position plane
        (:func:`pool_runs`), so the work is one lookup per kernel in use,
        whatever the number of layers.
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
        return pool_runs(value_norms, layout, runs)

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
    settings_fields: ClassVar[Tuple[str, ...]] = ("pool_kernels",)
    pool_kernels: Optional[Tuple[Kernel, ...]] = field(default=DEFAULT_POOL_KERNELS)
