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
