"""Publish camera images from a rosbag2 or a video file onto ROS 2 topics.

Sources:

* a rosbag2 directory (sqlite3 or mcap, read with ``rosbags.rosbag2.Reader``):
  every ``sensor_msgs/msg/Image`` and ``sensor_msgs/msg/CompressedImage``
  connection (or those chosen with ``--topics``), optionally renamed with
  ``--remap old:=new``. The recorded CDR bytes are deserialized by rclpy, so
  what is published is exactly what was recorded (stamps included).
* a video file (the tools' one reader, :mod:`.video`): frames as ``rgb8``
  (default) or ``bgr8`` Images, stamped ``start + index / fps`` (fps: --fps >
  the file's when sane > 30); undecodable frames are skipped and counted.

This module holds the bag source and the CLI; publishing and the video source
are :mod:`.replayer`'s (re-exported here), timing and /clock the
:class:`~.pacer.Pacer`'s. A damaged bag (truncated, bad metadata.yaml, missing
storage file, damage met while reading) is a :class:`ReplayError` naming it.

Timing follows the recorded times (bag: log time; video: index / fps) scaled by
``--rate`` (1 = real time, 4 = four times faster, 0 = as fast as possible).
Header stamps are kept unless ``--restamp`` shifts them so that the first
message is stamped "now" (the node's ROS clock), keeping their spacing.
``--clock`` also publishes ``rosgraph_msgs/Clock`` on ``/clock`` following the
header stamps (for nodes with ``use_sim_time``).

Works with the rclpy of Humble through kilted (Python >= 3.10).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import rclpy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image

from .replayer import (
    DEFAULT_VIDEO_TOPIC,
    ReplayError,
    ReplayItem,
    ReplayResult,
    Replayer,
    VideoSource,
    rgb_to_image_msg,
)

__all__ = [
    "IMAGE_MSGTYPES",
    "ReplayError",
    "ReplayItem",
    "ReplayResult",
    "BagSource",
    "VideoSource",
    "Replayer",
    "rgb_to_image_msg",
    "main",
]

#: rosbag2 message type names this tool can publish, with their rclpy classes.
IMAGE_MSGTYPES = {
    "sensor_msgs/msg/Image": Image,
    "sensor_msgs/msg/CompressedImage": CompressedImage,
}


# --------------------------------------------------------------------------
# bag source
# --------------------------------------------------------------------------
def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (YAML errors span several), at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BagSource:
    """Image/CompressedImage messages of a rosbag2 directory, in log-time order.

    Args:
        path: bag directory (the folder with metadata.yaml); a ``.mcap``/``.db3``
            file inside it is accepted too.
        topics: topics to play (recorded names); None = every image topic.
        remap: {recorded topic: output topic}.

    Raises:
        ReplayError: not a readable bag, no image topics, unknown or non-image
            topic requested, or a remap names a topic that is not played.
    """

    def __init__(self, path: Union[str, Path], topics: Optional[Sequence[str]] = None,
                 remap: Optional[Dict[str, str]] = None) -> None:
        from rosbags.rosbag2 import Reader

        path = Path(path)
        if path.is_file() and path.suffix in (".mcap", ".db3"):
            path = path.parent
        if not path.is_dir():
            raise ReplayError(f"bag {path} is not a directory")
        self.path = path
        try:
            with Reader(path) as reader:
                connections = list(reader.connections)
        except Exception as exc:  # rosbags raises its own error types for bad bags
            raise ReplayError(f"cannot read bag {path} (damaged, truncated or incomplete?): {_one_line(exc)}") from None
        images = [c for c in connections if c.msgtype in IMAGE_MSGTYPES]
        available = sorted({c.topic for c in images})
        if not images:
            types = sorted({f"{c.topic} ({c.msgtype})" for c in connections})
            raise ReplayError(f"bag {path} has no Image/CompressedImage topics (has: {', '.join(types) or 'none'})")
        if topics:
            wanted = [t if t.startswith("/") else "/" + t for t in topics]
            missing = [t for t in wanted if t not in available]
            if missing:
                raise ReplayError(f"topic(s) {', '.join(missing)} not image topics of {path}; "
                                  f"available: {', '.join(available)}")
            images = [c for c in images if c.topic in wanted]
        remap = dict(remap or {})
        unknown = [k for k in remap if k not in {c.topic for c in images}]
        if unknown:
            raise ReplayError(f"--remap source topic(s) {', '.join(unknown)} are not played; "
                              f"played: {', '.join(sorted({c.topic for c in images}))}")
        self._connection_ids = {c.id for c in images}
        self._out = {c.id: (remap.get(c.topic, c.topic), IMAGE_MSGTYPES[c.msgtype]) for c in images}
        self.skipped = 0  # messages whose CDR bytes did not deserialize (all passes)
        self.topics: Dict[str, type] = {}
        for out, cls in self._out.values():
            if self.topics.get(out, cls) is not cls:
                raise ReplayError(f"topic {out} would carry both Image and CompressedImage")
            self.topics[out] = cls

    def __iter__(self) -> Iterator[ReplayItem]:
        """The messages in log-time order; one that does not deserialize is skipped and counted.

        Raises:
            ReplayError: the storage fails while reading (truncated or damaged
                bag), naming the bag and how many messages were read before.
        """
        from rosbags.rosbag2 import Reader

        read = 0
        try:
            with Reader(self.path) as reader:
                conns = [c for c in reader.connections if c.id in self._connection_ids]
                for conn, log_ns, raw in reader.messages(connections=conns):
                    read += 1
                    out, cls = self._out[conn.id]
                    try:
                        msg = deserialize_message(bytes(raw), cls)
                    except Exception:  # rclpy raises RMWError for CDR it cannot parse
                        self.skipped += 1
                        continue
                    yield ReplayItem(out, int(log_ns), msg)
        except ReplayError:
            raise
        except Exception as exc:  # rosbags, sqlite (apsw) and mcap errors of a damaged file
            raise ReplayError(f"bag {self.path} is damaged: reading failed after {read} message(s): "
                              f"{type(exc).__name__}: {_one_line(exc)}") from None

    def __repr__(self) -> str:
        return f"BagSource({str(self.path)!r}, topics={sorted(self.topics)})"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def _parse_remap(values: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for value in values:
        old, sep, new = value.partition(":=")
        if not sep or not old or not new:
            raise ReplayError(f"--remap expects OLD:=NEW, got {value!r}")
        norm = lambda t: t if t.startswith("/") else "/" + t  # noqa: E731
        out[norm(old)] = norm(new)
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinipot-replay",
        description="Publish camera images from a rosbag2 directory (sqlite3/mcap) or a video file "
                    "onto ROS 2 topics, paced by the recorded times. ROS arguments go after --ros-args.",
        epilog="QoS: the default sensor-data profile is best effort; a best-effort publisher does NOT "
               "reach a reliable subscription (ros2 topic echo and many nodes default to reliable): use "
               "--reliable for those. A reliable publisher reaches both.",
    )
    p.add_argument("source", help="rosbag2 directory, or a video file")
    g = p.add_argument_group("bag source")
    g.add_argument("--topics", nargs="+", metavar="TOPIC", help="image topics to play (default: all)")
    g.add_argument("--remap", action="append", default=[], metavar="OLD:=NEW",
                   help="publish recorded topic OLD as NEW (repeatable)")
    g = p.add_argument_group("video source")
    g.add_argument("--topic", default=DEFAULT_VIDEO_TOPIC, help=f"output topic (default {DEFAULT_VIDEO_TOPIC})")
    g.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8", help="Image encoding (default rgb8)")
    g.add_argument("--frame-id", default="camera", help="header.frame_id (default camera)")
    g.add_argument("--fps", type=float, default=None,
                   help="video frame rate of the stamps (default: the file's when sane, else 30)")
    g.add_argument("--video-start-stamp", type=float, default=None, metavar="SECONDS",
                   help="stamp of frame 0 (default: wall-clock time when playback starts)")
    g = p.add_argument_group("playback")
    g.add_argument("--rate", type=float, default=1.0,
                   help="speed factor: 1 real time, 4 four times faster, 0 as fast as possible (default 1)")
    g.add_argument("--restamp", action="store_true",
                   help="shift header stamps so the first message is stamped now (ROS clock), keeping spacing")
    g.add_argument("--clock", action="store_true",
                   help="also publish rosgraph_msgs/Clock on /clock (never backwards; with --loop add --restamp)")
    g.add_argument("--clock-rate", type=float, default=50.0, metavar="HZ",
                   help="/clock ticks per second between messages (default 50; 0 = only at messages)")
    g.add_argument("--loop", action="store_true", help="play the source again and again")
    g.add_argument("--start-delay", type=float, default=0.0, metavar="S",
                   help="sleep S seconds before the first message (after --wait-for-subscribers)")
    g.add_argument("--wait-for-subscribers", type=int, default=0, metavar="N",
                   help="wait until every image topic has N matched subscribers")
    g.add_argument("--wait-timeout", type=float, default=30.0, metavar="S",
                   help="give up waiting for subscribers after S seconds (default 30; exit code 1)")
    g.add_argument("--max-messages", type=int, default=None, metavar="N", help="stop after N image messages")
    g.add_argument("--reliable", action="store_true",
                   help="reliable QoS, keep last 10 (default: sensor data = best effort, keep last 5)")
    g.add_argument("--node-name", default="infinipot_replay", help="node name (default infinipot_replay)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.rate) and args.rate >= 0):
        raise ReplayError(f"--rate must be >= 0, got {args.rate}")
    for name in ("start_delay", "wait_timeout", "clock_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise ReplayError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.wait_for_subscribers < 0:
        raise ReplayError(f"--wait-for-subscribers must be >= 0, got {args.wait_for_subscribers}")
    if args.max_messages is not None and args.max_messages < 1:
        raise ReplayError(f"--max-messages must be >= 1, got {args.max_messages}")


def _make_source(args: argparse.Namespace) -> Any:
    path = Path(args.source)
    if not path.exists():
        raise ReplayError(f"source {path} does not exist")
    if path.is_dir() or path.suffix in (".mcap", ".db3"):
        return BagSource(path, topics=args.topics, remap=_parse_remap(args.remap))
    if args.topics or args.remap:
        raise ReplayError("--topics/--remap apply to bag sources; for a video use --topic")
    return VideoSource(path, topic=args.topic, encoding=args.encoding, frame_id=args.frame_id,
                       fps=args.fps, start_stamp=args.video_start_stamp)


def _split_ros_args(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split argv into (our arguments, the ``--ros-args ... [--]`` sections).

    rclpy's remove_ros_args cannot be used: rcl still treats a bare
    ``old:=new`` outside ``--ros-args`` as a (deprecated) remap rule and would
    swallow the value of our own ``--remap old:=new``. Only the explicit
    sections go to rclpy.init.
    """
    ours: List[str] = []
    ros: List[str] = []
    inside = False
    for token in argv:
        if token == "--ros-args":
            inside = True
            ros.append(token)
        elif inside and token == "--":
            inside = False
            ros.append(token)
        elif inside:
            ros.append(token)
        else:
            ours.append(token)
    return ours, ros


def _missing_note(source: Any) -> str:
    stats = getattr(source, "stats", None)
    missing = getattr(stats, "missing", 0)
    return f", {missing} frame(s) announced by the video header never read (truncated?)" if missing else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point.

    Returns 0 on success, 2 on bad arguments or an unusable source, 1 when the
    replay itself fails (e.g. the subscriber wait timed out), 130 on Ctrl-C.
    ROS arguments (``--ros-args -r __node:=name -p ...``) are passed to rclpy.
    """
    raw = list(sys.argv[1:] if argv is None else argv)
    prog = "infinipot-replay"
    ours, ros_args = _split_ros_args(raw)
    parser = _build_parser()
    try:
        args = parser.parse_args(ours)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        _check_args(args)
        source = _make_source(args)
    except ReplayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    try:
        rclpy.init(args=[prog] + ros_args)
    except Exception as exc:  # malformed --ros-args section
        print(f"{prog}: error: bad ROS arguments {' '.join(ros_args)!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    replayer: Optional[Replayer] = None
    try:
        replayer = Replayer(
            source, node_name=args.node_name, rate=args.rate, restamp=args.restamp, clock=args.clock,
            clock_rate_hz=args.clock_rate, loop=args.loop, start_delay=args.start_delay,
            wait_for_subscribers=args.wait_for_subscribers, wait_timeout=args.wait_timeout,
            max_messages=args.max_messages, reliable=args.reliable)
        print(f"{prog}: {source!r} -> {', '.join(replayer.topics)} (rate {args.rate:g}, "
              f"{'reliable' if args.reliable else 'sensor-data QoS'})", file=sys.stderr)
        result = replayer.run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ReplayError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if replayer is not None:
            try:
                replayer.destroy()
            except Exception:  # context may already be shut down by Ctrl-C
                pass
        if rclpy.ok():
            rclpy.shutdown()
    print(f"{prog}: published {result.published} messages "
          f"({', '.join(f'{t}: {n}' for t, n in sorted(result.per_topic.items()))}), "
          f"{result.loops} loop(s), {result.clock_published} /clock, {result.wall_time_s:.2f} s, "
          f"{result.skipped} undecodable skipped{_missing_note(source)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
