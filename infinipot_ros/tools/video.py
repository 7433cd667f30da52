"""The one video-file reader of the command-line tools (OpenCV, deterministic, damage-tolerant).

Used by ``infinipot-stream``, ``infinipot-bench``, ``infinipot-video-to-bag``
and ``infinipot-replay`` (and the eval and load tools).

:class:`VideoReader` yields :class:`VideoFrame` ``(index, stamp_ns, image)``
per decoded frame: the frame's position in the video (it keeps counting across
loops, and a skipped frame keeps its slot), a stamp of ``index / fps`` seconds
(in ns) and the frame as uint8 [H, W, 3], RGB (default) or BGR. Decoding goes
through ``cv2.VideoCapture`` with no seeking, so the same file gives the same
frames, bit for bit, on every pass and in every process of one machine.

The frame-rate rule (:func:`resolve_fps`, the same in every tool):
``fps`` given by the caller (``--fps`` of the replayer and the bag writer;
must be finite and > 0, else ValueError) > the container's frame rate when it
is sane (finite, 0 < fps <= :data:`MAX_SANE_FPS`) > :data:`DEFAULT_FPS` (30),
with a warning naming the file. ``infinipot-stream`` and ``infinipot-bench``
have no video-rate option (their ``--fps`` is the sampling rate), so for them
it is the header's rate or 30.

Damaged files (truncated, garbage in the middle, frames the decoder refuses):

* a failed read followed by a good frame is an undecodable frame: skipped,
  counted in :attr:`ReadStats.skipped`, its index (and stamp slot) kept;
* the stream ends at the first failed read once the header's frame count is
  reached, or after :data:`MAX_CONSECUTIVE_FAILURES` failed reads in a row
  (reading never hangs: each ``grab`` is bounded inside OpenCV);
* frames the header announced that never came are
  :attr:`ReadStats.missing` (a truncated file; containers that estimate the
  count, e.g. mkv, may show a few on a sound file);
* a pass that decodes no frame at all raises :class:`VideoError` naming the
  file; a file OpenCV cannot open (missing, empty, not a video) raises it at
  construction.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Tuple

import cv2
import numpy as np

log = logging.getLogger(__name__)

#: Frame rate used when the caller gives none and the header's is missing or not sane (frames per second).
DEFAULT_FPS = 30.0
FALLBACK_FPS = DEFAULT_FPS  # the older name
#: Header frame rates above this are treated as missing (some containers report a time base, e.g. 90000).
MAX_SANE_FPS = 1000.0
#: Failed reads in a row after which a stream whose header count is not reached is taken as ended.
MAX_CONSECUTIVE_FAILURES = 25

FPS_GIVEN, FPS_HEADER, FPS_DEFAULT = "given", "header", "default"


class VideoError(OSError):
    """A video file that cannot be read: missing, empty, not a video, or no decodable frame.

    The message names the file; ``path`` holds it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"video {str(path)!r}: {reason}")
        self.path = str(path)


def _sane(fps: Optional[float]) -> bool:
    return fps is not None and math.isfinite(fps) and 0 < fps <= MAX_SANE_FPS


def resolve_fps(given: Optional[float], header: Optional[float]) -> Tuple[float, str]:
    """The frame-rate rule of every tool: given > sane header > :data:`DEFAULT_FPS`.

    Args:
        given: the caller's frame rate (frames per second), None = not given.
        header: what the container reports (None, 0, -1, NaN, inf or absurd when it has none).

    Returns:
        ``(fps, source)``, source one of ``"given"``, ``"header"``, ``"default"``.

    Raises:
        ValueError: ``given`` is not a finite number > 0.
    """
    if given is not None:
        given = float(given)
        if not (math.isfinite(given) and given > 0):
            raise ValueError(f"fps must be a finite number > 0, got {given}")
        return given, FPS_GIVEN
    if header is not None and _sane(float(header)):
        return float(header), FPS_HEADER
    return DEFAULT_FPS, FPS_DEFAULT


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says, with the frame rate resolved.

    Attributes:
        fps: frame rate used for the stamps (frames per second), see :func:`resolve_fps`.
        fps_from_header: True when ``fps`` is the header's.
        frame_count: frames per pass as the header reports it (0 = unknown;
            some containers report an estimate, a truncated file the original count).
        width, height: frame size (pixels).
        fps_source: ``"given"``, ``"header"`` or ``"default"``.
        header_fps: the header's raw value (frames per second; may be 0, -1, NaN).
    """

    fps: float
    fps_from_header: bool
    frame_count: int
    width: int
    height: int
    fps_source: str = FPS_HEADER
    header_fps: float = 0.0

    def total_frames(self, loops: int = 1, max_frames: int = 0) -> int:
        """Frames a sound file yields for ``loops`` and ``max_frames`` (0 = unknown)."""
        total = self.frame_count * max(1, int(loops))
        if max_frames and max_frames > 0:
            total = min(total, max_frames) if total else int(max_frames)
        return total


class VideoFrame(NamedTuple):
    """One decoded frame: ``index`` in the video, ``stamp_ns = round(index * 1e9 / fps)``, uint8 [H, W, 3]."""

    index: int
    stamp_ns: int
    image: np.ndarray


@dataclass
class ReadStats:
    """Counts of a :class:`VideoReader`, over every pass it made.

    Attributes:
        frames: frames yielded.
        skipped: undecodable frames skipped (a failed read with a good frame after it).
        missing: frames the header announced that were never read (truncated file).
        passes: passes that reached the end of the file.
    """

    frames: int = 0
    skipped: int = 0
    missing: int = 0
    passes: int = 0


def _open(path: str) -> "cv2.VideoCapture":
    path = str(path)
    if not os.path.exists(path):
        raise VideoError(path, "cannot open: the file does not exist")
    if os.path.isdir(path):
        raise VideoError(path, "cannot open: it is a directory")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "cannot open: the file is empty")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise VideoError(path, "cannot open: OpenCV finds no video in it (not a video file, or its header is damaged)")
    return cap


def probe_video(path: str, fps: Optional[float] = None) -> VideoInfo:
    """Frame rate, frame count and size of a video file, from its header (nothing decoded).

    Args:
        path: the file.
        fps: the caller's frame rate (see :func:`resolve_fps`), None = from the header.

    Raises:
        VideoError (an OSError): the file cannot be opened as a video.
        ValueError: ``fps`` given but not finite and > 0.
    """
    cap = _open(path)
    try:
        header = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    rate, source = resolve_fps(fps, header)
    return VideoInfo(rate, source == FPS_HEADER, max(0, count), width, height, source, header)


class VideoReader:
    """Frames of a video file with stamps, tolerant of damage (see the module doc).

    Args:
        path: any file OpenCV's VideoCapture opens.
        fps: frame rate for the stamps (frames per second), None = the rule of :func:`resolve_fps`.
        max_frames: stop after yielding this many frames in all (all loops together); 0 = no limit.
        loops: passes over the file (>= 1); the file is reopened for each pass and
            indices (so stamps) continue as if the video went on.
        every: yield only frames whose index within the pass is a multiple of this
            (the others are grabbed, not converted).
        color: ``"rgb"`` or ``"bgr"`` channel order of the yielded images.
        max_failures: failed reads in a row that end a pass before the header's count.

    Attributes:
        info: :class:`VideoInfo` (``info.fps`` is the rate used).
        stats: :class:`ReadStats`, updated while iterating.

    Raises (at construction):
        VideoError: the file cannot be opened as a video.
        ValueError: loops < 1, max_frames < 0, every < 1, max_failures < 1, bad
            color, or fps given but not > 0.

    Iterating raises VideoError when a pass decodes no frame at all.
    """

    def __init__(self, path: str, *, fps: Optional[float] = None, max_frames: int = 0, loops: int = 1,
                 every: int = 1, color: str = "rgb", max_failures: int = MAX_CONSECUTIVE_FAILURES) -> None:
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        if color not in ("rgb", "bgr"):
            raise ValueError(f"color must be 'rgb' or 'bgr', got {color!r}")
        self.path = str(path)
        self.info = probe_video(self.path, fps)
        self.max_frames, self.loops, self.every = int(max_frames), int(loops), int(every)
        self.color, self.max_failures = color, int(max_failures)
        self.stats = ReadStats()
        if self.info.fps_source == FPS_DEFAULT:
            log.warning("video %r reports no usable frame rate (%s); assuming %g fps", self.path,
                        self.info.header_fps, self.info.fps)

    @property
    def fps(self) -> float:
        """Frame rate of the stamps (frames per second)."""
        return self.info.fps

    def __iter__(self) -> Iterator[VideoFrame]:
        base = 0  # index of this pass's first frame
        for _ in range(self.loops):
            length, done = yield from self._pass(base)
            if done:
                return
            base += length

    def _pass(self, base: int):
        """One pass from index ``base``; returns (positions read, limit reached)."""
        stats, every, ns_per_frame = self.stats, self.every, 1e9 / self.info.fps
        count = self.info.frame_count
        pos = 0  # positions of this pass known to be frames (good or skipped)
        pending = 0  # failed reads in a row not yet followed by a good frame
        good = 0
        skipped_before = stats.skipped
        cap = _open(self.path)
        try:
            while True:
                if self.max_frames and stats.frames >= self.max_frames:
                    return pos, True
                if not cap.grab():
                    pending += 1
                    if pending >= self.max_failures or (count and pos + pending >= count):
                        break
                    continue
                stats.skipped += pending
                pos += pending
                pending = 0
                index = pos
                pos += 1
                good += 1
                if index % every:
                    continue
                ok, image = cap.retrieve()
                if not ok or image is None:
                    stats.skipped += 1
                    continue
                stats.frames += 1
                yield VideoFrame(base + index, int(round((base + index) * ns_per_frame)), self._convert(image))
        finally:
            cap.release()
        if not good:
            raise VideoError(self.path, "no decodable frame (the file is truncated or damaged, "
                                        f"{pending} read(s) failed)")
        stats.passes += 1
        missing = max(0, count - pos) if count else 0
        stats.missing += missing
        skipped = stats.skipped - skipped_before
        if skipped or missing:
            log.warning("video %r: %d undecodable frame(s) skipped, %d of the %d frames its header announces "
                        "never read (damaged or truncated file)", self.path, skipped, missing, count)
        return pos, False

    def _convert(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            code = cv2.COLOR_GRAY2RGB if self.color == "rgb" else cv2.COLOR_GRAY2BGR
        elif image.shape[2] == 4:
            code = cv2.COLOR_BGRA2RGB if self.color == "rgb" else cv2.COLOR_BGRA2BGR
        elif self.color == "rgb":
            code = cv2.COLOR_BGR2RGB
        else:
            return image
        return cv2.cvtColor(image, code)


def iter_video(
    path: str, max_frames: int = 0, loops: int = 1, fps: Optional[float] = None
) -> Iterator[Tuple[int, int, np.ndarray]]:
    """Yield (index, stamp_ns, RGB uint8 frame [H, W, 3]) of a video file: :class:`VideoReader` as a generator.

    Args:
        path: any file OpenCV's VideoCapture opens.
        max_frames: stop after this many frames in all (all loops together); 0 = no limit.
        loops: passes over the file (>= 1).
        fps: frame rate used for the stamps (frames per second); None = :func:`resolve_fps`'s rule.

    Raises (at the first ``next``):
        VideoError (an OSError): the file cannot be opened, or a pass decodes no frame.
        ValueError: loops < 1, max_frames < 0 or fps <= 0.
    """
    yield from VideoReader(path, fps=fps, max_frames=max_frames, loops=loops)
