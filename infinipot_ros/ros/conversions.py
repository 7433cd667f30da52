"""sensor_msgs/Image and CompressedImage -> RGB numpy arrays.

Pure numpy/OpenCV: nothing here imports rclpy, so the functions accept any
object with the sensor_msgs fields (rclpy messages, rosbags dataclasses,
``types.SimpleNamespace`` in tests).

Output contract for every public function: a new, writeable, C-contiguous
``np.ndarray`` of shape ``[H, W, 3]``, dtype ``uint8``, channel order RGB. It
never aliases ``msg.data``, so the message may be reused or freed afterwards.

Supported ``sensor_msgs/Image`` encodings (exact, case-sensitive names, as
cv_bridge; :data:`SUPPORTED_ENCODINGS`), each converted the way ROS 2
cv_bridge's ``imgmsg_to_cv2(msg, "rgb8")`` does where cv_bridge converts it:

=================================  ===========================================
encoding                           conversion
=================================  ===========================================
rgb8                               copy
bgr8 / rgba8 / bgra8 / mono8       ``COLOR_BGR2RGB`` / ``RGBA2RGB`` /
                                   ``BGRA2RGB`` / ``GRAY2RGB``
rgb16 / bgr16 / rgba16 / bgra16,   as the 8-bit encoding, then 16 -> 8 bit
mono16
bayer_rggb8 / bayer_bggr8 /        ``COLOR_BayerBG2RGB`` / ``BayerRG2RGB`` /
bayer_gbrg8 / bayer_grbg8          ``BayerGR2RGB`` / ``BayerGB2RGB``
                                   (cv_bridge's table; OpenCV names a Bayer
                                   pattern by its second row, so these are
                                   ``COLOR_BayerRGGB2RGB`` etc.)
bayer_*16                          the same code on the 16-bit mosaic, then
                                   16 -> 8 bit (demosaic before rounding)
yuv422 (alias uyvy)                ``COLOR_YUV2RGB_UYVY``; width must be even
yuv422_yuy2 (alias yuyv)           ``COLOR_YUV2RGB_YUY2``; width must be even
nv12 / nv21                        ``COLOR_YUV2RGB_NV12`` / ``..._NV21``
nv24                               numpy, the BT.601 limited-range math of
                                   OpenCV's NV12/NV21 decoders (see below)
8UC1 / 8UC3 / 8UC4                 as mono8 / bgr8 / bgra8
=================================  ===========================================

16 -> 8 bit is cv_bridge's ``convertTo(CV_8U, 255.0 / 65535.0)`` (multiply,
round to nearest, saturate), i.e. ``v8 = round(v16 / 257)``. 16-bit data
honours ``is_bigendian``. ``step`` (row stride, may include padding) is
honoured for every encoding. Alpha is dropped.

Where this module goes beyond cv_bridge (it is the only path for these; with
the cv_bridge backend, cv_bridge raises and the fallback is used):

* ``8UC1/8UC3/8UC4``: cv_bridge's ``imgmsg_to_cv2(msg, "rgb8")`` raises ("not
  a color format"); we follow its ``cvtColorForDisplay`` convention (OpenCV
  channel order: gray, BGR, BGRA).
* ``nv12/nv21`` (released cv_bridge does not convert them): ``height`` is the
  image height, ``data`` holds ``height`` luma rows then ``height / 2``
  interleaved chroma rows (VU for nv21, UV for nv12), all ``step`` bytes apart
  (``step >= width``, width and height even); OpenCV's decoder.
* ``nv24`` (OpenCV has no code for it): V4L2 layout, ``height`` luma rows of
  ``step >= width`` bytes, then ``height`` rows of interleaved U,V at full
  resolution, ``2 * step`` bytes apart (``3 * step * height`` bytes in all).
  Each pixel is decoded with OpenCV's 4:2:0/4:2:2 fixed-point math (BT.601,
  limited range, 20-bit fixed point): ``y = max(Y - 16, 0) * 1220542``,
  ``R = (y + 2^19 + 1673527 (V-128)) >> 20``,
  ``G = (y + 2^19 - 852492 (V-128) - 409993 (U-128)) >> 20``,
  ``B = (y + 2^19 + 2116026 (U-128)) >> 20``, each saturated to 0..255, so
  nv24 decodes exactly like nv12 would with the same samples.
* ``uyvy`` / ``yuyv``: the newer names sensor_msgs gives yuv422 / yuv422_yuy2.

Rejected (:class:`ImageConversionError`, a ``ValueError``, whose ``reason``
is one of :data:`REJECT_REASONS` and whose message names the encoding or
format and the sizes involved): other encodings (``unsupported_encoding``),
generic integer OpenCV types such as ``16UC1`` depth or ``8UC2``
(``depth_image``), float types ``32FC*``/``64FC*`` (``float_image``), zero
sizes, odd widths/heights for chroma-subsampled encodings, ``step`` below a
row, data shorter than the layout needs (checked in Python integers against
``len(data)`` before anything is allocated, so a header claiming 2**31 rows is
rejected at once), dimensions beyond OpenCV's int32 range.

``sensor_msgs/CompressedImage`` whose ``format`` names jpeg/jpg/png, either
plain (``"jpeg"``, ``"png"``) or the image_transport form
(``"rgb8; jpeg compressed bgr8"``); ``compressedDepth`` is rejected as a
depth image. The PNG IHDR / JPEG SOF header is read before decoding: images
whose decode would exceed :data:`MAX_DECODE_PIXELS` are rejected
(``too_large``) without decoding.

Pixel limit: every converter takes ``max_pixels`` (``None``: no limit). A
frame with more pixels is downscaled with ``cv2.INTER_AREA``, aspect kept, to
``floor(w * s) x floor(h * s)``, ``s = sqrt(max_pixels / (w * h))`` (each side
at least 1, the product at most ``max_pixels``). Raw 8-bit packed encodings
(rgb8 ... 8UC4) resize a strided view of the message bytes before the colour
conversion, so no full-size intermediate is allocated; 16-bit ones resize the
16-bit samples and round afterwards (so they may differ by 1 from resizing the
full-size 8-bit result); a full-size copy is made only when the byte order is
not native or the rows are not 2-byte aligned. Bayer and YUV encodings are
decoded at full size first (demosaicing / chroma needs the whole frame), then
resized. JPEGs are decoded with ``cv2.IMREAD_REDUCED_COLOR_{2,4,8}`` (DCT
scaling: the largest factor whose result still covers the target size), then
resized; PNGs are decoded at full size and resized.

Backend: when ROS 2's ``cv_bridge`` is importable and passes a self-test,
:func:`message_to_rgb` converts full-size Images through it (the reference on
a robot); otherwise, and for downscaled frames, through the numpy/OpenCV
fallback in this module, written to the same rules (the comparison test runs
wherever cv_bridge is importable). CompressedImages always decode here:
cv_bridge's Python ``compressed_imgmsg_to_cv2`` is the same
``cv2.imdecode(IMREAD_UNCHANGED)``, without the header check. The choice is
made once, in :func:`try_cv_bridge`; set ``INFINIPOT_NO_CV_BRIDGE=1`` to force
the fallback.

Why not ``rosbags.image`` (installed with rosbags-image): its
``image_to_cvimage`` maps ``msg.data`` as ``height x width`` pixels ignoring
``step`` (padded rows come out shifted), and its 16->8 bit path truncates
(``astype`` after multiplying) where cv_bridge rounds.
"""
from __future__ import annotations

import functools
import logging
import math
import operator
import os
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import cv2
import numpy as np

__all__ = [
    "SUPPORTED_ENCODINGS",
    "REJECT_REASONS",
    "MAX_DECODE_PIXELS",
    "ImageConversionError",
    "image_to_rgb",
    "compressed_to_rgb",
    "message_to_rgb",
    "try_cv_bridge",
    "conversion_backend",
]

_LOG = logging.getLogger(__name__)

#: Machine-readable values of :attr:`ImageConversionError.reason`.
REJECT_REASONS = (
    "unsupported_encoding",  # Image encoding unknown (names are case-sensitive)
    "depth_image",           # generic integer type (16UC1 depth, 8UC2, 32SC1, ...) or compressedDepth
    "float_image",           # generic float type (32FC1 depth, 64FC3, ...)
    "zero_size",             # width or height is 0
    "odd_size",              # odd width (yuv422, nv12/nv21) or odd height (nv12/nv21)
    "step_too_small",        # step < width * channels * bytes per channel
    "truncated",             # data shorter than the layout needs
    "too_large",             # beyond OpenCV's int32 sizes or MAX_DECODE_PIXELS
    "bad_message",           # a field is missing or has the wrong type
    "empty_data",            # CompressedImage without data
    "unsupported_format",    # CompressedImage format names neither jpeg/jpg nor png
    "undecodable",           # OpenCV could not decode the compressed data
)

#: Most pixels a CompressedImage may decode to (after IMREAD_REDUCED_*);
#: larger ones are rejected with reason ``too_large`` before decoding.
#: 2**27 = 134M pixels (e.g. 16384 x 8192; 400 MB as BGR).
MAX_DECODE_PIXELS = 1 << 27

_INT32_MAX = (1 << 31) - 1

# OpenCV fixed-point BT.601 limited-range YUV -> RGB (its NV12/NV21/UYVY decoders)
_YUV_SHIFT = 20
_CY, _CUB, _CUG, _CVG, _CVR = 1220542, 2116026, -409993, -852492, 1673527


class ImageConversionError(ValueError):
    """A message cannot be converted to an RGB image.

    Attributes:
        reason: one of :data:`REJECT_REASONS`, for counting rejections.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown ImageConversionError reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable despite the keyword-only argument
        return _rebuild_error, (str(self), self.reason)


def _rebuild_error(message: str, reason: str) -> ImageConversionError:
    return ImageConversionError(message, reason=reason)


# --------------------------------------------------------------------------
# encodings
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """How an encoding lays out its bytes."""

    kind: str            # "packed", "bayer", "yuv422", "nv420" (nv12/nv21), "nv24"
    channels: int        # samples per pixel in the first (or only) plane
    bpc: int             # bytes per sample: 1 or 2
    code: Optional[int]  # cv2.cvtColor code to RGB; None: already RGB (packed) / custom (nv24)


def _packed(channels: int, bpc: int, code: Optional[int]) -> _Layout:
    return _Layout("packed", channels, bpc, code)


_ENCODINGS = {
    "rgb8": _packed(3, 1, None),
    "bgr8": _packed(3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": _packed(4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": _packed(4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": _packed(1, 1, cv2.COLOR_GRAY2RGB),
    "rgb16": _packed(3, 2, None),
    "bgr16": _packed(3, 2, cv2.COLOR_BGR2RGB),
    "rgba16": _packed(4, 2, cv2.COLOR_RGBA2RGB),
    "bgra16": _packed(4, 2, cv2.COLOR_BGRA2RGB),
    "mono16": _packed(1, 2, cv2.COLOR_GRAY2RGB),
    # generic OpenCV types with colour meaning by convention (OpenCV channel order)
    "8UC1": _packed(1, 1, cv2.COLOR_GRAY2RGB),
    "8UC3": _packed(3, 1, cv2.COLOR_BGR2RGB),
    "8UC4": _packed(4, 1, cv2.COLOR_BGRA2RGB),
    # cv_bridge's Bayer table (OpenCV names the pattern by its second row)
    "bayer_rggb8": _Layout("bayer", 1, 1, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": _Layout("bayer", 1, 1, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": _Layout("bayer", 1, 1, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": _Layout("bayer", 1, 1, cv2.COLOR_BayerGB2RGB),
    "bayer_rggb16": _Layout("bayer", 1, 2, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr16": _Layout("bayer", 1, 2, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg16": _Layout("bayer", 1, 2, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg16": _Layout("bayer", 1, 2, cv2.COLOR_BayerGB2RGB),
    "yuv422": _Layout("yuv422", 2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": _Layout("yuv422", 2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Layout("yuv422", 2, 1, cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": _Layout("yuv422", 2, 1, cv2.COLOR_YUV2RGB_YUY2),
    "nv12": _Layout("nv420", 1, 1, cv2.COLOR_YUV2RGB_NV12),
    "nv21": _Layout("nv420", 1, 1, cv2.COLOR_YUV2RGB_NV21),
    "nv24": _Layout("nv24", 1, 1, None),
}

#: Image encodings accepted by :func:`image_to_rgb` (and by message_to_rgb,
#: whichever backend is active).
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)

# cv_bridge's generic types (getCvType): "16UC1", "32FC3", bare "16U" = 1 channel
_CV_TYPE = re.compile(r"(8U|8S|16U|16S|32S|32F|64F)(?:C([0-9]+))?")

_COMPRESSED_KINDS = ("jpeg", "jpg", "png")

# cv_bridge's 16 -> 8 bit factor (cv_bridge.cpp, toCvCopyImpl: convertTo).
_SCALE_16_TO_8 = 255.0 / 65535.0


class _Frame(NamedTuple):
    """A validated Image message."""

    encoding: str
    layout: _Layout
    height: int
    width: int
    step: int
    bigendian: bool
    buf: np.ndarray  # 1-D uint8, at least as long as the layout needs


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _data_nbytes(data: Any, what: str) -> int:
    """Length of msg.data in bytes, without copying or converting it."""
    if isinstance(data, np.ndarray):
        return int(data.nbytes)
    try:
        with memoryview(data) as view:
            return view.nbytes
    except TypeError:
        pass
    if isinstance(data, (list, tuple)):
        return len(data)
    raise ImageConversionError(f"{what}: data is not bytes-like ({type(data).__name__})",
                               reason="bad_message")


def _as_uint8_buffer(data: Any, what: str = "message") -> np.ndarray:
    """msg.data (bytes, array.array('B'), memoryview, numpy, list) -> 1-D uint8 view/array."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        pass
    try:  # a plain list/tuple of ints (e.g. a hand-built message)
        return np.asarray(data, dtype=np.uint8).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageConversionError(f"{what}: data is not a sequence of bytes ({exc})",
                                   reason="bad_message") from None


def _int_field(msg: Any, name: str, what: str) -> int:
    value = getattr(msg, name, None)
    try:
        return operator.index(value)
    except TypeError:
        raise ImageConversionError(f"{what}: field {name!r} is not an integer ({value!r})",
                                   reason="bad_message") from None


def _check_max_pixels(max_pixels: Optional[int]) -> Optional[int]:
    """None or an int >= 1 (a bad value is a caller bug: plain TypeError/ValueError)."""
    if max_pixels is None:
        return None
    try:
        value = operator.index(max_pixels)
    except TypeError:
        raise TypeError(f"max_pixels must be an int or None, not {type(max_pixels).__name__}") from None
    if value < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {value}")
    return value


def _target_size(width: int, height: int, max_pixels: Optional[int]) -> Optional[tuple]:
    """(w, h) to downscale to so that w * h <= max_pixels, aspect kept; None if it fits."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    new_w = min(width, max(1, math.floor(width * scale)))
    new_h = min(height, max(1, math.floor(height * scale)))
    if new_w * new_h > max_pixels:  # a side clamped to 1, or float rounding
        if new_w >= new_h:
            new_w = max(1, max_pixels // new_h)
        else:
            new_h = max(1, max_pixels // new_w)
    return new_w, new_h


def _reduce_16_to_8(img16: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 with cv_bridge's rule: saturate(round(v * 255 / 65535))."""
    # convertScaleAbs computes saturate_cast<uchar>(|v * alpha|): for unsigned
    # input that is exactly convertTo(CV_8U, alpha) (checked for all 65536 values
    # in the tests).
    return cv2.convertScaleAbs(img16, alpha=_SCALE_16_TO_8)


def _finish(img: np.ndarray, target: Optional[tuple]) -> np.ndarray:
    """Full-size decoded RGB (8 or 16 bit) -> resized to target, 8 bit."""
    if target is not None:
        img = cv2.resize(img, target, interpolation=cv2.INTER_AREA)
    if img.dtype == np.uint16:
        img = _reduce_16_to_8(img)
    return img


def _to_rgb_from_decoded(img: np.ndarray, what: str) -> np.ndarray:
    """An imdecode result (gray, BGR or BGRA; 8 or 16 bit) -> RGB uint8."""
    if img.dtype == np.uint16:
        img = _reduce_16_to_8(img)
    elif img.dtype != np.uint8:
        raise ImageConversionError(f"{what}: decoded to unsupported dtype {img.dtype}",
                                   reason="undecodable")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ImageConversionError(f"{what}: decoded to unsupported shape {img.shape}",
                               reason="undecodable")


def _reject_encoding(encoding: Any) -> ImageConversionError:
    if isinstance(encoding, str):
        match = _CV_TYPE.fullmatch(encoding)
        if match:
            if match.group(1) in ("32F", "64F"):
                return ImageConversionError(
                    f"image encoding {encoding!r} is a float image (depth or other float data), "
                    f"not a colour encoding", reason="float_image")
            return ImageConversionError(
                f"image encoding {encoding!r} is a depth image (generic integer data with no colour "
                f"meaning), not a colour encoding", reason="depth_image")
    return ImageConversionError(
        f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}",
        reason="unsupported_encoding")


def _validate_image(msg: Any) -> _Frame:
    """Check an Image message against its encoding's layout, before allocating anything."""
    encoding = getattr(msg, "encoding", None)
    layout = _ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    if layout is None:
        raise _reject_encoding(encoding)
    what = f"{encoding} image"
    height, width = _int_field(msg, "height", what), _int_field(msg, "width", what)
    step = _int_field(msg, "step", what)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"{encoding} image has zero size ({width}x{height})", reason="zero_size")
    what = f"{encoding} image {width}x{height}"
    if layout.kind in ("yuv422", "nv420") and width % 2:
        raise ImageConversionError(f"{what}: width must be even (chroma is shared by pixel pairs)",
                                   reason="odd_size")
    if layout.kind == "nv420" and height % 2:
        raise ImageConversionError(f"{what}: height must be even (4:2:0 chroma)", reason="odd_size")
    row_bytes = width * layout.channels * layout.bpc
    if step < row_bytes:
        raise ImageConversionError(
            f"{what}: step {step} < width*channels*bytes = "
            f"{width}*{layout.channels}*{layout.bpc} = {row_bytes}", reason="step_too_small")
    # chroma planes after the first: nv12/nv21 height/2 rows of step, nv24 height rows of 2*step
    numerator, denominator, planes = {"nv420": (3, 2, "*3/2"), "nv24": (3, 1, "*3")}.get(
        layout.kind, (1, 1, ""))
    needed = step * height * numerator // denominator  # Python ints: no overflow, nothing allocated
    nbytes = _data_nbytes(getattr(msg, "data", None), what)
    if nbytes < needed:
        raise ImageConversionError(
            f"{what}: data has {nbytes} bytes, needs step*height{planes} = {step}*{height}{planes} "
            f"= {needed} (truncated)", reason="truncated")
    rows = height * 3 // 2 if layout.kind == "nv420" else height
    if rows > _INT32_MAX or width > _INT32_MAX:
        raise ImageConversionError(f"{what}: larger than OpenCV's int32 sizes", reason="too_large")
    buf = _as_uint8_buffer(msg.data, what)
    bigendian = bool(getattr(msg, "is_bigendian", 0))
    return _Frame(encoding, layout, height, width, step, bigendian, buf)


def _samples(frame: _Frame, channels: int, *, offset: int = 0, row_stride: Optional[int] = None,
             rows: Optional[int] = None) -> np.ndarray:
    """A strided view of the message samples, [rows, width(, channels)] uint8/uint16.

    16-bit samples are copied to native byte order only when the message's
    order differs or the rows are not 2-byte aligned (OpenCV needs both).
    """
    bpc = frame.layout.bpc
    rows = frame.height if rows is None else rows
    stride = frame.step if row_stride is None else row_stride
    if bpc == 1:
        dtype = np.dtype(np.uint8)
    else:
        dtype = np.dtype(">u2" if frame.bigendian else "<u2")
    if channels == 1:
        shape, strides = (rows, frame.width), (stride, bpc)
    else:
        shape, strides = (rows, frame.width, channels), (stride, channels * bpc, bpc)
    view = np.ndarray(shape=shape, dtype=dtype, buffer=frame.buf, offset=offset, strides=strides)
    if bpc == 2 and (not view.dtype.isnative or not view.flags.aligned):
        view = view.astype(np.uint16, order="C")  # byte swap / realign: a full-size copy
    return view


def _packed_to_rgb(frame: _Frame, target: Optional[tuple]) -> np.ndarray:
    layout = frame.layout
    img = _samples(frame, layout.channels)
    fresh = False  # does img already own new memory?
    if target is not None:  # resize the view first: no full-size intermediate
        img, fresh = cv2.resize(img, target, interpolation=cv2.INTER_AREA), True
    if layout.bpc == 2:
        img, fresh = _reduce_16_to_8(img), True
    if layout.code is not None:
        return cv2.cvtColor(img, layout.code)
    return img if fresh else np.array(img, dtype=np.uint8, order="C", copy=True)


def _yuv444_tables() -> tuple:
    values = np.arange(256, dtype=np.int64)
    y_term = np.maximum(values - 16, 0) * _CY + (1 << (_YUV_SHIFT - 1))
    r_v = _CVR * (values - 128)
    b_u = _CUB * (values - 128)
    g_uv = (_CUG * (values - 128))[:, None] + (_CVG * (values - 128))[None, :]  # [u, v]
    return tuple(t.astype(np.int32) for t in (y_term, r_v, b_u, g_uv.reshape(-1)))


_Y_TERM, _R_V, _B_U, _G_UV = _yuv444_tables()


def _yuv444_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Full-resolution Y, U, V (uint8 [H, W]) -> RGB uint8 with OpenCV's BT.601 fixed point."""
    out = np.empty(y.shape + (3,), dtype=np.uint8)
    y_term = _Y_TERM[y]  # int32; all sums stay within +-6e8
    uv = (u.astype(np.intp) << 8) | v
    for channel, chroma in ((0, _R_V[v]), (1, _G_UV[uv]), (2, _B_U[u])):
        chroma += y_term
        chroma >>= _YUV_SHIFT
        np.clip(chroma, 0, 255, out=chroma)
        out[..., channel] = chroma
    return out


# --------------------------------------------------------------------------
# fallback converters
# --------------------------------------------------------------------------
def image_to_rgb(msg: Any, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """Convert a sensor_msgs/Image to RGB with numpy/OpenCV (no cv_bridge).

    Args:
        msg: object with ``encoding`` (one of :data:`SUPPORTED_ENCODINGS`),
            ``height``, ``width``, ``step`` (bytes per row, >= width * channels
            * bytes per channel; extra bytes are row padding), ``is_bigendian``
            (used for 16-bit encodings) and ``data`` (bytes-like,
            ``array('B')``, numpy array or list of ints; at least ``step *
            height`` bytes, ``* 3/2`` for nv12/nv21, ``* 3`` for nv24).
        max_pixels: downscale (INTER_AREA, aspect kept) frames with more
            pixels than this; None: full size. See the module docstring.

    Returns:
        ``np.ndarray`` [height, width, 3] uint8, RGB, C-contiguous, a new array
        (smaller when downscaled). Conversions per encoding: module docstring.

    Raises:
        ImageConversionError: see :data:`REJECT_REASONS`; the size checks run
            before any allocation.
        ValueError, TypeError: ``max_pixels`` is not None or an int >= 1.
    """
    max_pixels = _check_max_pixels(max_pixels)
    frame = _validate_image(msg)
    target = _target_size(frame.width, frame.height, max_pixels)
    layout = frame.layout
    if layout.kind == "packed":
        return _packed_to_rgb(frame, target)
    if layout.kind == "bayer":
        rgb = cv2.cvtColor(_samples(frame, 1), layout.code)
    elif layout.kind == "yuv422":
        rgb = cv2.cvtColor(_samples(frame, 2), layout.code)
    elif layout.kind == "nv420":
        rgb = cv2.cvtColor(_samples(frame, 1, rows=frame.height * 3 // 2), layout.code)
    else:  # nv24
        luma = _samples(frame, 1)
        chroma = _samples(frame, 2, offset=frame.height * frame.step, row_stride=2 * frame.step)
        rgb = _yuv444_to_rgb(luma, chroma[..., 0], chroma[..., 1])
    return _finish(rgb, target)


def _compressed_kind(msg: Any) -> str:
    fmt = getattr(msg, "format", None)
    if not isinstance(fmt, str):
        raise ImageConversionError(f"CompressedImage has no string 'format' field ({fmt!r})",
                                   reason="bad_message")
    low = fmt.lower()
    if "compresseddepth" in low:
        raise ImageConversionError(
            f"unsupported compressed format {fmt!r}: compressedDepth is a depth image, not an RGB stream",
            reason="depth_image")
    for kind in _COMPRESSED_KINDS:
        if kind in low:
            return kind
    raise ImageConversionError(
        f"unsupported compressed format {fmt!r}; expected one naming jpeg, jpg or png "
        f"(e.g. 'jpeg', 'png', 'rgb8; jpeg compressed bgr8')", reason="unsupported_format")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _png_size(data: memoryview) -> Optional[tuple]:
    if len(data) < 24 or bytes(data[:8]) != _PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: memoryview) -> Optional[tuple]:
    """(width, height) from the first SOF marker, None if not found before the scan."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    for _ in range(10000):  # marker segments (and fill bytes) before the first scan
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any SOF
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return (width, height) if width and height else None  # height 0: DNL, unknown
        if length < 2:
            return None
        i += 2 + length
    return None


_REDUCED_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}


def compressed_to_rgb(msg: Any, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (jpeg/png) to RGB with OpenCV.

    Args:
        msg: object with ``format`` (``"jpeg"``, ``"jpg"``, ``"png"`` or an
            image_transport string such as ``"rgb8; jpeg compressed bgr8"`` or
            ``"mono8; png compressed mono8"``) and ``data`` (the encoded bytes).
        max_pixels: downscale (INTER_AREA, aspect kept) images with more pixels
            than this; JPEGs are decoded at 1/2, 1/4 or 1/8 scale
            (``IMREAD_REDUCED_COLOR_*``) when that still covers the target
            size, so they may differ slightly from a full decode + resize.

    Returns:
        ``np.ndarray`` [H, W, 3] uint8 RGB, C-contiguous. Gray images are
        replicated to 3 channels, alpha is dropped, 16-bit PNGs are reduced
        with the same rule as mono16. The channel order in the format string
        does not matter: OpenCV always decodes to BGR(A)/gray, as cv_bridge does.

    Raises:
        ImageConversionError: format not jpeg/jpg/png (``unsupported_format``)
            or compressedDepth (``depth_image``), empty data (``empty_data``),
            a header whose decode would exceed :data:`MAX_DECODE_PIXELS`
            (``too_large``, checked before decoding), or data OpenCV cannot
            decode (``undecodable``).
        ValueError, TypeError: ``max_pixels`` is not None or an int >= 1.
    """
    max_pixels = _check_max_pixels(max_pixels)
    _compressed_kind(msg)
    what = f"CompressedImage {msg.format!r}"
    buf = _as_uint8_buffer(getattr(msg, "data", None), what)
    if buf.size == 0:
        raise ImageConversionError(f"CompressedImage ({msg.format!r}) has no data", reason="empty_data")
    with memoryview(buf) as header:
        png = _png_size(header)
        size = png or _jpeg_size(header)
    factor, target = 1, None
    if size is not None:
        width, height = size
        target = _target_size(width, height, max_pixels)
        if target is not None and png is None:  # JPEG: decode at reduced scale (DCT scaling)
            factor = next((f for f in (8, 4, 2)
                           if -(-width // f) >= target[0] and -(-height // f) >= target[1]), 1)
        decoded = (-(-width // factor)) * (-(-height // factor))
        if decoded > MAX_DECODE_PIXELS:
            raise ImageConversionError(
                f"{what}: header says {width}x{height}; decoding "
                f"{'it' if factor == 1 else f'at 1/{factor} scale'} gives {decoded} pixels, more than "
                f"MAX_DECODE_PIXELS = {MAX_DECODE_PIXELS}", reason="too_large")
    img = cv2.imdecode(buf, _REDUCED_FLAGS[factor] if factor > 1 else cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageConversionError(
            f"could not decode CompressedImage (format {msg.format!r}, {buf.size} bytes)",
            reason="undecodable")
    if img.shape[0] * img.shape[1] > MAX_DECODE_PIXELS:  # header unreadable and image huge
        raise ImageConversionError(
            f"{what}: decoded to {img.shape[1]}x{img.shape[0]}, more than MAX_DECODE_PIXELS",
            reason="too_large")
    if factor == 1:  # take the size from the decode itself
        target = _target_size(img.shape[1], img.shape[0], max_pixels)
    if target is not None and (img.shape[1], img.shape[0]) != target:
        img = cv2.resize(img, target, interpolation=cv2.INTER_AREA)
    return _to_rgb_from_decoded(img, what)


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


def message_to_rgb(msg: Any, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """Convert an Image or CompressedImage message to RGB, the node's entry point.

    Dispatches on type: objects with a ``format`` attribute are
    CompressedImage (:func:`compressed_to_rgb`, always: cv_bridge's Python
    path is the same ``imdecode``), others Image (:func:`image_to_rgb`
    rules). The same inputs are accepted and rejected whichever backend is
    active; with cv_bridge (see :func:`try_cv_bridge`) full-size Image pixels
    come from ``imgmsg_to_cv2(msg, "rgb8")``. If cv_bridge raises on a message
    that passed validation (an encoding it does not convert, such as 8UC3,
    nv21 or nv24; data longer than ``step * height``; big-endian 16-bit with
    NumPy 2, where cv_bridge's ``ndarray.newbyteorder`` no longer exists), and
    for frames that ``max_pixels`` downscales, the fallback is used.

    Args:
        msg: a sensor_msgs Image or CompressedImage (or duck-typed object).
        max_pixels: pixel limit, see :func:`image_to_rgb`; None: full size.

    Returns:
        ``np.ndarray`` [H, W, 3] uint8 RGB, C-contiguous.

    Raises:
        ImageConversionError: see :func:`image_to_rgb` / :func:`compressed_to_rgb`.
        ValueError, TypeError: ``max_pixels`` is not None or an int >= 1.
    """
    max_pixels = _check_max_pixels(max_pixels)
    if hasattr(msg, "format"):
        return compressed_to_rgb(msg, max_pixels=max_pixels)
    frame = _validate_image(msg)
    bridge = try_cv_bridge()
    if bridge is None or _target_size(frame.width, frame.height, max_pixels) is not None:
        return image_to_rgb(msg, max_pixels=max_pixels)
    try:
        out = bridge.imgmsg_to_cv2(msg, "rgb8")
    except Exception:
        return image_to_rgb(msg)
    return np.ascontiguousarray(out, dtype=np.uint8)
