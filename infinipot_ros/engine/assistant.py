"""The streaming assistant: frames in, answers out, KV cache capped (no ROS).

``StreamingAssistant`` pairs each camera's frames into temporal patches,
vision-encodes a patch once, prefills its tokens onto the capped KV cache
with explicit M-RoPE positions (the cache compresses itself when it fills)
and answers questions from the cache, removing the question and answer
tokens again afterwards. Every public method holds one lock, so ``ingest``
and ``ask`` may be called from different threads.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..kv import NOTE_CAMERA, CappedKVCache, CompressionEvent, PartialCompressionError, VisionChunk
from ..models import ModelAdapter, load_adapter
from .config import LIVE_FIELDS, EngineConfig
from .gate import FrameGate, GateDecision
from .stats import (CameraStats, EngineState, EngineStats, FrameCounters, FrameRejectReason, NoteStats, RateMeter,
                    device_memory, process_rss_bytes)

log = logging.getLogger(__name__)

class AskErrorCode(str, enum.Enum):
    """Why a question got no answer: the CODE of the Ask service's / action's ``error`` ("CODE: detail")."""

    TIMEOUT = "TIMEOUT"  # no answer within the timeout (queueing included)
    BUSY = "BUSY"  # too many questions waiting, or shutting down
    NO_FRAMES = "NO_FRAMES"  # nothing cached matches the cameras / time window
    BAD_REQUEST = "BAD_REQUEST"  # empty or too long question, bad window, unknown camera, max_new_tokens too big
    MODEL_ERROR = "MODEL_ERROR"  # model not loaded (loading, failed, cleaned up) or failed while answering
    CANCELED = "CANCELED"  # the action goal was cancelled by its client


#: Error codes of :class:`AskError`, as strings.
ASK_ERROR_CODES = tuple(c.value for c in AskErrorCode)
MAX_QUESTION_CHARS = 4000  # cheap bound checked before tokenizing; the real limit is in tokens
MIN_FRAME_SIDE = 28


def check_request(question: object, *, max_new_tokens: int, since_ns: int, until_ns: int,
                  limit_new_tokens: int) -> str:
    """The checks of a question that need neither the model nor the cache; returns the stripped question.

    Args:
        question: the question (must be a non-empty str of at most :data:`MAX_QUESTION_CHARS`).
        max_new_tokens: requested answer cap, 0 = default; must be in [0, ``limit_new_tokens``].
        since_ns, until_ns: time window (ns), 0 = open end; both >= 0 and since <= until when both set.
        limit_new_tokens: the largest answer allowed (the config's ``max_new_tokens``).

    Raises:
        AskError: BAD_REQUEST naming the first problem found.
    """
    if not isinstance(question, str) or not question.strip():
        raise AskError(AskErrorCode.BAD_REQUEST, "question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise AskError(AskErrorCode.BAD_REQUEST, f"question is {len(question)} characters, more than "
                                                 f"{MAX_QUESTION_CHARS}")
    if "\x00" in question:
        raise AskError(AskErrorCode.BAD_REQUEST, "question contains a NUL character")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0 or max_new_tokens > limit_new_tokens:
        raise AskError(AskErrorCode.BAD_REQUEST, f"max_new_tokens must be in [0, {limit_new_tokens}], got {max_new_tokens!r} "
                                                 f"(ask.max_new_tokens; the KV reserve is sized for it)")
    if since_ns < 0 or until_ns < 0:
        raise AskError(AskErrorCode.BAD_REQUEST, f"negative time window since={since_ns} until={until_ns} (ns)")
    if since_ns and until_ns and since_ns > until_ns:
        raise AskError(AskErrorCode.BAD_REQUEST, f"since ({since_ns} ns) is after until ({until_ns} ns)")
    return question.strip()


def fault_reason(exc: BaseException) -> FrameRejectReason:
    """The rejection reason of a frame whose ingestion raised ``exc``: OUT_OF_MEMORY or MODEL_ERROR."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return FrameRejectReason.OUT_OF_MEMORY
    return FrameRejectReason.MODEL_ERROR


def free_device_memory(device: torch.device) -> None:
    """Return cached, unused CUDA blocks to the driver after an out-of-memory error (no-op elsewhere)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class AskError(Exception):
    """A question that could not be answered; ``code`` is one of :data:`ASK_ERROR_CODES`."""

    def __init__(self, code: "AskErrorCode | str", message: str) -> None:
        try:
            code = AskErrorCode(code)
        except ValueError:
            raise ValueError(f"unknown ask error code {code!r}") from None
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class FrameError(ValueError):
    """A frame the engine cannot use (wrong shape, dtype, size); it is dropped and counted.

    Attributes:
        reason: a :class:`~.stats.FrameRejectReason` (INVALID_FRAME, FRAME_TOO_SMALL or ASPECT_RATIO).
    """

    def __init__(self, message: str, reason: FrameRejectReason = FrameRejectReason.INVALID_FRAME) -> None:
        super().__init__(message)
        self.reason = FrameRejectReason(reason)


_LOG_THROTTLE_S = 5.0
_last_logged: dict = {}


def _warn_throttled(key: tuple, message: str, *args, level: int = logging.WARNING) -> None:
    """log.log(level, message, *args) at most once per _LOG_THROTTLE_S per key (a camera and a reason)."""
    now = time.monotonic()
    if now - _last_logged.get(key, -1e9) >= _LOG_THROTTLE_S:
        _last_logged[key] = now
        log.log(level, message, *args)


class IngestStatus(str, enum.Enum):
    """What :meth:`StreamingAssistant.ingest` did with a frame."""

    BUFFERED = "buffered"  # first frame of a temporal patch, waiting for its pair
    INGESTED = "ingested"  # its patch was prefilled into the KV cache
    REJECTED = "rejected"  # malformed, or failed to encode/prefill (see error); cache unchanged
    DROPPED = "dropped"  # taken before the stream restarted (older timeline); cache unchanged


@dataclass(frozen=True)
class IngestResult:
    """What happened to one frame (see :class:`IngestStatus`)."""

    camera: str
    stamp_ns: int
    status: IngestStatus
    ms: float = 0.0  # wall time spent on this frame (encode + prefill + compression), ms
    encode_ms: float = 0.0  # vision encoding of the patch (ms)
    prefill_ms: float = 0.0  # language-model prefill of its tokens, compression excluded (ms)
    compression_ms: float = 0.0  # KV compression this patch triggered, 0 if none (ms)
    chunk_tokens: int = 0  # vision tokens the patch added
    compression: Optional[CompressionEvent] = None
    error: str = ""


@dataclass(frozen=True)
class AskResult:
    """An answer and what it was computed from."""

    question: str
    answer: str
    generated_tokens: int
    context_tokens: int  # cached tokens visible to the answer (per layer and head)
    frames_in_context: int
    oldest_stamp_ns: int
    newest_stamp_ns: int
    latency_s: float  # wall time inside the engine (prefill of the question + decoding)
    stopped_by: str
    ttft_s: float = 0.0  # time to first token: question prefill + first decoded token (s)
    decode_tok_s: float = 0.0  # decoded tokens per second after the first (0 if fewer than 2)


def validate_frame(frame: np.ndarray) -> np.ndarray:
    """Check that ``frame`` is RGB uint8 [H, W, 3] of a usable size; returns it contiguous.

    Raises:
        FrameError: anything else (``reason``: INVALID_FRAME, FRAME_TOO_SMALL, ASPECT_RATIO).
    """
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise FrameError(f"frame must be RGB [H, W, 3], got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame must be uint8, got {frame.dtype}")
    h, w = frame.shape[:2]
    if h < MIN_FRAME_SIDE or w < MIN_FRAME_SIDE:
        raise FrameError(f"frame of {w}x{h} px is smaller than {MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}",
                         FrameRejectReason.FRAME_TOO_SMALL)
    if max(h, w) / min(h, w) > 200:
        raise FrameError(f"frame aspect ratio {w}x{h} exceeds 200:1", FrameRejectReason.ASPECT_RATIO)
    return np.ascontiguousarray(frame)


class StreamingAssistant:
    """Streams frames into a multimodal LLM under a hard KV cap and answers questions.

    Args:
        config: engine settings.
        adapter: an already loaded model adapter (tests share one); default:
            loaded from ``config``.
    """

    def __init__(self, config: EngineConfig, adapter: Optional[ModelAdapter] = None) -> None:
        self.config = config
        self.adapter = adapter if adapter is not None else load_adapter(
            config.model, device=config.device, dtype=config.dtype, **config.adapter_kwargs()
        )
        self.policy = config.make_policy()
        self._lock = threading.RLock()
        self._ingest_rate = RateMeter()
        self._last_chunk_ms = 0.0
        self._cameras: dict[str, int] = {}
        self._camera_counters: dict[str, FrameCounters] = {}
        self._camera_newest: dict[str, int] = {}
        self._camera_handled: dict[str, float] = {}  # monotonic time of the last frame handled (buffered/ingested)
        self._pending: dict[str, tuple[np.ndarray, int]] = {}
        self._origin_ns: Optional[int] = None
        self.gate = FrameGate(config.frame_rate_hz, config.time_jump_s, config.time_jump_frames)
        self.epoch = 0  # bumped by every reset: frames admitted before it are dropped
        self.time_jumps = 0
        self.memory_source = "empty"
        self.last_saved_unix_s = 0.0
        self._notes = NoteStats()
        self.cache: CappedKVCache = self._new_cache()

    @property
    def reserve_tokens(self) -> int:
        """KV slots per layer and head beyond prefix + M: the configured value, or (0 = auto) the larger of
        the biggest chunk and the longest question + answer (a chunk and an answer never coexist)."""
        if self.config.reserve_tokens > 0:
            return self.config.reserve_tokens
        return max(self.adapter.max_chunk_tokens(), self._max_scratch_tokens)

    @property
    def _max_scratch_tokens(self) -> int:
        """Longest question + answer, in tokens: template + max_question_tokens + max_new_tokens."""
        return len(self.adapter.question_ids("")) + self.config.max_question_tokens + self.config.max_new_tokens

    def _new_cache(self) -> CappedKVCache:
        cache = self.adapter.new_cache(
            budget=self.config.make_budget(), policy=self.policy, reserve_tokens=self.reserve_tokens,
            layers_per_pass=self.config.layers_per_pass,
        )
        self.adapter.prefill_prefix(cache)
        return cache

    @property
    def policy_name(self) -> str:
        return self.policy.name if self.policy is not None else "none"

    def reset(self) -> None:
        """Forget the stream: empty cache (prefix re-written), pending frames, stream clock and gate.

        Frames admitted before the reset (``epoch`` older) are dropped if they still arrive.
        """
        with self._lock:
            self.cache = self._new_cache()
            self._pending.clear()
            self._origin_ns = None
            self.gate.reset()
            self.epoch += 1
            self.memory_source = "empty"

    def restart_stream(self, reason: str) -> None:
        """A restart of the stream's timeline (sustained stamp jump back, /clock back): reset and count it."""
        with self._lock:
            log.warning("restarting the stream (memory forgotten): %s", reason)
            self.reset()
            self.time_jumps += 1

    @property
    def counters(self) -> FrameCounters:
        """Frame counters summed over the cameras (a copy)."""
        with self._lock:
            total = FrameCounters()
            for c in self._camera_counters.values():
                total += c
            return total

    def count_frames(self, camera: str, *, rejected: int = 0, reason: str = "", **deltas: int) -> None:
        """Add to ``camera``'s frame counters under the engine lock.

        ``deltas``: received, sampled, ingested, dropped, stamp_dropped;
        ``rejected`` frames are counted under ``reason`` (a caller's reason
        name, e.g. ``conversions.REJECT_REASONS``, or a FrameRejectReason).

        Raises:
            ValueError: ``rejected`` without a reason, or an unknown counter.
        """
        with self._lock:
            counters = self._camera(camera)
            if rejected:
                counters.reject(reason, rejected)
            counters.add(**deltas)

    def _camera(self, camera: str) -> FrameCounters:
        c = self._camera_counters.get(camera)
        if c is None:
            c = self._camera_counters[camera] = FrameCounters()
        return c

    def admit(self, camera: str, stamp_ns: int, now_ns: Optional[int] = None) -> GateDecision:
        """Count a received frame of ``camera`` and pass its header stamp (ns) through the frame gate.

        ACCEPT and RESTART mean: convert the frame and :meth:`ingest` it (with
        ``epoch=self.epoch``); on RESTART the stream was already restarted
        (memory forgotten, ``time_jumps`` counted). JUMP_DROPPED is counted
        as ``stamp_dropped``; SKIP is not sampled; STALE, FUTURE and INVALID
        are counted as rejected (``stale_stamp``, ``future_stamp``,
        ``bad_stamp``). ``now_ns``: the caller's clock for the gate's future
        check (the node's ROS time); None skips it.
        """
        with self._lock:
            counters = self._camera(camera)
            counters.received += 1
            decision = self.gate.offer(camera, stamp_ns, now_ns)
            refused = {GateDecision.STALE: FrameRejectReason.STALE_STAMP,
                       GateDecision.FUTURE: FrameRejectReason.FUTURE_STAMP,
                       GateDecision.INVALID: FrameRejectReason.BAD_STAMP}.get(decision)
            if refused is not None:
                counters.reject(refused)
                return decision
            self._camera_newest[camera] = max(stamp_ns, self._camera_newest.get(camera, 0))
            if decision is GateDecision.RESTART:
                last = self.cache.table.stamp_range()[1]
                self.restart_stream(f"{camera}: {self.config.time_jump_frames} consecutive header stamps "
                                    f"jumped back more than {self.config.time_jump_s:g} s (newest cached "
                                    f"{last / 1e9:.3f} s, now {stamp_ns / 1e9:.3f} s)")
                self.gate.offer(camera, stamp_ns)  # the gate was reset with the engine: this frame starts it
                newest = self._camera_newest
                newest.clear()
                newest[camera] = stamp_ns
            if decision is GateDecision.JUMP_DROPPED:
                counters.stamp_dropped += 1
            elif decision in (GateDecision.ACCEPT, GateDecision.RESTART):
                counters.sampled += 1
            return decision

    # ----------------------------------------------------------------- memory
    def save_memory(self, path: str):
        """Write the memory (KV cache, chunk table, stream clock) to ``path``; see :mod:`.snapshot`.

        Returns:
            SnapshotInfo (absolute path, frames, vision tokens, save time).
        Raises:
            SnapshotError: the file cannot be written (an existing file is then left as it was).
        """
        from .snapshot import save_snapshot

        info = save_snapshot(self, path)
        self.last_saved_unix_s = info.saved_unix_s
        return info

    def load_memory(self, path: str):
        """Replace the memory by the snapshot at ``path``; see :mod:`.snapshot`.

        Raises:
            SnapshotError: missing, truncated or corrupt file, another format version,
                model, dtype or configuration; the memory is then left as it was.
        """
        from .snapshot import load_snapshot

        with self._lock:
            info = load_snapshot(self, path)
            self.epoch += 1  # frames admitted before the load belong to the old memory's timeline
            self.gate.reset()
            cam_col, end_col = self.cache.table.column("camera"), self.cache.table.column("end_stamp")
            for name, idx in self._cameras.items():  # frames older than the memory are stale or a time jump
                mine = end_col[cam_col == idx]
                if mine.numel():
                    self.gate.seed(name, int(mine.max()))
            self.memory_source = f"snapshot {info.path} ({info.frames} frames)"
            return info

    def update_settings(self, **changes) -> None:
        """Change live settings (:data:`~.config.LIVE_FIELDS`) while running.

        Raises:
            ValueError: a field that is not live, a value the config refuses, or a
                question + answer length the KV reserve (allocated at start) cannot hold.
        """
        fixed = sorted(set(changes) - set(LIVE_FIELDS))
        if fixed:
            raise ValueError(f"{fixed} cannot change while running (live: {list(LIVE_FIELDS)})")
        with self._lock:
            new = dataclasses.replace(self.config, **changes)
            scratch = len(self.adapter.question_ids("")) + new.max_question_tokens + new.max_new_tokens
            if scratch > max(self.cache.reserve_tokens, self._max_scratch_tokens):
                raise ValueError(
                    f"max_question_tokens + max_new_tokens (+ template) = {scratch} tokens do not fit the KV reserve of "
                    f"{self.cache.reserve_tokens} tokens sized at start; restart (reconfigure) to raise them")
            self.config = new
            if "frame_rate_hz" in changes:
                self.gate.set_rate(new.frame_rate_hz)

    # ----------------------------------------------------------------- ingest
    def camera_index(self, camera: str) -> int:
        with self._lock:
            if camera not in self._cameras:
                self._cameras[camera] = len(self._cameras)
            return self._cameras[camera]

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def ingest(self, camera: str, frame: np.ndarray, stamp_ns: int, epoch: Optional[int] = None) -> IngestResult:
        """Take one sampled frame of ``camera`` stamped ``stamp_ns`` (header stamp, ns).

        Frames are paired per camera into temporal patches; the second frame
        of a pair triggers vision encoding and prefill (and a compression when
        the cache reaches M). A bad frame, or a model error, leaves the cache
        exactly as it was and is counted as rejected. ``epoch``: the
        :attr:`epoch` the frame was admitted in; a frame from before a reset is
        dropped (counted).
        """
        with self._lock:
            t0 = time.perf_counter()
            counters = self._camera(camera)
            if epoch is not None and epoch != self.epoch:
                counters.dropped += 1
                return IngestResult(camera, stamp_ns, IngestStatus.DROPPED, error="admitted before the stream restarted")
            try:
                frame = validate_frame(frame)
            except FrameError as exc:
                counters.reject(exc.reason)
                _warn_throttled((camera, exc.reason), "%s: frame rejected (%s): %s", camera, exc.reason.value, exc)
                return IngestResult(camera, stamp_ns, IngestStatus.REJECTED, error=str(exc))
            self._camera_handled[camera] = time.monotonic()
            pending = self._pending.pop(camera, None)
            if pending is not None and pending[0].shape != frame.shape:
                _warn_throttled((camera, FrameRejectReason.RESOLUTION_CHANGED),
                                "camera %s changed resolution %s -> %s; dropping the unpaired frame (%s)",
                                camera, pending[0].shape, frame.shape, FrameRejectReason.RESOLUTION_CHANGED.value)
                counters.reject(FrameRejectReason.RESOLUTION_CHANGED)
                pending = None
            frames_per_patch = self.adapter.frames_per_patch
            group = ([pending] if pending is not None else []) + [(frame, stamp_ns)]
            if frames_per_patch > 1 and len(group) < frames_per_patch:
                self._pending[camera] = (frame, stamp_ns)
                return IngestResult(camera, stamp_ns, IngestStatus.BUFFERED, ms=(time.perf_counter() - t0) * 1e3)
            return self._ingest_patch(camera, group, t0)

    def offer(self, camera: str, frame: np.ndarray, stamp_ns: int) -> Optional[IngestResult]:
        """Gate then ingest a decoded frame (the CLI and the bench; the node converts between the two steps).

        Returns:
            The :class:`IngestResult`, or None when the gate did not sample the frame.
        """
        decision = self.admit(camera, stamp_ns)
        if decision not in (GateDecision.ACCEPT, GateDecision.RESTART):
            return None
        return self.ingest(camera, frame, stamp_ns)

    def seconds_since_handled(self, camera: str, now: Optional[float] = None) -> float:
        """Wall time (s) since ``camera``'s last frame was buffered or ingested; inf if never."""
        last = self._camera_handled.get(camera)
        return float("inf") if last is None else (time.monotonic() if now is None else now) - last

    def _stream_seconds(self, stamp_ns: int) -> float:
        """Seconds of ``stamp_ns`` on the stream clock (since its origin, the first chunk's stamp; >= 0)."""
        if self._origin_ns is None:
            self._origin_ns = stamp_ns
        return max(0.0, (stamp_ns - self._origin_ns) / 1e9)

    def _rebase_for(self, stamp_ns: int) -> float:
        """Re-base positions if a chunk at ``stamp_ns`` would pass the threshold; its stream seconds after that."""
        seconds = self._stream_seconds(stamp_ns)
        if self.config.rebase_position_threshold:  # unbounded uptime: keep temporal positions under the threshold
            shift_ns = self.adapter.rebase_positions(self.cache, seconds, self.config.rebase_position_threshold)
            if shift_ns:  # the cache moved down: the stream clock moves with it
                self._origin_ns += shift_ns
                seconds = self._stream_seconds(stamp_ns)
                log.info("re-based stream positions by %d (re-base %d)", self.cache.last_rebase.delta,
                         self.cache.rebases)
        return seconds

    def _ingest_patch(self, camera: str, group: Sequence[tuple[np.ndarray, int]], t0: float) -> IngestResult:
        first_stamp, last_stamp = group[0][1], group[-1][1]
        cache = self.cache
        compressions_before = cache.compressions
        cuda = self.adapter.device.type == "cuda"
        try:
            seconds = self._rebase_for(first_stamp)
            patch = self.adapter.encode_patch([f for f, _ in group])
            if cuda:  # split encode from prefill honestly: wait for the vision tower
                torch.cuda.synchronize(self.adapter.device)
            t_enc = time.perf_counter()
            chunk = VisionChunk(
                patch.grid_h, patch.grid_w, camera=self.camera_index(camera),
                stamp_ns=first_stamp, end_stamp_ns=last_stamp, num_frames=len(group),
            )
            self.adapter.prefill_patch(self.cache, patch, chunk, seconds=seconds)
        except Exception as exc:  # model/processor/policy failure or out of memory: the cache is rolled back
            reason = fault_reason(exc)
            if reason is FrameRejectReason.OUT_OF_MEMORY:
                free_device_memory(self.adapter.device)
            undone = ""
            if isinstance(exc, PartialCompressionError):  # layers disagree: the memory cannot be trusted
                self.reset()
                undone = "; the compression failed between layer passes: memory forgotten (stream restarted)"
            self._camera(camera).reject(reason, len(group))
            _warn_throttled((camera, reason), "ingest of %s @ %d failed (%s): %s%s", camera, first_stamp,
                            reason.value, exc, undone, level=logging.ERROR)
            return IngestResult(camera, last_stamp, IngestStatus.REJECTED, ms=(time.perf_counter() - t0) * 1e3,
                                error=f"{reason.value}: {type(exc).__name__}: {exc}")
        if cuda:
            torch.cuda.synchronize(self.adapter.device)
        t_end = time.perf_counter()
        ms = (t_end - t0) * 1e3
        self._camera(camera).ingested += len(group)
        for _ in group:
            self._ingest_rate.tick()
        self._last_chunk_ms = ms
        event = self.cache.last_compression if self.cache.compressions > compressions_before else None
        comp_ms = event.ms if event is not None else 0.0
        return IngestResult(
            camera, last_stamp, IngestStatus.INGESTED, ms=ms, encode_ms=(t_enc - t0) * 1e3,
            prefill_ms=max(0.0, (t_end - t_enc) * 1e3 - comp_ms), compression_ms=comp_ms,
            chunk_tokens=chunk.num_tokens, compression=event,
        )

    # ------------------------------------------------------------------ notes
    def add_note(self, text: str, stamp_ns: int, source: str = "notes") -> IngestResult:
        """Append a text event (operator note, transcript, detector label) to the stream.

        The note's tokens (:meth:`ModelAdapter.note_ids`: "Note at S s: TEXT" in the
        model's template) become one chunk of the stream, stamped ``stamp_ns``
        (ROS time, ns): compressed under the same cap M as the frames (a note
        has no spatial grid: TaR never finds it redundant, VaN scores its value
        norms pooled along its own tokens only; see :mod:`infinipot_ros.kv.layout`),
        visible to questions whose since/until window holds its stamp whatever
        their camera filter, and counted in :class:`NoteStats`.

        Returns:
            INGESTED (``chunk_tokens``: its tokens) or REJECTED with the reason
            (empty, a NUL character, a negative stamp, more than ``max_note_tokens``
            tokens, or a model error); a rejected note leaves the cache exactly as it was.
        """
        with self._lock:
            t0 = time.perf_counter()
            self._notes.received += 1

            def rejected(why: str) -> IngestResult:
                self._notes.rejected += 1
                return IngestResult(source, stamp_ns, IngestStatus.REJECTED, ms=(time.perf_counter() - t0) * 1e3,
                                    error=why)

            if not isinstance(text, str) or not text.strip():
                return rejected("empty note")
            if "\x00" in text:
                return rejected("note contains a NUL character")
            if not isinstance(stamp_ns, int) or stamp_ns < 0:
                return rejected(f"bad note stamp {stamp_ns!r}")
            text = " ".join(text.split())  # one line: newlines would read as template structure
            first = self._origin_ns is None
            ids = self.adapter.note_ids(text, self._stream_seconds(stamp_ns))
            if len(ids) > self.config.max_note_tokens:
                if first:
                    self._origin_ns = None
                return rejected(f"note is {len(ids)} tokens, more than max_note_tokens={self.config.max_note_tokens}")
            compressions_before = self.cache.compressions
            try:
                seconds = self._rebase_for(stamp_ns)
                chunk = VisionChunk(1, len(ids), camera=NOTE_CAMERA, stamp_ns=stamp_ns, end_stamp_ns=stamp_ns,
                                    num_frames=0)
                self.adapter.prefill_note(self.cache, ids, chunk, seconds=seconds)
            except Exception as exc:  # model failure: the cache rolls the note back (its transaction, vision_chunk)
                log.error("note @ %d failed: %s", stamp_ns, exc)
                if isinstance(exc, PartialCompressionError):  # layers disagree: the memory cannot be trusted
                    self.reset()
                if first:
                    self._origin_ns = None
                return rejected(f"{type(exc).__name__}: {exc}")
            self._notes.ingested += 1
            event = self.cache.last_compression if self.cache.compressions > compressions_before else None
            return IngestResult(source, stamp_ns, IngestStatus.INGESTED, ms=(time.perf_counter() - t0) * 1e3,
                                compression_ms=event.ms if event is not None else 0.0, chunk_tokens=len(ids),
                                compression=event)

    def count_note_rejected(self, why: str) -> None:
        """Count a note received and rejected before it reached :meth:`add_note` (e.g. a full queue)."""
        with self._lock:
            self._notes.received += 1
            self._notes.rejected += 1
            log.warning("note rejected: %s", why)

    def note_stats(self) -> NoteStats:
        """Note counters and the notes the cache holds now (a copy)."""
        with self._lock:
            table = self.cache.table
            mine = table.column("camera") == NOTE_CAMERA
            return dataclasses.replace(self._notes, in_cache=int(mine.sum()),
                                       tokens_in_cache=int(table.column("row0_tokens")[mine].sum()))

    # -------------------------------------------------------------------- ask
    def ask(
        self,
        question: str,
        *,
        cameras: Optional[Sequence[str]] = None,
        since_ns: int = 0,
        until_ns: int = 0,
        max_new_tokens: int = 0,
        on_token: Optional[Callable[[str, int], Optional[bool]]] = None,
    ) -> AskResult:
        """Answer ``question`` from the cache as it is now.

        Args:
            cameras: only tokens of these cameras are visible; None/empty = all.
            since_ns, until_ns: only frames stamped inside [since, until]
                (header stamps, ns) are visible; 0 = open end.
            max_new_tokens: answer cap; 0 = the config's ``max_new_tokens``, which is also the largest allowed.
            on_token: called after every decoded token with (new text piece, possibly
                "" inside a UTF-8 character; tokens so far); returning False stops the
                answer there (``stopped_by == "cancelled"``). The cache is left exactly
                as before the question either way.

        Raises:
            AskError: BAD_REQUEST, NO_FRAMES or MODEL_ERROR.
        """
        check_request(question, max_new_tokens=max_new_tokens, since_ns=since_ns, until_ns=until_ns,
                      limit_new_tokens=self.config.max_new_tokens)
        n_question = len(self.adapter.question_ids(question.strip())) - len(self.adapter.question_ids(""))
        if n_question > self.config.max_question_tokens:
            raise AskError("BAD_REQUEST", f"question is {n_question} tokens, more than max_question_tokens="
                                          f"{self.config.max_question_tokens}")
        with self._lock:
            t0 = time.perf_counter()
            cam_idx = None
            if cameras:
                unknown = [c for c in cameras if c not in self._cameras]
                if unknown:
                    raise AskError("BAD_REQUEST", f"unknown camera(s) {unknown}; known: {sorted(self._cameras)}")
                cam_idx = [self._cameras[c] for c in cameras]
            table = self.cache.table
            selected = table.select(cam_idx, since_ns, until_ns)
            if not selected.any():
                what = "no frames ingested yet" if not len(self.cache.table) else "no cached frame matches the cameras/time window"
                raise AskError("NO_FRAMES", what)
            oldest, newest = table.stamp_range(selected)
            visible = self.cache.visibility(cam_idx, since_ns, until_ns)
            try:
                answer = self.adapter.generate(
                    self.cache, question.strip(),
                    max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                    visible=visible, on_token=on_token, temperature=self.config.temperature,
                )
            except Exception as exc:  # the scratch block removed the question and the partial answer
                if fault_reason(exc) is FrameRejectReason.OUT_OF_MEMORY:
                    free_device_memory(self.adapter.device)
                    log.error("answering ran out of memory: %s", exc)
                    raise AskError("MODEL_ERROR", f"out of memory while answering: {exc}") from exc
                log.exception("answering failed")
                raise AskError("MODEL_ERROR", f"{type(exc).__name__}: {exc}") from exc
            return AskResult(
                question=question,
                answer=answer.text,
                generated_tokens=len(answer.token_ids),
                context_tokens=answer.context_tokens,
                frames_in_context=table.frames(selected),
                oldest_stamp_ns=oldest,
                newest_stamp_ns=newest,
                latency_s=time.perf_counter() - t0,
                stopped_by=answer.stopped_by,
                ttft_s=answer.ttft_s,
                decode_tok_s=answer.decode_tok_s,
            )

    # ------------------------------------------------------------------ stats
    def camera_stats(self, cameras: Sequence[str] = ()) -> list[CameraStats]:
        """Per-camera counters, newest stamp and cache share: ``cameras`` first (in that order), then any other."""
        with self._lock:
            table = self.cache.table
            cam_col, row0 = table.column("camera"), table.column("row0_tokens")
            frames_col = table.column("num_frames")
            now = time.monotonic()
            names = list(dict.fromkeys([*cameras, *self._camera_counters]))
            out = []
            for name in names:
                idx = self._cameras.get(name)
                mine = cam_col == idx if idx is not None else torch.zeros_like(cam_col, dtype=torch.bool)
                since = self.seconds_since_handled(name, now)
                out.append(CameraStats(
                    camera=name,
                    frames=(self._camera_counters.get(name) or FrameCounters()).copy(),
                    newest_stamp_ns=self._camera_newest.get(name, 0),
                    tokens_in_cache=int(row0[mine].sum()),
                    frames_in_cache=int(frames_col[mine].sum()),
                    seconds_since_ingest=since if since != float("inf") else -1.0,
                ))
            return out

    def stats(self, state: EngineState = EngineState.READY, error: str = "",
              cameras: Sequence[str] = ()) -> EngineStats:
        """One snapshot for status and diagnostics; ``cameras``: the subscribed ones, listed first."""
        with self._lock:
            used, total = device_memory(self.adapter.device)
            return EngineStats(
                state=state,
                model_id=self.adapter.model_id,
                device=str(self.adapter.device),
                policy=self.policy_name,
                cache=self.cache.stats(),
                frames=self.counters,
                cameras=self.camera_stats(cameras),
                time_jumps=self.time_jumps,
                memory_source=self.memory_source,
                last_saved_unix_s=self.last_saved_unix_s,
                notes=self.note_stats(),
                ingest_fps=self._ingest_rate.rate(),
                last_chunk_ms=self._last_chunk_ms,
                rss_bytes=process_rss_bytes(),
                device_memory_used=used,
                device_memory_total=total,
                error=error,
            )
