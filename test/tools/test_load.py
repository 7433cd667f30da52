"""infinipot-load (infinipot_ros.tools.load): pure helpers, and one short run against a real node.

The short run starts the tool as a subprocess (which starts the node as its
own subprocess) in the conftest's isolated ROS domain, and checks that the
figures it writes add up. Frames are published at 384 px wide: full-size
768x576 rgb8 messages (1.3 MB) over best-effort loopback DDS lose most
samples on a small VM, which would make "every camera ingested" a matter of
luck rather than of the node.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from infinipot_ros.tools.load import (
    CameraFigures,
    LoadReport,
    error_code,
    format_report,
    increase_times,
    longest_gap,
    main,
    percentile,
    scan_log,
)

try:
    import rclpy  # noqa: F401

    from infinipot_ros.msg import CacheStatus  # noqa: F401
    from infinipot_ros.srv import Ask  # noqa: F401
except ImportError as exc:  # no ROS 2 Python stack or interfaces not built
    _ROS_MISSING = f"rclpy / infinipot_ros interfaces not importable: {exc}"
else:
    _ROS_MISSING = ""


# ------------------------------------------------------------------ helpers
def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 100.0
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0  # unsorted input


def test_increase_times_and_longest_gap():
    samples = [(0.0, 0), (1.0, 0), (2.0, 2), (2.5, 2), (4.5, 4), (5.0, 3), (6.0, 4), (9.0, 6)]
    # a value that goes back (a late, reordered message) is no increase, nor is regaining it
    assert increase_times(samples) == [2.0, 4.5, 9.0]
    assert longest_gap([2.0, 4.5, 9.0]) == pytest.approx(4.5)
    assert longest_gap([1.0]) is None
    assert longest_gap([]) is None
    assert increase_times([(0.0, 5)]) == []  # the first sample is the baseline


def test_error_code():
    assert error_code("BUSY: 4 questions already waiting (ask.max_pending=4)") == "BUSY"
    assert error_code("NO_FRAMES: no frames ingested yet") == "NO_FRAMES"
    assert error_code("TIMEOUT") == "TIMEOUT"
    assert error_code("") == "?"


def test_scan_log():
    text = "\n".join([
        "[INFO] [1.0] [infinipot_assistant]: model ready",
        "[WARN] [2.0] [infinipot_assistant]: /a: frame dropped",
        "[ERROR] [3.0] [infinipot_assistant]: /ask failed: RuntimeError: boom",
        "Traceback (most recent call last):",
        "RuntimeError: boom",
        "WARNING:infinipot_ros.engine:slow",
    ])
    errors, warnings, first = scan_log(text)
    assert (errors, warnings) == (3, 2)
    assert first[0].startswith("[ERROR]") and first[1].startswith("Traceback")


def test_format_report_has_every_figure():
    r = LoadReport(clients=3, cameras_n=2, camera_hz=30, fps=2.0, duration_s=90, max_new_tokens=16,
                   video="/x/vtest.avi", frame_size="768x576", elapsed_s=90.0, asks_sent=10, asks_answered=7,
                   asks_refused={"NO_FRAMES": 2, "BUSY": 1}, max_in_flight=3, latency_p50_s=0.1,
                   latency_p95_s=0.2, latency_max_s=0.3, rss_ready_bytes=800_000_000, rss_end_bytes=810_000_000,
                   node_exit_code=0, node_stop="SIGINT", node_stop_s=1.2, ok=True,
                   cameras=[CameraFigures("/cam0", published=2700, received=2000, sampled=180, ingested=90,
                                          dropped=80, rejected=0, ingest_gap_s=2.1, sample_gap_s=1.0)])
    text = format_report(r)
    for piece in ("sent 10", "answered 7", "refused 3 (BUSY 1, NO_FRAMES 2)", "no response 0", "p50 0.100 s",
                  "p95 0.200 s", "max 0.300 s", "/cam0", "2700", "2000", "2.10 s", "RSS 800 MB at READY",
                  "exit code 0 (SIGINT", "result    OK"):
        assert piece in text, piece
    assert r.to_json()["asks_refused_total"] == 3
    json.dumps(r.to_json())  # serialisable


def test_bad_arguments_exit_2(capsys):
    assert main(["--clients", "-1"]) == 2
    assert main(["--node-arg", "no_value"]) == 2
    assert main(["--video", "/nonexistent/clip.avi", "--duration", "1"]) == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------- a real run
@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.skipif(bool(_ROS_MISSING), reason=_ROS_MISSING or "n/a")
def test_short_run_figures_add_up(tmp_path, vtest_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "infinipot_ros.tools.load", "--duration", "8", "--clients", "2", "--cameras", "2",
           "--camera-hz", "10", "--width", "384", "--video", vtest_path, "--json-out", str(out),
           "--node-log", str(tmp_path / "node.log"), "--ready-timeout", "120"]
    # cwd outside the repository: `python -m` from the repo root would import the source tree
    # (without the generated interfaces) instead of the colcon install.
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "node.log").read_text()[-4000:]
    r = json.loads(out.read_text())
    assert "result    OK" in proc.stdout

    assert r["asks_sent"] > 0
    assert r["asks_answered"] > 0
    assert r["asks_no_response"] == 0
    assert r["asks_answered"] + r["asks_refused_total"] == r["asks_sent"]
    assert set(r["asks_refused"]) <= {"TIMEOUT", "BUSY", "NO_FRAMES", "BAD_REQUEST", "MODEL_ERROR"}
    assert 1 <= r["max_in_flight"] <= 2
    assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_max_s"]

    assert [c["camera_id"] for c in r["cameras"]] == [f"/infinipot_load/cam{i}/image_raw" for i in range(2)]
    for cam in r["cameras"]:
        assert cam["published"] >= cam["received"] > 0, cam
        assert cam["received"] >= cam["sampled"] >= cam["ingested"] > 0, cam
        assert cam["dropped"] <= cam["sampled"], cam
        assert cam["rejected"] == 0, cam
        assert cam["ingest_increases"] >= 1, cam
    assert r["status_messages"] > 0
    assert r["rss_ready_bytes"] > 0 and r["rss_end_bytes"] > 0
    assert r["node_exit_code"] == 0 and r["node_stop"] == "SIGINT"
    assert r["log_errors"] == 0, r["log_error_lines"]
    assert r["ok"] is True
