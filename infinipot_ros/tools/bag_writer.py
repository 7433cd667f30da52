"""Write a video file into a rosbag2 (mcap or sqlite3) as camera images.

Pure Python (OpenCV + the ``rosbags`` library): no ROS installation needed.
Each kept video frame becomes one ``sensor_msgs/msg/Image`` (rgb8 or bgr8) or
``sensor_msgs/msg/CompressedImage`` (jpeg) message with

* ``header.stamp = start_stamp + frame_index / video_fps`` (``frame_index`` is
  the frame's index in the video, so ``--every`` keeps true timing), and the
  bag's log (receive) time equal to that stamp, so a player pacing by log time
  reproduces the video's timing;
* ``header.frame_id`` as given (default ``camera``).

Frames come from the tools' one reader (:class:`.video.VideoReader`): its
frame-rate rule (``--fps`` > the file's when sane > 30) and its handling of
damaged files (undecodable frames skipped and counted, their stamp slots left
empty; no bag at all when no frame decodes).

Compatibility: messages use the ``ROS2_HUMBLE`` rosbags typestore (the
sensor_msgs/Image, CompressedImage, std_msgs/Header and builtin_interfaces/Time
definitions are identical from Humble to kilted, RIHS01 hashes included), and
the bag is written with rosbag2 metadata version 8: version 9 stores
``offered_qos_profiles`` as a YAML list, which Humble's ``ros2 bag`` cannot
parse ("bad conversion", ros2/rosbag2#2013). mcap needs
``ros-humble-rosbag2-storage-mcap`` on Humble; sqlite3 works everywhere.

CLI: ``infinipot-video-to-bag VIDEO BAG [options]`` (see ``--help``).
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from .video import ReadStats, VideoError, VideoReader

__all__ = ["BagSummary", "BagWriterError", "write_video_to_bag", "main", "DEFAULT_TOPIC"]

DEFAULT_TOPIC = "/camera/image_raw"
DEFAULT_START_STAMP = 1_700_000_000.0
IMAGE_MSGTYPE = "sensor_msgs/msg/Image"
COMPRESSED_MSGTYPE = "sensor_msgs/msg/CompressedImage"
_STORAGES = ("mcap", "sqlite3")
_ENCODINGS = ("rgb8", "bgr8")
_BAG_VERSION = 8  # see module docstring: readable by Humble's rosbag2


class BagWriterError(RuntimeError):
    """Bad input for the bag writer (video unreadable, bag exists, bad option)."""


@dataclass(frozen=True)
class BagSummary:
    """What :func:`write_video_to_bag` wrote.

    Attributes:
        frames: number of messages written.
        first_stamp_ns / last_stamp_ns: header stamps (= log times) of the first
            and last message, nanoseconds since the epoch (0 when nothing was written).
        topic: the topic written.
        msgtype: ``sensor_msgs/msg/Image`` or ``sensor_msgs/msg/CompressedImage``.
        frames_skipped: undecodable video frames skipped (their stamp slots stay empty).
        frames_missing: frames the video header announced that were never read (truncated file).
        fps: frame rate of the stamps (frames per second).
        fps_source: ``"given"`` (--fps), ``"header"`` or ``"default"`` (30; see :func:`.video.resolve_fps`).
    """

    frames: int
    first_stamp_ns: int
    last_stamp_ns: int
    topic: str
    msgtype: str
    frames_skipped: int = 0
    frames_missing: int = 0
    fps: float = 0.0
    fps_source: str = ""


def _seconds_to_ns(seconds: Union[float, int, str, Decimal]) -> int:
    """Exact seconds -> ns (Decimal of the repr, so 1700000000.1 gives ...100000000)."""
    try:
        value = Decimal(str(seconds))
    except InvalidOperation:
        raise BagWriterError(f"invalid start stamp {seconds!r}") from None
    if not value.is_finite() or value < 0:
        raise BagWriterError(f"start stamp must be a finite number >= 0, got {seconds!r}")
    return int(value * 1_000_000_000)


def _target_size(src_w: int, src_h: int, width: Optional[int], height: Optional[int]) -> tuple:
    """Output (w, h); one of width/height alone keeps the aspect ratio."""
    if width is None and height is None:
        return src_w, src_h
    if (width is not None and width <= 0) or (height is not None and height <= 0):
        raise BagWriterError(f"--width/--height must be > 0 (got {width}, {height})")
    if width is None:
        width = max(1, int(round(src_w * height / src_h)))
    if height is None:
        height = max(1, int(round(src_h * width / src_w)))
    return int(width), int(height)


def write_video_to_bag(
    video_path: Union[str, Path],
    bag_path: Union[str, Path],
    *,
    topic: Optional[str] = None,
    storage: str = "mcap",
    encoding: str = "rgb8",
    frame_id: str = "camera",
    start_stamp: Union[float, str] = DEFAULT_START_STAMP,
    every: int = 1,
    max_frames: Optional[int] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    compressed: bool = False,
    jpeg_quality: int = 90,
    fps: Optional[float] = None,
    progress: Optional[bool] = None,
) -> BagSummary:
    """Write the frames of ``video_path`` into a new rosbag2 at ``bag_path``.

    Args:
        video_path: any file OpenCV's VideoCapture opens.
        bag_path: bag directory to create; must not exist.
        topic: topic name; default ``/camera/image_raw`` (raw) or
            ``/camera/image_raw/compressed`` (``compressed=True``).
        storage: ``"mcap"`` or ``"sqlite3"``.
        encoding: ``"rgb8"`` or ``"bgr8"`` for raw images; for compressed
            images it only names the source encoding in the format string.
        frame_id: ``header.frame_id``.
        start_stamp: stamp of video frame 0, seconds since the epoch.
        every: keep every N-th video frame (frames 0, N, 2N, ...).
        max_frames: stop after writing this many messages (None: all).
        width, height: resize (cv2.INTER_AREA); one alone keeps the aspect ratio.
        compressed: write ``sensor_msgs/msg/CompressedImage`` (jpeg,
            format ``"<encoding>; jpeg compressed bgr8"`` as image_transport).
        jpeg_quality: 1..100 for ``compressed``.
        fps: frame rate of the stamps (frames per second); None = the file's
            when sane, else 30 (:func:`.video.resolve_fps`, the rule of every tool).
        progress: tqdm progress bar on stderr; None = only when stderr is a tty.

    Returns:
        :class:`BagSummary`.

    Raises:
        BagWriterError: bad option, bag path exists, video cannot be opened
            or has no decodable frame (no bag is created then), naming the
            file. Undecodable frames are skipped and counted
            (``frames_skipped``, also in the bag's custom data).
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    video_path = Path(video_path)
    bag_path = Path(bag_path)
    if storage not in _STORAGES:
        raise BagWriterError(f"storage must be one of {_STORAGES}, got {storage!r}")
    if encoding not in _ENCODINGS:
        raise BagWriterError(f"encoding must be one of {_ENCODINGS}, got {encoding!r}")
    if every < 1:
        raise BagWriterError(f"--every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 0:
        raise BagWriterError(f"--max-frames must be >= 0, got {max_frames}")
    if not 1 <= jpeg_quality <= 100:
        raise BagWriterError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise BagWriterError(f"--fps must be > 0, got {fps}")
    if topic is None:
        topic = DEFAULT_TOPIC + ("/compressed" if compressed else "")
    if not topic.startswith("/"):
        topic = "/" + topic
    start_ns = _seconds_to_ns(start_stamp)
    if bag_path.exists():
        raise BagWriterError(f"bag path {bag_path} exists already; choose a new path (nothing was overwritten)")
    if not video_path.is_file():
        raise BagWriterError(f"video file {video_path} does not exist")

    try:
        reader = VideoReader(str(video_path), fps=fps, every=every, color="bgr",
                             max_frames=max_frames if max_frames else 0)
    except (OSError, ValueError) as exc:
        raise BagWriterError(str(exc)) from None
    video_fps = reader.fps
    frames = iter(reader)
    first = None
    if max_frames != 0:
        try:  # the first frame before the bag exists: a video with none leaves no bag behind
            first = next(frames, None)
        except VideoError as exc:
            raise BagWriterError(str(exc)) from None
    total = reader.info.frame_count
    expected = (total + every - 1) // every if total > 0 else None
    if expected is not None and max_frames is not None:
        expected = min(expected, max_frames)

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    Time = typestore.types["builtin_interfaces/msg/Time"]
    Header = typestore.types["std_msgs/msg/Header"]
    msgtype = COMPRESSED_MSGTYPE if compressed else IMAGE_MSGTYPE
    Msg = typestore.types[msgtype]

    use_bar = sys.stderr.isatty() if progress is None else progress
    bar = None
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=expected, unit="frame", desc=f"{video_path.name} -> {bag_path.name}", file=sys.stderr)

    written = 0
    first_ns = last_ns = 0
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(bag_path, version=_BAG_VERSION, storage_plugin=plugin)
    writer.set_custom_data("infinipot.source_video", video_path.name)
    writer.set_custom_data("infinipot.video_fps", repr(video_fps))
    writer.set_custom_data("infinipot.video_fps_source", reader.info.fps_source)
    try:
        writer.open()
        conn = writer.add_connection(topic, msgtype, typestore=typestore)
        out_size = None
        for index, offset_ns, bgr in itertools.chain([first] if first is not None else [], frames):
            if out_size is None:
                out_size = _target_size(bgr.shape[1], bgr.shape[0], width, height)
            if out_size != (bgr.shape[1], bgr.shape[0]):
                bgr = cv2.resize(bgr, out_size, interpolation=cv2.INTER_AREA)
            stamp_ns = start_ns + offset_ns
            header = Header(stamp=Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000),
                            frame_id=frame_id)
            if compressed:
                ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
                if not ok:
                    raise BagWriterError(f"JPEG encoding failed for frame {index}")
                msg = Msg(header=header, format=f"{encoding}; jpeg compressed bgr8",
                          data=np.asarray(jpg, dtype=np.uint8).reshape(-1))
            else:
                pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if encoding == "rgb8" else bgr
                h, w = pixels.shape[:2]
                msg = Msg(header=header, height=h, width=w, encoding=encoding, is_bigendian=0,
                          step=w * 3, data=np.ascontiguousarray(pixels).reshape(-1))
            writer.write(conn, stamp_ns, typestore.serialize_cdr(msg, msgtype))
            if written == 0:
                first_ns = stamp_ns
            last_ns = stamp_ns
            written += 1
            if bar is not None:
                bar.update(1)
    except BaseException:
        if bar is not None:
            bar.close()
        if writer.storage is not None:
            _note_counts(writer, reader.stats)
            writer.close()  # keep what was written (e.g. after Ctrl-C) as a valid bag
        raise
    _note_counts(writer, reader.stats)
    writer.close()
    if bar is not None:
        bar.close()
    return BagSummary(frames=written, first_stamp_ns=first_ns, last_stamp_ns=last_ns, topic=topic,
                      msgtype=msgtype, frames_skipped=reader.stats.skipped, frames_missing=reader.stats.missing,
                      fps=video_fps, fps_source=reader.info.fps_source)


def _note_counts(writer, stats: ReadStats) -> None:
    """The reader's damage counts in the bag's custom data (metadata.yaml)."""
    writer.set_custom_data("infinipot.frames_skipped", str(stats.skipped))
    writer.set_custom_data("infinipot.frames_missing", str(stats.missing))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinipot-video-to-bag",
        description="Write a video file into a rosbag2 (mcap or sqlite3) as sensor_msgs/Image "
                    "(or CompressedImage jpeg) messages stamped start + frame_index / fps.",
    )
    p.add_argument("video", help="input video (anything OpenCV opens)")
    p.add_argument("bag", help="output bag directory (must not exist)")
    p.add_argument("--topic", default=None,
                   help=f"topic (default {DEFAULT_TOPIC}, or {DEFAULT_TOPIC}/compressed with --compressed)")
    p.add_argument("--storage", choices=_STORAGES, default="mcap",
                   help="rosbag2 storage plugin (default mcap; sqlite3 is readable by any Humble install)")
    p.add_argument("--encoding", choices=_ENCODINGS, default="rgb8", help="raw image encoding (default rgb8)")
    p.add_argument("--frame-id", default="camera", help="header.frame_id (default camera)")
    p.add_argument("--start-stamp", default=str(DEFAULT_START_STAMP),
                   help="stamp of frame 0 in seconds since the epoch (default 1700000000.0)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="keep every N-th frame (default 1)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="write at most N messages")
    p.add_argument("--width", type=int, default=None, help="resize to this width (INTER_AREA)")
    p.add_argument("--height", type=int, default=None, help="resize to this height (INTER_AREA)")
    p.add_argument("--fps", type=float, default=None,
                   help="video frame rate of the stamps (default: the file's when sane, else 30)")
    p.add_argument("--compressed", action="store_true",
                   help="write sensor_msgs/CompressedImage (jpeg) instead of raw Image")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns 0 on success, 2 on bad arguments/input, 1 on other errors."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage/error
        return int(exc.code or 0)
    try:
        summary = write_video_to_bag(
            args.video, args.bag, topic=args.topic, storage=args.storage, encoding=args.encoding,
            frame_id=args.frame_id, start_stamp=args.start_stamp, every=args.every,
            max_frames=args.max_frames, width=args.width, height=args.height,
            compressed=args.compressed, jpeg_quality=args.jpeg_quality, fps=args.fps,
            progress=args.progress,
        )
    except BagWriterError as exc:
        print(f"infinipot-video-to-bag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infinipot-video-to-bag: interrupted (the bag holds the frames written so far)", file=sys.stderr)
        return 130
    except Exception as exc:  # e.g. disk full: a one-line message, not a traceback
        print(f"infinipot-video-to-bag: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    span = (summary.last_stamp_ns - summary.first_stamp_ns) / 1e9
    print(f"wrote {summary.frames} {summary.msgtype} messages on {summary.topic} to {args.bag} "
          f"({args.storage}, {span:.3f} s of stamps starting {summary.first_stamp_ns / 1e9:.3f}, "
          f"{summary.fps:g} fps from {summary.fps_source}); {summary.frames_skipped} undecodable frame(s) "
          f"skipped, {summary.frames_missing} announced by the video header never read")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
