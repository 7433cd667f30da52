"""Base class of the compression policies: a policy only scores tokens.

Selection (top-k per head, original order kept) lives in
:mod:`infinipot_ros.kv.selection`; the cache calls ``score`` once per pass
over a batch of layers (all of them by default) and keeps the ``keep`` best
tokens of every layer and KV head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Tuple

import torch

from .layout import VisionLayout


Kernel = Tuple[int, int, int]  # (t, h, w) pooling window over frames x rows x columns


@dataclass(frozen=True)
class PolicySettings:
    """The hyper-parameters of every policy, typed, in one place (defaults: the paper's).

    Each policy class names the ones it uses in ``settings_fields``; the others
    do not apply to it.

    Attributes:
        tar_ratio: alpha, share of the target C chosen by TaR (InfiniPot-V Sec. 4.4: 0.5).
        recent_ratio: share of the cached frames TaR treats as recent (Sec. 4.2: 1/8).
        pool_kernels: VaN pooling kernel (t, h, w) per layer quarter, shallow to deep
            (Sec. 4.3, layer-adaptive pooling); None or () = raw value norms.
    """

    tar_ratio: float = 0.5
    recent_ratio: float = 0.125
    pool_kernels: Optional[Tuple[Kernel, ...]] = field(default=((3, 3, 3), (1, 3, 3), (1, 1, 3), (1, 1, 1)))


@dataclass
class ScoringPolicy:
    """Scores the vision tokens of one layer; higher = keep.

    Subclasses are small dataclasses (hyper-parameters as fields, checked in
    ``__post_init__``) that implement :meth:`score`. Tokens that must survive
    (e.g. the most recent frames) get ``+inf``.
    """

    name: ClassVar[str] = "base"
    #: The :class:`PolicySettings` this policy is built from (same-named fields).
    settings_fields: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> "ScoringPolicy":
        """The policy with the settings it uses taken from ``settings``."""
        kw = {name: getattr(settings, name) for name in cls.settings_fields}
        if "pool_kernels" in kw and not kw["pool_kernels"]:
            kw["pool_kernels"] = None
        return cls(**kw)

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
