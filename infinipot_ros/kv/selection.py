"""The one place where scores become kept tokens: per-head top-k, original order kept."""
from __future__ import annotations

import torch


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest-scoring tokens per head, sorted by original index.

    Ties (e.g. several protected tokens scored +inf) are broken by position:
    among equal scores the earlier token wins, so the result is deterministic.
    O(S) per row and no sort: each score becomes a unique int64 key (an
    order-preserving integer image of the float, then the position as the
    tie-break), one ``kthvalue`` finds the k-th largest, and a running count
    lays the kept positions out in order. No host synchronisation.

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
    if k == seq or k == 0:
        idx = torch.arange(k, device=scores.device)
        return idx.expand(scores.shape[0], scores.shape[1], k).clone()
    # "+ 0.0" turns -0.0 into +0.0, which compare equal as floats; NaN ranks lowest.
    s = torch.nan_to_num(scores.float(), nan=float("-inf")) + 0.0
    # Order-preserving int32 image of the floats, then a unique int64 key: higher score first and,
    # among equal scores, the earlier token (the stable-sort rule) -- no sort needed.
    bits = s.view(torch.int32)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    position = torch.arange(seq, device=scores.device)
    key = mono.long() * seq + (seq - 1 - position)
    threshold = torch.kthvalue(key, seq - k + 1, dim=-1, keepdim=True).values  # the k-th largest key
    kept = key >= threshold  # exactly k per row (keys are unique)
    # Compact the kept positions in ascending order: slot = running count - 1 (others go to slot k).
    slot = torch.where(kept, torch.cumsum(kept, -1) - 1, k)
    out = torch.zeros(*s.shape[:-1], k + 1, dtype=torch.long, device=scores.device)
    return out.scatter_(-1, slot, position.expand_as(slot))[..., :k]


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
