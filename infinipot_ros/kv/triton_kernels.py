"""Triton kernels for the compression hot path: fused TaR + VaN scores, in-place compaction.

Same semantics as the torch reference functions, fewer passes over memory:

* :func:`fused_scores` computes, in ONE kernel launch over every cached
  token of every row, the TaR similarity of :func:`.tar.tar_similarity`
  (InfiniPot-V Sec. 4.2) and the layer-adaptive pooled value norms of
  :func:`.van.pool_on_grid` (Sec. 4.3), reading the keys in their own dtype
  and strides (a view of the cache buffer, never copied) and accumulating
  in fp32.
* :func:`compact_` moves the kept tokens (from :func:`.selection.keep_topk`)
  of several per-token tensors to the front of their rows in place, the
  kernel counterpart of :func:`.selection.gather_tokens` + copy back, with no
  temporary of the kept tokens.

Which path runs is decided by :func:`use_triton`:

* ``INFINIPOT_KV_KERNELS=torch``: never (the torch reference everywhere);
* ``INFINIPOT_KV_KERNELS=triton``: always; raises RuntimeError if Triton is
  missing or cannot run on the device (a CPU tensor outside the interpreter);
* unset / ``auto``: when Triton imports (:data:`AVAILABLE`) and the device is
  CUDA, or the device is the CPU and ``TRITON_INTERPRET=1`` (Triton's
  interpreter, how the tests run the kernels without a GPU).

Importing this module never fails: without Triton, :data:`AVAILABLE` is
False, :data:`UNAVAILABLE_REASON` says why, and the kernel functions raise
RuntimeError. Kernels are JIT-wrapped lazily, once per mode (compiled or
interpreted, as ``triton.knobs.runtime.interpret`` says at call time), so
the order in which modules import Triton or set ``TRITON_INTERPRET`` does
not matter.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .layout import LOOKUP_COLUMNS, VisionLayout
from .van import Kernel, check_kernel, kernel_for_layer

try:  # pragma: no branch - exercised by the tests both ways
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install raising anything else
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton could not be imported: {type(exc).__name__}: {exc}"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

#: Environment variable choosing the kernels: "torch", "triton" or "auto" (default).
ENV_VAR = "INFINIPOT_KV_KERNELS"

# Block sizes (see _scores_blocks, compact_); tests may override them.
_SCORES_BLOCK_S: Optional[int] = None
_COMPACT_BLOCK_S: Optional[int] = None

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "ENV_VAR", "compact_", "fused_scores", "interpreting",
           "row_kernels", "use_triton"]


# --------------------------------------------------------------------------- dispatch
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(AVAILABLE and triton.knobs.runtime.interpret)


def use_triton(device: torch.device | str) -> bool:
    """Whether the Triton kernels should serve tensors on ``device``.

    See the module docstring for the rule (``INFINIPOT_KV_KERNELS`` =
    ``torch`` / ``triton`` / ``auto``).

    Raises:
        ValueError: for another value of ``INFINIPOT_KV_KERNELS``.
        RuntimeError: with ``INFINIPOT_KV_KERNELS=triton`` when Triton is
            unavailable or cannot run on ``device``.
    """
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{ENV_VAR} must be 'torch', 'triton' or 'auto', got {mode!r}")
    if mode == "torch":
        return False
    dev = torch.device(device)
    runnable = AVAILABLE and (dev.type == "cuda" or (dev.type == "cpu" and interpreting()))
    if mode == "triton" and not runnable:
        why = UNAVAILABLE_REASON if not AVAILABLE else (
            f"device {dev} needs CUDA, or TRITON_INTERPRET=1 for CPU tensors")
        raise RuntimeError(f"{ENV_VAR}=triton but the Triton kernels cannot run: {why}")
    return runnable


def row_kernels(pool_kernels: Optional[Sequence[Kernel]], layers: Sequence[int], num_layers: int,
                batch: int) -> list[Kernel]:
    """The per-row pooling kernel list :func:`fused_scores` takes, for layer-major rows N = len(layers) x batch.

    ``pool_kernels`` None (no pooling) gives (1, 1, 1) everywhere; otherwise
    :func:`.van.kernel_for_layer` per layer, as :meth:`.van.VaNPolicy.van_scores` uses.
    """
    out: list[Kernel] = []
    for layer in layers:
        k = (1, 1, 1) if pool_kernels is None else kernel_for_layer(pool_kernels, layer, num_layers)
        out.extend([k] * batch)
    return out


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the Triton kernels are unavailable: {UNAVAILABLE_REASON}")


_JITTED: dict[tuple[str, bool], object] = {}


def _jit(fn):
    """``triton.jit(fn)``, built on first use in the current mode (compiled or interpreted)."""
    key = (fn.__name__, bool(triton.knobs.runtime.interpret))
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _h2d(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host-to-device copy of a small CPU table, without waiting for the device (pinned + async on CUDA)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _strides(t: torch.Tensor, dims: int) -> list[int]:
    """Strides of the first ``dims`` axes, 0 for a size-1 axis (never used to move)."""
    return [t.stride(i) if t.shape[i] > 1 else 0 for i in range(dims)]


def _scores_blocks(d: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_S tokens per program, BLOCK_D key columns per step) of :func:`fused_scores`.

    128 tokens over 4 warps = one token per thread; a key step of 16 bytes
    (8 bf16 / fp16, 4 fp32 columns) is one vector load per thread, so the
    [BLOCK_S, BLOCK_D] tiles share the token vectors' layout and their row
    sums stay in-thread (about 40 registers, no shared memory on sm_90).
    """
    block_d = min(max(1, 16 // element_size), triton.next_power_of_2(d))
    return (_SCORES_BLOCK_S or 128), block_d


# --------------------------------------------------------------------------- kernels
# The kernels use builtins only, plus tl.reduce with the standard library's sum combiner (what
# tl.sum calls): the jit functions of triton.language.standard are fixed in the mode Triton was
# imported in, builtins follow the kernel's mode, and the interpreter recognises this combiner
# (numpy sum), so the same kernels run compiled or interpreted whatever the import order.
if AVAILABLE:

    def _fused_scores_kernel(
        keys_ptr, k_sn, k_sh, k_ss, k_sd,
        vn_ptr, v_sn, v_sh, v_ss,
        ids_ptr, i_sn, i_sh, i_ss,
        tab_ptr, tab_stride,
        bst_ptr, bst_stride, T,
        aux_ptr, rec_off, rec_cols,
        tar_ptr, van_ptr,
        H, S, D, R,
        C_FIRST: tl.constexpr, C_GH: tl.constexpr, C_GW: tl.constexpr, C_SLOT: tl.constexpr, C_T: tl.constexpr,
        LOG_S: tl.constexpr, LOG_R: tl.constexpr,
        DO_TAR: tl.constexpr, DO_VAN: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program = BLOCK_S consecutive tokens of one (n, h) row.
        pid_s = tl.program_id(0)
        row = tl.program_id(1)
        n = (row // H).to(tl.int64)
        h = (row % H).to(tl.int64)
        offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        tmask = offs < S
        ids_row = ids_ptr + n * i_sn + h * i_sh
        tid = tl.load(ids_row + offs.to(tl.int64) * i_ss, mask=tmask, other=0)

        # Chunk of every token: upper bound of its id in the chunks' first ids, minus one.
        lo = tl.full([BLOCK_S], 0, tl.int32)
        hi = tl.where(tmask, R, 0)
        for _ in range(LOG_R):
            active = lo < hi
            mid = (lo + hi) // 2
            f = tl.load(tab_ptr + C_FIRST * tab_stride + mid, mask=active, other=0)
            right = active & (f <= tid)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (f > tid), mid, hi)
        chunk = tl.maximum(lo - 1, 0)
        first = tl.load(tab_ptr + C_FIRST * tab_stride + chunk, mask=tmask, other=0)
        gw = tl.load(tab_ptr + C_GW * tab_stride + chunk, mask=tmask, other=1).to(tl.int32)
        slot = tl.load(tab_ptr + C_SLOT * tab_stride + chunk, mask=tmask, other=0).to(tl.int32)
        local = (tid - first).to(tl.int32)
        r = local // gw
        c = local - r * gw
        out_offs = row.to(tl.int64) * S + offs

        if DO_VAN:
            # Masked mean of the value norms of the cached tokens in the (kt, kh, kw) window.
            t_loc = tl.load(tab_ptr + C_T * tab_stride + chunk, mask=tmask, other=0).to(tl.int32)
            kt = tl.load(aux_ptr + n * 3).to(tl.int32)
            kh = tl.load(aux_ptr + n * 3 + 1).to(tl.int32)
            kw = tl.load(aux_ptr + n * 3 + 2).to(tl.int32)
            vn_row = vn_ptr + n * v_sn + h * v_sh
            acc = tl.full([BLOCK_S], 0.0, tl.float32)
            cnt = tl.full([BLOCK_S], 0.0, tl.float32)
            for it in range(0, kt):
                tt = t_loc + (it - kt // 2)
                t_ok = tmask & (tt >= 0) & (tt < T)
                nrec = tl.load(bst_ptr + slot.to(tl.int64) * bst_stride + tt, mask=t_ok, other=-1)
                exists = t_ok & (nrec >= 0)
                nrec = tl.maximum(nrec, 0)
                nfirst = tl.load(tab_ptr + C_FIRST * tab_stride + nrec, mask=exists, other=0)
                ngh = tl.load(tab_ptr + C_GH * tab_stride + nrec, mask=exists, other=0).to(tl.int32)
                ngw = tl.load(tab_ptr + C_GW * tab_stride + nrec, mask=exists, other=0).to(tl.int32)
                for ir in range(0, kh):
                    rr = r + (ir - kh // 2)
                    r_ok = exists & (rr >= 0) & (rr < ngh)
                    for ic in range(0, kw):
                        cc = c + (ic - kw // 2)
                        ok = r_ok & (cc >= 0) & (cc < ngw)
                        wanted = nfirst + (rr * ngw + cc).to(tl.int64)
                        # Lower bound of the neighbour's id in the row's ascending ids.
                        lo = tl.full([BLOCK_S], 0, tl.int32)
                        hi = tl.where(ok, S, 0)
                        for _ in range(LOG_S):
                            active = lo < hi
                            mid = (lo + hi) // 2
                            x = tl.load(ids_row + mid.to(tl.int64) * i_ss, mask=active, other=0)
                            lo = tl.where(active & (x < wanted), mid + 1, lo)
                            hi = tl.where(active & (x >= wanted), mid, hi)
                        pos = tl.minimum(lo, S - 1).to(tl.int64)
                        found = ok & (tl.load(ids_row + pos * i_ss, mask=ok, other=-1) == wanted)
                        acc += tl.load(vn_row + pos * v_ss, mask=found, other=0.0).to(tl.float32)
                        cnt += found.to(tl.float32)
            tl.store(van_ptr + out_offs, acc / tl.maximum(cnt, 1.0), mask=tmask)

        if DO_TAR:
            # Mean cosine of the key with the recent chunks' keys at the same (row, col):
            # sum_j (K_i . K_j) / (|K_i| |K_j|) / count, D walked in BLOCK_D columns at a time.
            k_row = keys_ptr + n * k_sn + h * k_sh
            dofs = tl.arange(0, BLOCK_D)
            ki_rows = (offs.to(tl.int64) * k_ss)[:, None]
            sq_i = tl.full([BLOCK_S], 0.0, tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dm = (d0 + dofs) < D
                dcol = ((d0 + dofs).to(tl.int64) * k_sd)[None, :]
                ki = tl.load(k_row + ki_rows + dcol, mask=tmask[:, None] & dm[None, :], other=0.0).to(tl.float32)
                sq_i += tl.reduce(ki * ki, 1, tl.standard._sum_combine)
            acc = tl.full([BLOCK_S], 0.0, tl.float32)
            rcnt = tl.full([BLOCK_S], 0.0, tl.float32)
            for j in range(0, rec_cols):
                rc = tl.load(aux_ptr + rec_off + slot.to(tl.int64) * rec_cols + j, mask=tmask, other=-1)
                exists = tmask & (rc >= 0)
                rc = tl.maximum(rc, 0)
                rfirst = tl.load(tab_ptr + C_FIRST * tab_stride + rc, mask=exists, other=0)
                rgh = tl.load(tab_ptr + C_GH * tab_stride + rc, mask=exists, other=0).to(tl.int32)
                rgw = tl.load(tab_ptr + C_GW * tab_stride + rc, mask=exists, other=0).to(tl.int32)
                ok = exists & (r < rgh) & (c < rgw)
                wanted = rfirst + (r * rgw + c).to(tl.int64)
                lo = tl.full([BLOCK_S], 0, tl.int32)
                hi = tl.where(ok, S, 0)
                for _ in range(LOG_S):
                    active = lo < hi
                    mid = (lo + hi) // 2
                    x = tl.load(ids_row + mid.to(tl.int64) * i_ss, mask=active, other=0)
                    lo = tl.where(active & (x < wanted), mid + 1, lo)
                    hi = tl.where(active & (x >= wanted), mid, hi)
                pos = tl.minimum(lo, S - 1).to(tl.int64)
                found = ok & (tl.load(ids_row + pos * i_ss, mask=ok, other=-1) == wanted)
                kj_rows = (pos * k_ss)[:, None]
                dot = tl.full([BLOCK_S], 0.0, tl.float32)
                sq_j = tl.full([BLOCK_S], 0.0, tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dm = found[:, None] & ((d0 + dofs) < D)[None, :]
                    dcol = ((d0 + dofs).to(tl.int64) * k_sd)[None, :]
                    ki = tl.load(k_row + ki_rows + dcol, mask=dm, other=0.0).to(tl.float32)
                    kj = tl.load(k_row + kj_rows + dcol, mask=dm, other=0.0).to(tl.float32)
                    dot += tl.reduce(ki * kj, 1, tl.standard._sum_combine)
                    sq_j += tl.reduce(kj * kj, 1, tl.standard._sum_combine)
                acc += tl.where(found, dot / tl.maximum(tl.sqrt(sq_j), 1e-12), 0.0)
                rcnt += found.to(tl.float32)
            sim = acc / tl.maximum(tl.sqrt(sq_i), 1e-12) / tl.maximum(rcnt, 1.0)
            tl.store(tar_ptr + out_offs, tl.where(rcnt > 0, sim, 0.0), mask=tmask)

    def _compact_kernel(
        t_ptr, t_sn, t_sh, t_ss, t_sw,
        idx_ptr, x_sn, x_sh, x_ss,
        H, W, keep,
        BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        # One program = one (n, h) row x BLOCK_W columns, walking the kept tokens front to back.
        row = tl.program_id(0)
        wb = tl.program_id(1)
        n = (row // H).to(tl.int64)
        h = (row % H).to(tl.int64)
        t_row = t_ptr + n * t_sn + h * t_sh
        i_row = idx_ptr + n * x_sn + h * x_sh
        w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        wcol = (w.to(tl.int64) * t_sw)[None, :]
        wmask = (w < W)[None, :]
        for start in range(0, keep, BLOCK_S):
            j = start + tl.arange(0, BLOCK_S)
            jm = j < keep
            src = tl.load(i_row + j.to(tl.int64) * x_ss, mask=jm, other=0).to(tl.int64)
            m = jm[:, None] & wmask
            x = tl.load(t_row + (src * t_ss)[:, None] + wcol, mask=m)
            # Every thread of the program has read its sources before any writes the block.
            tl.debug_barrier()
            tl.store(t_row + (j.to(tl.int64) * t_ss)[:, None] + wcol, x, mask=m)


# --------------------------------------------------------------------------- public API
def _host(x, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor of ``x`` (CPU tensor, numpy array or sequence; a device tensor is copied back: avoid)."""
    return torch.as_tensor(x).to(device="cpu", dtype=dtype).reshape(-1)


def _host_slots(lk) -> torch.Tensor:
    """[R] camera slot of every chunk, from the lookup's host-side copy (``slot_cpu`` / ``slot_np``)."""
    for name in ("slot_cpu", "slot_np"):
        v = getattr(lk, name, None)
        if v is not None:
            return _host(v, torch.long)
    return _host(lk.slot, torch.long)  # device read: only for a lookup without a host copy


def _recent_table(recent: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """[n_slots, r] int64 CPU: each camera slot's recent chunk indices (stream order), -1 padded; r >= 1."""
    rec = torch.nonzero(recent).view(-1)  # host-side: no device sync
    s = slot[rec]
    order = torch.sort(s, stable=True).indices
    rec, s = rec[order], s[order]
    counts = torch.bincount(s, minlength=n_slots)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.full((n_slots, max(1, int(counts.max()) if counts.numel() else 1)), -1, dtype=torch.long)
    out[s, torch.arange(rec.numel()) - starts[s]] = rec
    return out


def fused_scores(
    keys: Optional[torch.Tensor],
    value_norms: Optional[torch.Tensor],
    layout: VisionLayout,
    recent: Optional[torch.Tensor],
    kernels: Optional[Sequence[Sequence[int]]],
    *,
    tar: bool = True,
    van: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """TaR similarity and layer-adaptive pooled value norms of every cached token, in one launch.

    Per row (n, h) and token i, exactly as the torch references:

    * TaR (InfiniPot-V Sec. 4.2, :func:`.tar.tar_similarity`): mean over the
      recent chunks of i's camera of cos(K_i, K_j), j the recent chunk's token
      at i's (row, col) when the row still holds it; computed in fp32 as
      dot(normalize(K_i), mean of normalize(K_j)); 0 where no such j exists.
    * VaN pooling (Sec. 4.3, :func:`.van.pool_on_grid`): mean of the value
      norms of the row's cached tokens inside the (kt, kh, kw) window of
      (t_local, row, col) around i, cameras never mixed; found by binary
      search of each neighbour's id in the row's ascending ids.

    Grid: (cdiv(S, 128), N x H_kv); one program = 128 consecutive tokens of
    one row, one token per thread: it finds each token's chunk (binary search
    of the chunks' first ids), then for every window cell and every recent
    chunk of its camera binary-searches the wanted id in the row's ids. The
    cosine is accumulated as sum_j (K_i . K_j) / (|K_i| |K_j|) / count, equal
    to the reference's dot(normalize(K_i), mean normalize(K_j)) up to fp32
    rounding (same 1e-12 norm floor). The keys are read in their dtype through
    their strides (no copy); the small per-chunk tables (pooling kernels, each
    camera's recent chunks) go to the device in one pinned, asynchronous copy;
    no host synchronisation.

    Args:
        keys: [N, H_kv, S, D] float32 / bfloat16 / float16 cached keys, any
            strides (e.g. a view of the cache buffer). Needed when ``tar``.
        value_norms: [N, H_kv, S] float L2 norms of the cached values, any
            strides. Needed when ``van``.
        layout: source of the tokens, ``layout.token_ids`` [N, H_kv, S] int64
            ascending per row.
        recent: [R] bool CPU tensor per chunk of ``layout.table`` (e.g. from
            :meth:`.layout.ChunkTable.recent_chunks`; a numpy array works too).
            Needed when ``tar``.
        kernels: N odd (kt, kh, kw) pooling windows, one per row (see
            :func:`row_kernels`). Needed when ``van``.
        tar, van: which of the two outputs to compute.

    Returns:
        (similarity, pooled): float32 [N, H_kv, S] contiguous tensors, or None
        for an output not asked for.

    Raises:
        RuntimeError: if Triton is unavailable.
        ValueError: on shapes, devices or sizes that do not match, or an
            even / non-positive kernel size.
    """
    _require()
    ids = layout.token_ids
    if ids.dim() != 3:
        raise ValueError(f"layout.token_ids must be [N, H_kv, S], got shape {tuple(ids.shape)}")
    n, h, s = ids.shape
    device = ids.device
    if not (tar or van):
        return None, None
    lk = layout.lookup
    if tar:
        if keys is None or recent is None:
            raise ValueError("tar=True needs keys and recent")
        if keys.dim() != 4 or tuple(keys.shape[:3]) != (n, h, s):
            raise ValueError(f"keys must be [N, H_kv, S, D] = [{n}, {h}, {s}, D], got {tuple(keys.shape)}")
        if keys.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"keys must be float32, bfloat16 or float16, got {keys.dtype}")
        if keys.device != device:
            raise ValueError(f"keys on {keys.device}, token ids on {device}")
        recent = _host(recent, torch.bool)
        if recent.shape[0] != lk.n_records:
            raise ValueError(f"recent has {recent.shape[0]} flags for {lk.n_records} chunks")
    if van:
        if value_norms is None or kernels is None:
            raise ValueError("van=True needs value_norms and kernels")
        if tuple(value_norms.shape) != (n, h, s):
            raise ValueError(f"value_norms must be [N, H_kv, S] = [{n}, {h}, {s}], got {tuple(value_norms.shape)}")
        if value_norms.device != device:
            raise ValueError(f"value_norms on {value_norms.device}, token ids on {device}")
        if not value_norms.is_floating_point():
            raise ValueError(f"value_norms must be floating point, got {value_norms.dtype}")
        kern = [check_kernel(k) for k in kernels]
        if len(kern) != n:
            raise ValueError(f"need one pooling kernel per row: {n} rows, {len(kern)} kernels")
    out_tar = torch.empty((n, h, s), dtype=torch.float32, device=device) if tar else None
    out_van = torch.empty((n, h, s), dtype=torch.float32, device=device) if van else None
    if n * h * s == 0:
        return out_tar, out_van

    # One small int64 table for the device: kernels [N, 3], then the per-slot recent chunks.
    parts = [torch.tensor(kern, dtype=torch.long).view(-1) if van else torch.ones(3, dtype=torch.long)]
    rec_off, rec_cols = parts[0].numel(), 1
    if tar:
        rec_tab = _recent_table(recent, _host_slots(lk), lk.n_slots)
        rec_cols = rec_tab.shape[1]
        parts.append(rec_tab.reshape(-1))
    aux = _h2d(torch.cat(parts), device)

    d = keys.shape[3] if tar else 1
    block_s, block_d = _scores_blocks(d, keys.element_size() if tar else 4)
    table, bst = lk.table, lk.by_slot_time
    k_args = (keys, *_strides(keys, 4)) if tar else (ids, 0, 0, 0, 0)
    v_args = (value_norms, *_strides(value_norms, 3)) if van else (ids, 0, 0, 0)
    col = LOOKUP_COLUMNS.index
    grid = (triton.cdiv(s, block_s), n * h)
    _jit(_fused_scores_kernel)[grid](
        *k_args, *v_args, ids, *_strides(ids, 3),
        table, table.stride(0), bst, bst.stride(0), bst.shape[1],
        aux, rec_off, rec_cols,
        out_tar if tar else ids, out_van if van else ids,
        h, s, d, lk.n_records,
        C_FIRST=col("first"), C_GH=col("grid_h"), C_GW=col("grid_w"), C_SLOT=col("slot"), C_T=col("t_local"),
        LOG_S=int(s).bit_length(), LOG_R=int(lk.n_records).bit_length(),
        DO_TAR=bool(tar), DO_VAN=bool(van), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )
    return out_tar, out_van


def compact_(tensors: Sequence[torch.Tensor], idx: torch.Tensor, keep: int) -> list[torch.Tensor]:
    """Move the kept tokens of several per-token tensors to the front of their rows, in place.

    For every tensor ``t`` and row (n, h): ``t[n, h, j] = t[n, h, idx[n, h, j]]``
    for j < keep (tokens j >= keep are left as they were). This is what
    :func:`.selection.gather_tokens` followed by a copy into ``t[:, :, :keep]``
    does, without the temporary of the kept tokens (InfiniPot-V Sec. 3:
    compression in place, kept tokens in their order).

    In-place safety: ``idx`` is ascending per row (from
    :func:`.selection.keep_topk`), so ``idx[j] >= j``. One program owns one
    (n, h) row (and a slice of its D columns) and walks the kept tokens in
    blocks, front to back; it loads a whole block's sources, hits a barrier
    (so no thread stores before every thread has loaded), then stores the
    block. A block's stores land in [start, start + B) and every source of
    the later blocks lies at >= start + B, so nothing that is still to be
    read is overwritten; programs touch disjoint memory. Grid: (N x H_kv,
    cdiv(D, 32)) per tensor, one launch per tensor, no extra memory.

    Args:
        tensors: per-token tensors [N, H_kv, S, D] (e.g. the K and V buffer
            views, any dtype) or [N, H_kv, S] (value norms, ids), any strides;
            distinct, non-overlapping (no broadcast axis), S >= keep, on one device.
        idx: [N, H_kv, >= keep] integer indices into S, strictly ascending per
            row (out-of-range or unsorted indices give undefined results; they
            are not checked, as that would need a host sync).
        keep: tokens kept per row.

    Returns:
        The views ``t[:, :, :keep]`` of the compacted tensors.

    Raises:
        RuntimeError: if Triton is unavailable.
        ValueError: on mismatching shapes or devices, a broadcast axis, or
            the same tensor twice.
    """
    _require()
    if idx.dim() != 3 or idx.shape[2] < keep or keep < 0:
        raise ValueError(f"idx must be [N, H_kv, >= keep={keep}], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be int64 or int32, got {idx.dtype}")
    n, h = idx.shape[:2]
    seen = set()
    for t in tensors:
        if t.dim() not in (3, 4) or tuple(t.shape[:2]) != (n, h) or t.shape[2] < keep:
            raise ValueError(f"tensors must be [N={n}, H_kv={h}, S >= {keep}(, D)], got {tuple(t.shape)}")
        if t.device != idx.device:
            raise ValueError(f"tensor on {t.device}, idx on {idx.device}")
        if any(t.stride(i) == 0 and t.shape[i] > 1 for i in range(t.dim())):
            raise ValueError("cannot compact a tensor with a broadcast (stride 0) axis in place")
        key = (t.data_ptr(), tuple(t.stride()), t.dtype)
        if key in seen:
            raise ValueError("the same tensor was passed twice")
        seen.add(key)
    out = [t.narrow(2, 0, keep) for t in tensors]
    if keep == 0 or n * h == 0:
        return out
    kernel = _jit(_compact_kernel)
    ix = _strides(idx, 3)
    for t in tensors:
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        width = t.shape[3] if t.dim() == 4 else 1
        if width == 0:
            continue
        # [BLOCK_S, BLOCK_W] tiles of 8192 elements (32 per thread at 8 warps); columns split
        # over programs so a row's latency-bound walk has fewer, larger steps.
        block_w = min(32, triton.next_power_of_2(width))
        block_s = _COMPACT_BLOCK_S or min(1024, 8192 // block_w)
        sw = t.stride(3) if t.dim() == 4 else 0
        grid = (n * h, triton.cdiv(width, block_w))
        kernel[grid](t, *_strides(t, 3), sw, idx, *ix, h, width, keep,
                     BLOCK_S=block_s, BLOCK_W=block_w, num_warps=8)
    return out
