"""Engine statistics -> CacheStatus and DiagnosticArray messages."""
from __future__ import annotations

from typing import Optional

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from ..engine import EngineState, EngineStats
from ..engine.stats import ENGINE_REJECT_REASONS
from ..msg import CacheStatus, CameraStatus
from .conversions import REJECT_REASONS
from .stamps import ns_to_time

_STATES = {
    EngineState.LOADING: CacheStatus.STATE_LOADING,
    EngineState.READY: CacheStatus.STATE_READY,
    EngineState.ERROR: CacheStatus.STATE_ERROR,
    EngineState.UNCONFIGURED: CacheStatus.STATE_UNCONFIGURED,
    EngineState.INACTIVE: CacheStatus.STATE_INACTIVE,
}
#: CacheStatus.state -> name, for tools and logs.
STATE_NAMES = {v: k.value for k, v in _STATES.items()}


def _u32(x: Optional[int]) -> int:
    return max(0, min(int(x or 0), 2**32 - 1))


#: Order of the rejection reasons in CacheStatus/CameraStatus ``rejected_reasons``: the conversion
#: reasons, then the engine's; any other name a caller counted comes after them, sorted.
REASON_ORDER = REJECT_REASONS + ENGINE_REJECT_REASONS
_RANK = {r: i for i, r in enumerate(REASON_ORDER)}


def rejected_arrays(by_reason: dict) -> tuple[list, list]:
    """(reasons, counts) of the reasons with a count > 0, in :data:`REASON_ORDER`."""
    names = sorted((r for r, n in by_reason.items() if n > 0), key=lambda r: (_RANK.get(r, len(_RANK)), r))
    return names, [int(by_reason[r]) for r in names]


def to_cache_status(stats: EngineStats, stamp: Time, frame_id: str = "") -> CacheStatus:
    """Fill a CacheStatus from an engine snapshot (cache fields are 0 while loading)."""
    msg = CacheStatus()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.state = _STATES.get(stats.state, CacheStatus.STATE_ERROR)
    msg.model_id = stats.model_id
    msg.device = stats.device
    msg.policy = stats.policy
    msg.error_message = stats.error
    c = stats.cache
    if c is not None:
        msg.kv_bytes_used = c.kv_bytes
        msg.kv_bytes_budget = c.kv_bytes_budget
        msg.kv_bytes_reserved = c.kv_bytes_reserved
        msg.tokens_in_cache = _u32(c.tokens)
        msg.tokens_budget = _u32(c.prefix_tokens + c.max_vision_tokens if c.max_vision_tokens else 0)
        msg.prefix_tokens = _u32(c.prefix_tokens)
        msg.vision_tokens = _u32(c.vision_tokens)
        msg.vision_tokens_budget = _u32(c.max_vision_tokens)
        msg.compressions_total = _u32(c.compressions)
        msg.tokens_evicted_total = c.tokens_evicted
        msg.rebases_total = _u32(c.rebases)
        msg.frames_in_cache = _u32(c.frames_in_cache)
        msg.oldest_frame_stamp = ns_to_time(c.oldest_stamp_ns)
        msg.newest_frame_stamp = ns_to_time(c.newest_stamp_ns)
        msg.last_compression_ms = float(c.last_compression_ms)
    f = stats.frames
    msg.frames_received = f.received
    msg.frames_sampled = f.sampled
    msg.frames_ingested = f.ingested
    msg.frames_dropped = f.dropped
    msg.frames_rejected = f.rejected
    msg.rejected_reasons, msg.rejected_counts = rejected_arrays(f.rejected_by_reason)
    msg.frames_stamp_dropped = f.stamp_dropped
    msg.time_jumps = _u32(stats.time_jumps)
    msg.memory_source = stats.memory_source
    n = stats.notes
    msg.notes_received, msg.notes_ingested, msg.notes_rejected = n.received, n.ingested, n.rejected
    msg.notes_in_cache, msg.note_tokens = _u32(n.in_cache), _u32(n.tokens_in_cache)
    msg.last_saved = ns_to_time(int(stats.last_saved_unix_s * 1e9))
    for cam in stats.cameras:
        c_msg = CameraStatus(camera_id=cam.camera, frames_received=cam.frames.received,
                             frames_sampled=cam.frames.sampled, frames_ingested=cam.frames.ingested,
                             frames_dropped=cam.frames.dropped, frames_rejected=cam.frames.rejected,
                             frames_stamp_dropped=cam.frames.stamp_dropped,
                             newest_frame_stamp=ns_to_time(cam.newest_stamp_ns),
                             tokens_in_cache=_u32(cam.tokens_in_cache), frames_in_cache=_u32(cam.frames_in_cache),
                             seconds_since_ingest=float(cam.seconds_since_ingest))
        c_msg.rejected_reasons, c_msg.rejected_counts = rejected_arrays(cam.frames.rejected_by_reason)
        msg.cameras.append(c_msg)
    msg.ingest_fps = float(stats.ingest_fps)
    msg.last_chunk_ms = float(stats.last_chunk_ms)
    msg.device_memory_used_bytes = stats.device_memory_used
    msg.device_memory_total_bytes = stats.device_memory_total
    msg.process_rss_bytes = stats.rss_bytes
    return msg


def to_diagnostics(stats: EngineStats, stamp: Time, node_name: str) -> DiagnosticArray:
    """One DiagnosticStatus: OK when ready and under budget, WARN while loading, ERROR on error."""
    st = DiagnosticStatus(name=f"{node_name}: KV cache", hardware_id=stats.device)
    if stats.state is EngineState.ERROR:
        st.level, st.message = DiagnosticStatus.ERROR, stats.error or "error"
    elif stats.state is EngineState.LOADING:
        st.level, st.message = DiagnosticStatus.WARN, "loading model"
    elif stats.state is EngineState.READY:
        st.level, st.message = DiagnosticStatus.OK, "ready"
    else:
        st.level, st.message = DiagnosticStatus.OK, stats.state.value
    c = stats.cache
    values = {
        "model": stats.model_id,
        "policy": stats.policy,
        "frames_received": stats.frames.received,
        "frames_ingested": stats.frames.ingested,
        "frames_dropped": stats.frames.dropped,
        "frames_rejected": stats.frames.rejected,
        "frames_stamp_dropped": stats.frames.stamp_dropped,
        "time_jumps": stats.time_jumps,
        "notes_ingested": stats.notes.ingested,
        "notes_rejected": stats.notes.rejected,
        "notes_in_cache": stats.notes.in_cache,
        "memory": stats.memory_source,
        "ingest_fps": f"{stats.ingest_fps:.2f}",
        "process_rss_MB": f"{stats.rss_bytes / 1e6:.1f}",
    }
    if c is not None:
        values.update({
            "kv_MB": f"{c.kv_bytes / 1e6:.3f}",
            "kv_budget_MB": f"{c.kv_bytes_budget / 1e6:.3f}",
            "vision_tokens": c.vision_tokens,
            "vision_tokens_budget": c.max_vision_tokens or 0,
            "compressions": c.compressions,
            "rebases": c.rebases,
            "last_compression_ms": f"{c.last_compression_ms:.2f}",
        })
        if c.max_vision_tokens and c.vision_tokens > c.max_vision_tokens and st.level == DiagnosticStatus.OK:
            st.level, st.message = DiagnosticStatus.WARN, "over budget"
    for reason, n in zip(*rejected_arrays(stats.frames.rejected_by_reason)):
        values[f"frames_rejected.{reason}"] = n
    st.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
    arr = DiagnosticArray()
    arr.header.stamp = stamp
    arr.status = [st]
    return arr
