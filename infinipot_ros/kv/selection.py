"""The one place where scores become kept tokens: per-head top-k, original order kept."""
from __future__ import annotations

import torch


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest-scoring tokens per head, sorted by original index.

    Ties (e.g. several protected tokens scored +inf) are broken by position:
    among equal scores the earlier token wins, so the result is deterministic.

    Args:
        scores: [B, H_kv, S] float scores, higher = keep. NaN is treated as -inf.
        k: tokens to keep per head, 0 <= k <= S.

    Returns:
        [B, H_kv, k] int64 indices into the S axis, ascending in every row, so
        gathered tokens stay in their cache order (InfiniPot-V Sec. 4: kept
        tokens keep their order and position ids).

    Raises:
        ValueError: if k is negative or larger than S, or scores is not 3-D.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H_kv, S], got shape {tuple(scores.shape)}")
    seq = scores.shape[-1]
    if not 0 <= k <= seq:
        raise ValueError(f"cannot keep {k} of {seq} tokens")
    if k == seq:
        idx = torch.arange(seq, device=scores.device)
        return idx.expand(scores.shape[0], scores.shape[1], seq).clone()
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    # Stable ranking: sort descending with stable=True keeps earlier tokens first among ties.
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather tokens along the sequence axis.

    Args:
        x: [B, H_kv, S, D] (keys or values) or [B, H_kv, S] (per-token metadata).
        idx: [B, H_kv, k] int64 from :func:`keep_topk`.

    Returns:
        [B, H_kv, k, D] or [B, H_kv, k], same dtype and device as x.
    """
    if x.dim() == 4:
        # torch.gather reads a strided view (the cache's buffers) as it is: no copy of x.
        return torch.gather(x, 2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    return torch.gather(x, 2, idx)


def gather_kept(buffer: torch.Tensor, first_layer: int, offset: int, idx: torch.Tensor) -> torch.Tensor:
    """Gather kept tokens straight from a cache buffer, as row copies.

    Args:
        buffer: contiguous [L, B, H_kv, capacity, D] (keys, values) or [L, B, H_kv, capacity] (metadata).
        first_layer: layer of the first row of ``idx``.
        offset: slot of index 0 (the prefix length for K/V, 0 for vision-indexed metadata).
        idx: [N, H_kv, k] int64 from :func:`keep_topk`, N = layers x B (layer-major) starting at ``first_layer``.

    Returns:
        [N, H_kv, k, D] or [N, H_kv, k], a new tensor (the buffer is not modified).

    One ``index_select`` over the buffer seen as rows: an order of magnitude
    faster than an element-wise ``gather`` on the strided vision view.
    """
    if not buffer.is_contiguous():
        raise ValueError("gather_kept needs the contiguous cache buffer")
    _, b, h, cap = buffer.shape[:4]
    n = idx.shape[0]
    row = (torch.arange(n, device=idx.device) + first_layer * b).view(n, 1, 1) * h + torch.arange(h, device=idx.device).view(1, h, 1)
    src = (row * cap + offset + idx).reshape(-1)
    if buffer.dim() == 5:
        return buffer.view(-1, buffer.shape[-1]).index_select(0, src).view(n, h, idx.shape[-1], buffer.shape[-1])
    return buffer.view(-1).index_select(0, src).view(n, h, idx.shape[-1])
