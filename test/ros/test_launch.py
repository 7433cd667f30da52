"""launch/assistant.launch.py with the real launch machinery (launch_testing).

The node is started exactly as `ros2 launch infinipot_ros assistant.launch.py
lifecycle:=true` starts it (installed executable, parameters YAML, launch arguments,
configure + activate driven by the launch file's lifecycle events); the test waits
for READY on the status topic, calls /ask, and checks the exit code. The plain node
(lifecycle:=false) runs as a subprocess in test/tools/test_load.py and `make demo`.
"""
from __future__ import annotations

import os
import time
import unittest

import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
import pytest
import rclpy
from ament_index_python.packages import get_package_share_directory
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource

from infinipot_ros.msg import CacheStatus
from infinipot_ros.ros.node import STATUS_QOS
from infinipot_ros.srv import Ask

NAMESPACE = "launch_test"


@pytest.mark.launch_test
def generate_test_description():
    share = get_package_share_directory("infinipot_ros")
    include = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "assistant.launch.py")),
        launch_arguments={
            "namespace": NAMESPACE,
            "image_topic": "/launch_test/camera/image_raw",
            "log_level": "info",
            "lifecycle": "true",
        }.items(),
    )
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()])


class TestAssistantLaunch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("launch_test_client")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def test_ready_then_ask(self, proc_output):
        statuses = []
        self.node.create_subscription(CacheStatus, f"/{NAMESPACE}/infinipot/status", statuses.append, STATUS_QOS)
        end = time.monotonic() + 120
        while time.monotonic() < end and not any(s.state == CacheStatus.STATE_READY for s in statuses):
            rclpy.spin_once(self.node, timeout_sec=0.1)
        ready = [s for s in statuses if s.state == CacheStatus.STATE_READY]
        self.assertTrue(ready, f"no READY status; states seen: {[s.state for s in statuses]}")
        st = ready[-1]
        self.assertEqual(st.model_id, "builtin:tiny-qwen2.5-vl")  # from config/assistant.yaml
        self.assertEqual(st.vision_tokens_budget, 4096)
        self.assertGreater(st.prefix_tokens, 0)
        self.assertEqual(st.kv_bytes_used, st.prefix_tokens * (st.kv_bytes_budget // st.tokens_budget))
        proc_output.assertWaitFor("model ready", timeout=10, stream="stderr")

        client = self.node.create_client(Ask, f"/{NAMESPACE}/ask")
        self.assertTrue(client.wait_for_service(timeout_sec=10))
        fut = client.call_async(Ask.Request(question="What do you see?"))
        rclpy.spin_until_future_complete(self.node, fut, timeout_sec=30)
        res = fut.result()
        self.assertFalse(res.success)
        self.assertTrue(res.error.startswith("NO_FRAMES"), res.error)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_code(self, proc_info):
        # SIGINT from launch at the end of the test: the node shuts down cleanly.
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0])
