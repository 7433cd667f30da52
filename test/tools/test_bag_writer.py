"""Video -> rosbag2 writer (infinipot_ros.tools.bag_writer), read back with rosbags."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from infinipot_ros.tools.bag_writer import BagWriterError, main, write_video_to_bag

N = 40
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 100_000_000  # vtest.avi is 10 fps


@pytest.fixture(scope="module")
def frames(vtest_path) -> list:
    """The first N frames of vtest.avi, BGR."""
    cap = cv2.VideoCapture(vtest_path)
    out = []
    for _ in range(N):
        ok, f = cap.read()
        assert ok
        out.append(f)
    cap.release()
    return out


@pytest.fixture
def video(vtest_path) -> Path:
    return Path(vtest_path)


def read_bag(path: Path):
    """[(topic, msgtype, log_ns, msg)] via AnyReader."""
    out = []
    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        for conn, log_ns, raw in reader.messages(connections=reader.connections):
            out.append((conn.topic, conn.msgtype, log_ns, reader.deserialize(raw, conn.msgtype)))
    return out


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def pixels(msg) -> np.ndarray:
    assert msg.step == msg.width * 3 and msg.is_bigendian == 0
    return np.asarray(msg.data, dtype=np.uint8).reshape(msg.height, msg.width, 3)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_first_frames_round_trip(tmp_path, frames, storage, video):
    bag = tmp_path / f"bag_{storage}"
    summary = write_video_to_bag(video, bag, storage=storage, max_frames=N, progress=False)
    assert summary.frames == N
    assert summary.topic == "/camera/image_raw" and summary.msgtype == "sensor_msgs/msg/Image"
    assert summary.first_stamp_ns == START_NS
    assert summary.last_stamp_ns == START_NS + (N - 1) * PERIOD_NS
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert any(p.suffix == suffix for p in bag.iterdir())

    msgs = read_bag(bag)
    assert len(msgs) == N
    assert {(t, m) for t, m, _, _ in msgs} == {("/camera/image_raw", "sensor_msgs/msg/Image")}
    stamps = [stamp_ns(m) for *_, m in msgs]
    assert stamps == [START_NS + i * PERIOD_NS for i in range(N)]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    assert [log for _, _, log, _ in msgs] == stamps  # log time = header stamp
    for i, (*_, m) in enumerate(msgs):
        assert m.encoding == "rgb8" and m.header.frame_id == "camera"
        assert (m.height, m.width) == (576, 768)
        np.testing.assert_array_equal(pixels(m), cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB), err_msg=f"frame {i}")


def test_metadata_is_humble_readable_version(tmp_path, video):
    bag = tmp_path / "b"
    write_video_to_bag(video, bag, storage="sqlite3", max_frames=2, progress=False)
    meta = (bag / "metadata.yaml").read_text()
    assert "version: 8" in meta  # v9 QoS lists break Humble's ros2 bag
    assert "offered_qos_profiles: ''" in meta


def test_every_and_max_frames(tmp_path, frames, video):
    bag = tmp_path / "every"
    summary = write_video_to_bag(video, bag, every=3, max_frames=5, encoding="bgr8", frame_id="front",
                                 start_stamp="1700000123.25", progress=False)
    assert summary.frames == 5
    msgs = read_bag(bag)
    assert len(msgs) == 5
    start = 1_700_000_123_250_000_000
    assert [stamp_ns(m) for *_, m in msgs] == [start + k * 3 * PERIOD_NS for k in range(5)]
    for k, (*_, m) in enumerate(msgs):
        assert m.encoding == "bgr8" and m.header.frame_id == "front"
        np.testing.assert_array_equal(pixels(m), frames[3 * k])


def test_resize_and_topic(tmp_path, frames, video):
    bag = tmp_path / "small"
    write_video_to_bag(video, bag, topic="/front/image", width=192, max_frames=3, progress=False)
    msgs = read_bag(bag)
    assert [t for t, *_ in msgs] == ["/front/image"] * 3
    m = msgs[2][3]
    assert (m.width, m.height) == (192, 144)
    ref = cv2.cvtColor(cv2.resize(frames[2], (192, 144), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(pixels(m), ref)


def test_compressed_jpeg(tmp_path, frames, video):
    bag = tmp_path / "jpg"
    summary = write_video_to_bag(video, bag, compressed=True, max_frames=4, jpeg_quality=95, progress=False)
    assert summary.topic == "/camera/image_raw/compressed"
    assert summary.msgtype == "sensor_msgs/msg/CompressedImage"
    msgs = read_bag(bag)
    assert len(msgs) == 4
    for i, (_, msgtype, _, m) in enumerate(msgs):
        assert msgtype == "sensor_msgs/msg/CompressedImage"
        assert m.format == "rgb8; jpeg compressed bgr8"
        decoded = cv2.imdecode(np.asarray(m.data, dtype=np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(decoded.astype(np.int16) - frames[i]).mean() < 2.5


def test_existing_bag_is_an_error(tmp_path, video):
    bag = tmp_path / "exists"
    bag.mkdir()
    (bag / "keep.txt").write_text("mine")
    with pytest.raises(BagWriterError, match="exists"):
        write_video_to_bag(video, bag, max_frames=1, progress=False)
    assert [p.name for p in bag.iterdir()] == ["keep.txt"]
    assert main([str(video), str(bag), "--max-frames", "1"]) == 2


def test_bad_video_is_an_error(tmp_path, capsys):
    with pytest.raises(BagWriterError, match="does not exist"):
        write_video_to_bag(tmp_path / "missing.avi", tmp_path / "b1", progress=False)
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(BagWriterError, match="cannot open"):
        write_video_to_bag(junk, tmp_path / "b2", progress=False)
    assert not (tmp_path / "b2").exists()
    assert main([str(junk), str(tmp_path / "b3")]) == 2
    err = capsys.readouterr().err
    assert "cannot open" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [["--every", "0"], ["--storage", "zip"], ["--encoding", "yuv422"],
                                 ["--start-stamp", "yesterday"], ["--width", "-5"]])
def test_cli_bad_arguments_return_2(tmp_path, bad, capsys, video):
    assert main([str(video), str(tmp_path / "b")] + bad) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_main_writes_bag(tmp_path, capsys, video):
    bag = tmp_path / "cli"
    rc = main([str(video), str(bag), "--storage", "sqlite3", "--max-frames", "6", "--every", "2",
               "--topic", "/cam/image_raw", "--no-progress"])
    assert rc == 0
    assert "wrote 6" in capsys.readouterr().out
    msgs = read_bag(bag)
    assert [t for t, *_ in msgs] == ["/cam/image_raw"] * 6
    assert [stamp_ns(m) for *_, m in msgs] == [START_NS + 2 * k * PERIOD_NS for k in range(6)]
