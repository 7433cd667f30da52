"""One inference thread between fast producers (camera callbacks) and the model.

Producers never wait on the model: ``submit_frame`` stores the newest frame
per camera and returns (a frame still waiting when a newer one arrives is
dropped and counted: latest wins). Questions go to a small queue and are
served before frames; ``ask`` waits for its answer with a timeout.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .assistant import AskError, AskResult, IngestResult, StreamingAssistant

log = logging.getLogger(__name__)


@dataclass
class _AskJob:
    kwargs: dict
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancel: threading.Event = field(default_factory=threading.Event)


class StreamWorker:
    """Runs a :class:`StreamingAssistant` on its own thread.

    Args:
        assistant: the engine.
        on_ingest: called on the worker thread after every frame it handled.
        max_pending_asks: questions allowed to wait; more are refused with BUSY.
    """

    def __init__(
        self,
        assistant: StreamingAssistant,
        *,
        on_ingest: Optional[Callable[[IngestResult], None]] = None,
        max_pending_asks: int = 4,
    ) -> None:
        self.assistant = assistant
        self.on_ingest = on_ingest
        self.max_pending_asks = max_pending_asks
        self._cond = threading.Condition()
        self._frames: dict[str, tuple[np.ndarray, int]] = {}
        self._asks: list[_AskJob] = []
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="infinipot-worker", daemon=True)

    def start(self) -> "StreamWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the job in hand, fail waiting questions, stop the thread."""
        with self._cond:
            self._stop = True
            for job in self._asks:
                job.future.set_exception(AskError("BUSY", "assistant is shutting down"))
            self._asks.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._busy and not self._frames and not self._asks

    def wait_idle(self, timeout: float) -> bool:
        """Block until no frame or question is waiting or running (tests, CLI); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and not self._frames and not self._asks, timeout)

    # --------------------------------------------------------------- producers
    def submit_frame(self, camera: str, frame: np.ndarray, stamp_ns: int) -> None:
        """Hand the newest sampled frame of ``camera`` to the worker (never blocks on the model)."""
        with self._cond:
            if self._stop:
                return
            if camera in self._frames:
                self.assistant.count_frames(dropped=1)
            self._frames[camera] = (frame, stamp_ns)
            self._cond.notify_all()

    def submit_ask(self, question: str, **kwargs) -> concurrent.futures.Future:
        """Queue a question; the future gets an :class:`AskResult` or an :class:`AskError`.

        kwargs are those of :meth:`StreamingAssistant.ask` (cameras, since_ns, ...).
        """
        return self._enqueue(_AskJob(dict(kwargs, question=question))).future

    def ask(self, question: str, *, timeout_s: float, **kwargs) -> AskResult:
        """Ask and wait at most ``timeout_s`` seconds (queueing included).

        Raises:
            AskError: TIMEOUT when the answer is not ready in time (a running
                generation is stopped at its next token), BUSY when too many
                questions wait, or the engine's own error.
        """
        job = self._enqueue(_AskJob(dict(kwargs, question=question)))
        try:
            return job.future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            job.cancel.set()
            with self._cond:
                if job in self._asks:
                    self._asks.remove(job)
            raise AskError("TIMEOUT", f"no answer within {timeout_s:.1f} s") from None

    def _enqueue(self, job: _AskJob) -> _AskJob:
        with self._cond:
            if self._stop:
                job.future.set_exception(AskError("BUSY", "assistant is shutting down"))
            elif len(self._asks) >= self.max_pending_asks:
                job.future.set_exception(AskError("BUSY", f"{len(self._asks)} questions already waiting"))
            else:
                self._asks.append(job)
                self._cond.notify_all()
        return job

    # ------------------------------------------------------------------ worker
    def _next_job(self):
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._stop or self._asks or self._frames)
            if self._stop:
                return None
            self._busy = True
            if self._asks:
                return self._asks.pop(0)
            # Oldest stamp first, so several cameras advance together.
            camera = min(self._frames, key=lambda c: self._frames[c][1])
            frame, stamp = self._frames.pop(camera)
            return camera, frame, stamp

    def _run(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                break
            if isinstance(job, _AskJob):
                self._run_ask(job)
            else:
                self._run_frame(*job)
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _run_ask(self, job: _AskJob) -> None:
        if job.cancel.is_set() or not job.future.set_running_or_notify_cancel():
            return
        user_cb = job.kwargs.pop("on_text", None)

        def on_text(piece: str) -> Optional[bool]:
            if job.cancel.is_set():
                return False
            return user_cb(piece) if user_cb is not None else None

        try:
            job.future.set_result(self.assistant.ask(on_text=on_text, **job.kwargs))
        except AskError as exc:
            job.future.set_exception(exc)
        except Exception as exc:  # never let the worker die
            log.exception("ask failed")
            job.future.set_exception(AskError("MODEL_ERROR", f"{type(exc).__name__}: {exc}"))

    def _run_frame(self, camera: str, frame: np.ndarray, stamp: int) -> None:
        try:
            result = self.assistant.ingest(camera, frame, stamp)
        except Exception as exc:  # never let the worker die
            log.exception("ingest failed")
            result = IngestResult(camera, stamp, "rejected", error=f"{type(exc).__name__}: {exc}")
        if self.on_ingest is not None:
            try:
                self.on_ingest(result)
            except Exception:
                log.exception("on_ingest callback failed")
