"""Test-wide settings: ROS 2 isolation and shared fixtures.

Every test run gets its own ROS_DOMAIN_ID, localhost-only discovery and a
temporary ROS_HOME, so parallel runs and other ROS processes on the machine do
not see each other. This runs before any test imports rclpy.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "UDPv4")
_ros_home = tempfile.mkdtemp(prefix="infinipot-test-ros-")
os.environ.setdefault("ROS_HOME", _ros_home)
os.environ.setdefault("ROS_LOG_DIR", os.path.join(_ros_home, "log"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_VIDEO_CANDIDATES = (
    os.environ.get("INFINIPOT_VIDEO", ""),
    str(REPO.parent / "shared" / "data" / "vtest.avi"),
    str(REPO / ".cache" / "data" / "vtest.avi"),
    "/usr/share/doc/opencv-doc/examples/data/vtest.avi",
)


@pytest.fixture(scope="session")
def vtest_path() -> str:
    """OpenCV's sample video vtest.avi (795 frames, 768x576, 10 fps); `make data` fetches it."""
    for cand in _VIDEO_CANDIDATES:
        if cand and os.path.isfile(cand):
            return cand
    pytest.fail("vtest.avi not found: run `make data` (it comes from Debian's opencv-doc) or set INFINIPOT_VIDEO")


@pytest.fixture(scope="session")
def vtest_frames(vtest_path):
    """The first 16 frames of vtest.avi sampled at 2 fps (every 5th), RGB uint8 [576, 768, 3], with stamps (ns)."""
    import cv2

    cap = cv2.VideoCapture(vtest_path)
    frames, stamps, i = [], [], 0
    while len(frames) < 16:
        ok, bgr = cap.read()
        assert ok, "vtest.avi ended early"
        if i % 5 == 0:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            stamps.append(1_700_000_000 * 10**9 + i * 100_000_000)
        i += 1
    cap.release()
    return frames, stamps


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The embedded tiny Qwen2.5-VL, built once per test session (seed 0)."""
    from infinipot_ros.models.tiny import build_tiny_qwen2_5_vl

    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    """One loaded adapter (fp32, CPU) shared by the model and engine tests; 64 tokens per 2-frame patch."""
    from infinipot_ros.models import load_adapter

    return load_adapter(tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28)
