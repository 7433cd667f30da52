"""Image message -> RGB conversion (infinipot_ros.ros.conversions).

References are computed here independently: cv2.cvtColor / numpy channel
shuffles for colour, and for mono16 cv_bridge's rule (convertTo(CV_8U,
255/65535): round to nearest, saturate) written out in integer arithmetic.
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


@pytest.mark.parametrize("encoding", ["yuv422", "32FC1", "bayer_rggb8", "16UC1", "rgb16", "RGB8", ""])
def test_unsupported_encodings_raise(encoding):
    msg = SimpleNamespace(encoding=encoding, height=2, width=2, step=16, is_bigendian=0, data=bytes(64))
    with pytest.raises(ImageConversionError) as err:
        message_to_rgb(msg)
    assert repr(encoding) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(height=4, width=4, step=12, data=bytes(47)), ["rgb8", "47", "48", "truncated"]),
        (dict(height=0, width=4, step=12, data=b""), ["rgb8", "zero size"]),
        (dict(height=4, width=0, step=12, data=bytes(48)), ["rgb8", "zero size"]),
        (dict(height=4, width=4, step=11, data=bytes(48)), ["rgb8", "step 11", "12"]),
    ],
)
def test_bad_sizes_raise(fields, words):
    msg = SimpleNamespace(encoding="rgb8", is_bigendian=0, **fields)
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(msg)
    for word in words:
        assert word in str(err.value)


def test_mono16_step_must_cover_two_bytes_per_pixel():
    msg = SimpleNamespace(encoding="mono16", height=2, width=4, step=4, is_bigendian=0, data=bytes(16))
    with pytest.raises(ImageConversionError, match="mono16.*step 4"):
        image_to_rgb(msg)


# ---------------------------------------------------------------- CompressedImage
def compressed(fmt: str, data) -> SimpleNamespace:
    return SimpleNamespace(format=fmt, data=data)


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


@pytest.mark.parametrize(
    "fmt, data, words",
    [
        ("jpeg", b"this is not a jpeg" * 10, ["jpeg", "180 bytes", "decode"]),
        ("png", b"", ["png", "no data"]),
        ("bmp", b"BM" + bytes(60), ["'bmp'", "jpeg"]),
        ("", b"\xff\xd8", ["''"]),
        ("16UC1; compressedDepth png", b"\x00" * 12 + b"\x89PNG", ["compressedDepth"]),
    ],
)
def test_bad_compressed_raise(fmt, data, words):
    with pytest.raises(ImageConversionError) as err:
        message_to_rgb(compressed(fmt, data))
    for word in words:
        assert word in str(err.value)


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
    for encoding, px in cases.items():
        ns = make_image(px, encoding, pad=0)
        m = sensor_msgs.Image(height=ns.height, width=ns.width, encoding=encoding, step=ns.step,
                              is_bigendian=0, data=array.array("B", ns.data))
        np.testing.assert_array_equal(image_to_rgb(m), bridge.imgmsg_to_cv2(m, "rgb8"), err_msg=encoding)
    for ext in (".png", ".jpg"):
        m = sensor_msgs.CompressedImage(format=ext[1:], data=array.array("B", cv2.imencode(ext, bgr_frame)[1].tobytes()))
        np.testing.assert_array_equal(compressed_to_rgb(m), bridge.compressed_imgmsg_to_cv2(m, "rgb8"))
    monkeypatch.delenv("INFINIPOT_NO_CV_BRIDGE")
    conv.try_cv_bridge.cache_clear()
    assert conv.conversion_backend() == "cv_bridge"


def test_module_imports_no_rclpy():
    code = "import sys, infinipot_ros.ros.conversions; sys.exit(1 if 'rclpy' in sys.modules else 0)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO).returncode == 0
