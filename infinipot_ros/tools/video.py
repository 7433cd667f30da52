"""The one video-file reader of the command-line tools (OpenCV, deterministic).

:func:`iter_video` yields ``(index, stamp_ns, rgb)`` per decoded frame: a
global frame index that keeps counting across loops, a stamp of
``index / fps`` seconds (in ns) and the frame as RGB uint8 [H, W, 3]. Decoding
goes through ``cv2.VideoCapture`` with no seeking, so the same file gives the
same frames, bit for bit, on every pass and in every process of one machine.
:func:`probe_video` reads the header (frame rate, frame count, size) only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import cv2
import numpy as np

log = logging.getLogger(__name__)

#: Frame rate assumed for a file whose header reports none (frames per second).
FALLBACK_FPS = 30.0


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header says.

    Attributes:
        fps: frame rate (frames per second); :data:`FALLBACK_FPS` when the header has none.
        fps_from_header: False when ``fps`` is the fallback.
        frame_count: frames per pass as the header reports it (0 = unknown;
            some containers report an estimate).
        width, height: frame size (pixels).
    """

    fps: float
    fps_from_header: bool
    frame_count: int
    width: int
    height: int

    def total_frames(self, loops: int = 1, max_frames: int = 0) -> int:
        """Frames :func:`iter_video` is expected to yield for ``loops`` and ``max_frames`` (0 = unknown)."""
        total = self.frame_count * max(1, int(loops))
        if max_frames and max_frames > 0:
            total = min(total, max_frames) if total else int(max_frames)
        return total


def _open(path: str) -> "cv2.VideoCapture":
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise OSError(f"cannot open video {str(path)!r}")
    return cap


def probe_video(path: str) -> VideoInfo:
    """Frame rate, frame count and size of a video file, from its header (nothing decoded).

    Raises:
        OSError: the file cannot be opened as a video.
    """
    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    ok = fps > 0 and fps == fps  # not NaN
    return VideoInfo(fps if ok else FALLBACK_FPS, ok, max(0, count), width, height)


def iter_video(
    path: str, max_frames: int = 0, loops: int = 1, fps: Optional[float] = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (index, stamp_ns, RGB uint8 frame [H, W, 3]) of a video file, ``loops`` times over.

    Args:
        path: any file OpenCV's VideoCapture opens.
        max_frames: stop after this many frames in all (all loops together); 0 = no limit.
        loops: passes over the file (>= 1); the file is reopened for each pass.
        fps: frame rate used for the stamps (frames per second); None = the
            header's, :data:`FALLBACK_FPS` if it has none (logged).

    The index counts frames over all loops (the first frame of the second pass
    of an N-frame file has index N) and ``stamp_ns = round(index * 1e9 / fps)``,
    so stamps keep increasing across loops as if the video went on.

    Raises:
        OSError: the file cannot be opened as a video.
        ValueError: loops < 1, max_frames < 0 or fps <= 0.
    """
    if loops < 1:
        raise ValueError(f"loops must be >= 1, got {loops}")
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    info = probe_video(path)  # raises OSError before the first frame is asked for
    if fps is None:
        fps = info.fps
        if not info.fps_from_header:
            log.warning("%s reports no frame rate; assuming %.0f fps", path, fps)
    index = 0
    for _ in range(loops):
        cap = _open(path)
        try:
            while not max_frames or index < max_frames:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    break
                if bgr.ndim == 2:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                else:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield index, int(round(index * 1e9 / fps)), rgb
                index += 1
        finally:
            cap.release()
        if max_frames and index >= max_frames:
            return
