"""Counters and memory probes reported on the status topic and by the CLI."""
from __future__ import annotations

import collections
import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

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


class FrameRejectReason(str, enum.Enum):
    """Why the engine refused a frame: the engine's keys of :attr:`FrameCounters.rejected_by_reason`.

    Callers add their own reasons for frames refused before they reach the
    engine (the ROS node: ``infinipot_ros.ros.conversions.REJECT_REASONS``);
    none of those names is one of these.
    """

    INVALID_FRAME = "invalid_frame"  # not an RGB uint8 [H, W, 3] numpy array (float/NaN data, mono, ...)
    FRAME_TOO_SMALL = "frame_too_small"  # a side below MIN_FRAME_SIDE (28 px)
    ASPECT_RATIO = "aspect_ratio"  # longer side more than 200 times the shorter (the processor's limit)
    RESOLUTION_CHANGED = "resolution_changed"  # first frame of a pair dropped: the second has another size
    MODEL_ERROR = "model_error"  # vision encode, prefill or compression raised; the cache was rolled back
    OUT_OF_MEMORY = "out_of_memory"  # the device (or host) ran out of memory while ingesting; cache rolled back
    STALE_STAMP = "stale_stamp"  # header stamp at or before the camera's last accepted one (duplicate, reordered)
    FUTURE_STAMP = "future_stamp"  # header stamp more than the gate's max_future_s ahead of the caller's clock
    BAD_STAMP = "bad_stamp"  # negative header stamp


#: Values of :class:`FrameRejectReason`, as strings.
ENGINE_REJECT_REASONS = tuple(r.value for r in FrameRejectReason)

_COUNTS = ("received", "sampled", "ingested", "dropped", "rejected", "stamp_dropped")


@dataclass
class FrameCounters:
    """Frame counts since start (one camera, or all cameras summed).

    ``rejected`` is the total of ``rejected_by_reason`` (reason name -> frames):
    count rejections with :meth:`reject`, never by adding to ``rejected`` alone.
    """

    received: int = 0  # messages/frames offered to the engine or node
    sampled: int = 0  # accepted by the frame gate (frame_rate_hz sampler)
    ingested: int = 0  # prefilled into the KV cache (as part of a temporal patch)
    dropped: int = 0  # sampled, then replaced by a newer frame before the worker took it
    rejected: int = 0  # refused: malformed/unsupported, bad stamp, failed to encode/prefill (sum of the reasons)
    stamp_dropped: int = 0  # header stamp jumped back (one glitch): dropped, memory kept
    rejected_by_reason: Dict[str, int] = field(default_factory=dict)  # reason -> frames; sums to ``rejected``

    def add(self, **deltas: int) -> None:
        """Add to counters by name, e.g. ``add(received=1, sampled=1)``.

        Raises:
            ValueError: ``rejected`` (use :meth:`reject`, which needs a reason) or an unknown name.
        """
        for name, delta in deltas.items():
            if name not in _COUNTS or name == "rejected":
                raise ValueError(f"cannot add to {name!r}" + (" (use reject(reason))" if name == "rejected" else ""))
            setattr(self, name, getattr(self, name) + delta)

    def reject(self, reason: str, n: int = 1) -> None:
        """Count ``n`` frames rejected for ``reason`` (a :class:`FrameRejectReason` or a caller's reason name).

        Raises:
            ValueError: an empty reason.
        """
        reason = reason.value if isinstance(reason, FrameRejectReason) else str(reason)
        if not reason:
            raise ValueError("a rejection needs a reason")
        self.rejected += n
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + n

    def copy(self) -> "FrameCounters":
        """An independent copy (the reason dict included)."""
        return dataclasses.replace(self, rejected_by_reason=dict(self.rejected_by_reason))

    def to_dict(self) -> dict:
        """Plain ints and ``rejected_by_reason`` as a dict (JSON-ready)."""
        out = {name: int(getattr(self, name)) for name in _COUNTS}
        out["rejected_by_reason"] = {k: int(v) for k, v in self.rejected_by_reason.items()}
        return out

    def __iadd__(self, other: "FrameCounters") -> "FrameCounters":
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.rejected_by_reason.items():
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + n
        return self


@dataclass
class NoteStats:
    """Text events (notes) since start, and what of them the cache holds now."""

    received: int = 0  # offered to the engine (notes topic, --note-at)
    ingested: int = 0  # prefilled into the KV cache
    rejected: int = 0  # empty, too long, or failed to prefill
    in_cache: int = 0  # notes with at least one token left in the cache
    tokens_in_cache: int = 0  # note tokens held by layer 0 / KV head 0


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
    notes: NoteStats = field(default_factory=NoteStats)
