"""The infinipot_assistant node: camera topics in, /ask answers and cache status out.

A thin rclpy layer over :mod:`infinipot_ros.engine`:

* image callbacks sample frames by header stamp, convert them to RGB and
  hand the newest per camera to the one inference worker (latest wins,
  drops counted); they never wait on the model;
* ``ask`` (infinipot_ros/srv/Ask) waits on the worker with a timeout and
  answers with an error code instead of raising;
* ``infinipot/status`` (CacheStatus, reliable + transient local) after each
  ingested chunk and every status.period_s, ``/diagnostics`` every period.

The model loads on a background thread: status says LOADING until it is
ready, and /ask answers MODEL_ERROR meanwhile.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from ..engine import AskError, EngineConfig, EngineStats, FrameCounters, FrameSampler, StreamingAssistant, StreamWorker
from ..engine.assistant import IngestResult
from ..msg import CacheStatus
from ..srv import Ask
from .conversions import ImageConversionError, conversion_backend, message_to_rgb
from .params import NodeSettings, declare_parameters, read_parameters
from .stamps import ns_to_time, time_to_ns
from .status import to_cache_status, to_diagnostics

STATUS_QOS = QoSProfile(
    depth=1,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


class AssistantNode(Node):
    """ROS 2 node around a :class:`StreamingAssistant` (see module docstring).

    Args:
        engine: an already loaded engine (tests); default: loaded from the
            node's parameters on a background thread.
    """

    def __init__(self, *, engine: Optional[StreamingAssistant] = None, **node_kwargs) -> None:
        super().__init__("infinipot_assistant", **node_kwargs)
        declare_parameters(self)
        self.config: EngineConfig
        self.settings: NodeSettings
        self.config, self.settings = read_parameters(self)

        self._state = "loading"
        self._error = ""
        self._engine: Optional[StreamingAssistant] = None
        self._worker: Optional[StreamWorker] = None
        self._sampler = FrameSampler(self.config.frame_rate_hz)
        self._sampler_lock = threading.Lock()
        self._pre_counts = FrameCounters()  # frames seen while the model loads

        self._images_group = MutuallyExclusiveCallbackGroup()
        self._service_group = ReentrantCallbackGroup()
        self.status_pub = self.create_publisher(CacheStatus, "infinipot/status", STATUS_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._subs = []
        for topic in self.settings.image_topics:
            msg_type = CompressedImage if topic.rstrip("/").endswith("/compressed") else Image
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, t=topic: self._on_image(t, msg),
                qos_profile_sensor_data, callback_group=self._images_group,
            ))
        self.ask_srv = self.create_service(Ask, "ask", self._on_ask, callback_group=self._service_group)
        self.status_timer = self.create_timer(self.settings.status_period_s, self._on_timer)
        self.get_logger().info(
            f"subscribing to {self.settings.image_topics} at {self.config.frame_rate_hz} Hz (by header stamp); "
            f"image conversion: {conversion_backend()}; model {self.config.model} on {self.config.device}"
        )
        if engine is not None:
            self._start(engine)
        else:
            threading.Thread(target=self._load, name="infinipot-load", daemon=True).start()
        self.publish_status()

    # ---------------------------------------------------------------- lifecycle
    def _load(self) -> None:
        t0 = time.monotonic()
        try:
            engine = StreamingAssistant(self.config)
        except Exception as exc:  # reported on the status topic, node keeps running
            self._state, self._error = "error", f"model load failed: {type(exc).__name__}: {exc}"
            self.get_logger().error(self._error)
            self.publish_status()
            return
        self.get_logger().info(f"model ready in {time.monotonic() - t0:.1f} s")
        self._start(engine)

    def _start(self, engine: StreamingAssistant) -> None:
        engine.count_frames(**{k: v for k, v in vars(self._pre_counts).items() if v})
        self._engine = engine
        self._worker = StreamWorker(engine, on_ingest=self._on_ingested,
                                    max_pending_asks=self.settings.max_pending_asks).start()
        st = engine.stats().cache
        self._state = "ready"
        self.get_logger().info(
            f"KV cache: policy {engine.policy_name}, {st.bytes_per_token} B/token, prefix {st.prefix_tokens} tokens, "
            f"M={st.max_vision_tokens} C={st.target_vision_tokens} vision tokens, budget {st.kv_bytes_budget / 1e6:.1f} MB"
        )
        self.publish_status()

    def shutdown(self) -> None:
        """Stop the worker (waiting questions get BUSY)."""
        if self._worker is not None:
            self._worker.stop()

    # ----------------------------------------------------------------- images
    def _count(self, **deltas: int) -> None:
        if self._engine is not None:
            self._engine.count_frames(**deltas)
        else:
            self._pre_counts.add(**deltas)

    def _on_image(self, camera: str, msg) -> None:
        self._count(received=1)
        if self._worker is None:
            return  # model still loading (or failed): frames are counted, not kept
        stamp_ns = time_to_ns(msg.header.stamp)
        if stamp_ns == 0:
            stamp_ns = self.get_clock().now().nanoseconds
            self.get_logger().warning(f"{camera}: frames have no header stamp; using receive time",
                                      throttle_duration_sec=30.0)
        with self._sampler_lock:
            last = self._sampler.last_stamp_ns(camera)
            jump = self.settings.time_jump_reset_s
            if last is not None and jump > 0 and stamp_ns < last - int(jump * 1e9):
                self.get_logger().warning(
                    f"{camera}: header stamp jumped back {(last - stamp_ns) / 1e9:.1f} s; restarting the stream")
                self._sampler.reset()
                self._engine.reset()
            if not self._sampler.accept(camera, stamp_ns):
                return
        self._count(sampled=1)
        try:
            frame = message_to_rgb(msg)
        except ImageConversionError as exc:
            self._count(rejected=1)
            self.get_logger().warning(f"{camera}: frame dropped: {exc}", throttle_duration_sec=5.0)
            return
        self._worker.submit_frame(camera, frame, stamp_ns)

    def _on_ingested(self, result: IngestResult) -> None:
        if result.status == "rejected":
            self.get_logger().warning(f"{result.camera}: frame rejected: {result.error}", throttle_duration_sec=5.0)
        elif result.status == "ingested":
            if result.compression is not None:
                ev = result.compression
                self.get_logger().debug(f"compressed {ev.before} -> {ev.after} tokens in {ev.ms:.1f} ms")
            self.publish_status()

    # -------------------------------------------------------------------- ask
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        t0 = time.monotonic()
        response.success = False
        try:
            if self._worker is None:
                raise AskError("MODEL_ERROR", self._error or "model is still loading")
            timeout = float(request.timeout_s) if request.timeout_s > 0 else self.settings.ask_timeout_s
            result = self._worker.ask(
                request.question,
                timeout_s=timeout,
                cameras=[c for c in request.camera_ids if c] or None,
                since_ns=time_to_ns(request.since),
                until_ns=time_to_ns(request.until),
                max_new_tokens=int(request.max_new_tokens),
            )
        except AskError as exc:
            response.error = str(exc)
            self.get_logger().info(f"/ask refused: {exc}")
        except Exception as exc:  # a bad request never becomes a traceback for the caller
            response.error = f"MODEL_ERROR: {type(exc).__name__}: {exc}"
            self.get_logger().error(f"/ask failed: {response.error}")
        else:
            response.success = True
            response.answer = result.answer
            response.oldest_frame_stamp = ns_to_time(result.oldest_stamp_ns)
            response.newest_frame_stamp = ns_to_time(result.newest_stamp_ns)
            response.frames_in_context = result.frames_in_context
            response.context_tokens = result.context_tokens
            response.generated_tokens = result.generated_tokens
        response.latency_s = float(time.monotonic() - t0)
        return response

    # ----------------------------------------------------------------- status
    def stats(self) -> EngineStats:
        if self._engine is not None:
            return self._engine.stats(state=self._state, error=self._error)
        return EngineStats(state=self._state, model_id=self.config.model, device=self.config.device,
                           policy=self.config.policy, cache=None, frames=self._pre_counts, error=self._error)

    def publish_status(self) -> None:
        stamp = self.get_clock().now().to_msg()
        self.status_pub.publish(to_cache_status(self.stats(), stamp))

    def _on_timer(self) -> None:
        stats = self.stats()
        stamp = self.get_clock().now().to_msg()
        self.status_pub.publish(to_cache_status(stats, stamp))
        self.diag_pub.publish(to_diagnostics(stats, stamp, self.get_name()))


def main(args=None) -> int:
    """Entry point (ros2 run infinipot_ros assistant_node / launch file)."""
    rclpy.init(args=args)
    try:
        node = AssistantNode()
    except ValueError as exc:  # bad parameters: say so plainly, no traceback
        print(f"infinipot_assistant: bad parameters: {exc}", flush=True)
        rclpy.shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=4)
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
