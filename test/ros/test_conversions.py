"""Image message -> RGB conversion (infinipot_ros.ros.conversions).

References are computed here independently: cv2.cvtColor / numpy channel
shuffles for colour, and for 16 bit cv_bridge's rule (convertTo(CV_8U,
255/65535): round to nearest, saturate) written out in integer arithmetic.
Encoded messages (Bayer mosaics, UYVY/YUYV, NV12/NV21/NV24) are built from a
real frame with OpenCV's encoders and checked against OpenCV's decode of the
same bytes; nv24, which OpenCV cannot decode, against OpenCV's NV12 decode of
the same samples at twice the size.
"""
from __future__ import annotations

import array
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from infinipot_ros.ros import conversions as conv
from infinipot_ros.ros.conversions import (
    ImageConversionError,
    compressed_to_rgb,
    image_to_rgb,
    message_to_rgb,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bgr_frame(vtest_path) -> np.ndarray:
    """Frame 10 of vtest.avi (conftest's vtest_path), BGR uint8 [576, 768, 3]."""
    cap = cv2.VideoCapture(vtest_path)
    cap.set(cv2.CAP_PROP_POS_FRAMES, 10)
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (576, 768, 3)
    return frame


@pytest.fixture(autouse=True)
def _fallback_backend(monkeypatch):
    """All tests here exercise the numpy/OpenCV fallback unless they opt out."""
    monkeypatch.setenv("INFINIPOT_NO_CV_BRIDGE", "1")
    conv.try_cv_bridge.cache_clear()
    yield
    conv.try_cv_bridge.cache_clear()


def cv_bridge_rule(v16: np.ndarray) -> np.ndarray:
    """cv_bridge 16->8 bit: saturate(round(v * 255 / 65535)); v/257 never ties at .5."""
    v = np.asarray(v16, dtype=np.int64)
    return np.clip((2 * v + 257) // 514, 0, 255).astype(np.uint8)


def make_image(pixels: np.ndarray, encoding: str, *, pad: int = 0, bigendian: bool = False,
               container=bytes) -> SimpleNamespace:
    """A duck-typed sensor_msgs/Image with `pad` garbage bytes after every row."""
    h, w = pixels.shape[:2]
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2" if bigendian else "<u2")
    rows = np.ascontiguousarray(pixels).view(np.uint8).reshape(h, -1)
    if pad:
        garbage = np.full((h, pad), 0xA5, dtype=np.uint8)
        rows = np.concatenate([rows, garbage], axis=1)
    raw = rows.tobytes()
    data = {bytes: raw, array.array: array.array("B", raw), np.ndarray: np.frombuffer(raw, np.uint8).copy(),
            list: list(raw)}[container]
    return SimpleNamespace(encoding=encoding, height=h, width=w, step=rows.shape[1],
                           is_bigendian=int(bigendian), data=data)


def check_rgb(out: np.ndarray, expected: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------- Image
@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_8bit_encodings_match_opencv(bgr_frame, encoding, pad):
    rgb = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB)
    alpha = np.random.default_rng(1).integers(0, 256, bgr_frame.shape[:2], dtype=np.uint8)[..., None]
    if encoding == "rgb8":
        pixels, expected = rgb, rgb
    elif encoding == "bgr8":
        pixels, expected = bgr_frame, rgb
    elif encoding == "rgba8":
        pixels, expected = np.concatenate([rgb, alpha], axis=2), rgb
    elif encoding == "bgra8":
        pixels, expected = np.concatenate([bgr_frame, alpha], axis=2), rgb
    else:
        gray = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2GRAY)
        pixels, expected = gray, np.repeat(gray[..., None], 3, axis=2)
    msg = make_image(pixels, encoding, pad=pad)
    assert msg.step == pixels.shape[1] * (pixels.shape[2] if pixels.ndim == 3 else 1) + pad
    check_rgb(image_to_rgb(msg), expected)
    check_rgb(message_to_rgb(msg), expected)


@pytest.mark.parametrize("container", [bytes, array.array, np.ndarray])
def test_data_containers(bgr_frame, container):
    small = bgr_frame[:48, :64]
    msg = make_image(small, "bgr8", pad=3, container=container)
    check_rgb(image_to_rgb(msg), small[..., ::-1])


def test_list_data_and_odd_padding():
    px = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = make_image(px, "rgb8", pad=1, container=list)
    assert msg.step == 10
    check_rgb(image_to_rgb(msg), px)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 6])
def test_mono16_known_values(bigendian, pad):
    values = np.array([[0, 128, 129, 257, 384, 385, 386, 32767],
                       [32768, 65279, 65534, 65535, 1000, 40000, 255, 256]], dtype=np.uint16)
    # written out by hand from round(v / 257)
    expected8 = np.array([[0, 0, 1, 1, 1, 1, 2, 127],
                          [128, 254, 255, 255, 4, 156, 1, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(cv_bridge_rule(values), expected8)
    msg = make_image(values, "mono16", pad=pad, bigendian=bigendian)
    check_rgb(image_to_rgb(msg), np.repeat(expected8[..., None], 3, axis=2))


def test_mono16_all_values_match_cv_bridge_rule():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    ref_float = np.clip(np.rint(values.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(cv_bridge_rule(values), ref_float)
    for big in (False, True):
        out = image_to_rgb(make_image(values, "mono16", bigendian=big))
        np.testing.assert_array_equal(out[..., 0], ref_float)
        np.testing.assert_array_equal(out[..., 2], ref_float)


def test_mono16_big_endian_really_swaps():
    # 0x0100 = 256 big endian is 1 little endian: the two must differ
    le = SimpleNamespace(encoding="mono16", height=1, width=1, step=2, is_bigendian=0, data=b"\x00\xff")
    be = SimpleNamespace(encoding="mono16", height=1, width=1, step=2, is_bigendian=1, data=b"\x00\xff")
    assert image_to_rgb(le)[0, 0, 0] == cv_bridge_rule(np.array([0xFF00]))[0]  # 65280 -> 254
    assert image_to_rgb(be)[0, 0, 0] == cv_bridge_rule(np.array([0x00FF]))[0]  # 255 -> 1


def test_mono16_from_real_frame(bgr_frame):
    gray = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2GRAY)
    noise = np.random.default_rng(2).integers(0, 257, gray.shape)
    v16 = (gray.astype(np.int64) * 257 + noise - 128).clip(0, 65535).astype(np.uint16)
    expected = np.repeat(cv_bridge_rule(v16)[..., None], 3, axis=2)
    check_rgb(image_to_rgb(make_image(v16, "mono16", pad=4, bigendian=True)), expected)


def test_output_is_a_copy(bgr_frame):
    rgb = np.ascontiguousarray(bgr_frame[..., ::-1])
    msg = make_image(rgb, "rgb8", container=np.ndarray)
    before = msg.data.copy()
    out = image_to_rgb(msg)
    out[:] = 0
    np.testing.assert_array_equal(msg.data, before)


def test_real_rclpy_message(bgr_frame):
    msgs = pytest.importorskip("sensor_msgs.msg")
    m = msgs.Image()
    m.height, m.width, m.encoding, m.step = 576, 768, "bgr8", 768 * 3
    raw = array.array("B")
    raw.frombytes(bgr_frame.tobytes())
    m.data = raw
    check_rgb(message_to_rgb(m), cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB))


# ---------------------------------------------------------------- CompressedImage
@pytest.mark.parametrize("fmt", ["png", "bgr8; png compressed bgr8", "rgb8; png compressed bgr8", "PNG"])
def test_png_is_exact(bgr_frame, fmt):
    ok, enc = cv2.imencode(".png", bgr_frame)
    assert ok
    msg = compressed(fmt, enc.tobytes())
    expected = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB)
    check_rgb(compressed_to_rgb(msg), expected)
    check_rgb(message_to_rgb(msg), expected)


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "rgb8; jpeg compressed bgr8", "bgr8; jpeg compressed bgr8"])
def test_jpeg_within_tolerance(bgr_frame, fmt):
    ok, enc = cv2.imencode(".jpg", bgr_frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    out = message_to_rgb(compressed(fmt, array.array("B", enc.tobytes())))
    expected = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB)
    assert out.shape == expected.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - expected)
    assert diff.mean() < 2.5, diff.mean()
    # and exactly what OpenCV's own decoder gives, channel-swapped
    np.testing.assert_array_equal(out, cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1])


def test_gray_and_alpha_and_16bit_png(bgr_frame):
    gray = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2GRAY)
    out = compressed_to_rgb(compressed("mono8; png compressed mono8", cv2.imencode(".png", gray)[1].tobytes()))
    check_rgb(out, np.repeat(gray[..., None], 3, axis=2))
    bgra = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2BGRA)
    out = compressed_to_rgb(compressed("png", cv2.imencode(".png", bgra)[1].tobytes()))
    check_rgb(out, cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB))
    v16 = (gray.astype(np.uint16) * 257 + 100)
    out = compressed_to_rgb(compressed("png", cv2.imencode(".png", v16)[1].tobytes()))
    check_rgb(out, np.repeat(cv_bridge_rule(v16)[..., None], 3, axis=2))


# ---------------------------------------------------------------- every colour encoding
# Messages are built from a real frame (conftest's vtest_frames); each is checked
# against OpenCV's decode of the same bytes (cvtColor), or for 16 bit against
# cv_bridge_rule applied to it. Codes are named here by the Bayer *layout*
# (COLOR_BayerRGGB2RGB: R at (0, 0)); cv_bridge's table uses OpenCV's older
# second-row names (bayer_rggb8 -> COLOR_BayerBG2RGB), the same numbers.
BAYER_CODES = {
    "rggb": cv2.COLOR_BayerRGGB2RGB, "bggr": cv2.COLOR_BayerBGGR2RGB,
    "gbrg": cv2.COLOR_BayerGBRG2RGB, "grbg": cv2.COLOR_BayerGRBG2RGB,
}
YUV422_CODES = {  # encoding -> (OpenCV encoder, decoder)
    "yuv422": (cv2.COLOR_RGB2YUV_UYVY, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": (cv2.COLOR_RGB2YUV_UYVY, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (cv2.COLOR_RGB2YUV_YUY2, cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": (cv2.COLOR_RGB2YUV_YUY2, cv2.COLOR_YUV2RGB_YUY2),
}
PACKED8 = {  # encoding -> RGB frame -> message pixels
    "rgb8": lambda rgb: rgb, "bgr8": lambda rgb: rgb[..., ::-1],
    "rgba8": lambda rgb: np.dstack([rgb, ALPHA(rgb)]), "bgra8": lambda rgb: np.dstack([rgb[..., ::-1], ALPHA(rgb)]),
    "mono8": lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY),
    # generic OpenCV types: OpenCV channel order, as cv_bridge's cvtColorForDisplay
    "8UC1": lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), "8UC3": lambda rgb: rgb[..., ::-1],
    "8UC4": lambda rgb: np.dstack([rgb[..., ::-1], ALPHA(rgb)]),
}
PACKED16 = {  # encoding -> 16-bit RGB -> message pixels
    "rgb16": lambda v: v, "bgr16": lambda v: v[..., ::-1],
    "rgba16": lambda v: np.dstack([v, 257 * ALPHA(v)]), "bgra16": lambda v: np.dstack([v[..., ::-1], 257 * ALPHA(v)]),
    "mono16": lambda v: cv2.cvtColor(v, cv2.COLOR_RGB2GRAY),
}


def ALPHA(img: np.ndarray) -> np.ndarray:  # noqa: N802 (reads like a constant in the tables)
    return np.random.default_rng(3).integers(0, 256, img.shape[:2], dtype=np.uint8).astype(img.dtype)


def to_16bit(rgb: np.ndarray) -> np.ndarray:
    """A 16-bit frame that uses the low byte too: v * 257 + noise in [-128, 128]."""
    noise = np.random.default_rng(4).integers(-128, 129, rgb.shape)
    return (rgb.astype(np.int64) * 257 + noise).clip(0, 65535).astype(np.uint16)


def mosaic(img: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image [H, W, 3] through a Bayer filter; pattern names (0,0) (0,1) (1,0) (1,1)."""
    out = np.empty(img.shape[:2], img.dtype)
    for k, colour in enumerate(pattern):
        dy, dx = divmod(k, 2)
        out[dy::2, dx::2] = img[dy::2, dx::2, "rgb".index(colour)]
    return out


def yuv420_planes(rgb: np.ndarray) -> tuple:
    """OpenCV's I420 encode -> (Y [H, W], U [H/2, W/2], V [H/2, W/2])."""
    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    y, rest = i420[: h * w].reshape(h, w), i420[h * w:]
    return y, rest[: h * w // 4].reshape(h // 2, w // 2), rest[h * w // 4:].reshape(h // 2, w // 2)


def semi_planar(y: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Y plane + one interleaved chroma plane, as one [rows, W] uint8 array (NV12: U,V; NV21: V,U)."""
    return np.vstack([y, np.dstack([first, second]).reshape(first.shape[0], -1)])


def yuv444(rgb: np.ndarray) -> tuple:
    """Full-resolution BT.601 Y, U, V with OpenCV's encoder: I420 of the frame upscaled 2x (nearest)."""
    y2, u, v = yuv420_planes(np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1))
    return y2[::2, ::2], u, v


def nv24_reference(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's own decode of 4:4:4 samples: NV12 of the 2x (nearest) image, every other pixel."""
    y2 = np.repeat(np.repeat(y, 2, axis=0), 2, axis=1)
    return cv2.cvtColor(semi_planar(y2, u, v), cv2.COLOR_YUV2RGB_NV12)[::2, ::2]


def nv24_message(y: np.ndarray, u: np.ndarray, v: np.ndarray, *, pad: int = 0) -> SimpleNamespace:
    """NV24: luma rows of `step` bytes, then interleaved U,V rows of 2 * step bytes."""
    h, w = y.shape
    luma = np.concatenate([y, np.full((h, pad), 0xA5, np.uint8)], axis=1)
    chroma = np.concatenate([np.dstack([u, v]).reshape(h, 2 * w), np.full((h, 2 * pad), 0x5A, np.uint8)], axis=1)
    return SimpleNamespace(encoding="nv24", height=h, width=w, step=w + pad, is_bigendian=0,
                           data=luma.tobytes() + chroma.tobytes())


def encoded_case(encoding: str, rgb: np.ndarray, *, pad: int = 0, bigendian: bool = False) -> tuple:
    """(message, expected RGB) for `encoding`, built from the RGB frame."""
    if encoding in PACKED8:
        return make_image(np.ascontiguousarray(PACKED8[encoding](rgb)), encoding, pad=pad, bigendian=bigendian), (
            np.repeat(PACKED8[encoding](rgb)[..., None], 3, axis=2) if encoding in ("mono8", "8UC1") else rgb)
    if encoding in PACKED16:
        v16 = to_16bit(rgb)
        pixels = np.ascontiguousarray(PACKED16[encoding](v16))
        expected = cv_bridge_rule(np.repeat(pixels[..., None], 3, axis=2) if encoding == "mono16" else v16)
        return make_image(pixels, encoding, pad=pad, bigendian=bigendian), expected
    if encoding.startswith("bayer_"):
        pattern, bits = encoding[6:10], encoding[10:]
        raw = mosaic(rgb if bits == "8" else to_16bit(rgb), pattern)
        decoded = cv2.cvtColor(raw, BAYER_CODES[pattern])  # demosaic at 16 bit, then round (cv_bridge)
        return (make_image(raw, encoding, pad=pad, bigendian=bigendian),
                decoded if bits == "8" else cv_bridge_rule(decoded))
    if encoding in YUV422_CODES:
        encode, decode = YUV422_CODES[encoding]
        packed = cv2.cvtColor(rgb, encode)
        assert packed.shape == rgb.shape[:2] + (2,)
        return make_image(packed, encoding, pad=pad, bigendian=bigendian), cv2.cvtColor(packed, decode)
    if encoding in ("nv12", "nv21"):
        y, u, v = yuv420_planes(rgb)
        nv = semi_planar(y, u, v) if encoding == "nv12" else semi_planar(y, v, u)
        msg = make_image(nv, encoding, pad=pad, bigendian=bigendian)
        msg.height = rgb.shape[0]  # the image height; data holds 3/2 as many rows
        code = cv2.COLOR_YUV2RGB_NV12 if encoding == "nv12" else cv2.COLOR_YUV2RGB_NV21
        return msg, cv2.cvtColor(nv, code)
    if encoding == "nv24":
        y, u, v = yuv444(rgb)
        msg = nv24_message(y, u, v, pad=pad)
        msg.is_bigendian = int(bigendian)
        return msg, nv24_reference(y, u, v)
    raise AssertionError(f"no test case for {encoding}")


@pytest.fixture(scope="module")
def rgb_frame(vtest_frames) -> np.ndarray:
    """Frame 3 of conftest's vtest_frames (RGB uint8 [576, 768, 3])."""
    return vtest_frames[0][3]


@pytest.fixture(scope="module")
def rgb_crop(rgb_frame) -> np.ndarray:
    """A 240 x 320 crop of it, to keep the encoding matrix quick."""
    return np.ascontiguousarray(rgb_frame[120:360, 200:520])


def test_every_supported_encoding_has_a_case(rgb_crop):
    for encoding in conv.SUPPORTED_ENCODINGS:
        encoded_case(encoding, rgb_crop[:4, :4])


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("encoding", conv.SUPPORTED_ENCODINGS)
def test_encoding_matches_opencv_reference(rgb_crop, encoding, pad, bigendian):
    # pad 5: odd strides, so 16-bit rows are misaligned; is_bigendian only matters for 16 bit
    msg, expected = encoded_case(encoding, rgb_crop, pad=pad, bigendian=bigendian)
    assert msg.step > msg.width or pad == 0
    check_rgb(image_to_rgb(msg), expected)
    check_rgb(message_to_rgb(msg), expected)


def test_bayer_names_follow_cv_bridge_table():
    # cv_bridge.cpp getConversionCodes: bayer_rggb -> COLOR_BayerBG2RGB, bggr -> RG, gbrg -> GR, grbg -> GB
    assert (cv2.COLOR_BayerBG2RGB, cv2.COLOR_BayerRG2RGB, cv2.COLOR_BayerGR2RGB, cv2.COLOR_BayerGB2RGB) == (
        BAYER_CODES["rggb"], BAYER_CODES["bggr"], BAYER_CODES["gbrg"], BAYER_CODES["grbg"])


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_pattern_semantics_on_real_frame(rgb_frame, pattern):
    # the layout, not just the code: the right pattern reconstructs the frame, every other is far off
    errors = {}
    for name in BAYER_CODES:
        out = image_to_rgb(make_image(mosaic(rgb_frame, pattern), f"bayer_{name}8"))
        errors[name] = np.abs(out.astype(np.int16) - rgb_frame).mean()
    assert errors[pattern] < 4, errors
    assert min(e for n, e in errors.items() if n != pattern) > 15, errors


def test_bayer_odd_sizes(rgb_crop):
    msg, expected = encoded_case("bayer_gbrg16", rgb_crop[:37, :51], pad=3, bigendian=True)
    check_rgb(image_to_rgb(msg), expected)


@pytest.mark.parametrize("encoding", ["yuv422", "yuv422_yuy2", "nv12", "nv21", "nv24"])
def test_yuv_decodes_close_to_the_frame(rgb_frame, encoding):
    msg, _ = encoded_case(encoding, rgb_frame)
    err = np.abs(image_to_rgb(msg).astype(np.int16) - rgb_frame).mean()
    assert err < (1.0 if encoding == "nv24" else 3.0), err


def test_nv24_math_matches_opencv_for_every_chroma_pair():
    # all 65536 (U, V) pairs x 16 luma values, including the clamp at Y < 16 and saturation
    ys = np.array([0, 1, 15, 16, 17, 50, 100, 127, 128, 180, 220, 234, 235, 236, 250, 255], dtype=np.uint8)
    u = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256 * ys.size, axis=1)
    v = np.repeat(np.arange(256, dtype=np.uint8), ys.size)[None, :].repeat(256, axis=0)
    y = np.tile(ys, 256)[None, :].repeat(256, axis=0)
    check_rgb(image_to_rgb(nv24_message(y, u, v, pad=3)), nv24_reference(y, u, v))


def test_8bit_encodings_ignore_is_bigendian(rgb_crop):
    for encoding in ("bgr8", "bayer_rggb8", "yuv422", "nv21"):
        little, _ = encoded_case(encoding, rgb_crop, pad=2)
        big, _ = encoded_case(encoding, rgb_crop, pad=2, bigendian=True)
        check_rgb(image_to_rgb(big), image_to_rgb(little))


@pytest.mark.parametrize("encoding", ["rgb16", "bgra16", "bayer_bggr16"])
def test_16bit_big_endian_really_swaps(rgb_crop, encoding):
    msg, expected = encoded_case(encoding, rgb_crop, bigendian=True)
    msg.is_bigendian = 0  # the same bytes read little-endian are something else
    assert not np.array_equal(image_to_rgb(msg), expected)


# ---------------------------------------------------------------- rejections
def image(**fields) -> SimpleNamespace:
    base = dict(encoding="rgb8", height=4, width=4, step=12, is_bigendian=0, data=bytes(48))
    base.update(fields)
    return SimpleNamespace(**base)


def forged_png(bgr_frame, width: int, height: int) -> bytes:
    """A real PNG whose IHDR claims another size (CRC left stale: only the header is read)."""
    data = bytearray(cv2.imencode(".png", bgr_frame[:8, :8])[1].tobytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


def forged_jpeg(bgr_frame, width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 claims another size."""
    data = bytearray(cv2.imencode(".jpg", bgr_frame[:8, :8])[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


HUGE = np.broadcast_to(np.zeros(1, np.uint8), (2**31 + 8,))  # reports 2 GiB, allocates 1 byte

IMAGE_REJECTIONS = [  # (message, reason, words in the message)
    (image(encoding="RGB8"), "unsupported_encoding", ["'RGB8'", "supported"]),
    (image(encoding=""), "unsupported_encoding", ["''"]),
    (image(encoding=None), "unsupported_encoding", ["None"]),
    (image(encoding="yuv420"), "unsupported_encoding", ["'yuv420'"]),
    (image(encoding="16UC1"), "depth_image", ["'16UC1'", "depth", "not a colour"]),
    (image(encoding="32SC1"), "depth_image", ["'32SC1'", "depth"]),
    (image(encoding="16UC3"), "depth_image", ["'16UC3'", "depth"]),
    (image(encoding="8UC2"), "depth_image", ["'8UC2'", "depth"]),
    (image(encoding="8SC3"), "depth_image", ["'8SC3'"]),
    (image(encoding="16U"), "depth_image", ["'16U'"]),
    (image(encoding="32FC1"), "float_image", ["'32FC1'", "float", "not a colour"]),
    (image(encoding="64FC3"), "float_image", ["'64FC3'", "float"]),
    (image(height=0, data=b""), "zero_size", ["rgb8", "zero size"]),
    (image(width=0), "zero_size", ["rgb8", "zero size"]),
    (image(height=-3), "zero_size", ["zero size"]),
    (image(step=11), "step_too_small", ["rgb8", "step 11", "12"]),
    (image(encoding="mono16", height=2, width=4, step=4, data=bytes(16)), "step_too_small", ["mono16", "step 4", "8"]),
    (image(encoding="rgba16", step=31, data=bytes(128)), "step_too_small", ["rgba16", "step 31", "32"]),
    (image(encoding="yuv422", step=7), "step_too_small", ["yuv422", "step 7", "8"]),
    (image(encoding="nv21", step=3), "step_too_small", ["nv21", "step 3", "4"]),
    (image(data=bytes(47)), "truncated", ["rgb8", "47", "48", "truncated"]),
    (image(encoding="nv21", step=4, data=bytes(16)), "truncated", ["nv21", "16", "step*height*3/2", "24"]),
    (image(encoding="nv24", step=4, data=bytes(47)), "truncated", ["nv24", "47", "step*height*3", "48"]),
    (image(encoding="bayer_rggb16", step=8, data=bytes(31)), "truncated", ["bayer_rggb16", "31", "32"]),
    (image(height=2**31), "truncated", ["4x2147483648", "25769803776"]),
    (image(encoding="yuv422", width=3, step=6), "odd_size", ["yuv422", "3x4", "even"]),
    (image(encoding="nv12", height=3, step=4), "odd_size", ["nv12", "height", "even"]),
    (image(encoding="nv21", width=5, step=5), "odd_size", ["nv21", "width", "even"]),
    (image(encoding="mono8", height=1, width=2**31, step=2**31, data=HUGE), "too_large", ["int32"]),
    (image(height="4"), "bad_message", ["'height'", "'4'"]),
    (image(step=None), "bad_message", ["'step'"]),
    (image(data=None), "bad_message", ["not bytes-like"]),
    (image(height=1, width=1, step=3, data=[1, 2, 300]), "bad_message", ["not a sequence of bytes"]),
]


def compressed(fmt: str, data) -> SimpleNamespace:
    return SimpleNamespace(format=fmt, data=data)


def compressed_rejections(bgr_frame) -> list:
    return [
        (compressed("jpeg", b"this is not a jpeg" * 10), "undecodable", ["jpeg", "180 bytes", "decode"]),
        (compressed("png", b"\x89PNG\r\n\x1a\n" + bytes(40)), "undecodable", ["png", "decode"]),
        (compressed("png", b""), "empty_data", ["png", "no data"]),
        (compressed("bmp", b"BM" + bytes(60)), "unsupported_format", ["'bmp'", "jpeg"]),
        (compressed("", b"\xff\xd8"), "unsupported_format", ["''"]),
        (compressed("16UC1; compressedDepth png", b"\x00" * 12 + b"\x89PNG"), "depth_image", ["compressedDepth"]),
        (compressed(None, b"\xff\xd8"), "bad_message", ["format"]),
        (compressed("png", forged_png(bgr_frame, 100_000, 100_000)), "too_large",
         ["100000x100000", "MAX_DECODE_PIXELS"]),
        (compressed("jpeg", forged_jpeg(bgr_frame, 65000, 65000)), "too_large", ["65000x65000"]),
    ]


def check_rejection(convert, msg, reason: str, words: list) -> ImageConversionError:
    with pytest.raises(ImageConversionError) as err:
        convert(msg)
    assert isinstance(err.value, ValueError)
    assert err.value.reason == reason, (err.value.reason, str(err.value))
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    return err.value


@pytest.mark.parametrize("msg, reason, words", IMAGE_REJECTIONS,
                         ids=[f"{r}-{m.encoding}" for m, r, _ in IMAGE_REJECTIONS])
def test_image_rejections(msg, reason, words):
    check_rejection(image_to_rgb, msg, reason, words)
    check_rejection(message_to_rgb, msg, reason, words)
    check_rejection(lambda m: image_to_rgb(m, max_pixels=4), msg, reason, words)


def test_compressed_rejections(bgr_frame):
    for msg, reason, words in compressed_rejections(bgr_frame):
        check_rejection(compressed_to_rgb, msg, reason, words)
        check_rejection(message_to_rgb, msg, reason, words)


def test_every_reject_reason_is_exercised(bgr_frame):
    exercised = {r for _, r, _ in IMAGE_REJECTIONS} | {r for _, r, _ in compressed_rejections(bgr_frame)}
    assert exercised == set(conv.REJECT_REASONS)
    assert len(set(conv.REJECT_REASONS)) == len(conv.REJECT_REASONS)


def test_error_reason_is_checked_and_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageConversionError("x truncated", reason="truncated")))
    assert (str(err), err.reason) == ("x truncated", "truncated")
    with pytest.raises(ValueError, match="unknown"):
        ImageConversionError("x", reason="no_such_reason")


def test_absurd_header_is_rejected_without_allocation():
    import time
    import tracemalloc

    msgs = [image(height=2**31), image(encoding="nv24", height=2**31, width=2**20, step=2**20),
            image(encoding="bayer_rggb16", height=2**40, width=2**40, step=2**41)]
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for msg in msgs:
            for max_pixels in (None, 1000):
                with pytest.raises(ImageConversionError) as err:
                    message_to_rgb(msg, max_pixels=max_pixels)
                assert err.value.reason == "truncated"
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05, elapsed
    assert peak < 64 * 1024, peak


# ---------------------------------------------------------------- pixel limit
@pytest.mark.parametrize(
    "width, height, max_pixels, expected",
    [
        (768, 576, None, (768, 576)),
        (768, 576, 768 * 576, (768, 576)),
        (768, 576, 100_000, (365, 273)),  # s = sqrt(1e5 / 442368) = 0.4755
        (768, 576, 1, (1, 1)),
        (1000, 1, 10, (10, 1)),           # a side clamped to 1: the other takes what is left
        (1, 1000, 10, (1, 10)),
        (3, 1000, 2, (1, 2)),
        (641, 479, 300_000, (633, 473)),
    ],
)
def test_max_pixels_target_size(width, height, max_pixels, expected):
    msg = image(encoding="mono8", width=width, height=height, step=width, data=bytes(width * height))
    out = image_to_rgb(msg, max_pixels=max_pixels)
    assert (out.shape[1], out.shape[0]) == expected
    assert max_pixels is None or out.shape[0] * out.shape[1] <= max_pixels


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-5, ValueError), (2.5, TypeError), ("100", TypeError)])
def test_max_pixels_must_be_a_positive_int(bad, error):
    msg = image()
    for convert in (image_to_rgb, message_to_rgb):
        with pytest.raises(error) as err:
            convert(msg, max_pixels=bad)
        assert not isinstance(err.value, ImageConversionError)


DOWNSCALED = (365, 273)  # 768 x 576 under max_pixels=100_000


@pytest.mark.parametrize(
    "encoding", ["rgb8", "bgra8", "mono8", "8UC3", "bayer_grbg8", "yuv422", "yuyv", "nv21", "nv24"])
def test_max_pixels_downscales_8bit_like_resizing_the_full_result(rgb_frame, encoding):
    msg, expected = encoded_case(encoding, rgb_frame, pad=3)
    reference = cv2.resize(expected, DOWNSCALED, interpolation=cv2.INTER_AREA)
    check_rgb(image_to_rgb(msg, max_pixels=100_000), reference)
    check_rgb(message_to_rgb(msg, max_pixels=100_000), reference)


@pytest.mark.parametrize("encoding, bigendian", [("rgb16", False), ("bgra16", True), ("mono16", True),
                                                 ("bayer_rggb16", False), ("bayer_gbrg16", True)])
def test_max_pixels_downscales_16bit_before_rounding(rgb_frame, encoding, bigendian):
    v16 = to_16bit(rgb_frame)
    if encoding == "mono16":
        gray = cv2.cvtColor(v16, cv2.COLOR_RGB2GRAY)
        msg, full16 = make_image(gray, encoding, pad=5, bigendian=bigendian), cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    elif encoding.startswith("bayer_"):
        raw = mosaic(v16, encoding[6:10])
        full16 = cv2.cvtColor(raw, BAYER_CODES[encoding[6:10]])
        msg = make_image(raw, encoding, pad=5, bigendian=bigendian)
    else:
        full16 = v16
        msg = make_image(np.ascontiguousarray(PACKED16[encoding](v16)), encoding, pad=5, bigendian=bigendian)
    out = image_to_rgb(msg, max_pixels=100_000)
    # exactly: INTER_AREA on the 16-bit samples, then cv_bridge's rounding
    check_rgb(out, cv_bridge_rule(cv2.resize(full16, DOWNSCALED, interpolation=cv2.INTER_AREA)))
    # and within one level of resizing the full-size 8-bit result
    full8 = cv2.resize(image_to_rgb(msg), DOWNSCALED, interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(np.int16) - full8).max() <= 1


def test_downscale_allocates_no_full_size_intermediate():
    import tracemalloc

    side = 2000
    msg = image(encoding="bgra8", width=side, height=side, step=side * 4 + 4, data=bytes((side * 4 + 4) * side))
    peaks = {}
    for max_pixels in (None, 10_000):
        tracemalloc.start()
        try:
            out = image_to_rgb(msg, max_pixels=max_pixels)
            peaks[max_pixels] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        del out
    assert peaks[None] >= side * side * 3  # the tracer sees OpenCV's numpy outputs...
    assert peaks[10_000] < 1 << 20, peaks  # ...and a strided view + resize needs no full-size copy


def test_png_max_pixels_is_resize_of_full_decode(bgr_frame):
    msg = compressed("png", cv2.imencode(".png", bgr_frame)[1].tobytes())
    reference = cv2.resize(cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB), DOWNSCALED, interpolation=cv2.INTER_AREA)
    check_rgb(compressed_to_rgb(msg, max_pixels=100_000), reference)
    check_rgb(message_to_rgb(msg, max_pixels=100_000), reference)
    check_rgb(compressed_to_rgb(msg, max_pixels=10**9), cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB))


def test_jpeg_max_pixels_decodes_reduced(monkeypatch, rgb_frame):
    big = np.tile(rgb_frame[..., ::-1], (4, 4, 1))  # 3072 x 2304 BGR, 7.1 Mpx
    enc = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    full = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    flags = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flag: flags.append(flag) or real_imdecode(buf, flag))
    msg = compressed("rgb8; jpeg compressed bgr8", enc.tobytes())
    cases = [(768 * 576, 4, (768, 576)),   # 1/4 scale is exactly the target: no resize
             (500_000, 2, (816, 612)),     # 1/4 (768 wide) would be below 816: 1/2, then INTER_AREA
             (10**8, None, (3072, 2304))]  # fits: full decode
    for max_pixels, factor, size in cases:
        flags.clear()
        out = message_to_rgb(msg, max_pixels=max_pixels)
        assert (out.shape[1], out.shape[0]) == size
        expected_flag = cv2.IMREAD_UNCHANGED if factor is None else (
            {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        assert flags == [expected_flag]
        # DCT-scaled decode vs full decode + INTER_AREA: close, not equal
        diff = np.abs(out.astype(np.int16) - cv2.resize(full, size, interpolation=cv2.INTER_AREA))
        assert diff.mean() < 2.0, (max_pixels, diff.mean())


def test_compressed_header_too_large_is_rejected_before_decoding(monkeypatch, bgr_frame):
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a))
    png = compressed("png", forged_png(bgr_frame, 20_000, 20_000))  # 4e8 px; PNG has no reduced decode
    jpeg = compressed("jpeg", forged_jpeg(bgr_frame, 40_000, 40_000))  # 1.6e9 px; 1/8: 2.5e7 px would fit
    for msg, max_pixels in ((png, None), (png, 10_000), (jpeg, None)):
        with pytest.raises(ImageConversionError) as err:
            compressed_to_rgb(msg, max_pixels=max_pixels)
        assert err.value.reason == "too_large"
    assert decoded == []
    with pytest.raises(ImageConversionError) as err:  # allowed through at 1/8 scale, then fails to decode
        compressed_to_rgb(jpeg, max_pixels=10_000)
    assert err.value.reason == "undecodable" and len(decoded) == 1
    assert decoded[0][1] == cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION


# ---------------------------------------------------------------- backend choice
def test_backend_choice_is_cached_and_respects_env(monkeypatch):
    assert conv.try_cv_bridge() is None
    assert conv.conversion_backend() == "numpy"
    monkeypatch.delenv("INFINIPOT_NO_CV_BRIDGE")
    assert conv.try_cv_bridge() is None  # cached: the env is read once
    conv.try_cv_bridge.cache_clear()
    try:
        import cv_bridge  # noqa: F401
    except ImportError:
        assert conv.try_cv_bridge() is None
        assert conv.conversion_backend() == "numpy"


def test_agrees_with_cv_bridge_when_available(monkeypatch, bgr_frame):
    cv_bridge = pytest.importorskip("cv_bridge")
    sensor_msgs = pytest.importorskip("sensor_msgs.msg")
    bridge = cv_bridge.CvBridge()
    rgb = cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB)
    cases = {
        "rgb8": rgb, "bgr8": bgr_frame, "mono8": cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2GRAY),
        "rgba8": cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGBA), "bgra8": cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2BGRA),
        "mono16": cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257 + 77,
    }
    messages = {encoding: make_image(px, encoding, pad=0) for encoding, px in cases.items()}
    # encodings released cv_bridge converts (not 8UC*, nv12/nv21/nv24, nor the uyvy/yuyv aliases)
    for encoding in ("rgb16", "bgr16", "rgba16", "bgra16", "yuv422", "yuv422_yuy2",
                     "bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8", "bayer_rggb16", "bayer_grbg16"):
        messages[encoding] = encoded_case(encoding, rgb)[0]
    for encoding, ns in messages.items():
        m = sensor_msgs.Image(height=ns.height, width=ns.width, encoding=encoding, step=ns.step,
                              is_bigendian=0, data=array.array("B", ns.data))
        np.testing.assert_array_equal(image_to_rgb(m), bridge.imgmsg_to_cv2(m, "rgb8"), err_msg=encoding)
    for ext in (".png", ".jpg"):
        m = sensor_msgs.CompressedImage(format=ext[1:], data=array.array("B", cv2.imencode(ext, bgr_frame)[1].tobytes()))
        np.testing.assert_array_equal(compressed_to_rgb(m), bridge.compressed_imgmsg_to_cv2(m, "rgb8"))
    monkeypatch.delenv("INFINIPOT_NO_CV_BRIDGE")
    conv.try_cv_bridge.cache_clear()
    assert conv.conversion_backend() == "cv_bridge"


class FakeBridge:
    """Stands in for cv_bridge: records calls, converts only what released cv_bridge converts."""

    def __init__(self):
        self.calls = []

    def imgmsg_to_cv2(self, msg, desired):
        self.calls.append(msg.encoding)
        if msg.encoding in ("8UC3", "nv21", "nv24"):
            raise TypeError(f"[{msg.encoding}] is not a color format")  # CvBridgeError is a TypeError
        return image_to_rgb(msg)


def test_message_to_rgb_routes_between_bridge_and_fallback(monkeypatch, rgb_crop, bgr_frame):
    bridge = FakeBridge()
    fake = lambda: bridge  # noqa: E731
    fake.cache_clear = lambda: None
    monkeypatch.setattr(conv, "try_cv_bridge", fake)
    for encoding in ("bgr8", "bayer_rggb16", "8UC3", "nv21", "nv24"):
        msg, expected = encoded_case(encoding, rgb_crop, pad=1)
        check_rgb(message_to_rgb(msg), expected)  # bridge, or the fallback where it raises
        small = message_to_rgb(msg, max_pixels=1000)  # downscaled: always the fallback
        check_rgb(small, image_to_rgb(msg, max_pixels=1000))
    assert bridge.calls == ["bgr8", "bayer_rggb16", "8UC3", "nv21", "nv24"]
    check_rejection(message_to_rgb, image(encoding="32FC1"), "float_image", [])  # rejected before the bridge
    png = compressed("png", cv2.imencode(".png", bgr_frame)[1].tobytes())
    check_rgb(message_to_rgb(png), cv2.cvtColor(bgr_frame, cv2.COLOR_BGR2RGB))
    assert len(bridge.calls) == 5  # compressed images never go through it


def test_module_imports_no_rclpy():
    code = "import sys, infinipot_ros.ros.conversions; sys.exit(1 if 'rclpy' in sys.modules else 0)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO).returncode == 0
