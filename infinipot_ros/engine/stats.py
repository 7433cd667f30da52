"""Counters and memory probes reported on the status topic and by the CLI."""
from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, List, Optional

import psutil
import torch

from ..kv import CacheStats


def process_rss_bytes() -> int:
    """Resident set size of this process (bytes), from psutil."""
    return int(psutil.Process().memory_info().rss)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(allocated, total) bytes of a CUDA device; (0, 0) elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0, 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.memory_allocated(idx)), int(torch.cuda.get_device_properties(idx).total_memory)


class RateMeter:
    """Events per second over a sliding window of wall time (thread-safe)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._times: Deque[float] = collections.deque()
        self._lock = threading.Lock()

    def tick(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            span = max(now - self._times[0], 1e-9)
            return (len(self._times) - 1) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


@dataclass
class FrameCounters:
    """Frame counts since start (one camera, or all cameras summed)."""

    received: int = 0  # messages/frames offered to the engine or node
    sampled: int = 0  # accepted by the frame gate (frame_rate_hz sampler)
    ingested: int = 0  # prefilled into the KV cache (as part of a temporal patch)
    dropped: int = 0  # sampled, then replaced by a newer frame before the worker took it
    rejected: int = 0  # malformed/unsupported, or failed to encode/prefill
    stamp_dropped: int = 0  # header stamp jumped back (one glitch): dropped, memory kept

    def add(self, **deltas: int) -> None:
        """Add to counters by name, e.g. ``add(received=1, sampled=1)``."""
        for name, delta in deltas.items():
            setattr(self, name, getattr(self, name) + delta)

    def __iadd__(self, other: "FrameCounters") -> "FrameCounters":
        self.add(**vars(other))
        return self


class EngineState(str, enum.Enum):
    """State of the assistant as the status topic reports it (CacheStatus.STATE_*)."""

    UNCONFIGURED = "unconfigured"  # lifecycle: no model loaded
    LOADING = "loading"  # model (and memory snapshot) loading
    INACTIVE = "inactive"  # lifecycle: loaded, not ingesting; questions still answered
    READY = "ready"  # ingesting and answering
    ERROR = "error"  # model failed to load (see error)


@dataclass
class CameraStats:
    """One camera's part of :class:`EngineStats`."""

    camera: str
    frames: FrameCounters
    newest_stamp_ns: int = 0  # newest header stamp received (ns; 0 = none)
    tokens_in_cache: int = 0  # vision tokens held by layer 0 / KV head 0
    frames_in_cache: int = 0  # frames with vision tokens left in the cache
    seconds_since_ingest: float = -1.0  # wall time since the camera's last frame was handled (-1 = never)


@dataclass
class EngineStats:
    """One snapshot of the engine for the status topic, diagnostics and the CLI."""

    state: EngineState
    model_id: str
    device: str
    policy: str
    cache: Optional[CacheStats]
    frames: FrameCounters = field(default_factory=FrameCounters)
    ingest_fps: float = 0.0
    last_chunk_ms: float = 0.0
    rss_bytes: int = 0
    device_memory_used: int = 0
    device_memory_total: int = 0
    error: str = ""
    cameras: List[CameraStats] = field(default_factory=list)
    time_jumps: int = 0  # stream restarts (sustained stamp jump back, /clock jumping back)
    memory_source: str = "empty"  # "empty", "snapshot PATH (N frames)", "snapshot refused: ..."
    last_saved_unix_s: float = 0.0  # wall time of the last successful memory save (0 = never)
