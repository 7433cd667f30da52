"""A decode step with static shapes over the cache's preallocated buffers (CUDA-graph ready).

Today's dynamic path appends one token by running the model on K/V views
that grow by one slot per step, so every step has new tensor shapes, and
the host launches ~70 kernels per layer each time. The static step instead:

* attends over the **whole capacity** of the :class:`~infinipot_ros.kv.CappedKVCache`
  buffers ([L, B, H_kv, capacity, D]) with a boolean ``allowed`` mask
  [L, B, H_kv, capacity] (visibility of the cached tokens for this answer,
  plus every slot written so far by the answer), so no shape changes from
  step to step;
* writes the new token's K/V in place at slot ``length`` (a 0-d device tensor)
  with ``index_copy_``;
* reads its inputs (token id, position id, slot) from small device buffers.

Its inputs and outputs live at fixed addresses, so on CUDA it is captured
once as a CUDA graph and replayed per token (one launch instead of
hundreds); on any device it compiles with ``torch.compile(fullgraph=True)``
with no graph break and no recompilation from step to step
(test/models/test_static_decode.py). Masked-out slots get zero attention
weight, so greedy answers are token for token those of the dynamic path.

Model-agnostic over transformers decoder stacks that accept
``inputs_embeds``, ``position_ids`` and a ``Cache``; the adapter supplies the
position layout (M-RoPE: the same id on its 3 rows for text).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..kv import CappedKVCache

log = logging.getLogger(__name__)

#: Keyword argument carrying the [L, B, H_kv, capacity] allowed mask to the attention function.
ALLOWED_KW = "infinipot_allowed"

#: Decode modes: "auto" = CUDA graph on CUDA, eager static step elsewhere.
DECODE_MODES = ("auto", "cuda_graph", "compile", "eager", "dynamic")


def static_step_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          allowed: torch.Tensor, scaling: Optional[float] = None) -> torch.Tensor:
    """SDPA for one query token over the full cache capacity, GQA without repeating K/V.

    Args:
        query: [B, H_q, 1, D] (after rotary embedding).
        key, value: [B, H_kv, capacity, D] the layer's whole cache buffers.
        allowed: [B, H_kv, capacity] bool, slots the query may attend to.
        scaling: softmax scale (default 1/sqrt(D)).

    Returns:
        [B, 1, H_q, D], the layout transformers' attention functions return.
    """
    b, h_q, _, d = query.shape
    h_kv = key.shape[1]
    q = query.reshape(b, h_kv, h_q // h_kv, d)  # the n_rep query heads of a KV head share its K/V and mask
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed[:, :, None, :], scale=scaling)
    return out.reshape(b, h_q, 1, d).transpose(1, 2)


_STATIC_CLASSES: dict[str, type] = {}


def _static_cache_view(cache: CappedKVCache, slot: torch.Tensor):
    """A transformers ``Cache`` whose layers write one token at ``slot`` and return the full buffers."""
    if not _STATIC_CLASSES:
        from transformers.cache_utils import Cache, CacheLayerMixin

        class _StaticSlotLayer(CacheLayerMixin):
            is_sliding = False
            is_compileable = True

            def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
                super().__init__()
                self.keys, self.values, self.slot = keys, values, slot
                self.is_initialized = True

            def lazy_initialization(self, key_states, value_states) -> None:
                pass

            def update(self, key_states, value_states, *args, **kwargs):
                self.keys.index_copy_(2, self.slot, key_states)
                self.values.index_copy_(2, self.slot, value_states)
                return self.keys, self.values

            def get_mask_sizes(self, *args, **kwargs):
                raise RuntimeError("infinipot: the static decode step brings its own mask")

            def get_seq_length(self, *args, **kwargs) -> int:
                raise RuntimeError("infinipot: the static decode step passes explicit positions")

            def get_max_length(self) -> int:
                return self.keys.shape[2]

        _STATIC_CLASSES["layer"] = _StaticSlotLayer
        _STATIC_CLASSES["cache"] = Cache
    keys, values = cache.buffers()
    layers = [_STATIC_CLASSES["layer"](keys[i], values[i], slot) for i in range(cache.num_layers)]
    return _STATIC_CLASSES["cache"](layers=layers)


class StaticDecodeStep:
    """One greedy/sampled decode token with fixed shapes, bound to one cache's buffers.

    Build it after the question prefill (inside the cache's scratch block),
    call :meth:`begin` once per answer, then :meth:`__call__` once per token.
    A new instance is needed when the cache reallocates (its buffers change;
    :meth:`bound_to` tells).

    Args:
        cache: the stream's cache (capacity must hold the whole answer:
            :meth:`CappedKVCache.ensure_capacity` before building).
        forward: ``forward(inputs_embeds [1, 1, hidden], position_ids, cache_view, allowed) -> hidden [1, 1, hidden]``,
            the model's decoder stack (the adapter binds its kwargs).
        embed: token embedding module.
        head: ``hidden [hidden] -> logits [vocab]`` (lm_head, float32).
        positions: ``pos [1] int64 -> position_ids`` in the model's layout (M-RoPE: [3, 1, 1]).
        mode: one of :data:`DECODE_MODES` except "dynamic".
        compile_backend: ``torch.compile`` backend for mode "compile" (None = inductor).
    """

    def __init__(self, cache: CappedKVCache, *, forward: Callable, embed: torch.nn.Module, head: Callable,
                 positions: Callable[[torch.Tensor], torch.Tensor], mode: str = "auto",
                 compile_backend: Any = None) -> None:
        if mode not in DECODE_MODES or mode == "dynamic":
            raise ValueError(f"static decode mode must be one of {DECODE_MODES[:-1]}, got {mode!r}")
        dev = cache.device
        if mode == "auto":
            mode = "cuda_graph" if dev.type == "cuda" else "eager"
        if mode == "cuda_graph" and dev.type != "cuda":
            raise ValueError("cuda_graph decode needs a CUDA cache")
        self.cache = cache
        self.mode = mode
        keys, _ = cache.buffers()
        self._buffer_ptr = keys.data_ptr()
        self.capacity = keys.shape[3]
        # Static inputs (fixed addresses): token id, position id, write slot; the allowed mask.
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.allowed = torch.zeros(cache.num_layers, cache.batch_size, cache.num_kv_heads, self.capacity,
                                   dtype=torch.bool, device=dev)
        self._view = _static_cache_view(cache, self.slot)
        self._forward, self._embed, self._head, self._positions = forward, embed, head, positions
        self._graph: Optional[Any] = None
        self._graph_logits: Optional[torch.Tensor] = None
        self._fn: Callable[[], torch.Tensor] = self._step
        if mode == "compile":
            self._fn = torch.compile(self._step, fullgraph=True, dynamic=False,
                                     **({} if compile_backend is None else {"backend": compile_backend}))

    def bound_to(self, cache: CappedKVCache) -> bool:
        """True if this step still writes into ``cache``'s current buffers."""
        keys, _ = cache.buffers()
        return cache is self.cache and keys.data_ptr() == self._buffer_ptr and keys.shape[3] == self.capacity

    def _step(self) -> torch.Tensor:
        """The captured computation: K/V of ``token`` written at ``slot``, logits [vocab] float32 returned."""
        self.allowed.index_fill_(3, self.slot, True)  # the new token sees itself
        hidden = self._forward(self._embed(self.token).unsqueeze(0), self._positions(self.position), self._view,
                               self.allowed)
        return self._head(hidden[0, -1])

    @torch.inference_mode()
    def begin(self, visible: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Start an answer: slots [0, current length) are allowed where ``visible`` says (all if None).

        Args:
            visible: per layer [B, H_kv, S_l] bool from :meth:`CappedKVCache.visibility`
                (S_l = the layer's length when it was computed; later slots, the
                question, are allowed).
        """
        self.allowed.zero_()
        lengths = [self.cache.get_seq_length(layer) for layer in range(self.cache.num_layers)]
        for layer, n in enumerate(lengths):
            self.allowed[layer, :, :, :n] = True
            if visible is not None:
                v = visible[layer]
                self.allowed[layer, :, :, : v.shape[-1]] = v

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Decode ``token`` at ``position``; returns logits [vocab] float32 for the next token.

        Appends one token to every layer of the cache (inside its scratch block).

        Raises:
            RuntimeError: if the cache has no free slot left.
        """
        slot = self.cache.get_seq_length()
        if slot >= self.capacity:
            raise RuntimeError(f"static decode: cache capacity {self.capacity} exhausted")
        self.token.fill_(token)
        self.position.fill_(position)
        self.slot.fill_(slot)
        if self.mode == "cuda_graph":
            logits = self._replay()
        else:
            logits = self._fn()
        self.cache.advance(1)
        return logits

    def _replay(self) -> torch.Tensor:
        if self._graph is None:
            self._capture()
        if self._graph is None:  # capture failed: eager static step from now on
            return self._step()
        self._graph.replay()
        return self._graph_logits

    def _capture(self) -> None:
        """Capture :meth:`_step` as a CUDA graph (after one warm-up on a side stream, as CUDA graphs require)."""
        # The warm-up step writes a K/V row at the current slot and allows it: both are rewritten by
        # the real step that follows, so capture leaves the cache and the mask as they were.
        saved = self.allowed.clone()
        try:
            stream = torch.cuda.Stream(self.cache.device)
            stream.wait_stream(torch.cuda.current_stream(self.cache.device))
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream(self.cache.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._step()
            self._graph, self._graph_logits = graph, logits
        except Exception as exc:  # an op that cannot be captured: keep working, without the graph
            log.warning("CUDA graph capture of the decode step failed (%s: %s); using the eager static step",
                        type(exc).__name__, exc)
            self._graph = None
        finally:
            self.allowed.copy_(saved)
