"""One inference thread between fast producers (camera callbacks) and the model.

Producers never wait on the model: ``submit_frame`` stores the newest frame
per camera and returns (a frame still waiting when a newer one arrives is
dropped and counted: latest wins). Questions go to a small queue and are
served before frames, except that a camera whose last frame was handled
more than half of ``max_ingest_gap_s`` ago goes first, so each camera still
gets a frame pair ingested about every ``max_ingest_gap_s`` under continuous
questions; among cameras, the one served longest ago goes first (one camera
cannot starve another). ``ask`` waits for its answer with a timeout;
``submit_ask`` returns a future and a handle that cancels it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
import time
from typing import Callable, Optional

import numpy as np

from .assistant import (AskError, AskErrorCode, AskResult, IngestResult, IngestStatus, StreamingAssistant,
                        fault_reason, free_device_memory)
from .stats import FrameRejectReason

log = logging.getLogger(__name__)

#: Text events allowed to wait for the worker; more drop the oldest (counted as rejected).
MAX_PENDING_NOTES = 64


@dataclass
class AskJob:
    """A queued question: ``future`` gets an :class:`AskResult` or an :class:`AskError`; ``cancel()`` stops it.

    A cancelled job still waiting is never run; one being answered stops
    before its next token and ends with AskError CANCELED (``partial``: the
    text decoded until then). The KV cache is left as before the question.
    """

    kwargs: dict
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    partial: list = field(default_factory=list)  # text pieces decoded so far
    tokens: int = 0  # tokens decoded so far

    def cancel(self) -> None:
        self.cancelled.set()


class StreamWorker:
    """Runs a :class:`StreamingAssistant` on its own thread.

    Args:
        assistant: the engine.
        on_ingest: called on the worker thread after every frame it handled.

    Questions allowed to wait (more: BUSY) and the ingest gap are the engine's
    live settings ``max_pending_asks`` and ``max_ingest_gap_s``.
    """

    def __init__(
        self,
        assistant: StreamingAssistant,
        *,
        on_ingest: Optional[Callable[[IngestResult], None]] = None,
    ) -> None:
        self.assistant = assistant
        self.on_ingest = on_ingest
        self._cond = threading.Condition()
        self._frames: dict[str, tuple[np.ndarray, int, int]] = {}  # camera -> (frame, stamp_ns, epoch)
        self._asks: list[AskJob] = []
        self._notes: collections.deque = collections.deque()  # (text, stamp_ns, source), oldest first
        self._served: dict[str, float] = {}  # camera -> monotonic time its last frame was taken
        self._stop = False
        self._busy = False
        self._current: Optional[AskJob] = None  # the question being answered (stop() ends it at its next token)
        self._high_water = {"frames": 0, "asks": 0, "notes": 0}  # most items ever waiting at once
        self._thread = threading.Thread(target=self._run, name="infinipot-worker", daemon=True)

    def start(self) -> "StreamWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Fail waiting questions with BUSY, stop an answer being decoded at its next token (BUSY too),
        finish a frame in hand, stop the thread (waiting at most ``timeout`` s for it)."""
        with self._cond:
            self._stop = True
            for job in self._asks:
                if not job.future.done():
                    job.future.set_exception(AskError(AskErrorCode.BUSY, "assistant is shutting down"))
            self._asks.clear()
            self._frames.clear()
            self._notes.clear()
            if self._current is not None:
                self._current.cancel()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop

    def depths(self) -> dict:
        """Items waiting now and the most ever waiting at once: ``{"frames", "asks", "notes"}`` and
        ``{"frames_max", "asks_max", "notes_max"}`` (frames: one per camera at most; asks: at most
        ``max_pending_asks``; notes: at most :data:`MAX_PENDING_NOTES`)."""
        with self._cond:
            now = {"frames": len(self._frames), "asks": len(self._asks), "notes": len(self._notes)}
            return {**now, **{f"{k}_max": v for k, v in self._high_water.items()}}

    def _mark(self) -> None:  # under self._cond
        hw = self._high_water
        hw["frames"] = max(hw["frames"], len(self._frames))
        hw["asks"] = max(hw["asks"], len(self._asks))
        hw["notes"] = max(hw["notes"], len(self._notes))

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._busy and not self._frames and not self._asks and not self._notes

    def wait_idle(self, timeout: float) -> bool:
        """Block until no frame or question is waiting or running (tests, CLI); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._busy and not self._frames and not self._asks and not self._notes, timeout)

    # --------------------------------------------------------------- producers
    def submit_frame(self, camera: str, frame: np.ndarray, stamp_ns: int, epoch: Optional[int] = None) -> None:
        """Hand the newest sampled frame of ``camera`` to the worker (never blocks on the model).

        ``epoch``: the engine's epoch when the frame was admitted (default: now).
        """
        with self._cond:
            if self._stop:
                return
            if camera in self._frames:
                self.assistant.count_frames(camera, dropped=1)
            self._served.setdefault(camera, time.monotonic())  # a new camera waits like one just served
            self._frames[camera] = (frame, stamp_ns, self.assistant.epoch if epoch is None else epoch)
            self._mark()
            self._cond.notify_all()

    def submit_note(self, text: str, stamp_ns: int, source: str = "notes") -> None:
        """Queue a text event for :meth:`StreamingAssistant.add_note` (never blocks on the model).

        Notes are taken before questions and frames, in arrival order, so a question asked
        after a note sees it. At most :data:`MAX_PENDING_NOTES` wait; beyond that the oldest
        waiting note is dropped and counted as rejected.
        """
        with self._cond:
            if self._stop:
                return
            if len(self._notes) >= MAX_PENDING_NOTES:
                self._notes.popleft()
                self.assistant.count_note_rejected(f"more than {MAX_PENDING_NOTES} notes waiting")
            self._notes.append((text, stamp_ns, source))
            self._mark()
            self._cond.notify_all()

    def submit_ask(self, question: str, **kwargs) -> AskJob:
        """Queue a question; returns its :class:`AskJob` (``.future``, ``.cancel()``).

        kwargs are those of :meth:`StreamingAssistant.ask` (cameras, since_ns, on_token, ...).
        """
        return self._enqueue(AskJob(dict(kwargs, question=question)))

    def ask(self, question: str, *, timeout_s: float, **kwargs) -> AskResult:
        """Ask and wait at most ``timeout_s`` seconds (queueing included).

        Raises:
            AskError: TIMEOUT when the answer is not ready in time (a running
                generation is stopped at its next token), BUSY when too many
                questions wait, or the engine's own error.
        """
        job = self._enqueue(AskJob(dict(kwargs, question=question)))
        try:
            return job.future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            self.withdraw(job)
            raise AskError(AskErrorCode.TIMEOUT, f"no answer within {timeout_s:.1f} s") from None

    def withdraw(self, job: AskJob) -> None:
        """Cancel ``job``: removed if still waiting, stopped at its next token if running."""
        job.cancel()
        with self._cond:
            if job in self._asks:
                self._asks.remove(job)
                if not job.future.done():
                    job.future.set_exception(AskError(AskErrorCode.CANCELED, "withdrawn before it ran"))
                self._cond.notify_all()

    def _enqueue(self, job: AskJob) -> AskJob:
        with self._cond:
            limit = self.assistant.config.max_pending_asks
            if self._stop:
                job.future.set_exception(AskError(AskErrorCode.BUSY, "assistant is shutting down"))
            elif len(self._asks) >= limit:
                job.future.set_exception(AskError(AskErrorCode.BUSY, f"{len(self._asks)} questions already waiting "
                                                                      f"(ask.max_pending={limit})"))
            else:
                self._asks.append(job)
                self._mark()
                self._cond.notify_all()
        return job

    # ------------------------------------------------------------------ worker
    def _next_job(self):
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._stop or self._asks or self._frames or self._notes)
            if self._stop:
                return None
            self._busy = True
            if self._notes:  # small, and a question asked after a note must see it
                return self._notes.popleft()
            now = time.monotonic()
            # Served longest ago first (never-served cameras first of all): no camera starves another.
            camera = min(self._frames, key=lambda c: self._served[c]) if self._frames else None
            overdue = camera is not None and now - self._served[camera] >= 0.5 * self.assistant.config.max_ingest_gap_s
            if self._asks and not overdue:
                self._current = self._asks.pop(0)
                return self._current
            frame, stamp, epoch = self._frames.pop(camera)
            self._served[camera] = now
            return camera, frame, stamp, epoch

    def _run(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                break
            if isinstance(job, AskJob):
                try:
                    self._run_ask(job)
                finally:
                    with self._cond:
                        self._current = None
            elif len(job) == 3:
                self._run_note(*job)
            else:
                self._run_frame(*job)
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _run_ask(self, job: AskJob) -> None:
        if job.cancelled.is_set():
            if not job.future.done():
                job.future.set_exception(AskError(AskErrorCode.CANCELED, "cancelled before it ran"))
            return
        if not job.future.set_running_or_notify_cancel():
            return
        user_cb = job.kwargs.pop("on_token", None)

        def on_token(piece: str, tokens: int) -> Optional[bool]:
            if job.cancelled.is_set():
                return False
            job.tokens = tokens
            if piece:
                job.partial.append(piece)
            verdict = user_cb(piece, tokens) if user_cb is not None else None
            return False if job.cancelled.is_set() else verdict

        try:
            result = self.assistant.ask(on_token=on_token, **job.kwargs)
        except AskError as exc:
            job.future.set_exception(exc)
        except Exception as exc:  # never let the worker die
            log.exception("ask failed")
            job.future.set_exception(AskError(AskErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}"))
        else:
            if job.cancelled.is_set() and result.stopped_by == "cancelled":
                if self._stop:
                    job.future.set_exception(AskError(AskErrorCode.BUSY, f"assistant is shutting down (answer "
                                                                         f"stopped after {result.generated_tokens} tokens)"))
                else:
                    job.future.set_exception(AskError(AskErrorCode.CANCELED,
                                                      f"cancelled after {result.generated_tokens} tokens"))
            else:
                job.future.set_result(result)

    def _run_note(self, text: str, stamp: int, source: str) -> None:
        try:
            result = self.assistant.add_note(text, stamp, source)
        except Exception as exc:  # never let the worker die
            log.exception("note failed")
            result = IngestResult(source, stamp, IngestStatus.REJECTED, error=f"{type(exc).__name__}: {exc}")
        if self.on_ingest is not None:
            try:
                self.on_ingest(result)
            except Exception:
                log.exception("on_ingest callback failed")

    def _run_frame(self, camera: str, frame: np.ndarray, stamp: int, epoch: int) -> None:
        try:
            result = self.assistant.ingest(camera, frame, stamp, epoch=epoch)
        except Exception as exc:  # never let the worker die; the engine counts its own faults, this one is ours
            reason = fault_reason(exc)
            if reason is FrameRejectReason.OUT_OF_MEMORY:
                free_device_memory(self.assistant.adapter.device)
            self.assistant.count_frames(camera, rejected=1, reason=reason)
            log.exception("ingest of %s @ %d failed (%s)", camera, stamp, reason.value)
            result = IngestResult(camera, stamp, IngestStatus.REJECTED,
                                  error=f"{reason.value}: {type(exc).__name__}: {exc}")
        if self.on_ingest is not None:
            try:
                self.on_ingest(result)
            except Exception:
                log.exception("on_ingest callback failed")
