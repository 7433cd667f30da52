"""Moving cached rotary keys to other positions, in place (re-basing a stream's positions).

Rotary position embedding (RoPE; Su et al. 2021, "RoFormer") rotates each
frequency pair i of a key at position p by the angle p * theta_i (radians).
A rotation by -delta * theta_i therefore turns the key cached at p into the
key the model would have cached at p - delta, without recomputing it; and
because attention scores only depend on the difference of query and key
positions, moving every token by the same delta leaves the model's outputs
unchanged.

Pair layout ("rotate_half", as transformers' Llama/Qwen code): with head
dim D, pair i is the two dims (i, i + D/2), i in [0, D/2).

M-RoPE (Qwen2-VL paper, Wang et al. 2024, Sec. 2.1; Qwen2.5-VL) gives every
token three position ids (temporal, height, width) and splits the D/2
pairs into consecutive sections ``mrope_section`` (Qwen2.5-VL-3B/7B:
[16, 24, 24] of 64): section j takes its angle from position id j % 3. So
moving a token only in time rotates only the pairs of the temporal
section(s) (:func:`section_pairs`).

Pure torch (no model): works on any device and float dtype; angles are
computed in float64 on the host, rotations in float32, written back in
the keys' dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

#: Index of the temporal, height and width position ids of M-RoPE.
TEMPORAL, HEIGHT, WIDTH = 0, 1, 2


def section_pairs(mrope_section: Sequence[int], axis: int = TEMPORAL) -> list[tuple[int, int]]:
    """Frequency pairs [lo, hi) that take their angle from M-RoPE position id ``axis``.

    Sections are consecutive over the D/2 pairs; section j belongs to axis j % 3
    (the layout of transformers' Qwen2/2.5-VL rotary embedding).

    Args:
        mrope_section: pairs per section, summing to D/2 (e.g. [16, 24, 24]).
        axis: TEMPORAL (0), HEIGHT (1) or WIDTH (2).

    Returns:
        Ranges of pair indices, in order (one range for the usual 3 sections).

    Raises:
        ValueError: a negative section size or an axis outside 0..2.
    """
    if axis not in (TEMPORAL, HEIGHT, WIDTH):
        raise ValueError(f"axis must be 0 (temporal), 1 (height) or 2 (width), got {axis}")
    if any(int(s) < 0 for s in mrope_section):
        raise ValueError(f"mrope_section sizes must be >= 0, got {list(mrope_section)}")
    out, lo = [], 0
    for j, size in enumerate(int(s) for s in mrope_section):
        if j % 3 == axis and size:
            out.append((lo, lo + size))
        lo += size
    return out


def rotation_table(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of delta * theta_i, each [R, n] float32 (CPU), computed in float64.

    Args:
        delta: [R] integer shifts (positions).
        inv_freq: [n] theta_i (radians per position) of the pairs to rotate.

    float64 keeps the angle exact to ~1e-12 rad up to |delta| ~ 1e4..1e6 (float32 would lose ~1e-3 rad).
    """
    angle = delta.detach().to("cpu", torch.float64)[:, None] * inv_freq.detach().to("cpu", torch.float64)[None, :]
    return torch.cos(angle).float(), torch.sin(angle).float()


@torch.inference_mode()
def shift_rotary_keys_(
    keys: torch.Tensor,
    delta: Union[int, torch.Tensor],
    inv_freq: torch.Tensor,
    pairs: Optional[Sequence[tuple[int, int]]] = None,
    index: Optional[torch.Tensor] = None,
) -> None:
    """Move rotary keys from position p to p - delta in the given frequency pairs, in place.

    One pass over all layers, no host synchronisation: the per-token angles
    are gathered on the keys' device, every rotated section is computed in
    float32 before anything is written, then copied back in the keys' dtype.

    Args:
        keys: [L, B, H_kv, S, D] cached keys after RoPE (any strided view, e.g.
            the vision slots of a cache's buffer; any float dtype).
        delta: positions to move by: an int (every token), or [R] integers, one per
            group of tokens (e.g. chunks), chosen per token by ``index``.
        inv_freq: [D/2] theta_i of every pair (radians per position), as the model uses.
        pairs: [lo, hi) ranges of pair indices to rotate (M-RoPE temporal section:
            ``section_pairs(mrope_section)``); None = all D/2 pairs (plain 1-D RoPE).
        index: [L, B, H_kv, S] int64 row of ``delta`` for each token (same device as
            ``keys``); required when ``delta`` is a tensor.

    Raises:
        ValueError: D odd or not 2 x len(inv_freq), pairs out of range, or a tensor
            ``delta`` without ``index`` (or the reverse).
    """
    if keys.dim() != 5:
        raise ValueError(f"keys must be [L, B, H_kv, S, D], got shape {tuple(keys.shape)}")
    d = keys.shape[-1]
    half = d // 2
    if d % 2 or inv_freq.numel() != half:
        raise ValueError(f"head dim {d} does not fit {inv_freq.numel()} rotary frequency pairs")
    pairs = [(0, half)] if pairs is None else [(int(lo), int(hi)) for lo, hi in pairs]
    if any(not 0 <= lo <= hi <= half for lo, hi in pairs):
        raise ValueError(f"frequency pairs {pairs} fall outside [0, {half})")
    pairs = [(lo, hi) for lo, hi in pairs if hi > lo]
    tensor_delta = isinstance(delta, torch.Tensor)
    if tensor_delta != (index is not None):
        raise ValueError("a per-group delta tensor needs an index (and an index needs a delta tensor)")
    if not pairs or keys.numel() == 0:
        return
    freq = torch.cat([inv_freq.reshape(-1)[lo:hi] for lo, hi in pairs])
    table = delta.reshape(-1) if tensor_delta else torch.tensor([int(delta)])
    cos, sin = (t.to(keys.device) for t in rotation_table(table, freq))  # [R, n]
    if tensor_delta:
        cos, sin = cos[index], sin[index]  # [L, B, H_kv, S, n]
    else:
        cos, sin = cos[0], sin[0]  # [n], broadcast
    # x1 = the pairs' first dims, x2 = their second dims (i + D/2); rotation by -delta * theta:
    # x1' = x1 cos + x2 sin, x2' = x2 cos - x1 sin (the inverse of RoPE's x1 cos - x2 sin, x2 cos + x1 sin).
    first = [keys[..., lo:hi] for lo, hi in pairs]
    second = [keys[..., half + lo : half + hi] for lo, hi in pairs]
    x1 = torch.cat([t.float() for t in first], dim=-1)
    x2 = torch.cat([t.float() for t in second], dim=-1)
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    o = 0
    for (lo, hi), a, b in zip(pairs, first, second):
        a.copy_(y1[..., o : o + hi - lo])
        b.copy_(y2[..., o : o + hi - lo])
        o += hi - lo
