"""Base class of the compression policies: a policy only scores tokens.

Selection (top-k per head, original order kept) lives in
:mod:`infinipot_ros.kv.selection`; the cache calls ``score`` once per pass
over a batch of layers (all of them by default) and keeps the ``keep`` best
tokens of every layer and KV head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .layout import VisionLayout


@dataclass
class ScoringPolicy:
    """Scores the vision tokens of one layer; higher = keep.

    Subclasses are small dataclasses (hyper-parameters as fields, checked in
    ``__post_init__``) that implement :meth:`score`. Tokens that must survive
    (e.g. the most recent frames) get ``+inf``.
    """

    name: ClassVar[str] = "base"

    def score(
        self,
        keys: torch.Tensor,
        value_norms: torch.Tensor,
        layout: VisionLayout,
        *,
        layers: Sequence[int],
        num_layers: int,
        keep: int,
    ) -> torch.Tensor:
        """Score the cached vision tokens of a group of layers at once.

        The batch axis N holds layer-major (layer, batch) pairs: N = len(layers) x B.

        Args:
            keys: [N, H_kv, S, D] cached keys (after rotary embedding); may be a strided view.
            value_norms: [N, H_kv, S] float32 L2 norms of the cached values
                (computed once at append, InfiniPot-V Sec. 4.3).
            layout: source of each token, tensors [N, H_kv, S].
            layers: the decoder layers in N order (0 = closest to the input), consecutive.
            num_layers: number of decoder layers.
            keep: tokens per head that will be kept (the target C).

        Returns:
            [N, H_kv, S] float32 scores.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the policy and its settings, for logs and status."""
        fields = ", ".join(f"{k}={v}" for k, v in self.__dict__.items())
        return f"{self.name}({fields})"
