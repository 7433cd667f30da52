"""sensor_msgs/Image and CompressedImage -> RGB numpy arrays.

Pure numpy/OpenCV: nothing here imports rclpy, so the functions accept any
object with the sensor_msgs fields (rclpy messages, rosbags dataclasses,
``types.SimpleNamespace`` in tests).

Output contract for every public function: a new, writeable, C-contiguous
``np.ndarray`` of shape ``[H, W, 3]``, dtype ``uint8``, channel order RGB. It
never aliases ``msg.data``, so the message may be reused or freed afterwards.

Supported input:

* ``sensor_msgs/Image`` with encoding ``rgb8``, ``bgr8``, ``rgba8``,
  ``bgra8``, ``mono8`` or ``mono16`` (exact, case-sensitive names, as
  cv_bridge). ``step`` (row stride, may include padding) and, for mono16,
  ``is_bigendian`` are honoured. Alpha is dropped. mono16 is reduced to 8 bit
  like cv_bridge does (``convertTo(CV_8U, 255.0 / 65535.0)``: multiply, round
  to nearest, saturate), i.e. ``v8 = round(v16 / 257)``.
* ``sensor_msgs/CompressedImage`` whose ``format`` names jpeg/jpg/png, either
  plain (``"jpeg"``, ``"png"``) or the image_transport form
  (``"rgb8; jpeg compressed bgr8"``). ``compressedDepth`` is rejected.

Everything else raises :class:`ImageConversionError` (a ``ValueError``) whose
message names the encoding/format and the sizes involved.

Backend: when ROS 2's ``cv_bridge`` is importable and passes a self-test,
:func:`message_to_rgb` converts through it (the reference on a robot);
otherwise through the numpy/OpenCV fallback in this module, written to the same
rules (the comparison test runs wherever cv_bridge is importable). The choice is made once, in :func:`try_cv_bridge`; set
``INFINIPOT_NO_CV_BRIDGE=1`` to force the fallback.

Why not ``rosbags.image`` (installed with rosbags-image): its
``image_to_cvimage`` maps ``msg.data`` as ``height x width`` pixels ignoring
``step`` (padded rows come out shifted), and its 16->8 bit path truncates
(``astype`` after multiplying) where cv_bridge rounds.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Optional

import cv2
import numpy as np

__all__ = [
    "SUPPORTED_ENCODINGS",
    "ImageConversionError",
    "image_to_rgb",
    "compressed_to_rgb",
    "message_to_rgb",
    "try_cv_bridge",
    "conversion_backend",
]

_LOG = logging.getLogger(__name__)

# encoding -> (channels, bytes per channel, cv2 code to RGB or None if already RGB)
_ENCODINGS = {
    "rgb8": (3, 1, None),
    "bgr8": (3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": (4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": (1, 1, cv2.COLOR_GRAY2RGB),
    "mono16": (1, 2, cv2.COLOR_GRAY2RGB),
}

#: Image encodings accepted by :func:`image_to_rgb` (and by message_to_rgb,
#: whichever backend is active).
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)

_COMPRESSED_KINDS = ("jpeg", "jpg", "png")

# cv_bridge's 16 -> 8 bit factor (cv_bridge.cpp, toCvCopyImpl: convertTo).
_SCALE_16_TO_8 = 255.0 / 65535.0


class ImageConversionError(ValueError):
    """A message cannot be converted to an RGB image.

    Raised for unsupported encodings or compressed formats, inconsistent sizes
    (zero width/height, ``step`` too small, truncated ``data``) and
    undecodable compressed data. The message names the encoding or format.
    """


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _as_uint8_buffer(data: Any) -> np.ndarray:
    """msg.data (bytes, array.array('B'), memoryview, numpy, list) -> 1-D uint8 view/array."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        # a plain list/tuple of ints (e.g. a hand-built message)
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _reduce_16_to_8(img16: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 with cv_bridge's rule: saturate(round(v * 255 / 65535))."""
    # convertScaleAbs computes saturate_cast<uchar>(|v * alpha|): for unsigned
    # input that is exactly convertTo(CV_8U, alpha) (checked for all 65536 values
    # in the tests).
    return cv2.convertScaleAbs(img16, alpha=_SCALE_16_TO_8)


def _to_rgb_from_decoded(img: np.ndarray, what: str) -> np.ndarray:
    """An imdecode result (gray, BGR or BGRA; 8 or 16 bit) -> RGB uint8."""
    if img.dtype == np.uint16:
        img = _reduce_16_to_8(img)
    elif img.dtype != np.uint8:
        raise ImageConversionError(f"{what}: decoded to unsupported dtype {img.dtype}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ImageConversionError(f"{what}: decoded to unsupported shape {img.shape}")


def _validate_image(msg: Any) -> tuple:
    """Check an Image message; return (encoding, h, w, step, channels, bpc, buffer)."""
    encoding = getattr(msg, "encoding", None)
    if encoding not in _ENCODINGS:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    channels, bpc, _ = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"{encoding} image has zero size ({width}x{height})")
    row_bytes = width * channels * bpc
    if step < row_bytes:
        raise ImageConversionError(
            f"{encoding} image {width}x{height}: step {step} < width*channels*bytes = "
            f"{width}*{channels}*{bpc} = {row_bytes}"
        )
    buf = _as_uint8_buffer(msg.data)
    if buf.size < step * height:
        raise ImageConversionError(
            f"{encoding} image {width}x{height}: data has {buf.size} bytes, "
            f"needs step*height = {step}*{height} = {step * height} (truncated)"
        )
    return encoding, height, width, step, channels, bpc, buf


# --------------------------------------------------------------------------
# fallback converters
# --------------------------------------------------------------------------
def image_to_rgb(msg: Any) -> np.ndarray:
    """Convert a sensor_msgs/Image to RGB with numpy/OpenCV (no cv_bridge).

    Args:
        msg: object with ``encoding`` (one of :data:`SUPPORTED_ENCODINGS`),
            ``height``, ``width``, ``step`` (bytes per row, >= width * channels
            * bytes per channel; extra bytes are row padding), ``is_bigendian``
            (used for mono16) and ``data`` (bytes-like, ``array('B')``, uint8
            numpy array or list of ints; at least ``step * height`` bytes).

    Returns:
        ``np.ndarray`` [height, width, 3] uint8, RGB, C-contiguous, a new array.
        mono8 is replicated to 3 channels; mono16 is first reduced to 8 bit as
        cv_bridge does (``round(v * 255 / 65535)``, saturated); alpha is dropped.

    Raises:
        ImageConversionError: unsupported encoding, zero width/height, step too
            small, or data shorter than ``step * height``.
    """
    encoding, height, width, step, channels, bpc, buf = _validate_image(msg)
    code = _ENCODINGS[encoding][2]
    if bpc == 1:
        # a strided view over the message bytes: rows `step` apart, padding skipped
        view = np.ndarray(shape=(height, width, channels), dtype=np.uint8, buffer=buf,
                          strides=(step, channels, 1))
        if code is None:
            return np.array(view, dtype=np.uint8, order="C", copy=True)
        if channels == 1:
            view = view[:, :, 0]
        return cv2.cvtColor(view, code)
    # mono16: honour the message's byte order
    dtype = np.dtype(">u2" if int(getattr(msg, "is_bigendian", 0)) else "<u2")
    view16 = np.ndarray(shape=(height, width), dtype=dtype, buffer=buf, strides=(step, 2))
    native = np.ascontiguousarray(view16, dtype=np.uint16)  # converts byte order if needed
    return cv2.cvtColor(_reduce_16_to_8(native), cv2.COLOR_GRAY2RGB)


def _compressed_kind(msg: Any) -> str:
    fmt = getattr(msg, "format", None)
    if not isinstance(fmt, str):
        raise ImageConversionError(f"CompressedImage has no string 'format' field ({fmt!r})")
    low = fmt.lower()
    if "compresseddepth" in low:
        raise ImageConversionError(
            f"unsupported compressed format {fmt!r}: compressedDepth (depth images) is not an RGB stream"
        )
    for kind in _COMPRESSED_KINDS:
        if kind in low:
            return kind
    raise ImageConversionError(
        f"unsupported compressed format {fmt!r}; expected one naming jpeg, jpg or png "
        f"(e.g. 'jpeg', 'png', 'rgb8; jpeg compressed bgr8')"
    )


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (jpeg/png) to RGB with OpenCV.

    Args:
        msg: object with ``format`` (``"jpeg"``, ``"jpg"``, ``"png"`` or an
            image_transport string such as ``"rgb8; jpeg compressed bgr8"`` or
            ``"mono8; png compressed mono8"``) and ``data`` (the encoded bytes).

    Returns:
        ``np.ndarray`` [H, W, 3] uint8 RGB, C-contiguous. Gray images are
        replicated to 3 channels, alpha is dropped, 16-bit PNGs are reduced
        with the same rule as mono16. The channel order in the format string
        does not matter: OpenCV always decodes to BGR(A)/gray, as cv_bridge does.

    Raises:
        ImageConversionError: format not jpeg/jpg/png (or compressedDepth),
            empty data, or data OpenCV cannot decode.
    """
    kind = _compressed_kind(msg)
    buf = _as_uint8_buffer(msg.data)
    if buf.size == 0:
        raise ImageConversionError(f"CompressedImage ({msg.format!r}) has no data")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageConversionError(
            f"could not decode CompressedImage as {kind} (format {msg.format!r}, {buf.size} bytes)"
        )
    return _to_rgb_from_decoded(img, f"CompressedImage {msg.format!r}")


# --------------------------------------------------------------------------
# backend choice (cv_bridge when it works)
# --------------------------------------------------------------------------
class _Probe:
    """Duck-typed Image used to self-test cv_bridge."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


@functools.lru_cache(maxsize=1)
def try_cv_bridge() -> Optional[Any]:
    """Return a working ROS 2 ``cv_bridge.CvBridge`` instance, or None.

    The result is cached: the import and a small self-test (a padded bgr8
    image and a mono16 image converted by both cv_bridge and the fallback must
    agree) run once per process. Returns None when ``INFINIPOT_NO_CV_BRIDGE``
    is set to a non-empty value other than ``0``, when cv_bridge is not
    importable (no ROS install, or the ROS 1 ``cv-bridge`` from PyPI) or when
    the self-test fails; the reason is logged at INFO level.
    """
    if os.environ.get("INFINIPOT_NO_CV_BRIDGE", "") not in ("", "0"):
        _LOG.info("cv_bridge disabled by INFINIPOT_NO_CV_BRIDGE; using the numpy/OpenCV fallback")
        return None
    try:
        import cv_bridge  # noqa: PLC0415 (optional dependency)

        bridge = cv_bridge.CvBridge()
        rng = np.random.default_rng(0)
        h, w = 3, 5
        step = w * 3 + 4
        bgr = rng.integers(0, 256, size=(h, step), dtype=np.uint8)
        probes = [
            _Probe(encoding="bgr8", height=h, width=w, step=step, is_bigendian=0, data=bgr.tobytes()),
            _Probe(encoding="mono16", height=1, width=4, step=8, is_bigendian=0,
                   data=np.array([0, 128, 129, 65535], dtype="<u2").tobytes()),
        ]
        for probe in probes:
            got = np.asarray(bridge.imgmsg_to_cv2(probe, "rgb8"))
            if not np.array_equal(got, image_to_rgb(probe)):
                _LOG.warning("cv_bridge disagrees with the fallback on %s; not using it", probe.encoding)
                return None
    except Exception as exc:  # ImportError, CvBridgeError, broken install: all mean "no bridge"
        _LOG.info("cv_bridge not used (%s: %s); using the numpy/OpenCV fallback", type(exc).__name__, exc)
        return None
    _LOG.info("using cv_bridge for image conversion")
    return bridge


def conversion_backend() -> str:
    """``"cv_bridge"`` or ``"numpy"``: which path :func:`message_to_rgb` uses."""
    return "cv_bridge" if try_cv_bridge() is not None else "numpy"


def message_to_rgb(msg: Any) -> np.ndarray:
    """Convert an Image or CompressedImage message to RGB, the node's entry point.

    Dispatches on type: objects with a ``format`` attribute are
    CompressedImage (:func:`compressed_to_rgb` rules), others Image
    (:func:`image_to_rgb` rules). The same inputs are accepted and rejected
    whichever backend is active; with cv_bridge (see :func:`try_cv_bridge`)
    the pixels come from ``imgmsg_to_cv2(msg, "rgb8")`` or
    ``compressed_imgmsg_to_cv2(msg)`` + BGR->RGB. If cv_bridge raises on a
    message that passed validation (e.g. big-endian mono16 with NumPy 2, where
    cv_bridge's ``ndarray.newbyteorder`` no longer exists), the fallback is used.

    Returns:
        ``np.ndarray`` [H, W, 3] uint8 RGB, C-contiguous.

    Raises:
        ImageConversionError: see :func:`image_to_rgb` / :func:`compressed_to_rgb`.
    """
    bridge = try_cv_bridge()
    if hasattr(msg, "format"):
        _compressed_kind(msg)  # same acceptance rules for both backends
        if bridge is None:
            return compressed_to_rgb(msg)
        if _as_uint8_buffer(msg.data).size == 0:
            raise ImageConversionError(f"CompressedImage ({msg.format!r}) has no data")
        try:
            img = bridge.compressed_imgmsg_to_cv2(msg)
        except Exception:
            return compressed_to_rgb(msg)
        if img is None:
            raise ImageConversionError(
                f"could not decode CompressedImage (format {msg.format!r}, {len(msg.data)} bytes)"
            )
        return _to_rgb_from_decoded(np.asarray(img), f"CompressedImage {msg.format!r}")
    _validate_image(msg)
    if bridge is None:
        return image_to_rgb(msg)
    try:
        out = bridge.imgmsg_to_cv2(msg, "rgb8")
    except Exception:
        return image_to_rgb(msg)
    return np.ascontiguousarray(out, dtype=np.uint8)
