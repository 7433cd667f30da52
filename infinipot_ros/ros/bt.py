"""py_trees behaviour that asks the assistant about the scene over ``ask_stream``.

:class:`AskScene` is a client of the node's ``ask_stream`` action
(infinipot_ros/action/Ask): ``initialise`` sends the goal, ``update`` reports
RUNNING until the result is in, then SUCCESS or FAILURE, and ``terminate``
cancels a goal that is still running (a higher-priority branch took over, or the
behaviour timed out).

The behaviour never blocks and never spins: every ROS call it makes from a tick
is asynchronous (``send_goal_async``, ``get_result_async``,
``cancel_goal_async``) and the goal, feedback and result callbacks run on
whatever executor spins ``node``, on another thread. So the node must be spun
elsewhere, e.g.::

    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    tree.tick_tock(period_ms=100)   # or your own tick loop, on this thread

Callbacks only record into a per-goal object under a lock; the blackboard is
written by the tick thread alone (in ``update``).

Blackboard (absolute keys, each a constructor argument):

* ``answer_key`` (default ``/infinipot/answer``): the answer text, written on
  SUCCESS; a failure leaves the previous answer in place;
* ``result_key`` (``/infinipot/result``): the whole ``Ask.Result`` of the last
  finished ask, ``None`` when it ended without one (no server, rejected, timeout);
* ``error_key`` (``/infinipot/error``): ``""`` on SUCCESS, else ``"CODE: detail"``
  with the server's code (TIMEOUT, BUSY, NO_FRAMES, BAD_REQUEST, MODEL_ERROR,
  CANCELED) or one of :class:`ClientCode`;
* ``partial_key`` (``/infinipot/partial_answer``): the text streamed so far
  (feedback pieces joined, leading whitespace dropped), updated every tick
  while RUNNING, reset to ``""`` when an ask starts, the answer on SUCCESS.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import py_trees
from action_msgs.msg import GoalStatus
from builtin_interfaces.msg import Time
from rclpy.action import ActionClient
from rclpy.node import Node

from ..action import Ask
from .stamps import ns_to_time, time_to_ns

Status = py_trees.common.Status

DEFAULT_ANSWER_KEY = "/infinipot/answer"
DEFAULT_RESULT_KEY = "/infinipot/result"
DEFAULT_ERROR_KEY = "/infinipot/error"
DEFAULT_PARTIAL_KEY = "/infinipot/partial_answer"


class ClientCode(str, enum.Enum):
    """Error codes the behaviour reports itself; the server's own codes pass through unchanged."""

    NO_SERVER = "NO_SERVER"  # the action server did not appear within server_wait_s
    REJECTED = "REJECTED"  # the server rejected the goal
    TIMEOUT = "TIMEOUT"  # no result within the behaviour's timeout_s (the goal is canceled)
    MODEL_ERROR = "MODEL_ERROR"  # the goal ended without success and without an error text


def error_code(error: str) -> str:
    """The CODE of a ``"CODE: detail"`` error string (``""`` for ``""``)."""
    return error.split(":", 1)[0].strip()


@dataclass(frozen=True)
class AskOutcome:
    """How one ask ended (the last one is :attr:`AskScene.outcome`).

    Attributes:
        status: SUCCESS or FAILURE.
        answer: the answer text ("" on failure).
        error: "" on success, else "CODE: detail".
        latency_s: wall time from ``initialise`` to the end, seconds (server
            wait and queueing included; the server's own figure is
            ``result.latency_s``).
        result: the action result, None when none came back.
    """

    status: Status
    answer: str
    error: str
    latency_s: float
    result: Optional[Any] = None

    @property
    def code(self) -> str:
        """The error's CODE ("" on success)."""
        return error_code(self.error)


class _Goal:
    """One sent goal: written by the executor's callbacks, read by the tick, under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handle = None  # ClientGoalHandle once the server answered the goal request
        self.rejected = False
        self.send_error = ""  # the goal request itself failed
        self.status = GoalStatus.STATUS_UNKNOWN
        self.result = None  # Ask.Result once it arrived
        self.pieces: list[str] = []
        self.generated_tokens = 0
        self.cancel_wanted = False
        self.cancel_sent = False
        self.sent_at = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.rejected or bool(self.send_error) or self.result is not None


def _as_time(t: Any) -> Time:
    """builtin_interfaces/Time from builtin_interfaces/Time or rclpy.time.Time."""
    if t is None:
        return Time()
    if hasattr(t, "to_msg"):
        t = t.to_msg()
    return ns_to_time(time_to_ns(t))


class AskScene(py_trees.behaviour.Behaviour):
    """Ask the assistant a question about what its cameras saw (``ask_stream`` action).

    RUNNING while the server is awaited or the goal is pending / executing,
    SUCCESS when the result has ``success`` (answer and result on the
    blackboard), FAILURE on a rejected goal, a result with ``success`` false,
    no action server within ``server_wait_s``, or no result within
    ``timeout_s``; the error code is in ``feedback_message`` and on the
    blackboard (see module docstring). Stopping the behaviour while its goal
    runs (INVALID: preempted by a higher priority, or FAILURE on timeout)
    cancels the goal. Never blocks a tick; ``node`` must be spun by an
    executor on another thread.

    Args:
        name: behaviour name.
        node: the rclpy node that owns the action client (spun elsewhere).
        question: the question, plain text.
        last_s: only frames stamped in the last ``last_s`` seconds of the
            node's clock (ROS time; sim time with ``use_sim_time``), taken
            when the ask starts; 0 = no lower bound. Excludes ``since``.
        since, until: fixed stamp window (builtin_interfaces/Time or
            rclpy.time.Time); None = open end.
        camera_ids: only these cameras (image topic names); empty = all.
        timeout_s: behaviour timeout, wall seconds from ``initialise`` to
            the result (server wait included); 0 = none. Keep it above the
            node's ``ask.timeout_s`` (or ``goal_timeout_s``) so that the
            server's own TIMEOUT comes back first.
        max_new_tokens: answer length cap sent with the goal; 0 = node default.
        goal_timeout_s: the goal's ``timeout_s`` (node-side: queueing +
            decoding); 0 = node default (``ask.timeout_s``).
        server_wait_s: how long the ticks wait for the action server to
            appear before FAILURE with NO_SERVER.
        accept_timeout_s: a goal the server has not acknowledged after this
            long is sent again (the unacknowledged one is canceled should it
            be accepted later): DDS may deliver a request to endpoints of a
            server that is gone (a restarted node, until its lease expires)
            or lose it while a new server is still being matched. 0 = never
            resend.
        action_name: action name, relative to the node's namespace unless it
            starts with "/".
        answer_key, result_key, error_key, partial_key: blackboard keys.

    Raises:
        ValueError: negative last_s / timeouts / max_new_tokens, or both
            last_s and since.
    """

    def __init__(
        self,
        name: str,
        node: Node,
        question: str,
        *,
        last_s: float = 0.0,
        since: Any = None,
        until: Any = None,
        camera_ids: Sequence[str] = (),
        timeout_s: float = 60.0,
        max_new_tokens: int = 0,
        goal_timeout_s: float = 0.0,
        server_wait_s: float = 3.0,
        accept_timeout_s: float = 3.0,
        action_name: str = "ask_stream",
        answer_key: str = DEFAULT_ANSWER_KEY,
        result_key: str = DEFAULT_RESULT_KEY,
        error_key: str = DEFAULT_ERROR_KEY,
        partial_key: str = DEFAULT_PARTIAL_KEY,
    ) -> None:
        super().__init__(name)
        if min(last_s, timeout_s, goal_timeout_s, server_wait_s, accept_timeout_s, max_new_tokens) < 0:
            raise ValueError("last_s, timeouts and max_new_tokens must be >= 0")
        if last_s > 0 and since is not None:
            raise ValueError("give last_s or since, not both")
        self.node = node
        self.question = question
        self.last_s = float(last_s)
        self.since = _as_time(since)
        self.until = _as_time(until)
        self.camera_ids = list(camera_ids)
        self.timeout_s = float(timeout_s)
        self.max_new_tokens = int(max_new_tokens)
        self.goal_timeout_s = float(goal_timeout_s)
        self.server_wait_s = float(server_wait_s)
        self.accept_timeout_s = float(accept_timeout_s)
        self.action_name = action_name
        self.keys = {"answer": answer_key, "result": result_key, "error": error_key, "partial": partial_key}
        self.blackboard = self.attach_blackboard_client(name=name)
        for key in self.keys.values():
            self.blackboard.register_key(key=key, access=py_trees.common.Access.WRITE)
        self.outcome: Optional[AskOutcome] = None
        self.goals_sent = 0  # goals sent for the current ask (> 1 after unacknowledged ones were resent)
        self._client: Optional[ActionClient] = None
        self._goal: Optional[_Goal] = None
        self._started = 0.0
        self._partial_len = 0
        self._partial = ""

    # ------------------------------------------------------------ py_trees API
    def setup(self, **kwargs: Any) -> None:
        """Create the action client (also done on the first ``initialise``); never waits."""
        if self._client is None:
            self._client = ActionClient(self.node, Ask, self.action_name)

    def initialise(self) -> None:
        """Start an ask: reset the partial answer, send the goal if the server is there."""
        self.setup()
        self._goal = None
        self.goals_sent = 0
        self._started = time.monotonic()
        self._partial_len = 0
        self._partial = ""
        self.blackboard.set(self.keys["partial"], "", overwrite=True)
        self.feedback_message = f"waiting for action server {self.action_name}"
        self._send_if_ready()

    def update(self) -> Status:
        """RUNNING / SUCCESS / FAILURE from what the callbacks recorded; never blocks."""
        elapsed = time.monotonic() - self._started
        if self._goal is None and not self._send_if_ready():
            if self.timeout_s and elapsed >= self.timeout_s:
                return self._timed_out("no action server")
            if elapsed >= self.server_wait_s:
                return self._fail(f"{ClientCode.NO_SERVER.value}: action server {self._server_name()} "
                                  f"not available within {self.server_wait_s:.1f} s")
            return Status.RUNNING
        goal = self._goal
        with goal.lock:
            rejected, send_error, result = goal.rejected, goal.send_error, goal.result
            pieces = goal.pieces[self._partial_len:]
            tokens = goal.generated_tokens
            accepted = goal.handle is not None
        if pieces:
            self._partial_len += len(pieces)
            # lstrip: the final answer is stripped by the node, the raw pieces are not
            self._partial = (self._partial + "".join(pieces)).lstrip()
            self.blackboard.set(self.keys["partial"], self._partial, overwrite=True)
        if rejected:
            return self._fail(f"{ClientCode.REJECTED.value}: goal rejected by {self._server_name()}")
        if send_error:
            return self._fail(f"{ClientCode.MODEL_ERROR.value}: {send_error}")
        if result is not None:
            if result.success:
                return self._succeed(result)
            return self._fail(result.error or f"{ClientCode.MODEL_ERROR.value}: goal ended with status "
                                              f"{goal.status} and no error", result)
        if self.timeout_s and elapsed >= self.timeout_s:
            return self._timed_out(f"{tokens} tokens streamed" if accepted else "goal not acknowledged")
        if not accepted and self.accept_timeout_s and time.monotonic() - goal.sent_at >= self.accept_timeout_s:
            self._resend(goal)
            return Status.RUNNING
        if not accepted:
            self.feedback_message = "goal sent, waiting for acceptance"
        else:
            self.feedback_message = f"answering ({tokens} tokens): {self._partial}"
        return Status.RUNNING

    def terminate(self, new_status: Status) -> None:
        """Cancel the goal if it is still running (preempted, interrupted or timed out)."""
        goal = self._goal
        if goal is None:
            return
        with goal.lock:
            if goal.finished or goal.cancel_wanted:
                return
            goal.cancel_wanted = True
            handle = goal.handle
        if handle is not None:
            self._cancel(goal, handle)
        # else: the goal response callback cancels it once the server accepted it
        if new_status == Status.INVALID:
            self.feedback_message = "interrupted: goal canceled"

    def shutdown(self) -> None:
        """Destroy the action client (tree shutdown)."""
        if self._client is not None:
            self._client.destroy()
            self._client = None

    # ------------------------------------------------------------- goal state
    @property
    def goal_status(self) -> int:
        """action_msgs/GoalStatus code of the most recent goal (STATUS_UNKNOWN until known)."""
        goal = self._goal
        if goal is None:
            return GoalStatus.STATUS_UNKNOWN
        with goal.lock:
            return goal.status

    @property
    def goal_result(self) -> Optional[Any]:
        """Ask.Result of the most recent goal once it arrived, also after a cancel."""
        goal = self._goal
        if goal is None:
            return None
        with goal.lock:
            return goal.result

    # ---------------------------------------------------------------- helpers
    def _server_name(self) -> str:
        if self.action_name.startswith("/"):
            return self.action_name
        ns = self.node.get_namespace().rstrip("/")
        return f"{ns}/{self.action_name}"

    def _make_goal(self) -> Any:
        goal = Ask.Goal(question=self.question, camera_ids=self.camera_ids, until=self.until,
                        max_new_tokens=self.max_new_tokens, timeout_s=self.goal_timeout_s)
        if self.last_s > 0:
            goal.since = ns_to_time(self.node.get_clock().now().nanoseconds - int(self.last_s * 1e9))
        else:
            goal.since = self.since
        return goal

    def _send_if_ready(self) -> bool:
        """Send the goal when the server is available; False while it is not."""
        if self._goal is not None:
            return True
        if not self._client.server_is_ready():
            return False
        goal = _Goal()
        self._goal = goal
        self.goals_sent += 1
        future = self._client.send_goal_async(
            self._make_goal(), feedback_callback=lambda msg: self._on_feedback(goal, msg))
        future.add_done_callback(lambda fut: self._on_goal_response(goal, fut))
        self.feedback_message = "goal sent, waiting for acceptance"
        return True

    def _resend(self, goal: _Goal) -> None:
        """Give up on an unacknowledged goal (canceled if accepted later) and send it again."""
        with goal.lock:
            if goal.handle is not None or goal.finished:
                return  # acknowledged meanwhile
            goal.cancel_wanted = True
        self.node.get_logger().warning(
            f"{self.name}: goal not acknowledged by {self._server_name()} within {self.accept_timeout_s:.1f} s; "
            f"sending it again")
        self._goal = None
        self._partial_len = 0  # its feedback (if it runs after all) is not this ask's answer
        self._partial = ""
        self.blackboard.set(self.keys["partial"], "", overwrite=True)
        self._send_if_ready()

    def _on_goal_response(self, goal: _Goal, future: Any) -> None:
        try:
            handle = future.result()
        except Exception as exc:  # the request failed (e.g. shutdown): a FAILURE, not a traceback
            with goal.lock:
                goal.send_error = f"goal request failed: {type(exc).__name__}: {exc}"
            return
        with goal.lock:
            if not handle.accepted:
                goal.rejected = True
                goal.status = GoalStatus.STATUS_UNKNOWN
                return
            goal.handle = handle
            goal.status = GoalStatus.STATUS_ACCEPTED
            cancel = goal.cancel_wanted
        handle.get_result_async().add_done_callback(lambda fut: self._on_result(goal, fut))
        if cancel:
            self._cancel(goal, handle)

    def _on_feedback(self, goal: _Goal, msg: Any) -> None:
        with goal.lock:
            goal.pieces.append(msg.feedback.piece)
            goal.generated_tokens = int(msg.feedback.generated_tokens)
            if goal.status == GoalStatus.STATUS_ACCEPTED:
                goal.status = GoalStatus.STATUS_EXECUTING

    def _on_result(self, goal: _Goal, future: Any) -> None:
        try:
            response = future.result()
        except Exception as exc:
            with goal.lock:
                goal.send_error = f"result request failed: {type(exc).__name__}: {exc}"
            return
        with goal.lock:
            goal.status = int(response.status)
            goal.result = response.result

    def _cancel(self, goal: _Goal, handle: Any) -> None:
        with goal.lock:
            if goal.cancel_sent:
                return
            goal.cancel_sent = True
        handle.cancel_goal_async()
        self.node.get_logger().debug(f"{self.name}: canceling goal on {self._server_name()}")

    def _succeed(self, result: Any) -> Status:
        self.blackboard.set(self.keys["answer"], result.answer, overwrite=True)
        self.blackboard.set(self.keys["result"], result, overwrite=True)
        self.blackboard.set(self.keys["error"], "", overwrite=True)
        self.blackboard.set(self.keys["partial"], result.answer, overwrite=True)
        self.outcome = AskOutcome(Status.SUCCESS, result.answer, "", time.monotonic() - self._started, result)
        self.feedback_message = f"answered ({result.generated_tokens} tokens, {result.latency_s:.2f} s)"
        return Status.SUCCESS

    def _timed_out(self, stage: str) -> Status:
        return self._fail(f"{ClientCode.TIMEOUT.value}: no result within {self.timeout_s:.1f} s "
                          f"(behaviour timeout, {stage}; goal canceled)")

    def _fail(self, error: str, result: Any = None) -> Status:
        self.blackboard.set(self.keys["result"], result, overwrite=True)
        self.blackboard.set(self.keys["error"], error, overwrite=True)
        self.outcome = AskOutcome(Status.FAILURE, "", error, time.monotonic() - self._started, result)
        self.feedback_message = error
        return Status.FAILURE
