"""KV cache with a hard cap and its compression policies (pure torch: no model, no ROS).

One class per scoring method; selection (top-k per head, order kept) lives
in :mod:`.selection` only. ``POLICIES`` maps the names used in parameters and
on the command line to the classes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .baselines import RecentPolicy, UniformPolicy
from .cache import (CacheBudget, CacheStateError, CacheStats, CappedKVCache, CompressionEvent,
                    PartialCompressionError, RebaseEvent)
from .infinipot_v import InfiniPotVPolicy
from .layout import NOTE_CAMERA, ChunkTable, VisionChunk, VisionLayout
from .policy import PolicySettings, ScoringPolicy
from .selection import gather_kept, gather_tokens, keep_topk
from .tar import TaRPolicy, tar_similarity
from .van import DEFAULT_POOL_KERNELS, PooledVaNPolicy, VaNPolicy, pool_on_grid, value_norms

#: Compression methods by name ("none" = full cache, no cap).
POLICIES: dict[str, type[ScoringPolicy]] = {
    cls.name: cls
    for cls in (InfiniPotVPolicy, TaRPolicy, VaNPolicy, PooledVaNPolicy, UniformPolicy, RecentPolicy)
}


def make_policy(name: str, settings: Optional[PolicySettings] = None, **overrides: Any) -> Optional[ScoringPolicy]:
    """Policy instance by name, built from typed settings; ``"none"`` gives None (uncapped cache).

    Args:
        settings: hyper-parameters (default: the paper's); each class takes the
            fields it names in ``settings_fields``.
        overrides: fields of :class:`PolicySettings` to change, e.g. ``tar_ratio=0.25``.

    Raises:
        ValueError: an unknown name.
        TypeError: an override that is not a PolicySettings field.
    """
    if name == "none":
        return None
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown compression policy {name!r}; choose one of {['none', *POLICIES]}") from None
    settings = dataclasses.replace(settings or PolicySettings(), **overrides)
    return cls.from_settings(settings)


__all__ = [
    "CacheBudget", "CacheStateError", "CacheStats", "CappedKVCache", "ChunkTable", "CompressionEvent",
    "PartialCompressionError", "RebaseEvent",
    "DEFAULT_POOL_KERNELS", "InfiniPotVPolicy", "POLICIES", "PolicySettings", "PooledVaNPolicy", "RecentPolicy",
    "ScoringPolicy", "TaRPolicy", "UniformPolicy", "VaNPolicy", "VisionChunk", "VisionLayout",
    "gather_kept", "gather_tokens", "keep_topk", "make_policy", "pool_on_grid", "tar_similarity", "value_norms",
]
