"""The infinipot_assistant node: camera topics in, answers and cache status out (a lifecycle node).

A thin rclpy layer over :mod:`infinipot_ros.engine`:

* **lifecycle** -- configure loads the model and, when ``cache.snapshot_path``
  names an existing file, the memory snapshot; activate subscribes to the
  cameras; deactivate unsubscribes and keeps the memory (questions are still
  answered from it); cleanup frees the model; shutdown is clean from every
  state. With ``autostart`` (default) the node configures and activates
  itself, as a plain node; with ``autostart:=false`` a lifecycle manager or
  ``ros2 lifecycle set`` drives it;
* image callbacks pass each header stamp through the engine's frame gate
  (sampling, time-jump rule), convert sampled frames to RGB and hand the
  newest per camera to the one inference worker; they never wait on the model;
* ``notes`` (std_msgs/String, ``stream.notes_topic``): text events stamped with
  the node clock on arrival and appended to the stream (compressed under the
  same cap, visible to since/until, counted in status ``notes_*``);
* ``ask`` (infinipot_ros/srv/Ask) and the ``ask_stream`` action
  (infinipot_ros/action/Ask: answer pieces as feedback, cancel within one
  token) answer with an error code instead of raising;
* ``save_memory`` (infinipot_ros/srv/SaveMemory) writes the memory snapshot;
  ``cache.autosave_s`` > 0 saves it periodically;
* ``infinipot/status`` (CacheStatus, reliable + transient local) after each
  ingested chunk and every status.period_s, ``/diagnostics`` every period;
* stream.frame_rate_hz, ask.* and status.period_s change at run time.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import queue
import threading
import time
from typing import Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ..action import Ask as AskAction
from ..engine import (
    AskError, AskErrorCode, AskResult, EngineConfig, EngineState, EngineStats, FrameCounters, GateDecision,
    IngestResult, IngestStatus, StreamingAssistant, StreamWorker,
)
from ..engine.assistant import check_request
from ..msg import CacheStatus
from ..srv import Ask, SaveMemory
from .conversions import ImageConversionError, conversion_backend, message_to_rgb
from .params import BY_NAME, NodeSettings, declare_parameters, from_ros, owner, read_parameters
from .stamps import ns_to_time, time_to_ns
from .status import to_cache_status, to_diagnostics

STATUS_QOS = QoSProfile(
    depth=1,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
#: Gate decisions that refuse a frame for its header stamp -> the reason it is counted under.
_REFUSED_STAMPS = {GateDecision.STALE: "stale_stamp", GateDecision.FUTURE: "future_stamp",
                   GateDecision.INVALID: "bad_stamp"}
_FEEDBACK_POLL_S = 0.02  # how often a running action goal forwards feedback and checks its timeout
_GOAL_DRAIN_S = 5.0  # destroy_node waits at most this long for running goals to return their result


class AssistantNode(LifecycleNode):
    """ROS 2 lifecycle node around a :class:`StreamingAssistant` (see module docstring).

    Args:
        engine: an already loaded engine (tests); configure then uses it
            instead of loading one from the parameters (cleanup drops it).
        node_kwargs: passed to rclpy's Node (parameter_overrides, namespace, ...).

    Raises:
        ValueError: parameters that cannot form a valid configuration.
    """

    def __init__(self, *, engine: Optional[StreamingAssistant] = None, **node_kwargs) -> None:
        super().__init__("infinipot_assistant", **node_kwargs)
        declare_parameters(self)
        self.config: EngineConfig
        self.settings: NodeSettings
        self.config, self.settings = read_parameters(self)  # validated now: bad parameters fail at start

        self._given_engine = engine
        self._state = EngineState.UNCONFIGURED
        self._error = ""
        self._engine: Optional[StreamingAssistant] = None
        self._worker: Optional[StreamWorker] = None
        self._ingesting = False
        self._goals: dict[bytes, object] = {}  # goal id -> AskJob of running action goals
        self._goals_lock = threading.Condition()
        self._executing = 0  # ask_stream execute callbacks running (destroy_node waits for them, bounded)

        self._images_group = MutuallyExclusiveCallbackGroup()
        self._service_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self.status_pub = self.create_publisher(CacheStatus, "infinipot/status", STATUS_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._subs: list = []
        self.ask_srv = self.create_service(Ask, "ask", self._on_ask, callback_group=self._service_group)
        self.save_srv = self.create_service(SaveMemory, "save_memory", self._on_save_memory,
                                            callback_group=self._service_group)
        self.ask_action = ActionServer(
            self, AskAction, "ask_stream", execute_callback=self._execute_goal,
            goal_callback=lambda goal: GoalResponse.ACCEPT, cancel_callback=self._on_cancel,
            callback_group=self._service_group,
        )
        self.status_timer = self.create_timer(self.settings.status_period_s, self._on_timer,
                                              callback_group=self._timer_group)
        self._autosave_timer = None
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._clock_jump = None
        if self.get_clock().clock_type == ClockType.ROS_TIME and self.config.time_jump_s > 0:
            # A looping bag or a simulator reset sends /clock backwards: the stream restarts (use_sim_time).
            self._clock_jump = self.get_clock().create_jump_callback(
                JumpThreshold(min_forward=None, min_backward=Duration(seconds=-self.config.time_jump_s),
                              on_clock_change=False),
                post_callback=self._on_clock_jump)
        self.publish_status()
        if self.settings.autostart:
            threading.Thread(target=self._autostart, name="infinipot-autostart", daemon=True).start()

    # -------------------------------------------------------------- lifecycle
    def _autostart(self) -> None:
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._state, self._error = EngineState.LOADING, ""
        self.publish_status()
        t0 = time.monotonic()
        try:
            self.config, self.settings = read_parameters(self)
            engine = self._given_engine or StreamingAssistant(self.config)
            self.config = engine.config  # an injected engine (tests) brings its own
        except Exception as exc:  # reported on status and diagnostics; asks answer MODEL_ERROR
            self._state, self._error = EngineState.ERROR, f"model load failed: {type(exc).__name__}: {exc}"
            self.get_logger().error(self._error)
            self.publish_status()
            return TransitionCallbackReturn.FAILURE
        self._load_snapshot(engine)
        self._engine = engine
        self._worker = StreamWorker(engine, on_ingest=self._on_ingested).start()
        if self.config.autosave_s > 0:
            self._autosave_timer = self.create_timer(self.config.autosave_s, self._on_autosave,
                                                     callback_group=self._timer_group)
        st = engine.stats().cache
        self.get_logger().info(
            f"model ready in {time.monotonic() - t0:.1f} s: {engine.adapter.model_id} on {engine.adapter.device}; "
            f"KV cache: policy {engine.policy_name}, {st.bytes_per_token} B/token, prefix {st.prefix_tokens} tokens, "
            f"M={st.max_vision_tokens} C={st.target_vision_tokens} vision tokens, budget {st.kv_bytes_budget / 1e6:.1f} MB; "
            f"memory: {engine.memory_source}"
        )
        self._state = EngineState.INACTIVE
        self.publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for topic in self.settings.image_topics:
            msg_type = CompressedImage if topic.rstrip("/").endswith("/compressed") else Image
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, t=topic: self._on_image(t, msg),
                qos_profile_sensor_data, callback_group=self._images_group,
            ))
        if self.settings.notes_topic:
            self._subs.append(self.create_subscription(
                String, self.settings.notes_topic, self._on_note, 50, callback_group=self._images_group))
        self._ingesting = True
        self._state = EngineState.READY
        self.get_logger().info(
            f"active: subscribing to {self.settings.image_topics} at {self._engine.config.frame_rate_hz} Hz "
            f"(by header stamp); image conversion: {conversion_backend()}; notes: "
            f"{self.settings.notes_topic or 'off'}")
        self.publish_status()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_ingesting()
        self._state = EngineState.INACTIVE
        self.get_logger().info("inactive: not ingesting; the memory is kept and questions are still answered")
        self.publish_status()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state = EngineState.UNCONFIGURED
        self.get_logger().info("cleaned up: model and memory freed")
        self.publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state = EngineState.UNCONFIGURED
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state = EngineState.ERROR
        self.publish_status()
        return TransitionCallbackReturn.SUCCESS

    def _stop_ingesting(self) -> None:
        self._ingesting = False
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    def _release(self) -> None:
        self._stop_ingesting()
        if self._autosave_timer is not None:
            self.destroy_timer(self._autosave_timer)
            self._autosave_timer = None
        if self._worker is not None:
            self._worker.stop()
        engine, self._engine, self._worker = self._engine, None, None
        if engine is not None and engine is self._given_engine:
            engine.reset()  # an injected engine outlives cleanup: its memory must not
        if engine is not None and engine.adapter.device.type == "cuda":
            import torch

            del engine
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
        """Stop ingesting and the worker (waiting questions get BUSY); safe to call twice."""
        self._release()

    def destroy_node(self) -> None:
        """Release the model, then the action server (rclpy's destroy_node leaves action servers alive).

        Running ask_stream goals end with BUSY when the worker stops; their execute callbacks are given
        up to :data:`_GOAL_DRAIN_S` to return their result before the action server goes. Never raises
        for a server rclpy already tore down (after ``rclpy.shutdown`` its goal futures may be gone).
        """
        self._release()
        with self._goals_lock:
            self._goals_lock.wait_for(lambda: self._executing == 0, _GOAL_DRAIN_S)
        try:
            self.ask_action.destroy()
        except Exception as exc:  # rclpy: destroying after the context was shut down can fail on finished goals
            self.get_logger().debug(f"action server teardown: {type(exc).__name__}: {exc}")
        super().destroy_node()

    # ---------------------------------------------------------------- memory
    def _load_snapshot(self, engine: StreamingAssistant) -> None:
        path = self.config.snapshot_path
        if not path:
            return
        if not os.path.exists(path):
            engine.memory_source = f"empty (no snapshot at {path} yet)"
            return
        try:
            info = engine.load_memory(path)
        except Exception as exc:  # refused: start empty and say so in status
            engine.memory_source = f"snapshot refused: {exc}"
            self.get_logger().error(f"memory snapshot not loaded, starting with an empty memory: {exc}")
        else:
            self.get_logger().info(f"memory restored from {info.path}: {info.frames} frames")

    def _on_save_memory(self, request: SaveMemory.Request, response: SaveMemory.Response) -> SaveMemory.Response:
        response.success = False
        path = request.path or self.config.snapshot_path
        engine = self._engine
        if engine is None:
            response.error = f"MODEL_ERROR: {self._error or 'no model loaded (state ' + self._state.value + ')'}"
        elif not path:
            response.error = "BAD_REQUEST: no path given and cache.snapshot_path is empty"
        else:
            try:
                info = engine.save_memory(path)
            except Exception as exc:
                response.error = f"{type(exc).__name__}: {exc}"
                self.get_logger().error(f"save_memory failed: {response.error}")
            else:
                response.success, response.path, response.frames = True, info.path, info.frames
                self.get_logger().info(f"memory saved to {info.path} ({info.frames} frames)")
        return response

    def _on_autosave(self) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            engine.save_memory(self.config.snapshot_path)
        except Exception as exc:
            self.get_logger().error(f"autosave to {self.config.snapshot_path} failed: {exc}", throttle_duration_sec=60.0)

    # ----------------------------------------------------------------- images
    def _on_image(self, camera: str, msg) -> None:
        engine, worker = self._engine, self._worker
        if engine is None or worker is None or not self._ingesting:
            return
        stamp_ns = time_to_ns(msg.header.stamp)
        now_ns = self.get_clock().now().nanoseconds
        if stamp_ns == 0:
            stamp_ns = now_ns
            self.get_logger().warning(f"{camera}: frames have no header stamp; using receive time",
                                      throttle_duration_sec=30.0)
        decision = engine.admit(camera, stamp_ns, now_ns=now_ns)
        if decision in _REFUSED_STAMPS:
            self.get_logger().warning(
                f"{camera}: frame rejected ({_REFUSED_STAMPS[decision]}): header stamp {stamp_ns / 1e9:.3f} s "
                + ("is negative" if decision is GateDecision.INVALID else
                   f"is more than {engine.gate.max_future_s:g} s ahead of the node clock ({now_ns / 1e9:.3f} s)"
                   if decision is GateDecision.FUTURE else
                   f"is not after the last accepted one ({(engine.gate.last_stamp_ns(camera) or 0) / 1e9:.3f} s; "
                   f"duplicated or out of order)"), throttle_duration_sec=5.0)
            return
        if decision is GateDecision.JUMP_DROPPED:
            self.get_logger().warning(
                f"{camera}: header stamp jumped back {(engine.gate.last_stamp_ns(camera) - stamp_ns) / 1e9:.1f} s; "
                f"frame dropped, memory kept (a sustained jump of {engine.config.time_jump_frames} frames restarts "
                f"the stream)", throttle_duration_sec=5.0)
            return
        if decision is GateDecision.RESTART:
            self.get_logger().warning(f"{camera}: header stamps jumped back for {engine.config.time_jump_frames} "
                                      f"frames in a row; stream restarted, memory forgotten")
        elif decision is not GateDecision.ACCEPT:
            return
        epoch = engine.epoch
        try:
            frame = message_to_rgb(msg)
        except ImageConversionError as exc:
            engine.count_frames(camera, rejected=1, reason=exc.reason)
            self.get_logger().warning(f"{camera}: frame rejected ({exc.reason}): {exc}", throttle_duration_sec=5.0)
            return
        except Exception as exc:  # a converter/backend error we did not foresee: still one dropped frame
            engine.count_frames(camera, rejected=1, reason="bad_message")
            self.get_logger().error(f"{camera}: frame rejected (bad_message): conversion raised "
                                    f"{type(exc).__name__}: {exc}", throttle_duration_sec=5.0)
            return
        worker.submit_frame(camera, frame, stamp_ns, epoch=epoch)

    def _on_note(self, msg: String) -> None:
        """A text event: stamped with the node clock on arrival (std_msgs/String has no header)."""
        worker = self._worker
        if worker is None or not self._ingesting:
            return
        worker.submit_note(msg.data, self.get_clock().now().nanoseconds, source=self.settings.notes_topic)

    def _on_clock_jump(self, jump) -> None:
        engine = self._engine
        delta = jump.delta.nanoseconds / 1e9
        if engine is None or delta >= 0:
            return

        def restart() -> None:  # off the clock's callback, which must not block on the engine lock
            engine.restart_stream(f"/clock jumped back {-delta:.1f} s (bag loop or simulator reset)")
            self.get_logger().warning(f"/clock jumped back {-delta:.1f} s: stream restarted, memory forgotten")

        threading.Thread(target=restart, name="infinipot-clock-jump", daemon=True).start()

    def _on_ingested(self, result: IngestResult) -> None:
        if result.status is IngestStatus.REJECTED:
            what = "note" if result.camera == self.settings.notes_topic else "frame"
            self.get_logger().warning(f"{result.camera}: {what} rejected: {result.error}", throttle_duration_sec=5.0)
        elif result.status is IngestStatus.INGESTED:
            if result.compression is not None:
                ev = result.compression
                self.get_logger().debug(f"compressed {ev.before} -> {ev.after} tokens in {ev.ms:.1f} ms")
            self.publish_status()

    # -------------------------------------------------------------------- ask
    def _ask_kwargs(self, request) -> dict:
        """Engine ask() arguments from an Ask.srv request or Ask.action goal (same fields), checked.

        Everything that needs neither the model nor the cache is checked here, before the question
        waits for the worker (a bad request is never BUSY or TIMEOUT): see :func:`check_request`, a
        ``timeout_s`` that is negative or not finite, a stamp whose nanosec is not below 1e9. The
        length in tokens and the camera names are checked by the engine.

        Raises:
            AskError: BAD_REQUEST.
        """
        timeout = float(request.timeout_s)
        if not math.isfinite(timeout) or timeout < 0:
            raise AskError(AskErrorCode.BAD_REQUEST, f"timeout_s={timeout!r} must be >= 0 and finite (0 = ask.timeout_s)")
        for name in ("since", "until"):
            t = getattr(request, name)
            if t.nanosec >= 1_000_000_000:
                raise AskError(AskErrorCode.BAD_REQUEST, f"{name}.nanosec={t.nanosec} must be below 1e9")
        kwargs = dict(
            cameras=[c for c in request.camera_ids if c] or None,
            since_ns=time_to_ns(request.since),
            until_ns=time_to_ns(request.until),
            max_new_tokens=int(request.max_new_tokens),
        )
        engine = self._engine
        limit = (engine.config if engine is not None else self.config).max_new_tokens
        check_request(request.question, max_new_tokens=kwargs["max_new_tokens"], since_ns=kwargs["since_ns"],
                      until_ns=kwargs["until_ns"], limit_new_tokens=limit)
        return kwargs

    def _timeout(self, request) -> float:
        engine = self._engine
        default = engine.config.ask_timeout_s if engine is not None else self.config.ask_timeout_s
        return float(request.timeout_s) if request.timeout_s > 0 else default

    def _worker_or_raise(self) -> StreamWorker:
        worker = self._worker
        if worker is None:
            why = self._error or ("model is loading" if self._state is EngineState.LOADING
                                  else f"no model loaded (state {self._state.value})")
            raise AskError(AskErrorCode.MODEL_ERROR, why)
        return worker

    @staticmethod
    def _fill(out, result: Optional[AskResult], error: str, t0: float):
        """Fill an Ask.srv response or Ask.action result (same fields)."""
        out.success = result is not None and not error
        out.error = error
        if result is not None:
            out.answer = result.answer
            out.oldest_frame_stamp = ns_to_time(result.oldest_stamp_ns)
            out.newest_frame_stamp = ns_to_time(result.newest_stamp_ns)
            out.frames_in_context = result.frames_in_context
            out.context_tokens = result.context_tokens
            out.generated_tokens = result.generated_tokens
        out.latency_s = float(time.monotonic() - t0)
        return out

    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        t0 = time.monotonic()
        try:
            kwargs = self._ask_kwargs(request)
            result = self._worker_or_raise().ask(request.question, timeout_s=self._timeout(request), **kwargs)
        except AskError as exc:
            self.get_logger().info(f"/ask refused: {exc}", throttle_duration_sec=2.0)
            return self._fill(response, None, str(exc), t0)
        except Exception as exc:  # a bad request never becomes a traceback for the caller
            self.get_logger().error(f"/ask failed: {type(exc).__name__}: {exc}")
            return self._fill(response, None, f"MODEL_ERROR: {type(exc).__name__}: {exc}", t0)
        return self._fill(response, result, "", t0)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        with self._goals_lock:
            job = self._goals.get(bytes(goal_handle.goal_id.uuid))
        worker = self._worker
        if job is not None and worker is not None:
            worker.withdraw(job)  # out of the queue, or stopped before its next token
        return CancelResponse.ACCEPT

    def _execute_goal(self, goal_handle):
        """ask_stream: queue the question, forward answer pieces as feedback, honour cancel and timeout."""
        with self._goals_lock:
            self._executing += 1
        try:
            return self._run_goal(goal_handle)
        finally:
            with self._goals_lock:
                self._executing -= 1
                self._goals_lock.notify_all()

    def _run_goal(self, goal_handle):
        t0 = time.monotonic()
        goal = goal_handle.request
        result = AskAction.Result()
        pieces: "queue.SimpleQueue[tuple[str, int]]" = queue.SimpleQueue()
        key = bytes(goal_handle.goal_id.uuid)
        try:
            kwargs = self._ask_kwargs(goal)
            worker = self._worker_or_raise()
            job = worker.submit_ask(goal.question, on_token=lambda piece, n: pieces.put((piece, n)), **kwargs)
        except AskError as exc:
            self.get_logger().info(f"ask_stream goal refused: {exc}", throttle_duration_sec=2.0)
            goal_handle.abort()
            return self._fill(result, None, str(exc), t0)
        with self._goals_lock:
            self._goals[key] = job
        if goal_handle.is_cancel_requested:
            worker.withdraw(job)
        deadline = t0 + self._timeout(goal)
        timed_out = False
        try:
            while True:
                try:
                    answer, error = job.future.result(timeout=_FEEDBACK_POLL_S), ""
                    break
                except concurrent.futures.TimeoutError:
                    pass
                except AskError as exc:
                    answer, error = None, str(exc)
                    break
                except Exception as exc:  # the worker turns errors into AskError; be safe anyway
                    answer, error = None, f"MODEL_ERROR: {type(exc).__name__}: {exc}"
                    break
                self._forward_feedback(goal_handle, pieces)
                if not timed_out and time.monotonic() > deadline:
                    timed_out = True
                    worker.withdraw(job)
        finally:
            with self._goals_lock:
                self._goals.pop(key, None)
        self._forward_feedback(goal_handle, pieces)
        if timed_out and error.startswith(AskErrorCode.CANCELED.value):
            error = f"TIMEOUT: no answer within {self._timeout(goal):.1f} s"
        if error.startswith(AskErrorCode.CANCELED.value) and goal_handle.is_cancel_requested:
            goal_handle.canceled()
            out = self._fill(result, None, error, t0)
            out.answer, out.generated_tokens = "".join(job.partial).strip(), job.tokens
            return out
        if error:
            self.get_logger().info(f"ask_stream goal failed: {error}", throttle_duration_sec=2.0)
            goal_handle.abort()
            return self._fill(result, None, error, t0)
        goal_handle.succeed()
        return self._fill(result, answer, "", t0)

    @staticmethod
    def _forward_feedback(goal_handle, pieces) -> None:
        text, tokens = "", None
        while True:
            try:
                piece, n = pieces.get_nowait()
            except queue.Empty:
                break
            text += piece
            tokens = n
        if tokens is not None and text:
            try:
                goal_handle.publish_feedback(AskAction.Feedback(piece=text, generated_tokens=tokens))
            except Exception:
                if rclpy.ok():
                    raise  # a shut-down context (SIGINT mid-answer) makes rcl refuse to publish: nothing to send to

    def _publish(self, publisher, msg) -> None:
        """Publish unless the context was shut down meanwhile (SIGINT races the timers: rcl then raises)."""
        try:
            publisher.publish(msg)
        except Exception:
            if self.context.ok():
                raise

    # ------------------------------------------------------------- parameters
    def _on_set_parameters(self, params) -> SetParametersResult:
        """Apply live parameters (stream.frame_rate_hz, ask.*, status.period_s); the rest are read-only."""
        engine_changes: dict = {}
        node_changes: dict = {}
        for param in params:
            spec = BY_NAME.get(param.name)
            if spec is None:
                continue  # use_sim_time and other rclpy parameters
            try:
                value = from_ros(spec, param.value)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            (engine_changes if owner(spec) == "engine" else node_changes)[spec.field] = value
        try:  # validate everything before applying anything: a refused set changes nothing
            new_settings = NodeSettings(**{**vars(self.settings), **node_changes}) if node_changes else None
            if engine_changes:
                if self._engine is not None:  # validates (config and KV reserve) and applies, or raises
                    self._engine.update_settings(**engine_changes)
                    self.config = self._engine.config
                else:
                    self.config = dataclasses.replace(self.config, **engine_changes)  # validates
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if new_settings is not None:
            if new_settings.status_period_s != self.settings.status_period_s:
                self.destroy_timer(self.status_timer)
                self.status_timer = self.create_timer(new_settings.status_period_s, self._on_timer,
                                                      callback_group=self._timer_group)
            self.settings = new_settings
        return SetParametersResult(successful=True)

    # ----------------------------------------------------------------- status
    def stats(self) -> EngineStats:
        engine = self._engine
        if engine is not None:
            return engine.stats(state=self._state, error=self._error, cameras=self.settings.image_topics)
        return EngineStats(state=self._state, model_id=self.config.model, device=self.config.device,
                           policy=self.config.policy, cache=None, frames=FrameCounters(), error=self._error)

    def publish_status(self) -> None:
        stamp = self.get_clock().now().to_msg()
        self._publish(self.status_pub, to_cache_status(self.stats(), stamp))

    def _on_timer(self) -> None:
        stats = self.stats()
        stamp = self.get_clock().now().to_msg()
        self._publish(self.status_pub, to_cache_status(stats, stamp))
        self._publish(self.diag_pub, to_diagnostics(stats, stamp, self.get_name()))


def main(args=None) -> int:
    """Entry point (ros2 run infinipot_ros assistant_node / launch file)."""
    rclpy.init(args=args)
    try:
        node = AssistantNode()
    except ValueError as exc:  # bad parameters: say so plainly, no traceback
        print(f"infinipot_assistant: bad parameters: {exc}", flush=True)
        rclpy.shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=8)
    try:
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # A second Ctrl-C (launch forwards SIGINT, a terminal sends another) must not
        # turn a clean shutdown into a traceback and a non-zero exit code.
        try:
            node.shutdown()
            executor.remove_node(node)
            node.destroy_node()
            executor.shutdown()
        except KeyboardInterrupt:
            pass
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
