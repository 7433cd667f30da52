"""infinipot-load: a load probe for the assistant node (camera streams and concurrent questions at once).

Starts the node as a subprocess (or, with ``--attach NS``, uses one already
running in namespace NS), waits for STATE_READY on its status topic, then for
``--duration`` seconds publishes a video on ``--cameras`` image topics at
``--camera-hz`` each (sensor_msgs/Image rgb8, header stamps = wall time now,
each camera its own part of the video) while ``--clients`` client threads ask
``/ask`` without pause (a few questions in turn, every other one restricted to
the last 10 s with ``since``). It then reads the last CacheStatus and prints:

* asks sent / answered / refused by error code / without a response, the most
  questions seen in flight at once, and the client-side round-trip latency of
  the answered ones (p50 / p95 / max);
* per camera: frames published, received, sampled, ingested, dropped (latest
  wins), rejected, and the *ingest gap*: the longest wall time between two
  consecutive increases of that camera's ``frames_ingested`` seen on the
  status topic (the node promises a frame pair about every
  ``ask.max_ingest_gap_s`` even under continuous questions), beside the
  same gap of ``frames_sampled`` (long too: the frames did not arrive);
* the node's RSS (at READY, at the end, peak) and, for a launched node, its
  exit code after SIGINT and the error / warning lines of its log.

``--json-out FILE`` writes the same figures (schema: :class:`LoadReport`).

    infinipot-load [--clients 3] [--duration 90] [--cameras 2] [--camera-hz 30] [--fps 2]
                   [--video PATH] [--max-new-tokens 16] [--node-arg NAME:=VALUE ...]
                   [--json-out FILE] [--attach NS] [--width PX] [--node-log FILE]

Full-size frames (vtest.avi: 768x576 rgb8, 1.3 MB a message) over best-effort
loopback DDS can lose most samples on a small machine before the node sees
them (``received`` << ``published``); ``--width 384`` publishes smaller ones.
A Ctrl-C ends the run early and still reports (exit 1); a second one stops at once.

Exit codes: 0 every question got a response (an answer or an error code) and
the node exited 0; 1 otherwise (a question without a response, the node not
READY, a non-zero exit code); 2 bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PROG = "infinipot-load"

#: Questions the clients ask in turn.
QUESTIONS = (
    "What is happening?",
    "How many people can you see?",
    "Is anyone walking to the left?",
    "Describe the scene briefly.",
)
#: Every other question asks about the frames of the last this many seconds (``since``).
SINCE_WINDOW_S = 10.0
#: How often a client checks whether its response came (s).
_POLL_S = 0.002
#: Log lines counted as errors / warnings (rcutils console format, Python logging, tracebacks).
_ERROR_RE = re.compile(r"\[(ERROR|FATAL)\]|^Traceback |^\S*Error: |^ERROR:|^CRITICAL:")
_WARN_RE = re.compile(r"\[WARN(ING)?\]|^WARNING:")


# ------------------------------------------------------------------ figures
@dataclass
class CameraFigures:
    """What happened to one camera's stream during the run (node counters are deltas over the run).

    Attributes:
        camera_id: image topic.
        published: messages this probe published on it.
        received, sampled, ingested, dropped, rejected, stamp_dropped: the
            node's per-camera counters (CameraStatus), last status minus the
            one at READY.
        ingest_increases: status messages on which frames_ingested went up.
        ingest_gap_s: longest wall time (s) between two consecutive increases
            of frames_ingested seen on the status topic; None = fewer than two.
        sample_gap_s: the same for frames_sampled: a long ingest gap with a
            short sample gap means the worker kept the camera waiting; both long,
            that its frames did not arrive.
        first_ingest_s: wall time (s) from the first published frame to the
            first increase; None = none.
        seconds_since_ingest: the camera's seconds_since_ingest in the last status.
        late_ticks: publishing ticks skipped because this probe fell behind ``--camera-hz``.
    """

    camera_id: str
    published: int = 0
    received: int = 0
    sampled: int = 0
    ingested: int = 0
    dropped: int = 0
    rejected: int = 0
    stamp_dropped: int = 0
    ingest_increases: int = 0
    ingest_gap_s: Optional[float] = None
    sample_gap_s: Optional[float] = None
    first_ingest_s: Optional[float] = None
    seconds_since_ingest: float = -1.0
    late_ticks: int = 0


@dataclass
class LoadReport:
    """Figures of one load run (``--json-out`` writes this as JSON; times in s, memory in bytes).

    Attributes:
        clients, cameras_n, camera_hz, fps, duration_s, max_new_tokens, video: the run's settings
            (fps: the node's stream.frame_rate_hz when launched by the probe, else None);
            frame_size: published WxH (bytes per message = 3 W H).
        elapsed_s: wall time of the publishing and asking phase.
        asks_sent: requests sent; asks_answered: success = true;
        asks_refused: error code (text before the first ":") -> count;
        asks_no_response: requests without any response within the wait;
        max_in_flight: most requests seen waiting for a response at once.
        latency_p50_s, latency_p95_s, latency_max_s: client round trip of the answered asks.
        node_latency_p50_s: the node's own latency_s of the answered asks (median).
        first_answer_latency_s: round trip of the first answered ask (cold paths).
        slowest_asks: the five slowest answered asks: sent_at_s (from the start of the run),
            latency_s (client round trip), node_latency_s.
        generated_tokens_mean: mean generated tokens per answer.
        cameras: per camera figures (:class:`CameraFigures`).
        status_messages: CacheStatus messages received during the run.
        state: last status state name; compressions: compressions during the run;
        vision_tokens, vision_tokens_budget, kv_bytes_used, kv_bytes_budget: last status.
        rss_ready_bytes, rss_end_bytes: the node's process_rss_bytes at READY and in the last status;
        rss_peak_bytes: VmHWM of a launched node (None when attached).
        node_exit_code: exit code after SIGINT (None when attached); node_stop: how it stopped
            ("SIGINT", "SIGTERM", "SIGKILL", "attached", "exited early");
        node_stop_s: SIGINT to exit; node_log: the launched node's stdout + stderr file;
        log_errors, log_warnings: matching lines in that log; log_error_lines: the first few.
        ok: every ask got a response and the node exited 0 (the exit code is 0 iff ok).
        problems: why not ok.
    """

    clients: int
    cameras_n: int
    camera_hz: float
    fps: Optional[float]
    duration_s: float
    max_new_tokens: int
    video: str
    frame_size: str = ""
    elapsed_s: float = 0.0
    asks_sent: int = 0
    asks_answered: int = 0
    asks_refused: Dict[str, int] = field(default_factory=dict)
    asks_no_response: int = 0
    max_in_flight: int = 0
    latency_p50_s: Optional[float] = None
    latency_p95_s: Optional[float] = None
    latency_max_s: Optional[float] = None
    node_latency_p50_s: Optional[float] = None
    first_answer_latency_s: Optional[float] = None
    slowest_asks: List[dict] = field(default_factory=list)
    generated_tokens_mean: Optional[float] = None
    cameras: List[CameraFigures] = field(default_factory=list)
    status_messages: int = 0
    state: str = ""
    compressions: int = 0
    vision_tokens: int = 0
    vision_tokens_budget: int = 0
    kv_bytes_used: int = 0
    kv_bytes_budget: int = 0
    rss_ready_bytes: int = 0
    rss_end_bytes: int = 0
    rss_peak_bytes: Optional[int] = None
    node_exit_code: Optional[int] = None
    node_stop: str = ""
    node_stop_s: Optional[float] = None
    node_log: str = ""
    log_errors: int = 0
    log_warnings: int = 0
    log_error_lines: List[str] = field(default_factory=list)
    ok: bool = False
    problems: List[str] = field(default_factory=list)

    @property
    def asks_refused_total(self) -> int:
        return sum(self.asks_refused.values())

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["asks_refused_total"] = self.asks_refused_total
        return out


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) of ``values``, linear between closest ranks; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def increase_times(samples: Sequence[tuple]) -> List[float]:
    """Times at which a counter went up, from ``(time, value)`` samples in arrival order."""
    out: List[float] = []
    last = None
    for t, value in samples:
        if last is not None and value > last:
            out.append(t)
        last = value if last is None else max(last, value)
    return out


def longest_gap(times: Sequence[float]) -> Optional[float]:
    """Longest interval between consecutive times; None for fewer than two."""
    if len(times) < 2:
        return None
    return max(b - a for a, b in zip(times, times[1:]))


def error_code(error: str) -> str:
    """The code of an Ask error ("BUSY: 4 questions waiting" -> "BUSY")."""
    code = error.split(":", 1)[0].strip()
    return code or "?"


def scan_log(text: str, keep: int = 8) -> tuple[int, int, List[str]]:
    """(error lines, warning lines, the first ``keep`` error lines) of a node log."""
    errors, warnings, first = 0, 0, []
    for line in text.splitlines():
        if _ERROR_RE.search(line):
            errors += 1
            if len(first) < keep:
                first.append(line.strip()[:300])
        elif _WARN_RE.search(line):
            warnings += 1
    return errors, warnings, first


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e6:.0f} MB"


def _s(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f} s"


def format_report(r: LoadReport) -> str:
    """The report as the table the CLI prints."""
    refused = ", ".join(f"{k} {v}" for k, v in sorted(r.asks_refused.items())) or "none"
    fps = f" (node samples {r.fps:g} fps)" if r.fps is not None else ""
    lines = [
        f"{PROG}: {r.clients} clients, {r.cameras_n} cameras x {r.camera_hz:g} Hz{fps}, {r.duration_s:g} s "
        f"(ran {r.elapsed_s:.1f} s), max_new_tokens {r.max_new_tokens}, "
        f"video {os.path.basename(r.video)} {r.frame_size} rgb8",
        f"asks      sent {r.asks_sent}  answered {r.asks_answered}  refused {r.asks_refused_total} ({refused})  "
        f"no response {r.asks_no_response}  max in flight {r.max_in_flight}  "
        f"({r.asks_answered / r.elapsed_s if r.elapsed_s else 0:.1f} answers/s)",
        f"latency   p50 {_s(r.latency_p50_s, 3)}  p95 {_s(r.latency_p95_s, 3)}  max {_s(r.latency_max_s, 3)}  "
        f"(answered, client round trip; node p50 {_s(r.node_latency_p50_s, 3)}, "
        f"first {_s(r.first_answer_latency_s, 3)}, "
        f"{'-' if r.generated_tokens_mean is None else f'{r.generated_tokens_mean:.1f}'} tokens/answer)",
    ]
    if r.slowest_asks:
        lines.append("slowest   " + ", ".join(f"{a['latency_s']:.3f} s (node {a['node_latency_s']:.3f} s) sent at "
                                               f"+{a['sent_at_s']:.1f} s" for a in r.slowest_asks[:3]))
    width = max([len("camera")] + [len(c.camera_id) for c in r.cameras])
    head = (f"{'camera':<{width}}  {'published':>9}  {'received':>8}  {'sampled':>7}  {'ingested':>8}  "
            f"{'dropped':>7}  {'rejected':>8}  {'ingest gap':>10}  {'sample gap':>10}  {'first':>7}  "
            f"{'since last':>10}")
    lines += [head]
    for c in r.cameras:
        lines.append(
            f"{c.camera_id:<{width}}  {c.published:>9}  {c.received:>8}  {c.sampled:>7}  {c.ingested:>8}  "
            f"{c.dropped:>7}  {c.rejected:>8}  {_s(c.ingest_gap_s):>10}  {_s(c.sample_gap_s):>10}  "
            f"{_s(c.first_ingest_s, 1):>7}  "
            f"{_s(c.seconds_since_ingest if c.seconds_since_ingest >= 0 else None, 1):>10}")
    lines.append(
        f"cache     {r.state}  vision tokens {r.vision_tokens}/{r.vision_tokens_budget or '-'}  "
        f"kv {r.kv_bytes_used / 1e6:.2f} / {r.kv_bytes_budget / 1e6:.2f} MB  compressions {r.compressions}  "
        f"status messages {r.status_messages}")
    stop = ""
    if r.node_exit_code is not None:
        stop = f"; exit code {r.node_exit_code} ({r.node_stop}, {_s(r.node_stop_s, 1)})"
    elif r.node_stop:
        stop = f"; {r.node_stop}"
    lines.append(f"node      RSS {_mb(r.rss_ready_bytes)} at READY, {_mb(r.rss_end_bytes)} at end, "
                 f"peak {_mb(r.rss_peak_bytes)}{stop}")
    if r.node_log:
        lines.append(f"node log  {r.log_errors} error lines, {r.log_warnings} warning lines ({r.node_log})")
        lines += [f"          {line}" for line in r.log_error_lines]
    lines.append("result    OK" if r.ok else "result    FAILED: " + "; ".join(r.problems))
    return "\n".join(lines)


# -------------------------------------------------------------- node process
def _find_video(path: str) -> str:
    if path:
        return path
    import infinipot_ros

    repo = Path(infinipot_ros.__file__).resolve().parents[1]
    for cand in (os.environ.get("INFINIPOT_VIDEO", ""), ".cache/data/vtest.avi", str(repo / ".cache/data/vtest.avi"),
                 str(repo.parent / "shared/data/vtest.avi"), "/usr/share/doc/opencv-doc/examples/data/vtest.avi"):
        if cand and os.path.isfile(cand):
            return cand
    raise ValueError("no --video given and vtest.avi not found (set INFINIPOT_VIDEO or run `make data`)")


def _node_command() -> List[str]:
    exe = Path(sys.executable).parent / "infinipot-assistant"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("infinipot-assistant")
    return [found] if found else [sys.executable, "-m", "infinipot_ros.ros.node"]


def _read_proc_kb(pid: int, key: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class NodeProcess:
    """The assistant node as a child process; stdout and stderr go to ``log_path``."""

    def __init__(self, ros_args: List[str], log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.cmd = _node_command() + ["--ros-args", *ros_args]
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)  # our SIGINT only, not the terminal's as well

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss(self) -> Optional[int]:
        return _read_proc_kb(self.pid, "VmHWM")

    def stop(self, timeout: float) -> tuple[Optional[int], str, float]:
        """SIGINT, then SIGTERM and SIGKILL if it does not exit; (exit code, how, seconds)."""
        t0 = time.monotonic()
        how = "exited early"
        if self.alive():
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                how = sig.name
                try:
                    self.proc.send_signal(sig)
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        code = self.proc.poll()
        self._log.close()
        return code, how, time.monotonic() - t0

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""


# ------------------------------------------------------------------ ROS side
class StatusMonitor:
    """Keeps the last CacheStatus and, per camera, (arrival time, value) samples of its counters."""

    TRACKED = ("frames_ingested", "frames_sampled")

    def __init__(self, node, topic: str) -> None:
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        from ..msg import CacheStatus

        # Reliable + transient local like the node's publisher; deeper so that no increase is missed.
        qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.CacheStatus = CacheStatus
        self._lock = threading.Lock()
        self.last = None
        self.count = 0
        self.ready = threading.Event()
        self.failed = threading.Event()
        self._samples: Dict[tuple, List[tuple]] = {}  # (camera, counter) -> [(monotonic arrival, value)]
        self.sub = node.create_subscription(CacheStatus, topic, self._on_status, qos)

    def _on_status(self, msg) -> None:
        now = time.monotonic()
        with self._lock:
            self.last = msg
            self.count += 1
            for cam in msg.cameras:
                for counter in self.TRACKED:
                    self._samples.setdefault((cam.camera_id, counter), []).append((now, int(getattr(cam, counter))))
        if msg.state == self.CacheStatus.STATE_READY:
            self.ready.set()
        elif msg.state == self.CacheStatus.STATE_ERROR:
            self.failed.set()

    def snapshot(self):
        with self._lock:
            return self.last, self.count

    def increases_of(self, camera: str, counter: str, t_start: float, t_end: float) -> List[float]:
        """Arrival times in [t_start, t_end] of statuses on which ``counter`` of ``camera`` went up."""
        with self._lock:
            samples = list(self._samples.get((camera, counter), []))
        before = [s for s in samples if s[0] < t_start][-1:]  # the value the run started from
        return increase_times(before + [s for s in samples if t_start <= s[0] <= t_end])


class CameraPublisher(threading.Thread):
    """Publishes one camera: the video from ``offset`` frames on, looping, at ``hz``, stamped with wall time.

    ``topic``: where it publishes (resolved); ``camera_id``: the camera's name in the node's status.
    """

    def __init__(self, node, topic: str, camera_id: str, frame_id: str, video: str, offset: int, hz: float,
                 go: threading.Event, stop: threading.Event, width: int = 0) -> None:
        super().__init__(name=f"load-{frame_id}", daemon=True)
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        from .video import iter_video

        self.topic, self.camera_id, self.frame_id, self.hz, self.width = topic, camera_id, frame_id, hz, width
        self.pub = node.create_publisher(Image, topic, qos_profile_sensor_data)
        self._frames = iter_video(video, loops=1 << 30)
        for _ in range(offset):  # each camera its own part of the video
            next(self._frames)
        self._go, self._halt = go, stop
        self.published = 0
        self.late_ticks = 0  # ticks skipped because publishing fell behind
        self.error: Optional[str] = None

    def run(self) -> None:
        import cv2

        from .replay import rgb_to_image_msg

        self._go.wait()
        period = 1.0 / self.hz
        t0 = time.monotonic()
        tick = 0
        try:
            while not self._halt.is_set():
                _, _, frame = next(self._frames)
                if self.width and frame.shape[1] != self.width:
                    h = max(1, round(frame.shape[0] * self.width / frame.shape[1]))
                    frame = cv2.resize(frame, (self.width, h), interpolation=cv2.INTER_AREA)
                self.pub.publish(rgb_to_image_msg(frame, time.time_ns(), self.frame_id))
                self.published += 1
                tick += 1
                now = time.monotonic()
                behind = int((now - t0) / period) - tick
                if behind > 0:  # fell more than a period behind: skip those ticks, keep the rate
                    self.late_ticks += behind
                    tick += behind
                self._halt.wait(max(0.0, t0 + tick * period - now))
        except Exception as exc:  # reported, never a traceback in a thread
            self.error = f"{type(exc).__name__}: {exc}"


@dataclass
class _AskRecord:
    sent_at: float  # monotonic
    latency_s: float
    success: bool
    error: str
    node_latency_s: float = 0.0
    generated_tokens: int = 0


class AskClient(threading.Thread):
    """One client: asks ``service`` without pause until ``stop``, waiting for each response."""

    def __init__(self, node, service: str, index: int, max_new_tokens: int, response_wait: float,
                 go: threading.Event, stop: threading.Event, in_flight: "_Gauge") -> None:
        super().__init__(name=f"load-client-{index}", daemon=True)
        from ..srv import Ask

        self.Ask = Ask
        self.node = node
        self.client = node.create_client(Ask, service)
        self.index = index
        self.max_new_tokens = max_new_tokens
        self.response_wait = response_wait
        self._go, self._halt, self._in_flight = go, stop, in_flight
        self.records: List[_AskRecord] = []
        self.sent = 0
        self.no_response = 0
        self.error: Optional[str] = None

    def _request(self, n: int):
        from ..ros.stamps import ns_to_time

        req = self.Ask.Request(question=QUESTIONS[(self.index + n) % len(QUESTIONS)],
                               max_new_tokens=self.max_new_tokens)
        if n % 2 == 1:
            req.since = ns_to_time(time.time_ns() - int(SINCE_WINDOW_S * 1e9))
        return req

    def run(self) -> None:
        self._go.wait()
        n = 0
        try:
            while not self._halt.is_set():
                done = threading.Event()
                t0 = time.monotonic()
                future = self.client.call_async(self._request(n))
                self.sent += 1
                n += 1
                self._in_flight.add(1)
                future.add_done_callback(lambda _f, ev=done: ev.set())  # this ask's event, not the next one's
                # future.done() turns true when the executor takes the response; the done
                # callback runs later, as an executor task: poll so its queueing is not counted.
                deadline = t0 + self.response_wait
                while not future.done() and not done.wait(_POLL_S) and time.monotonic() < deadline:
                    pass
                got = future.done()
                latency = time.monotonic() - t0
                self._in_flight.add(-1)
                if not got or future.result() is None:
                    self.no_response += 1
                    self.client.remove_pending_request(future)
                    continue
                res = future.result()
                self.records.append(_AskRecord(t0, latency, bool(res.success), res.error, float(res.latency_s),
                                               int(res.generated_tokens)))
        except Exception as exc:  # reported, never a traceback in a thread
            self.error = f"{type(exc).__name__}: {exc}"


class _Gauge:
    """A thread-safe counter that remembers its maximum."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0
        self.max = 0

    def add(self, d: int) -> None:
        with self._lock:
            self.value += d
            self.max = max(self.max, self.value)


# ---------------------------------------------------------------------- run
def _counters(msg) -> Dict[str, object]:
    return {c.camera_id: c for c in msg.cameras} if msg is not None else {}


def _resolve(ns: str, name: str) -> str:
    if name.startswith("/"):
        return name
    return f"{ns.rstrip('/')}/{name}" if ns else f"/{name}"


def _node_param(arg: str) -> str:
    arg = arg.strip()
    if arg.startswith("-p "):
        arg = arg[3:].strip()
    if ":=" not in arg:
        raise ValueError(f"--node-arg {arg!r}: expected NAME:=VALUE")
    return arg


def run_load(args: argparse.Namespace) -> LoadReport:
    """One load run (see module docstring); never raises for what the node does, reports it."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from .video import probe_video

    video = _find_video(args.video)
    info = probe_video(video)  # OSError before anything starts
    ns = ("/" + args.attach.strip("/")) if args.attach is not None else ""
    if ns == "/":
        ns = ""
    report = LoadReport(clients=args.clients, cameras_n=args.cameras, camera_hz=args.camera_hz,
                        fps=None if args.attach is not None else args.fps, duration_s=args.duration,
                        max_new_tokens=args.max_new_tokens, video=video)
    w = args.width or info.width
    report.frame_size = f"{w}x{max(1, round(info.height * w / info.width)) if info.width else info.height}"
    topics = [f"/infinipot_load/cam{i}/image_raw" for i in range(args.cameras)]
    camera_ids = list(topics)  # the names the node's status uses for them
    node_proc: Optional[NodeProcess] = None
    context = Context()
    # Our own Ctrl-C: rclpy's handler would only shut the context down, leaving the run going.
    rclpy.init(args=[PROG], context=context, signal_handler_options=SignalHandlerOptions.NO)
    nodes: list = []
    executor = MultiThreadedExecutor(num_threads=args.clients + 2, context=context)
    spin = threading.Thread(target=executor.spin, name="load-executor", daemon=True)
    go, stop_pub, stop_ask = threading.Event(), threading.Event(), threading.Event()
    publishers: List[CameraPublisher] = []
    clients: List[AskClient] = []
    try:
        if args.attach is None:
            params = [f"stream.image_topics:=[{','.join(topics)}]", f"stream.frame_rate_hz:={float(args.fps)!r}"]
            params += [_node_param(a) for a in args.node_arg]
            log_path = args.node_log or tempfile.mkstemp(prefix="infinipot-load-node-", suffix=".log")[1]
            node_proc = NodeProcess([x for p in params for x in ("-p", p)], log_path)
            report.node_log = log_path
            print(f"{PROG}: started the node (pid {node_proc.pid}): {' '.join(node_proc.cmd)}", file=sys.stderr,
                  flush=True)
        mon_node = rclpy.create_node("infinipot_load_monitor", context=context)
        nodes.append(mon_node)
        monitor = StatusMonitor(mon_node, _resolve(ns, "infinipot/status"))
        executor.add_node(mon_node)
        spin.start()

        # ---- READY
        deadline = time.monotonic() + args.ready_timeout
        while not monitor.ready.wait(0.2):
            if node_proc is not None and not node_proc.alive():
                report.problems.append(f"the node exited before READY (exit code {node_proc.proc.poll()})")
                return _finish(report, node_proc, monitor, args)
            if monitor.failed.is_set():
                last, _ = monitor.snapshot()
                report.problems.append(f"the node reports ERROR: {last.error_message}")
                return _finish(report, node_proc, monitor, args)
            if time.monotonic() > deadline:
                report.problems.append(f"no READY on {_resolve(ns, 'infinipot/status')} "
                                       f"within {args.ready_timeout:g} s")
                return _finish(report, node_proc, monitor, args)
        first, _ = monitor.snapshot()
        if args.attach is not None:
            ids = [c.camera_id for c in first.cameras]
            if len(ids) < args.cameras:
                report.problems.append(f"the attached node subscribes {len(ids)} camera(s) {ids}, "
                                       f"--cameras asks for {args.cameras}")
                return _finish(report, node_proc, monitor, args)
            camera_ids = ids[: args.cameras]
            topics = [_resolve(ns, t) for t in camera_ids]
        report.rss_ready_bytes = int(first.process_rss_bytes)
        print(f"{PROG}: node READY; publishing {args.cameras} x {args.camera_hz:g} Hz, {args.clients} clients "
              f"asking, for {args.duration:g} s", file=sys.stderr, flush=True)

        # ---- publishers and clients
        pub_node = rclpy.create_node("infinipot_load_cameras", context=context)
        nodes.append(pub_node)
        frames_per_pass = max(info.frame_count, 1)
        for i, (topic, camera_id) in enumerate(zip(topics, camera_ids)):
            publishers.append(CameraPublisher(pub_node, topic, camera_id, f"load_cam{i}", video,
                                              (i * frames_per_pass) // args.cameras, args.camera_hz, go, stop_pub,
                                              width=args.width))
        in_flight = _Gauge()
        service = _resolve(ns, "ask")
        for i in range(args.clients):
            cnode = rclpy.create_node(f"infinipot_load_client_{i}", context=context)
            nodes.append(cnode)
            executor.add_node(cnode)
            clients.append(AskClient(cnode, service, i, args.max_new_tokens, args.response_wait, go, stop_ask,
                                     in_flight))
        for c in clients:
            if not c.client.wait_for_service(timeout_sec=30.0):
                report.problems.append(f"service {service} not available")
                return _finish(report, node_proc, monitor, args)
        deadline = time.monotonic() + 30.0  # best effort: frames sent before the node's reader matched are lost
        while any(pub.pub.get_subscription_count() < 1 for pub in publishers) and time.monotonic() < deadline:
            time.sleep(0.05)
        unmatched = [pub.topic for pub in publishers if pub.pub.get_subscription_count() < 1]
        if unmatched:
            report.problems.append(f"nobody subscribes {unmatched}")
            return _finish(report, node_proc, monitor, args)
        baseline = _counters(monitor.snapshot()[0])
        base_msg = monitor.snapshot()[0]
        for t in publishers + clients:
            t.start()
        t_start = time.monotonic()
        status_before = monitor.snapshot()[1]
        go.set()
        end = t_start + args.duration
        try:
            while time.monotonic() < end:
                if node_proc is not None and not node_proc.alive():
                    report.problems.append(f"the node exited during the run (exit code {node_proc.proc.poll()})")
                    break
                time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        except KeyboardInterrupt:  # the first Ctrl-C ends the run early, figures still reported
            report.problems.append(f"interrupted after {time.monotonic() - t_start:.1f} s")
        stop_pub.set()
        stop_ask.set()
        t_end = time.monotonic()
        report.elapsed_s = t_end - t_start
        for t in publishers:
            t.join(5.0)
        for c in clients:  # in-flight questions get their response (or the wait runs out)
            c.join(args.response_wait + 5.0)
        time.sleep(args.settle)  # the last frames counted, one more periodic status
        last, count = monitor.snapshot()

        # ---- figures
        records = [r for c in clients for r in c.records]
        report.asks_sent = sum(c.sent for c in clients)
        report.asks_no_response = sum(c.no_response for c in clients)
        answered = [r for r in records if r.success]
        report.asks_answered = len(answered)
        for r in records:
            if not r.success:
                code = error_code(r.error)
                report.asks_refused[code] = report.asks_refused.get(code, 0) + 1
        report.max_in_flight = in_flight.max
        lat = [r.latency_s for r in answered]
        report.latency_p50_s, report.latency_p95_s = percentile(lat, 50), percentile(lat, 95)
        report.latency_max_s = max(lat) if lat else None
        report.node_latency_p50_s = percentile([r.node_latency_s for r in answered], 50)
        for r in sorted(answered, key=lambda r: -r.latency_s)[:5]:
            report.slowest_asks.append({"sent_at_s": round(r.sent_at - t_start, 3), "latency_s": round(r.latency_s, 3),
                                        "node_latency_s": round(r.node_latency_s, 3)})
        if answered:
            first_answer = min(answered, key=lambda r: r.sent_at)
            report.first_answer_latency_s = first_answer.latency_s
            report.generated_tokens_mean = sum(r.generated_tokens for r in answered) / len(answered)
        for c in clients:
            if c.error:
                report.problems.append(f"client {c.index}: {c.error}")
        report.status_messages = count - status_before
        final = _counters(last)
        for pub in publishers:
            if pub.error:
                report.problems.append(f"publisher {pub.topic}: {pub.error}")
            cam = CameraFigures(pub.topic, published=pub.published)
            now_c, base_c = final.get(pub.camera_id), baseline.get(pub.camera_id)
            if now_c is not None:
                for name in ("received", "sampled", "ingested", "dropped", "rejected", "stamp_dropped"):
                    attr = f"frames_{name}"
                    setattr(cam, name, int(getattr(now_c, attr)) - (int(getattr(base_c, attr)) if base_c else 0))
                cam.seconds_since_ingest = float(now_c.seconds_since_ingest)
            ups = monitor.increases_of(pub.camera_id, "frames_ingested", t_start, t_end)
            cam.ingest_increases = len(ups)
            cam.ingest_gap_s = longest_gap(ups)
            cam.sample_gap_s = longest_gap(monitor.increases_of(pub.camera_id, "frames_sampled", t_start, t_end))
            cam.late_ticks = pub.late_ticks
            cam.first_ingest_s = (ups[0] - t_start) if ups else None
            report.cameras.append(cam)
        if last is not None:
            report.state = {0: "LOADING", 1: "READY", 2: "ERROR", 3: "UNCONFIGURED", 4: "INACTIVE"}.get(
                last.state, str(last.state))
            report.compressions = int(last.compressions_total) - int(base_msg.compressions_total)
            report.vision_tokens, report.vision_tokens_budget = int(last.vision_tokens), int(last.vision_tokens_budget)
            report.kv_bytes_used, report.kv_bytes_budget = int(last.kv_bytes_used), int(last.kv_bytes_budget)
            report.rss_end_bytes = int(last.process_rss_bytes)
        if report.asks_no_response:
            report.problems.append(f"{report.asks_no_response} question(s) without a response "
                                   f"within {args.response_wait:g} s")
        return _finish(report, node_proc, monitor, args)
    finally:
        stop_pub.set()
        stop_ask.set()
        go.set()  # threads still waiting to start see stop and end
        executor.shutdown(timeout_sec=5.0)
        for n in nodes:
            n.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)
        if node_proc is not None and node_proc.alive():  # an exception on the way: never leave the node behind
            node_proc.stop(args.stop_timeout)


def _finish(report: LoadReport, node_proc: Optional[NodeProcess], monitor: StatusMonitor,
            args: argparse.Namespace) -> LoadReport:
    if node_proc is None:
        report.node_stop = "attached"
    else:
        report.rss_peak_bytes = node_proc.peak_rss()
        code, how, secs = node_proc.stop(args.stop_timeout)
        report.node_exit_code, report.node_stop, report.node_stop_s = code, how, secs
        report.log_errors, report.log_warnings, report.log_error_lines = scan_log(node_proc.log_text())
        if code != 0:
            report.problems.append(f"node exit code {code} after {how}")
    if report.asks_sent and report.asks_answered + report.asks_refused_total + report.asks_no_response \
            != report.asks_sent:
        report.problems.append("asks do not add up")
    report.ok = not report.problems
    return report


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Load probe: camera streams and concurrent /ask clients "
                                "against the infinipot assistant node; prints throughput, latency, per-camera "
                                "frame counts and ingest gaps, node RSS and exit code.")
    p.add_argument("--clients", type=int, default=3, help="concurrent /ask clients, each asking without pause (3)")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of publishing and asking (90)")
    p.add_argument("--cameras", type=int, default=2, help="camera topics published (2)")
    p.add_argument("--camera-hz", type=float, default=30.0, help="messages per second per camera (30)")
    p.add_argument("--fps", type=float, default=2.0,
                   help="the launched node's stream.frame_rate_hz (2; ignored with --attach)")
    p.add_argument("--video", default="", help="video file (default: vtest.avi from .cache/data or $INFINIPOT_VIDEO)")
    p.add_argument("--width", type=int, default=0,
                   help="publish frames resized to this width, aspect kept (0 = the video's own size)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length of each question (16)")
    p.add_argument("--node-arg", action="append", default=[], metavar="NAME:=VALUE",
                   help="extra node parameter (-p NAME:=VALUE), repeatable; ignored with --attach")
    p.add_argument("--json-out", default="", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--attach", default=None, metavar="NS",
                   help="use the node running in namespace NS ('' or / = root) instead of starting one; its "
                        "cameras are the first --cameras topics of its status")
    p.add_argument("--node-log", default="", metavar="FILE",
                   help="where the launched node's output goes (default: a temporary file, kept)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for READY (300)")
    p.add_argument("--response-wait", type=float, default=120.0,
                   help="seconds a client waits for a response before counting it as lost (120)")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds the node has to exit after SIGINT (30)")
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds between the end of the run and reading the last status (1.5)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.clients < 0:
        raise ValueError(f"--clients must be >= 0, got {args.clients}")
    if args.cameras < 1:
        raise ValueError(f"--cameras must be >= 1, got {args.cameras}")
    for name in ("duration", "camera_hz", "ready_timeout", "response_wait", "stop_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.fps < 0 or args.settle < 0 or args.width < 0:
        raise ValueError("--fps, --settle and --width must be >= 0")
    if not 1 <= args.max_new_tokens <= 4096:
        raise ValueError(f"--max-new-tokens must be in [1, 4096], got {args.max_new_tokens}")
    for a in args.node_arg:
        _node_param(a)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (infinipot-load); exit codes in the module docstring."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        _check_args(args)
        _find_video(args.video)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_load(args)
    except OSError as exc:  # unreadable video, unwritable log
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_report(report), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
