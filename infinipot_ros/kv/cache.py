"""A KV cache with a hard cap on vision tokens, compressed in place.

Layout of every layer's cache (all heads the same length; see InfiniPot-V
Sec. 3, "continual KV cache compression"):

    [ prefix | vision tokens (<= M per head) | scratch (question + answer) ]

* prefix: the system prompt up to and including the first vision-start
  token; protected, never compressed.
* vision: the streamed chunks. When an appended chunk takes the vision region
  past M tokens, every layer is compressed in place to C tokens (default
  C = 0.75 M) per KV head by the policy's scores; kept tokens keep their
  order, their cached (rotated) keys and hence their positions.
* scratch: text appended inside :meth:`CappedKVCache.scratch` (a question and
  its answer) and removed when the block ends.

Appends are transactions: if the model raises half-way through a forward,
every layer is truncated back and the cache is exactly as before.

Pure torch (no model, no ROS); works on any device and dtype.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from . import triton_kernels
from .layout import ChunkTable, VisionChunk, VisionLayout
from .policy import ScoringPolicy
from .rope import shift_rotary_keys_
from .selection import gather_kept, keep_topk

log = logging.getLogger(__name__)

#: Vision-token budget in MB uses decimal megabytes (1 MB = 1e6 bytes).
MB = 1_000_000


@dataclass(frozen=True)
class CacheBudget:
    """How many vision tokens the cache may hold, in tokens or in bytes.

    Exactly one of ``max_vision_tokens`` (M) and ``max_bytes`` is set, or
    neither (no cap: the cache grows with the stream).

    ``max_bytes`` caps the resident cache, prefix included:
    M = floor(max_bytes / bytes_per_token) - prefix_tokens. Bytes per token
    = 2 (K and V) x layers x KV heads x head_dim x dtype bytes (36,864 B for
    Qwen2.5-VL-3B in bf16). A chunk being prefilled and the question/answer
    tokens come on top of the cap while they exist.

    Args:
        max_vision_tokens: M, max vision tokens per layer and KV head.
        max_bytes: cap on prefix + vision K/V bytes, all layers.
        target_ratio: C / M, tokens kept by a compression (default 0.75).
    """

    max_vision_tokens: Optional[int] = None
    max_bytes: Optional[int] = None
    target_ratio: float = 0.75

    def __post_init__(self) -> None:
        if self.max_vision_tokens is not None and self.max_bytes is not None:
            raise ValueError("set the budget in tokens or in bytes, not both")
        if self.max_vision_tokens is not None and self.max_vision_tokens < 2:
            raise ValueError(f"max_vision_tokens must be >= 2, got {self.max_vision_tokens}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")
        if not 0.0 < self.target_ratio < 1.0:
            raise ValueError(f"target_ratio must be in (0, 1), got {self.target_ratio}")

    @classmethod
    def from_megabytes(cls, megabytes: float, target_ratio: float = 0.75) -> "CacheBudget":
        return cls(max_bytes=int(megabytes * MB), target_ratio=target_ratio)

    @property
    def capped(self) -> bool:
        return self.max_vision_tokens is not None or self.max_bytes is not None

    def resolve(self, bytes_per_token: int, prefix_tokens: int) -> tuple[Optional[int], Optional[int]]:
        """(M, C) in vision tokens per layer and head; (None, None) without a cap.

        Raises:
            ValueError: if a byte budget leaves fewer than 2 vision tokens.
        """
        if self.max_vision_tokens is not None:
            m = self.max_vision_tokens
        elif self.max_bytes is not None:
            m = self.max_bytes // bytes_per_token - prefix_tokens
            if m < 2:
                raise ValueError(
                    f"KV budget of {self.max_bytes / MB:.3f} MB holds {self.max_bytes // bytes_per_token} tokens "
                    f"at {bytes_per_token} B/token: not even the {prefix_tokens}-token prefix plus 2 vision tokens"
                )
        else:
            return None, None
        return m, max(1, int(math.floor(self.target_ratio * m)))


@dataclass(frozen=True)
class CompressionEvent:
    """What one compression did (per layer and head counts)."""

    before: int  # vision tokens before
    after: int  # vision tokens after (C)
    ms: float  # wall time of the whole compression, all layers (ms)
    chunks_dropped: int  # chunks that lost their last token


@dataclass(frozen=True)
class RebaseEvent:
    """What one re-base did (:meth:`CappedKVCache.rebase`); positions are position ids."""

    delta: int  # largest shift: the stream (and its clock) moved down by this many positions
    clamped_chunks: int  # chunks moved by less than delta (they would have fallen below the prefix's end)
    min_position: int  # smallest first position of a cached chunk after the shift (-1: no chunk)
    max_position: int  # largest position id of a cached chunk after the shift (-1: no chunk)
    ms: float  # wall time of the key rotation and bookkeeping (ms)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's size and history. Token counts are per layer and KV head."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    bytes_per_token: int
    prefix_tokens: int
    vision_tokens: int
    scratch_tokens: int
    max_vision_tokens: Optional[int]  # M
    target_vision_tokens: Optional[int]  # C
    capacity_tokens: int  # allocated slots per layer and head
    compressions: int
    tokens_evicted: int
    last_compression_ms: float
    chunks_in_cache: int
    frames_in_cache: int
    oldest_stamp_ns: int  # 0 when empty
    newest_stamp_ns: int  # 0 when empty
    rebases: int = 0  # re-bases of the stream's positions since start (unbounded uptime)

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.vision_tokens + self.scratch_tokens

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V in use, all layers."""
        return self.tokens * self.bytes_per_token

    @property
    def kv_bytes_reserved(self) -> int:
        """Bytes allocated for K and V, all layers."""
        return self.capacity_tokens * self.bytes_per_token

    @property
    def kv_bytes_budget(self) -> int:
        """Bytes at the cap (prefix + M); 0 without a cap."""
        if self.max_vision_tokens is None:
            return 0
        return (self.prefix_tokens + self.max_vision_tokens) * self.bytes_per_token


class CacheStateError(RuntimeError):
    """An operation was called in the wrong state (e.g. a chunk during a scratch block)."""


class PartialCompressionError(RuntimeError):
    """A compression failed after some of its layer passes had already compacted their layers.

    Only possible with ``layers_per_pass`` < layers: the vision region then holds
    different tokens in different layers and the chunk table no longer describes
    it, so the memory cannot be trusted; the caller must start a new stream
    (e.g. :meth:`CappedKVCache.reset`). The original error is ``__cause__``.
    """


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest over layers of max |a - b| / max |b| for two [L, ...] tensors (0 when equal)."""
    if a.numel() == 0:
        return 0.0
    diff = (a.float() - b.float()).abs().flatten(1).amax(1)
    scale = b.float().abs().flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return float((diff / scale).max())


class CappedKVCache:
    """K/V buffers [L, B, H_kv, capacity, D] with a protected prefix and a capped vision region per layer.

    The model writes through :meth:`update` (one call per layer per forward,
    as transformers' Cache API does); the engine brackets every forward in
    :meth:`prefix`, :meth:`vision_chunk` or :meth:`scratch`, which say what the
    appended tokens are.

    Args:
        num_layers: decoder layers.
        num_kv_heads: KV heads per layer (H_kv).
        head_dim: D.
        dtype, device: of the K/V buffers.
        budget: the cap; ``CacheBudget()`` for none.
        policy: scores tokens at compression; required when the budget caps.
        batch_size: B (a stream is 1).
        reserve_tokens: slots allocated beyond prefix + M for the chunk being
            prefilled or the question + answer (never both at once: a chunk is
            never appended inside a scratch block), so a capped cache never
            reallocates in steady state.
        layers_per_pass: layers scored together in one batched compression
            pass; 0 (default) = all layers in one pass, so the number of
            operations per compression does not grow with the layer count.
            A smaller value bounds the transient memory of a compression to
            about that many layers' vision K/V (fp32 keys for TaR plus the
            kept tokens).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        budget: CacheBudget = CacheBudget(),
        policy: Optional[ScoringPolicy] = None,
        batch_size: int = 1,
        reserve_tokens: int = 1024,
        layers_per_pass: int = 0,
    ) -> None:
        if budget.capped and policy is None:
            raise ValueError("a capped budget needs a compression policy")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.budget = budget
        self.policy = policy
        self.batch_size = batch_size
        self.reserve_tokens = reserve_tokens
        if reserve_tokens < 0 or layers_per_pass < 0:
            raise ValueError(f"reserve_tokens and layers_per_pass must be >= 0, got {reserve_tokens}, {layers_per_pass}")
        self.layers_per_pass = layers_per_pass or num_layers
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

        # One buffer per K and V for all layers, [L, B, H_kv, capacity, D], so a
        # group of consecutive layers is one strided view (batched compression).
        self._keys: Optional[torch.Tensor] = None
        self._values: Optional[torch.Tensor] = None
        self._token_ids: Optional[torch.Tensor] = None  # [L, B, H_kv, capacity] int64, vision slots
        # [L, B, H_kv, capacity] float32 L2 norm of each cached vision value, written at append:
        # a cached value never changes, so VaN never recomputes it (vision slots, like the ids).
        self._value_norms: Optional[torch.Tensor] = None
        self._appending_vision = False
        self._len = [0] * num_layers
        self._prefix_len = 0
        self._vision_len = 0
        self._scratch_depth = 0
        self._prefix_done = False
        self.table = ChunkTable()
        self.max_vision_tokens: Optional[int] = None
        self.target_vision_tokens: Optional[int] = None
        self.compressions = 0
        self.tokens_evicted = 0
        self.last_compression: Optional[CompressionEvent] = None
        self.rebases = 0  # re-bases of the stream's positions (:meth:`rebase`), not part of the state
        self.last_rebase: Optional[RebaseEvent] = None

    # ------------------------------------------------------------------ writes
    # Every tensor write runs under inference mode: a KV cache never needs
    # autograd, and buffers created inside a model's inference_mode forward
    # can then be compressed in place from anywhere.
    @torch.inference_mode()
    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K/V for one layer and return everything cached for it.

        Args:
            layer_idx: decoder layer.
            key_states: [B, H_kv, n, D] new keys (after rotary embedding).
            value_states: [B, H_kv, n, D] new values.

        Returns:
            (keys, values), each [B, H_kv, S + n, D]: views of the buffers.

        Raises:
            ValueError: on a shape that does not match the cache.
        """
        b, h, n, d = key_states.shape
        if (b, h, d) != (self.batch_size, self.num_kv_heads, self.head_dim) or value_states.shape != key_states.shape:
            raise ValueError(
                f"layer {layer_idx}: K/V of shape {tuple(key_states.shape)}/{tuple(value_states.shape)} do not fit a "
                f"cache of [B={self.batch_size}, H_kv={self.num_kv_heads}, S, D={self.head_dim}]"
            )
        start = self._len[layer_idx]
        self._ensure_capacity(start + n)
        k, v = self._keys[layer_idx], self._values[layer_idx]
        k[:, :, start : start + n].copy_(key_states)
        v[:, :, start : start + n].copy_(value_states)
        if self._appending_vision and self.policy is not None:
            slot = start - self._prefix_len
            torch.linalg.vector_norm(value_states.float(), dim=-1, out=self._value_norms[layer_idx, :, :, slot : slot + n])
        self._len[layer_idx] = start + n
        return k[:, :, : start + n], v[:, :, : start + n]

    @property
    def capacity(self) -> int:
        """Allocated token slots per layer and head."""
        return 0 if self._keys is None else self._keys.shape[3]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V buffers, each [L, B, H_kv, capacity, D], for static-shape steps that write in place.

        They stay at the same address until the cache grows (never in a capped
        steady state); see :meth:`ensure_capacity`.

        Raises:
            CacheStateError: before anything was written.
        """
        if self._keys is None:
            raise CacheStateError("the cache has no buffers before its first write")
        return self._keys, self._values

    def ensure_capacity(self, tokens: int) -> None:
        """Make room for ``tokens`` slots per layer and head now (e.g. a whole answer before decoding)."""
        self._ensure_capacity(tokens)

    def advance(self, n: int) -> None:
        """Count ``n`` tokens that a static step wrote in place at slots [length, length + n) of every layer.

        Only inside a scratch block (the text is removed when the block ends).

        Raises:
            CacheStateError: outside a scratch block, or past the capacity.
        """
        if not self._scratch_depth:
            raise CacheStateError("in-place writes are only allowed for scratch text (question + answer)")
        if max(self._len) + n > self.capacity:
            raise CacheStateError(f"advancing {n} tokens passes the capacity {self.capacity}")
        self._len = [x + n for x in self._len]

    @torch.inference_mode()
    def _ensure_capacity(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        if self.max_vision_tokens is not None:
            # Capped: exactly prefix + M + reserve (allocated when the prefix is done); grow only if a
            # single chunk or question + answer is bigger than the reserve.
            steady = self._prefix_len + self.max_vision_tokens + self.reserve_tokens
            if needed > steady:
                log.warning("KV cache grows past prefix + M + reserve (%d > %d slots): a chunk or question + answer "
                            "is larger than reserve_tokens=%d", needed, steady, self.reserve_tokens)
            target = max(needed, steady)
        elif not self._prefix_done and self.budget.capped:
            target = needed  # the prefix itself; the capped size is known once its length is
        else:
            target = (max(needed, int(cap * 1.5), 1024) + 255) // 256 * 256
        self._reallocate(target)

    def _reallocate(self, target: int) -> None:
        """Move the buffers to ``target`` slots per layer and head, keeping what is cached."""
        shape = (self.num_layers, self.batch_size, self.num_kv_heads, target, self.head_dim)
        # Zeros, not empty: static-shape steps attend over the whole capacity with masked-out slots, and
        # a masked slot holding NaN/inf garbage would still poison the output (0 x NaN = NaN).
        new_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        new_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        new_ids = torch.empty(shape[:4], dtype=torch.long, device=self.device)
        new_norms = torch.empty(shape[:4], dtype=torch.float32, device=self.device)
        if self._keys is not None:
            used = max(self._len)
            new_k[..., :used, :].copy_(self._keys[..., :used, :])
            new_v[..., :used, :].copy_(self._values[..., :used, :])
            # vision slots written so far (a chunk being appended may already be in some layers)
            vis = max(0, used - self._prefix_len)
            new_ids[..., :vis].copy_(self._token_ids[..., :vis])
            new_norms[..., :vis].copy_(self._value_norms[..., :vis])
        self._keys, self._values, self._token_ids, self._value_norms = new_k, new_v, new_ids, new_norms

    def _truncate_all(self, lengths: Sequence[int]) -> None:
        self._len = list(lengths)

    @contextlib.contextmanager
    def _transaction(self, expected_new: Optional[int]) -> Iterator[None]:
        before = list(self._len)
        try:
            yield
        except BaseException:
            self._truncate_all(before)
            raise
        added = {after - b for after, b in zip(self._len, before)}
        if len(added) != 1 or (expected_new is not None and added != {expected_new}):
            self._truncate_all(before)
            raise CacheStateError(
                f"forward appended {sorted(added)} tokens per layer, expected {expected_new} in every layer"
            )

    @contextlib.contextmanager
    def prefix(self) -> Iterator[None]:
        """Bracket the forward that writes the protected prefix (once, on an empty cache)."""
        if self._prefix_done or any(self._len):
            raise CacheStateError("the prefix is written once, into an empty cache")
        with self._transaction(None):
            yield
        self._prefix_len = self._len[0]
        self._prefix_done = True
        m, c = self.budget.resolve(self.bytes_per_token, self._prefix_len)
        self.max_vision_tokens, self.target_vision_tokens = m, c
        if m is not None:  # the steady-state size, allocated once: prefix + M + reserve
            with torch.inference_mode():
                self._reallocate(self._prefix_len + m + self.reserve_tokens)

    @contextlib.contextmanager
    def vision_chunk(self, chunk: VisionChunk) -> Iterator[None]:
        """Bracket the forward that prefills one chunk of vision tokens.

        On success the chunk's tokens join the vision region and, if that
        now exceeds M, every layer is compressed to C (:meth:`compress`).

        A forward that raises leaves the cache as it was (transaction). If the
        compression the chunk triggers raises (policy error, out of memory)
        before any layer was written, the chunk is taken out again and the
        cache is exactly as before the chunk (K/V, norms, ids, chunk table);
        the error propagates.

        Raises:
            CacheStateError: before the prefix, inside a scratch block, or if
                the forward did not append exactly ``chunk.num_tokens`` tokens.
            ValueError: if the chunk alone is larger than the target C.
            PartialCompressionError: the compression failed between layer
                passes (``layers_per_pass`` < layers): the memory is inconsistent.
        """
        if not self._prefix_done:
            raise CacheStateError("write the prefix before vision chunks")
        if self._scratch_depth:
            raise CacheStateError("cannot append vision while a question is being answered")
        if self.target_vision_tokens is not None and chunk.num_tokens > self.target_vision_tokens:
            raise ValueError(
                f"a chunk of {chunk.num_tokens} vision tokens does not fit the compression target "
                f"C={self.target_vision_tokens} (M={self.max_vision_tokens}): lower the frame resolution "
                f"(max_pixels) or raise the KV budget"
            )
        n = chunk.num_tokens
        self._appending_vision = True
        try:
            with self._transaction(n):
                yield
        finally:
            self._appending_vision = False
        compresses = self.max_vision_tokens is not None and self._vision_len + n > self.max_vision_tokens
        table_before = self.table.state_dict() if compresses else None  # a few [R] int64 columns
        self._label_vision(chunk)
        if compresses:
            try:
                self.compress()
            except PartialCompressionError:
                raise
            except BaseException:  # nothing was written: take the committed chunk out again
                self._truncate_all([length - n for length in self._len])
                self._vision_len -= n
                self.table.load_state_dict(table_before)
                raise

    @torch.inference_mode()
    def _label_vision(self, chunk: VisionChunk) -> None:
        n = chunk.num_tokens
        rec = self.table.append(chunk)
        start = self._vision_len
        self._token_ids[..., start : start + n] = torch.arange(rec.first_token_id, rec.first_token_id + n,
                                                               device=self.device)
        self._vision_len += n

    @contextlib.contextmanager
    def scratch(self) -> Iterator[None]:
        """Bracket text (a question and its answer) that is removed when the block ends.

        Any number of forwards may run inside; on exit, normal or not, every
        layer is truncated back to its length at entry.
        """
        if not self._prefix_done:
            raise CacheStateError("write the prefix first")
        before = list(self._len)
        self._scratch_depth += 1
        try:
            yield
        finally:
            self._scratch_depth -= 1
            self._truncate_all(before)

    # ------------------------------------------------------------- compression
    @torch.inference_mode()
    def compress(self, target: Optional[int] = None) -> Optional[CompressionEvent]:
        """Compress the vision region of every layer in place to ``target`` (default C) tokens per head.

        Per pass over a batch of consecutive layers (all layers by default,
        see ``layers_per_pass``; batched along N = layers x B): the policy
        scores [N, H_kv, S_v] tokens from the cached keys and the value norms
        stored at append, :func:`keep_topk` picks ``target`` per head in
        original order, and the kept K/V/norms/ids are gathered into the
        front of the vision region. No host synchronisation inside a pass;
        one at the end (the chunk table's bookkeeping). The transient extra
        memory is one pass's scoring tensors and kept tokens.

        Returns:
            The event, or None when there was nothing to drop.

        Raises:
            CacheStateError: inside a scratch block or without a policy.
            PartialCompressionError: a pass after the first failed (the earlier
                ones had compacted their layers); an error in the first pass
                propagates as is, with the cache unchanged.
        """
        if self._scratch_depth:
            raise CacheStateError("cannot compress while a question is being answered")
        if self.policy is None:
            raise CacheStateError("no compression policy configured")
        keep = self.target_vision_tokens if target is None else target
        if keep is None:
            raise CacheStateError("no target size: the budget is uncapped")
        before = self._vision_len
        if before <= keep:
            return None
        t0 = time.perf_counter()
        p = self._prefix_len
        for lo in range(0, self.num_layers, self.layers_per_pass):
            try:
                self._compress_pass(lo, before, keep)
            except BaseException as exc:
                if lo == 0:
                    raise  # nothing written yet
                raise PartialCompressionError(
                    f"compression failed in the pass from layer {lo} after layers 0..{lo - 1} were compacted: "
                    f"{type(exc).__name__}: {exc}") from exc
        self._len = [p + keep] * self.num_layers
        self._vision_len = keep
        dropped = self.table.prune(self._token_ids[..., :keep])  # the one host sync
        event = CompressionEvent(before, keep, (time.perf_counter() - t0) * 1e3, dropped)
        self.compressions += 1
        self.tokens_evicted += before - keep
        self.last_compression = event
        return event

    def _compress_pass(self, lo: int, before: int, keep: int) -> None:
        """One pass of :meth:`compress` over layers ``lo .. lo + layers_per_pass - 1``.

        Scores and picks before writing: an error before the final writes leaves the layers unchanged.
        """
        hi = min(self.num_layers, lo + self.layers_per_pass)
        p, b, h, d = self._prefix_len, self.batch_size, self.num_kv_heads, self.head_dim
        shape = ((hi - lo) * b, h, before)  # layer-major rows: one strided view of the buffers, no copy
        k_vis = self._keys[lo:hi, :, :, p : p + before].reshape(*shape, d)
        v_vis = self._values[lo:hi, :, :, p : p + before].reshape(*shape, d)
        norms = self._value_norms[lo:hi, :, :, :before].reshape(shape)
        ids = self._token_ids[lo:hi, :, :, :before].reshape(shape)
        scores = self.policy.score(
            k_vis, norms, self.table.layout(ids), layers=list(range(lo, hi)), num_layers=self.num_layers, keep=keep
        )
        idx = keep_topk(scores, keep)  # [N, H, keep], ascending
        if triton_kernels.use_triton(self.device):  # in place, no temporary of the kept tokens
            triton_kernels.compact_([k_vis, v_vis, norms, ids], idx, keep)
            return
        kept = (hi - lo, b, h, keep)
        # gather every kept row first (copies), then write them to the front of the vision region
        k_kept, v_kept = gather_kept(self._keys, lo, p, idx), gather_kept(self._values, lo, p, idx)
        n_kept, i_kept = gather_kept(self._value_norms, lo, 0, idx), gather_kept(self._token_ids, lo, 0, idx)
        self._keys[lo:hi, :, :, p : p + keep] = k_kept.view(*kept, d)
        self._values[lo:hi, :, :, p : p + keep] = v_kept.view(*kept, d)
        self._value_norms[lo:hi, :, :, :keep] = n_kept.view(kept)
        self._token_ids[lo:hi, :, :, :keep] = i_kept.view(kept)

    # ---------------------------------------------------------------- re-base
    @torch.inference_mode()
    def rebase(
        self,
        delta: torch.Tensor,
        *,
        inv_freq: torch.Tensor,
        pairs: Sequence[tuple[int, int]],
        fixed_max_position: torch.Tensor,
        stream_delta: Optional[int] = None,
        text: Optional[torch.Tensor] = None,
    ) -> RebaseEvent:
        """Move every cached vision token from position p to p - delta[its chunk], in place; the prefix stays.

        The keys of the vision slots of every layer, [L, B, H_kv, V, D], are
        rotated by -delta x theta_i in the frequency pairs ``pairs`` (M-RoPE:
        the temporal section; see :func:`~.rope.shift_rotary_keys_`), in one
        pass with no host synchronisation; values, value norms and token ids
        do not change. The chunk table's ``position`` / ``max_position``
        columns move with them (:meth:`ChunkTable.shift_positions`). Which
        delta to use is the model adapter's rule; positions of text and chunks
        appended later must move by the same delta (the caller's stream clock).

        Args:
            delta: [R] integers >= 0, one per live chunk (table order, oldest first), positions.
            inv_freq: [D/2] rotary frequencies theta_i (radians per position) the model uses.
            pairs: [lo, hi) frequency-pair ranges that carry the shifted position id.
            fixed_max_position: [R] integers, each chunk's largest position id on the axes that do not move.
            stream_delta: how far the caller moves its stream clock (reported as the event's delta);
                default: the largest chunk delta.
            text: [R] bool, chunks of text (notes): their position is the same on every axis, so their
                keys are rotated in all D/2 pairs, not only ``pairs``; their ``fixed_max_position`` is
                ignored (all axes move). None = no text.

        Returns:
            The event (also ``last_rebase``; ``rebases`` counts them).

        Raises:
            CacheStateError: before the prefix, inside a scratch block or while a chunk is appended.
            ValueError: tensors that are not [R], or a negative delta.
        """
        if not self._prefix_done:
            raise CacheStateError("write the prefix before re-basing")
        if self._scratch_depth or self._appending_vision:
            raise CacheStateError("cannot re-base while a question or a chunk is being processed")
        n = len(self.table)
        delta = delta.to("cpu", torch.long).reshape(-1)
        if delta.shape[0] != n or tuple(fixed_max_position.shape) != (n,):
            raise ValueError(f"rebase needs one delta and one fixed max position per live chunk ({n}), got "
                             f"{tuple(delta.shape)} / {tuple(fixed_max_position.shape)}")
        if n and int(delta.min()) < 0:
            raise ValueError("rebase moves positions down only (delta >= 0)")
        t0 = time.perf_counter()
        p, v = self._prefix_len, self._vision_len
        text = torch.zeros(n, dtype=torch.bool) if text is None else text.to("cpu", torch.bool).reshape(-1)
        if text.shape[0] != n:
            raise ValueError(f"rebase needs one text flag per live chunk ({n}), got {tuple(text.shape)}")
        if n and v and self._keys is not None:
            index = self.table.chunk_index(self._token_ids[..., :v])  # [L, B, H_kv, V] row of each token's chunk
            keys = self._keys[..., p : p + v, :]
            shift_rotary_keys_(keys, delta, inv_freq, pairs, index=index)
            if bool(text.any()):  # text: the other pairs too (its position is the same on every axis)
                half = keys.shape[-1] // 2
                covered = torch.zeros(half, dtype=torch.bool)
                for lo, hi in pairs:
                    covered[int(lo):int(hi)] = True
                rest, lo = [], None
                for i, c in enumerate(covered.tolist() + [True]):
                    if not c and lo is None:
                        lo = i
                    elif c and lo is not None:
                        rest.append((lo, i))
                        lo = None
                shift_rotary_keys_(keys, torch.where(text, delta, 0), inv_freq, rest, index=index)
        fixed_max_position = torch.where(text, self.table.column("max_position") - delta,
                                         fixed_max_position.to("cpu", torch.long))
        self.table.shift_positions(delta, fixed_max_position)
        top = int(delta.max()) if n else 0
        if stream_delta is not None:
            top = int(stream_delta)
        event = RebaseEvent(
            delta=top, clamped_chunks=int((delta < top).sum()) if n else 0,
            min_position=int(self.table.column("position").min()) if n else -1,
            max_position=int(self.table.column("max_position").max()) if n else -1,
            ms=(time.perf_counter() - t0) * 1e3,
        )
        self.rebases += 1
        self.last_rebase = event
        return event

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this cache's memory exactly, as CPU contiguous tensors (copies).

        With L layers, B batch, H_kv heads, D head_dim, P prefix and V vision tokens per layer and head:

        * ``keys``, ``values``: [L, B, H_kv, P + V, D] in the cache dtype (the prefix and vision
          slots of every layer; scratch text and a chunk being appended are not part of the state);
        * ``token_ids``: [L, B, H_kv, V] int64 global id of the token in each vision slot;
        * ``value_norms``: [L, B, H_kv, V] float32 L2 norm of each cached vision value (as stored at
          append; a cache without a policy never stores them, so they are computed from ``values``);
        * ``prefix_length``, ``vision_length``, ``compressions``, ``tokens_evicted``: 0-dim int64;
        * ``last_compression``: float64 [4] (before, after, ms, chunks_dropped), or [0] if none;
        * ``table.<column>`` / ``table.next_chunk_id`` / ``table.next_token_id``: the chunk table
          (:meth:`ChunkTable.state_dict`).

        Raises:
            CacheStateError: before the prefix is written.
        """
        if not self._prefix_done:
            raise CacheStateError("the cache has no state before its prefix is written")
        p, v = self._prefix_len, self._vision_len

        def out(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)

        if self.policy is not None:
            norms = out(self._value_norms[..., :v])
        else:  # never written without a policy: derive them as update() would have
            norms = torch.linalg.vector_norm(out(self._values[..., p : p + v, :]).float(), dim=-1)
        ev = self.last_compression
        state = {
            "keys": out(self._keys[..., : p + v, :]),
            "values": out(self._values[..., : p + v, :]),
            "token_ids": out(self._token_ids[..., :v]),
            "value_norms": norms.contiguous(),
            "prefix_length": torch.tensor(p, dtype=torch.long),
            "vision_length": torch.tensor(v, dtype=torch.long),
            "compressions": torch.tensor(self.compressions, dtype=torch.long),
            "tokens_evicted": torch.tensor(self.tokens_evicted, dtype=torch.long),
            "last_compression": torch.tensor(
                [] if ev is None else [ev.before, ev.after, ev.ms, ev.chunks_dropped], dtype=torch.float64),
        }
        state.update({f"table.{k}": t for k, t in self.table.state_dict().items()})
        return state

    #: Largest accepted difference between a saved prefix and this cache's own, per layer, relative to
    #: the layer's largest |K| or |V|: kernels may round differently across machines, but a prefix of
    #: another system prompt or model differs by O(1).
    PREFIX_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}
    PREFIX_RTOL_16BIT = 5e-2

    @torch.inference_mode()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this cache's memory by one exported with :meth:`state_dict` (tensors go to this cache's device).

        The cache must have the same geometry (layers, batch, KV heads, head_dim, dtype) and its
        prefix already written, by the same model and system prompt: the saved prefix must have
        the same length and match this cache's prefix K/V (within :data:`PREFIX_RTOL` of each
        layer's largest magnitude); the saved prefix is then restored bit-exactly. Whatever vision
        the cache held is replaced. If the restored vision region exceeds this cache's budget M,
        it is compressed to C with this cache's policy (one compression event), so the cap holds
        after the load. Everything is validated before anything is written: on error the cache
        is unchanged.

        Raises:
            CacheStateError: a missing tensor, another geometry or dtype, inconsistent lengths,
                another prefix, no prefix written here, or a scratch block / append in progress.
        """
        if not self._prefix_done:
            raise CacheStateError("write this cache's prefix before loading a state into it")
        if self._scratch_depth or self._appending_vision:
            raise CacheStateError("cannot load a state while a question or a chunk is being processed")
        required = ("keys", "values", "token_ids", "value_norms", "prefix_length", "vision_length",
                    "compressions", "tokens_evicted")
        missing = [k for k in required if k not in state]
        if missing:
            raise CacheStateError(f"cache state lacks tensors {missing}")
        keys, values, ids, norms = state["keys"], state["values"], state["token_ids"], state["value_norms"]
        p, v = int(state["prefix_length"]), int(state["vision_length"])
        geometry = (self.num_layers, self.batch_size, self.num_kv_heads, p + v, self.head_dim)
        if tuple(keys.shape) != geometry or tuple(values.shape) != geometry:
            raise CacheStateError(
                f"cache state of K {tuple(keys.shape)} / V {tuple(values.shape)} does not fit this cache "
                f"[L={self.num_layers}, B={self.batch_size}, H_kv={self.num_kv_heads}, P+V={p + v}, D={self.head_dim}]"
            )
        if keys.dtype != self.dtype or values.dtype != self.dtype:
            raise CacheStateError(f"cache state is {keys.dtype}/{values.dtype}, this cache {self.dtype}")
        if tuple(ids.shape) != geometry[:3] + (v,) or tuple(norms.shape) != geometry[:3] + (v,):
            raise CacheStateError(f"cache state token ids {tuple(ids.shape)} / value norms {tuple(norms.shape)} "
                                  f"do not match its {v} vision tokens")
        if ids.dtype != torch.long or norms.dtype != torch.float32:
            raise CacheStateError(f"cache state token ids must be int64 and norms float32, "
                                  f"got {ids.dtype}/{norms.dtype}")
        if p != self._prefix_len:
            raise CacheStateError(f"saved prefix has {p} tokens, this cache's {self._prefix_len}: "
                                  f"written by another model or system prompt")
        rtol = self.PREFIX_RTOL.get(self.dtype, self.PREFIX_RTOL_16BIT)
        for name, saved, own in (("K", keys, self._keys), ("V", values, self._values)):
            worst = _relative_difference(saved[..., :p, :].to(self.device), own[..., :p, :])
            if not worst <= rtol:  # NaN refuses too
                raise CacheStateError(f"saved prefix {name} differs from this cache's by {worst:.3g} (relative, "
                                      f"tolerance {rtol:g}): written by another model or system prompt")
        table = ChunkTable()
        try:
            table.load_state_dict({k[len("table."):]: t for k, t in state.items() if k.startswith("table.")})
        except ValueError as exc:
            raise CacheStateError(f"cache state: {exc}") from None
        if v:
            rows = ids.reshape(-1, v)
            if bool((rows[:, 1:] <= rows[:, :-1]).any()):
                raise CacheStateError("cache state token ids are not strictly ascending in every layer and head")
            lo = int(table.column("first")[0]) if len(table) else 0
            if not len(table) or int(rows[:, 0].min()) < lo or int(rows[:, -1].max()) >= table.next_token_id:
                raise CacheStateError("cache state token ids fall outside its chunk table")
        ev = state.get("last_compression")
        if ev is not None and ev.numel() not in (0, 4):
            raise CacheStateError(f"cache state last_compression must have 0 or 4 entries, got {ev.numel()}")

        # ---- validated: write
        m = self.max_vision_tokens
        steady = None if m is None else p + m + self.reserve_tokens
        if p + v > self.capacity:
            if steady is not None:  # over this cache's budget: room for the state, shrunk after compressing
                self._reallocate(p + v)
            else:
                self._ensure_capacity(p + v)
        self._keys[..., : p + v, :].copy_(keys)
        self._values[..., : p + v, :].copy_(values)
        self._token_ids[..., :v].copy_(ids)
        self._value_norms[..., :v].copy_(norms)
        self._len = [p + v] * self.num_layers
        self._vision_len = v
        self.table = table
        self.compressions = int(state["compressions"])
        self.tokens_evicted = int(state["tokens_evicted"])
        self.last_compression = None
        if ev is not None and ev.numel() == 4:
            b, a, ms, dropped = ev.tolist()
            self.last_compression = CompressionEvent(int(b), int(a), float(ms), int(dropped))
        if m is not None and v > m:
            self.compress()
            if self.capacity > steady:
                self._reallocate(steady)

    # ------------------------------------------------------------------- reads
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for ``layer_idx`` (prefix + vision + scratch)."""
        return self._len[layer_idx]

    @property
    def prefix_length(self) -> int:
        return self._prefix_len

    @property
    def vision_length(self) -> int:
        return self._vision_len

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, H_kv, S, D], [B, H_kv, S, D]) views of what one layer holds now."""
        n = self._len[layer_idx]
        return self._keys[layer_idx, :, :, :n], self._values[layer_idx, :, :, :n]

    def vision_token_ids(self, layer_idx: int) -> torch.Tensor:
        """[B, H_kv, S_v] global ids of the vision tokens a layer holds (see :mod:`.layout`)."""
        return self._token_ids[layer_idx, :, :, : self._vision_len]

    def vision_layout(self, layer_idx: int) -> VisionLayout:
        """Source of every vision token one layer holds."""
        return self.table.layout(self.vision_token_ids(layer_idx))

    def visibility(
        self,
        cameras: Optional[Sequence[int]] = None,
        since_ns: int = 0,
        until_ns: int = 0,
    ) -> Optional[list[torch.Tensor]]:
        """Which cached tokens an answer may attend to, per layer.

        A vision token is visible if its chunk's camera is in ``cameras``
        (None = all) and its frames overlap [since_ns, until_ns] (0 = open).
        Prefix and scratch tokens are always visible.

        Returns:
            None when everything is visible, else one [B, H_kv, S] bool
            tensor per layer covering prefix + vision + scratch at call time.
        """
        if cameras is None and since_ns <= 0 and until_ns <= 0:
            return None
        # The rule is per chunk (host side, vectorised); tokens look up their chunk's verdict.
        chunk_ok = self.table.select(cameras, since_ns, until_ns).to(self.device)
        p, s = self._prefix_len, self._vision_len
        vision_ok = chunk_ok[self.table.chunk_index(self._token_ids[..., :s])]  # [L, B, H_kv, S_v]
        masks = []
        for layer in range(self.num_layers):
            full = torch.ones(self.batch_size, self.num_kv_heads, self._len[layer], dtype=torch.bool, device=self.device)
            full[:, :, p : p + s] = vision_ok[layer]
            masks.append(full)
        return masks

    def stats(self) -> CacheStats:
        oldest, newest = self.table.stamp_range()
        return CacheStats(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=str(self.dtype).replace("torch.", ""),
            bytes_per_token=self.bytes_per_token,
            prefix_tokens=self._prefix_len,
            vision_tokens=self._vision_len,
            scratch_tokens=self._len[0] - self._prefix_len - self._vision_len,
            max_vision_tokens=self.max_vision_tokens,
            target_vision_tokens=self.target_vision_tokens,
            capacity_tokens=self.capacity,
            compressions=self.compressions,
            tokens_evicted=self.tokens_evicted,
            last_compression_ms=self.last_compression.ms if self.last_compression else 0.0,
            chunks_in_cache=len(self.table),
            frames_in_cache=self.table.frames(),
            oldest_stamp_ns=oldest,
            newest_stamp_ns=newest,
            rebases=self.rebases,
        )
