"""The streaming assistant: frames in, answers out, KV cache capped (no ROS).

``StreamingAssistant`` pairs each camera's frames into temporal patches,
vision-encodes a patch once, prefills its tokens onto the capped KV cache
with explicit M-RoPE positions (the cache compresses itself when it fills)
and answers questions from the cache, removing the question and answer
tokens again afterwards. Every public method holds one lock, so ``ingest``
and ``ask`` may be called from different threads.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..kv import CappedKVCache, CompressionEvent, VisionChunk
from ..models import ModelAdapter, load_adapter
from .config import EngineConfig
from .stats import EngineStats, FrameCounters, RateMeter, device_memory, process_rss_bytes

log = logging.getLogger(__name__)

#: Error codes of :class:`AskError` (and of the Ask service's ``error`` field).
ASK_ERROR_CODES = ("TIMEOUT", "BUSY", "NO_FRAMES", "BAD_REQUEST", "MODEL_ERROR")
MAX_QUESTION_CHARS = 4000  # cheap bound checked before tokenizing; the real limit is in tokens
MIN_FRAME_SIDE = 28


class AskError(Exception):
    """A question that could not be answered; ``code`` is one of :data:`ASK_ERROR_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ASK_ERROR_CODES:
            raise ValueError(f"unknown ask error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class FrameError(ValueError):
    """A frame the engine cannot use (wrong shape, dtype, size); it is dropped and counted."""


@dataclass(frozen=True)
class IngestResult:
    """What happened to one frame.

    status: "buffered" (first frame of a temporal patch, waiting for its
    pair), "ingested" (its patch was prefilled), or "rejected" (see error).
    """

    camera: str
    stamp_ns: int
    status: str
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
        FrameError: anything else.
    """
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise FrameError(f"frame must be RGB [H, W, 3], got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame must be uint8, got {frame.dtype}")
    h, w = frame.shape[:2]
    if h < MIN_FRAME_SIDE or w < MIN_FRAME_SIDE:
        raise FrameError(f"frame of {w}x{h} px is smaller than {MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}")
    if max(h, w) / min(h, w) > 200:
        raise FrameError(f"frame aspect ratio {w}x{h} exceeds 200:1")
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
        self.counters = FrameCounters()
        self._lock = threading.RLock()
        self._ingest_rate = RateMeter()
        self._last_chunk_ms = 0.0
        self._cameras: dict[str, int] = {}
        self._pending: dict[str, tuple[np.ndarray, int]] = {}
        self._origin_ns: Optional[int] = None
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
        """Forget the stream: empty cache (prefix re-written), pending frames and stream clock."""
        with self._lock:
            self.cache = self._new_cache()
            self._pending.clear()
            self._origin_ns = None

    def count_frames(self, **deltas: int) -> None:
        """Add to the frame counters (received, sampled, dropped, ...) under the engine lock."""
        with self._lock:
            self.counters.add(**deltas)

    # ----------------------------------------------------------------- ingest
    def camera_index(self, camera: str) -> int:
        with self._lock:
            if camera not in self._cameras:
                self._cameras[camera] = len(self._cameras)
            return self._cameras[camera]

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def ingest(self, camera: str, frame: np.ndarray, stamp_ns: int) -> IngestResult:
        """Take one sampled frame of ``camera`` stamped ``stamp_ns`` (header stamp, ns).

        Frames are paired per camera into temporal patches; the second frame
        of a pair triggers vision encoding and prefill (and a compression when
        the cache reaches M). A bad frame, or a model error, leaves the cache
        exactly as it was and is counted as rejected.
        """
        with self._lock:
            t0 = time.perf_counter()
            try:
                frame = validate_frame(frame)
            except FrameError as exc:
                self.counters.rejected += 1
                return IngestResult(camera, stamp_ns, "rejected", error=str(exc))
            pending = self._pending.pop(camera, None)
            if pending is not None and pending[0].shape != frame.shape:
                log.warning("camera %s changed resolution %s -> %s; dropping the unpaired frame",
                            camera, pending[0].shape, frame.shape)
                self.counters.rejected += 1
                pending = None
            frames_per_patch = self.adapter.frames_per_patch
            group = ([pending] if pending is not None else []) + [(frame, stamp_ns)]
            if frames_per_patch > 1 and len(group) < frames_per_patch:
                self._pending[camera] = (frame, stamp_ns)
                return IngestResult(camera, stamp_ns, "buffered", ms=(time.perf_counter() - t0) * 1e3)
            return self._ingest_patch(camera, group, t0)

    def _ingest_patch(self, camera: str, group: Sequence[tuple[np.ndarray, int]], t0: float) -> IngestResult:
        first_stamp, last_stamp = group[0][1], group[-1][1]
        if self._origin_ns is None:
            self._origin_ns = first_stamp
        seconds = max(0.0, (first_stamp - self._origin_ns) / 1e9)
        compressions_before = self.cache.compressions
        cuda = self.adapter.device.type == "cuda"
        try:
            patch = self.adapter.encode_patch([f for f, _ in group])
            if cuda:  # split encode from prefill honestly: wait for the vision tower
                torch.cuda.synchronize(self.adapter.device)
            t_enc = time.perf_counter()
            chunk = VisionChunk(
                patch.grid_h, patch.grid_w, camera=self.camera_index(camera),
                stamp_ns=first_stamp, end_stamp_ns=last_stamp, num_frames=len(group),
            )
            self.adapter.prefill_patch(self.cache, patch, chunk, seconds=seconds)
        except Exception as exc:  # model/processor failure: cache rolled back by its transaction
            self.counters.rejected += len(group)
            log.error("ingest of %s @ %d failed: %s", camera, first_stamp, exc)
            return IngestResult(camera, last_stamp, "rejected", ms=(time.perf_counter() - t0) * 1e3,
                                error=f"{type(exc).__name__}: {exc}")
        if cuda:
            torch.cuda.synchronize(self.adapter.device)
        t_end = time.perf_counter()
        ms = (t_end - t0) * 1e3
        self.counters.ingested += len(group)
        for _ in group:
            self._ingest_rate.tick()
        self._last_chunk_ms = ms
        event = self.cache.last_compression if self.cache.compressions > compressions_before else None
        comp_ms = event.ms if event is not None else 0.0
        return IngestResult(
            camera, last_stamp, "ingested", ms=ms, encode_ms=(t_enc - t0) * 1e3,
            prefill_ms=max(0.0, (t_end - t_enc) * 1e3 - comp_ms), compression_ms=comp_ms,
            chunk_tokens=chunk.num_tokens, compression=event,
        )

    # -------------------------------------------------------------------- ask
    def ask(
        self,
        question: str,
        *,
        cameras: Optional[Sequence[str]] = None,
        since_ns: int = 0,
        until_ns: int = 0,
        max_new_tokens: int = 0,
        on_text: Optional[Callable[[str], Optional[bool]]] = None,
    ) -> AskResult:
        """Answer ``question`` from the cache as it is now.

        Args:
            cameras: only tokens of these cameras are visible; None/empty = all.
            since_ns, until_ns: only frames stamped inside [since, until]
                (header stamps, ns) are visible; 0 = open end.
            max_new_tokens: answer cap; 0 = the config's ``max_new_tokens``, which is also the largest allowed.
            on_text: called with each new piece of answer text; False stops.

        Raises:
            AskError: BAD_REQUEST, NO_FRAMES or MODEL_ERROR.
        """
        if not isinstance(question, str) or not question.strip():
            raise AskError("BAD_REQUEST", "question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise AskError("BAD_REQUEST", f"question longer than {MAX_QUESTION_CHARS} characters")
        if max_new_tokens < 0 or max_new_tokens > self.config.max_new_tokens:
            raise AskError("BAD_REQUEST", f"max_new_tokens must be in [0, {self.config.max_new_tokens}] "
                                          f"(ask.max_new_tokens; the KV reserve is sized for it)")
        n_question = len(self.adapter.question_ids(question.strip())) - len(self.adapter.question_ids(""))
        if n_question > self.config.max_question_tokens:
            raise AskError("BAD_REQUEST", f"question is {n_question} tokens, more than max_question_tokens="
                                          f"{self.config.max_question_tokens}")
        if since_ns < 0 or until_ns < 0 or (since_ns and until_ns and since_ns > until_ns):
            raise AskError("BAD_REQUEST", f"bad time window since={since_ns} until={until_ns}")
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
                    visible=visible, on_text=on_text, temperature=self.config.temperature,
                )
            except Exception as exc:
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
    def stats(self, state: str = "ready", error: str = "") -> EngineStats:
        with self._lock:
            used, total = device_memory(self.adapter.device)
            return EngineStats(
                state=state,
                model_id=self.adapter.model_id,
                device=str(self.adapter.device),
                policy=self.policy_name,
                cache=self.cache.stats(),
                frames=FrameCounters(**vars(self.counters)),
                ingest_fps=self._ingest_rate.rate(),
                last_chunk_ms=self._last_chunk_ms,
                rss_bytes=process_rss_bytes(),
                device_memory_used=used,
                device_memory_total=total,
                error=error,
            )
