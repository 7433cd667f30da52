"""Damaged videos and bags in the tools: the one video reader, infinipot-stream, -video-to-bag, -replay.

Every damaged file is made here from the real vtest.avi (msmpeg4, 795 frames,
10 fps) or from a short MJPG clip cut from it: truncated at 50 %, garbage
written over its middle, empty, not a video at all, header only, single frames
whose JPEG payload is garbage (the decoder refuses exactly those), and an
absurd header frame rate. Bags are written by the bag writer and then
truncated, given a garbage metadata.yaml, robbed of their storage file or
damaged inside. The tools run for real: main() in this process, or a
subprocess with a timeout where "no traceback" and "never hangs" are the point.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from infinipot_ros.tools import bag_writer, stream
from infinipot_ros.tools.video import (
    DEFAULT_FPS,
    MAX_CONSECUTIVE_FAILURES,
    VideoError,
    VideoReader,
    iter_video,
    probe_video,
    resolve_fps,
)

VTEST_FRAMES = 795
CLIP_FRAMES = 20
BAD_CLIP_FRAMES = (4, 5, 11)  # JPEG payloads overwritten with garbage
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 100_000_000  # 10 fps


# ------------------------------------------------------------------ files
def _movi_frames(data: bytes) -> list[tuple[int, int]]:
    """(payload offset, size) of every video chunk ('##dc') of an AVI, walking the RIFF tree."""
    i = 12
    while i + 8 <= len(data):
        cid, size = data[i:i + 4], int.from_bytes(data[i + 4:i + 8], "little")
        if cid == b"LIST" and data[i + 8:i + 12] == b"movi":
            out, j, end = [], i + 12, i + 8 + size
            while j + 8 <= end:
                cid2, size2 = data[j:j + 4], int.from_bytes(data[j + 4:j + 8], "little")
                if cid2.endswith(b"dc"):
                    out.append((j + 8, size2))
                j += 8 + size2 + (size2 & 1)
            return out
        i += 8 + size + (size & 1)
    raise AssertionError("no movi list")


def _garbage(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory, vtest_path) -> dict:
    d = tmp_path_factory.mktemp("damaged")
    data = Path(vtest_path).read_bytes()
    n = len(data)
    out = {"vtest": Path(vtest_path)}
    out["truncated"] = d / "truncated.avi"
    out["truncated"].write_bytes(data[: n // 2])
    garbled = bytearray(data)
    garbled[n // 2 - 200_000: n // 2 + 200_000] = _garbage(400_000, 0)
    out["garbage_middle"] = d / "garbage_middle.avi"
    out["garbage_middle"].write_bytes(bytes(garbled))
    out["empty"] = d / "empty.avi"
    out["empty"].write_bytes(b"")
    out["not_video"] = d / "notes.avi"
    out["not_video"].write_text("this is a text file, not a video\n" * 200)
    out["header_only"] = d / "header_only.avi"
    out["header_only"].write_bytes(data[: data.find(b"movi") + 4])

    clip = d / "clip.avi"  # MJPG: one JPEG per frame, so single frames can be damaged
    cap = cv2.VideoCapture(vtest_path)
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (192, 144))
    assert writer.isOpened()
    for _ in range(CLIP_FRAMES):
        ok, bgr = cap.read()
        assert ok
        writer.write(cv2.resize(bgr, (192, 144), interpolation=cv2.INTER_AREA))
    writer.release()
    cap.release()
    out["clip"] = clip
    raw = clip.read_bytes()
    chunks = _movi_frames(raw)
    assert len(chunks) == CLIP_FRAMES
    bad, all_bad = bytearray(raw), bytearray(raw)
    for k, (off, size) in enumerate(chunks):
        if k in BAD_CLIP_FRAMES:
            bad[off:off + size] = _garbage(size, k)
        all_bad[off:off + size] = _garbage(size, 100 + k)
    out["bad_frames"] = d / "bad_frames.avi"
    out["bad_frames"].write_bytes(bytes(bad))
    out["all_bad"] = d / "all_bad.avi"
    out["all_bad"].write_bytes(bytes(all_bad))
    # an absurd header frame rate: strh rate 100000 / scale 1, avih 10 us per frame
    absurd = bytearray(raw)
    strh = absurd.find(b"strh") + 8
    absurd[strh + 20:strh + 28] = struct.pack("<II", 1, 100_000)
    avih = absurd.find(b"avih") + 8
    absurd[avih:avih + 4] = struct.pack("<I", 10)
    out["absurd_fps"] = d / "absurd_fps.avi"
    out["absurd_fps"].write_bytes(bytes(absurd))
    return out


UNUSABLE = ("empty", "not_video", "header_only", "all_bad")


# ------------------------------------------------------------------ the fps rule
def test_fps_rule():
    assert resolve_fps(None, 10.0) == (10.0, "header")
    assert resolve_fps(None, 1000.0) == (1000.0, "header")
    for header in (None, 0.0, -1.0, float("nan"), float("inf"), 1000.5, 90_000.0):
        assert resolve_fps(None, header) == (DEFAULT_FPS, "default"), header
    assert DEFAULT_FPS == 30.0
    assert resolve_fps(12.5, 10.0) == (12.5, "given")
    assert resolve_fps(5000.0, float("nan")) == (5000.0, "given")  # what the caller says goes
    for given in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            resolve_fps(given, 10.0)


def test_fps_rule_on_real_files(files):
    info = probe_video(str(files["vtest"]))
    assert (info.fps, info.fps_source, info.fps_from_header, info.frame_count) == (10.0, "header", True, 795)
    absurd = probe_video(str(files["absurd_fps"]))
    assert absurd.header_fps == 100_000.0
    assert (absurd.fps, absurd.fps_source, absurd.fps_from_header) == (30.0, "default", False)
    assert [s for _, s, _ in iter_video(str(files["absurd_fps"]), max_frames=3)] == [0, 33_333_333, 66_666_667]
    given = VideoReader(str(files["absurd_fps"]), fps=4.0)
    assert given.fps == 4.0 and given.info.fps_source == "given"
    assert [f.stamp_ns for f in given][:3] == [0, 250_000_000, 500_000_000]
    with pytest.raises(ValueError):
        VideoReader(str(files["vtest"]), fps=0.0)


# ------------------------------------------------------------------ the reader
def test_reader_skips_and_counts_undecodable_frames(files):
    clean = list(VideoReader(str(files["clip"])))
    reader = VideoReader(str(files["bad_frames"]))
    got = list(reader)
    kept = [i for i in range(CLIP_FRAMES) if i not in BAD_CLIP_FRAMES]
    assert [f.index for f in got] == kept  # a skipped frame keeps its slot
    assert [f.stamp_ns for f in got] == [i * PERIOD_NS for i in kept]
    assert (reader.stats.frames, reader.stats.skipped, reader.stats.missing) == (17, 3, 0)
    for f in got:
        np.testing.assert_array_equal(f.image, clean[f.index].image, err_msg=f"frame {f.index}")
    # two passes: indices continue over the whole pass length, the count adds up
    twice = VideoReader(str(files["bad_frames"]), loops=2)
    assert [f.index for f in twice] == kept + [CLIP_FRAMES + i for i in kept]
    assert twice.stats.skipped == 6 and twice.stats.passes == 2
    # every: picked by index, the skipped slots stay empty
    assert [f.index for f in VideoReader(str(files["bad_frames"]), every=2)] == [0, 2, 6, 8, 10, 12, 14, 16, 18]


def test_reader_truncated_file_is_bounded_and_counts_missing(files):
    t0 = time.monotonic()
    reader = VideoReader(str(files["truncated"]))
    got = list(reader)
    assert time.monotonic() - t0 < 20
    n = len(got)
    assert 300 < n < VTEST_FRAMES // 2 + 10, n
    assert [f.index for f in got] == list(range(n))
    assert reader.stats.missing == VTEST_FRAMES - n and reader.stats.skipped == 0
    clean = VideoReader(str(files["vtest"]), max_frames=n)
    for a, b in zip(got[:: 50], list(clean)[:: 50]):
        np.testing.assert_array_equal(a.image, b.image)  # what is there decodes as in the sound file


def test_reader_garbage_in_the_middle(files):
    reader = VideoReader(str(files["garbage_middle"]))
    got = list(reader)
    st = reader.stats
    assert 300 < st.frames < VTEST_FRAMES
    assert st.frames + st.skipped + st.missing == VTEST_FRAMES  # every frame announced is accounted for
    first = list(VideoReader(str(files["vtest"]), max_frames=300))
    for k in (0, 150, 299):  # before the garbage, bit for bit the sound file's
        np.testing.assert_array_equal(got[k].image, first[k].image)


@pytest.mark.parametrize("name", UNUSABLE + ("missing", "directory"))
def test_reader_unusable_file_raises_naming_it(files, name, tmp_path):
    path = {"missing": str(tmp_path / "missing.avi"), "directory": str(tmp_path)}.get(name) or str(files[name])
    t0 = time.monotonic()
    with pytest.raises(VideoError) as err:
        list(VideoReader(path))
    assert path in str(err.value) and err.value.path == path
    assert isinstance(err.value, OSError)
    assert time.monotonic() - t0 < 10
    if name in ("header_only", "all_bad"):
        assert "no decodable frame" in str(err.value)


def test_reader_stops_after_consecutive_failures_without_a_count(files):
    # all_bad announces 20 frames: it stops at the count; with max_failures 3 it stops after 3
    reader = VideoReader(str(files["all_bad"]), max_failures=3)
    with pytest.raises(VideoError, match=r"3 read\(s\) failed"):
        list(reader)
    with pytest.raises(VideoError, match=r"20 read\(s\) failed"):
        list(VideoReader(str(files["all_bad"])))
    assert MAX_CONSECUTIVE_FAILURES >= 3


# ------------------------------------------------------------------ infinipot-video-to-bag
def _read_bag(path: Path) -> list:
    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        return [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=reader.connections)]


def _stamp(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def test_bag_writer_skips_undecodable_frames(files, tmp_path, capsys):
    bag = tmp_path / "bad_frames_bag"
    assert bag_writer.main([str(files["bad_frames"]), str(bag), "--storage", "sqlite3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 17 " in out and "3 undecodable frame(s) skipped" in out
    kept = [i for i in range(CLIP_FRAMES) if i not in BAD_CLIP_FRAMES]
    assert [_stamp(m) for m in _read_bag(bag)] == [START_NS + i * PERIOD_NS for i in kept]
    meta = (bag / "metadata.yaml").read_text()
    assert "infinipot.frames_skipped: '3'" in meta and "infinipot.video_fps_source: header" in meta


def test_bag_writer_truncated_video(files, tmp_path):
    summary = bag_writer.write_video_to_bag(files["truncated"], tmp_path / "t", every=20, progress=False)
    assert 15 <= summary.frames <= 20 and summary.frames_skipped == 0
    assert summary.frames_missing > 390 and summary.fps_source == "header"
    assert len(_read_bag(tmp_path / "t")) == summary.frames


@pytest.mark.parametrize("name", UNUSABLE)
def test_bag_writer_unusable_video_exit_2_no_bag(files, tmp_path, name, capsys):
    bag = tmp_path / "never"
    assert bag_writer.main([str(files[name]), str(bag), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(files[name]) in err and "Traceback" not in err
    assert not bag.exists()


# ------------------------------------------------------------------ infinipot-stream
def _stream(capsys, *argv) -> tuple[int, list, str]:
    rc = stream.main(list(argv))
    cap = capsys.readouterr()
    return rc, [json.loads(x) for x in cap.out.splitlines() if x.startswith("{")], cap.err


def test_stream_damaged_video_counts_skipped(files, tiny_model_dir, capsys):
    rc, lines, _ = _stream(capsys, "--video", str(files["bad_frames"]), "--model", tiny_model_dir, "--device", "cpu",
                           "--fps", "10", "--max-tokens", "512", "--max-new-tokens", "2", "--json", "--ask", "What?")
    assert rc == 0
    summary = lines[-1]["summary"]
    assert (summary["frames_read"], summary["frames_skipped"], summary["frames_missing"]) == (17, 3, 0)
    frames = [e["frame"] for e in lines if "frame" in e]
    assert frames == [i for i in range(CLIP_FRAMES) if i not in BAD_CLIP_FRAMES]


def test_stream_truncated_video(files, tiny_model_dir, capsys):
    rc, lines, _ = _stream(capsys, "--video", str(files["truncated"]), "--model", tiny_model_dir, "--device", "cpu",
                           "--fps", "0.5", "--max-tokens", "512", "--max-new-tokens", "2", "--json")
    assert rc == 0
    summary = lines[-1]["summary"]
    assert 300 < summary["frames_read"] < 410
    assert summary["frames_read"] + summary["frames_missing"] == VTEST_FRAMES and summary["frames_skipped"] == 0


@pytest.mark.parametrize("name", ("empty", "not_video", "all_bad"))
def test_stream_unusable_video_exit_2(files, tiny_model_dir, capsys, name):
    rc, lines, err = _stream(capsys, "--video", str(files[name]), "--model", tiny_model_dir, "--device", "cpu",
                             "--json")
    assert rc == 2 and not lines
    assert str(files[name]) in err and "Traceback" not in err


# ------------------------------------------------------------------ infinipot-replay
def _run(*argv, timeout: float = 60) -> subprocess.CompletedProcess:
    """A tool as a real process (its module's __main__), bounded by ``timeout`` s."""
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _replay_main():
    from infinipot_ros.tools.replay import main

    return main


@pytest.mark.ros
def test_replay_damaged_video_publishes_the_rest(files, capsys):
    main = _replay_main()
    rc = main([str(files["bad_frames"]), "--rate", "0", "--topic", "/corrupt/bad_frames", "--ros-args",
               "-r", "__node:=replay_bad_frames"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "published 17 messages" in out and "3 undecodable skipped" in out


@pytest.mark.ros
def test_replay_truncated_video_subprocess(files):
    proc = _run("-m", "infinipot_ros.tools.replay", str(files["truncated"]), "--rate", "0",
                "--topic", "/corrupt/truncated")
    assert proc.returncode == 0, proc.stderr
    n = int(proc.stdout.split("published ")[1].split()[0])
    assert 300 < n < 410
    assert f"{VTEST_FRAMES - n} frame(s) announced by the video header never read" in proc.stdout


@pytest.mark.ros
@pytest.mark.parametrize("name", UNUSABLE)
def test_replay_unusable_video_nonzero(files, name, capsys):
    rc = _replay_main()([str(files[name]), "--rate", "0", "--topic", "/corrupt/unusable"])
    err = capsys.readouterr().err
    assert rc != 0 and str(files[name]) in err and "Traceback" not in err


@pytest.fixture(scope="module")
def bags(tmp_path_factory, vtest_path) -> dict:
    """A sound 12-frame bag per storage, and damaged copies of it."""
    d = tmp_path_factory.mktemp("bags")
    out = {}
    for storage, suffix in (("mcap", ".mcap"), ("sqlite3", ".db3")):
        sound = d / f"sound_{storage}"
        bag_writer.write_video_to_bag(vtest_path, sound, storage=storage, max_frames=12, width=160, progress=False)
        out[f"sound_{storage}"] = sound
        (data_file,) = [p for p in sound.iterdir() if p.suffix == suffix]
        size = data_file.stat().st_size

        def copy(kind: str) -> tuple[Path, Path]:
            dst = d / f"{kind}_{storage}"
            shutil.copytree(sound, dst)
            out[f"{kind}_{storage}"] = dst
            return dst, dst / data_file.name

        _, f = copy("truncated")
        f.write_bytes(f.read_bytes()[: size // 2])
        bag, _ = copy("garbage_metadata")
        (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: {{{ [ not yaml\n")
        bag, _ = copy("wrong_metadata")
        (bag / "metadata.yaml").write_text("rosbag2_bagfile_information:\n  version: banana\n")
        _, f = copy("missing_storage")
        f.unlink()
        _, f = copy("no_metadata")
        (f.parent / "metadata.yaml").unlink()
        _, f = copy("damaged_inside")
        raw = bytearray(f.read_bytes())
        raw[size // 2: size // 2 + 5000] = _garbage(5000, 7)
        f.write_bytes(bytes(raw))
    return out


DAMAGED_BAGS = [f"{k}_{s}" for k in ("truncated", "garbage_metadata", "wrong_metadata", "missing_storage",
                                      "no_metadata") for s in ("mcap", "sqlite3")]


@pytest.mark.ros
@pytest.mark.parametrize("name", DAMAGED_BAGS)
def test_replay_damaged_bag_exit_2_names_it(bags, name, capsys):
    rc = _replay_main()([str(bags[name]), "--rate", "0"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(bags[name]) in err and "Traceback" not in err and "error:" in err


@pytest.mark.ros
def test_replay_damaged_bag_subprocess_no_traceback(bags):
    for name in ("truncated_mcap", "missing_storage_sqlite3"):
        proc = _run("-m", "infinipot_ros.tools.replay", str(bags[name]), "--rate", "0",
                    "--remap", f"/camera/image_raw:=/corrupt/{name}")
        assert proc.returncode != 0, (name, proc.stdout)
        assert str(bags[name]) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.ros
def test_replay_bag_damaged_inside(bags, capsys):
    """Damage inside the storage file: an error naming the bag (sqlite: while reading), or the messages as they are."""
    for storage in ("mcap", "sqlite3"):
        name = f"damaged_inside_{storage}"
        rc = _replay_main()([str(bags[name]), "--rate", "0", "--remap", f"/camera/image_raw:=/corrupt/{name}"])
        cap = capsys.readouterr()
        if rc == 0:  # the garbage fell in pixel data only: nothing to detect, all 12 messages go out
            assert "published 12 messages" in cap.out
        else:
            assert str(bags[name]) in cap.err and "Traceback" not in cap.err
    sound = _replay_main()([str(bags["sound_sqlite3"]), "--rate", "0", "--remap", "/camera/image_raw:=/corrupt/s"])
    assert sound == 0 and "published 12 messages" in capsys.readouterr().out
