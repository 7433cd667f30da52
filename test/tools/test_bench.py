"""infinipot-bench on the real video and the embedded model; the one video reader; the 3B/7B shape builder.

The end-to-end run is the real command (parent in this process, one child
process per policy), 40 frames of vtest.avi at 10 fps with a 512-token cap, so
compressions happen within the run. Nothing here asserts timing.
"""
from __future__ import annotations

import csv
import json
import zlib

import cv2
import numpy as np
import pytest

from infinipot_ros.tools import bench
from infinipot_ros.tools.video import iter_video, probe_video

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POLICY_FRAMES = {"infinipot_v": 40, "none": 20}


# ------------------------------------------------------------------ video
@pytest.fixture(scope="module")
def short_clip(tmp_path_factory, vtest_path):
    """The first 10 frames of vtest.avi, downscaled to 192x144, as an MJPG avi at 5 fps."""
    path = str(tmp_path_factory.mktemp("clip") / "clip.avi")
    cap = cv2.VideoCapture(vtest_path)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (192, 144))
    assert out.isOpened()
    for _ in range(10):
        ok, bgr = cap.read()
        assert ok
        out.write(cv2.resize(bgr, (192, 144), interpolation=cv2.INTER_AREA))
    out.release()
    cap.release()
    return path


def test_iter_video_loops_continue_stamps_and_repeat_frames(short_clip):
    info = probe_video(short_clip)
    assert (info.fps, info.frame_count, info.width, info.height) == (5.0, 10, 192, 144)
    once = list(iter_video(short_clip))
    twice = list(iter_video(short_clip, loops=2))
    assert len(once) == 10 and len(twice) == 20
    assert [i for i, _, _ in twice] == list(range(20))
    assert [s for _, s, _ in twice] == [i * 200_000_000 for i in range(20)]  # 1 / 5 fps, continuing
    for k in range(10):
        assert twice[k][2].shape == (144, 192, 3) and twice[k][2].dtype == np.uint8
        assert np.array_equal(twice[k][2], once[k][2])
        assert np.array_equal(twice[10 + k][2], twice[k][2])  # the second pass decodes the same pixels
    assert len(list(iter_video(short_clip, max_frames=15, loops=2))) == 15  # the cap counts all loops
    assert [i for i, _, _ in iter_video(short_clip, max_frames=3, loops=5)] == [0, 1, 2]
    assert info.total_frames(loops=3) == 30 and info.total_frames(loops=3, max_frames=25) == 25


def test_iter_video_errors(tmp_path, short_clip):
    with pytest.raises(OSError):
        next(iter_video(str(tmp_path / "missing.avi")))
    with pytest.raises(ValueError):
        next(iter_video(short_clip, loops=0))


# ------------------------------------------------------------ pure helpers
def test_parse_policies_and_points():
    assert bench.parse_policies("infinipot_v, none@600") == [("infinipot_v", 0), ("none", 600)]
    for bad in ("", "bogus", "none@x", "none@0", "tar,tar@5"):
        with pytest.raises(ValueError):
            bench.parse_policies(bad)
    assert [bench.point_frame(f, 40) for f in bench.FRACTIONS] == [3, 9, 19, 39]
    assert [bench.point_frame(f, 3180) for f in bench.FRACTIONS] == [317, 794, 1589, 3179]
    assert bench.window_frames(40) == 4 and bench.window_frames(5) == 1
    rows = {"frame": np.array([1, 3, 5, 7]), "ms": np.array([10.0, 20.0, 30.0, 50.0])}
    assert bench.window_mean(rows, "ms", 7, 4) == (40.0, 2)  # frames 4..7
    assert bench.window_mean(rows, "ms", 0, 1) == (None, 0)


def _digest(frames, crcs):
    return {"frames_read": frames[-1] + 1, "digest": {"frame": list(frames), "crc": list(crcs)}}


def test_check_digests_flags_different_frames():
    chain = np.cumsum([11, 22, 33, 44]).tolist()
    same = bench.check_digests([_digest([0, 2, 4, 6], chain), _digest([0, 2], chain[:2])])
    assert same["match"] and same["common_frames"] == 3 and same["sampled_frames"] == 2
    assert same["digest"] == f"{chain[1]:08x}"
    other = bench.check_digests([_digest([0, 2, 4, 6], chain), _digest([0, 2, 4, 6], chain[:2] + [0, 0])])
    assert not other["match"] and other["first_mismatch_frame"] == 4 and other["digest"] is None


# ----------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, vtest_path):
    out = tmp_path_factory.mktemp("bench")
    files = {"json": out / "bench.json", "csv": out / "bench.csv", "png": out / "bench.png"}
    rc = bench.main([
        "--video", vtest_path, "--shapes", "tiny", "--device", "cpu", "--frames", "40", "--fps", "10",
        "--max-tokens", "512", "--policies", "infinipot_v,none@20", "--max-new-tokens", "8", "--count-ops",
        "--threads", "1",
        "--quiet", "--json-out", str(files["json"]), "--csv-out", str(files["csv"]), "--plot", str(files["png"]),
    ])
    assert rc == 0
    doc = json.loads(files["json"].read_text())
    return doc, files


def test_bench_json_schema_and_frames(bench_run):
    doc, _ = bench_run
    assert [r["policy"] for r in doc["runs"]] == ["infinipot_v", "none"]
    point_keys = {"fraction", "frame", "kv_bytes", "kv_bytes_reserved", "rss_bytes", "ms_per_patch", "encode_ms",
                  "prefill_ms", "compression_ms", "ttft_s", "decode_tok_s"}
    for run in doc["runs"]:
        assert {"policy", "kv_bytes_budget", "compression_share", "points"} <= set(run)
        assert [p["fraction"] for p in run["points"]] == list(bench.FRACTIONS)
        for p in run["points"]:
            assert point_keys <= set(p)
            assert p["rss_bytes"] > 0 and p["kv_bytes"] > 0 and p["kv_bytes_reserved"] >= p["kv_bytes"]
            assert p["ttft_s"] > 0 and p["ms_per_patch"] > 0
        frames = POLICY_FRAMES[run["policy"]]
        assert run["frames_read"] == run["frames_sampled"] == frames  # 10 fps video sampled at 10 fps
        assert run["patches"] == frames // 2 and run["ingest_rejected"] == 0
        assert run["points"][-1]["frame"] == frames - 1
        heap = [p["py_heap_bytes"] for p in run["points"]]
        assert heap[0] is None and all(isinstance(h, int) and h > 0 for h in heap[1:])  # traced from 10 % on
        assert run["warmup_ask_s"] > 0
    # the same decoded frames went into both runs, checked over the 20 frames they share
    assert doc["frames_digest_match"] is True
    assert doc["frames_digest"]["common_frames"] == 20 and doc["frames_digest"]["sampled_frames"] == 20


def test_bench_capped_run_stays_under_budget(bench_run):
    doc, _ = bench_run
    capped = doc["runs"][0]
    assert capped["compressions"] > 0
    assert capped["kv_bytes_budget"] == (capped["prefix_tokens"] + capped["max_vision_tokens"]) * capped["bytes_per_token"]
    one_chunk = capped["tokens_per_patch"] * capped["bytes_per_token"]
    assert one_chunk > 0
    for p in capped["points"]:
        assert p["kv_bytes"] <= capped["kv_bytes_budget"] + one_chunk
    assert max(capped["patch_rows"]["kv_bytes"]) <= capped["kv_bytes_budget"] + one_chunk
    assert 0 < capped["compression_share"] < 1
    assert capped["ops_per_decoded_token"] > 0 and capped["ops_per_compression"] > 0


def test_bench_full_cache_grows_and_ratios(bench_run):
    doc, _ = bench_run
    full = doc["runs"][1]
    kv = [p["kv_bytes"] for p in full["points"]]
    assert all(b > a for a, b in zip(kv, kv[1:]))
    assert full["kv_bytes_budget"] == 0 and full["compressions"] == 0 and full["compression_share"] == 0
    assert full["ops_per_compression"] is None
    (ratio,) = doc["ratios"]
    assert ratio["policy"] == "infinipot_v" and ratio["vs"] == "none"
    assert [p["frame"] for p in ratio["points"]] == [p["frame"] for p in full["points"]]
    capped_at = {p["frame"]: p for p in doc["runs"][0]["ref_points"]}
    last = ratio["points"][-1]
    assert last["kv"] == pytest.approx(capped_at[last["frame"]]["kv_bytes"] / kv[-1])
    assert last["kv"] < 1  # 10 pairs of 234 tokens do not fit under M = 512


def test_bench_csv_and_plot(bench_run):
    doc, files = bench_run
    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r["points"]) for r in doc["runs"]) == 8
    for run in doc["runs"]:
        mine = [r for r in rows if r["policy"] == run["policy"]]
        assert [float(r["fraction"]) for r in mine] == [p["fraction"] for p in run["points"]]
        assert [int(r["kv_bytes"]) for r in mine] == [p["kv_bytes"] for p in run["points"]]
    data = files["png"].read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 300


def test_bench_bad_arguments_exit_2(tmp_path, vtest_path):
    assert bench.main(["--video", str(tmp_path / "missing.avi"), "--quiet"]) == 2
    not_video = tmp_path / "notes.txt"
    not_video.write_text("not a video")
    assert bench.main(["--video", str(not_video), "--quiet"]) == 2
    assert bench.main(["--video", vtest_path, "--policies", "bogus", "--quiet"]) == 2
    assert bench.main(["--video", vtest_path, "--policies", "none@many", "--quiet"]) == 2
    assert bench.main(["--video", vtest_path, "--loops", "0", "--quiet"]) == 2
    assert bench.main(["--quiet"]) == 2  # argparse: --video is required


def test_bench_child_failure_exits_1(vtest_path, capsys):
    # M = 100 -> C = 75 < 234 tokens per frame pair: the engine rejects every pair, the child fails
    rc = bench.main(["--video", vtest_path, "--device", "cpu", "--frames", "4", "--fps", "10",
                     "--max-tokens", "100", "--policies", "infinipot_v", "--threads", "1", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "child failed" in err and "no frame pair was ingested" in err


# ------------------------------------------------------------------ shapes
def test_shapes_match_the_real_checkpoints():
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from infinipot_ros.models.shapes import SHAPES, shaped_config

    s3, s7 = SHAPES["qwen2.5-vl-3b"], SHAPES["qwen2.5-vl-7b"]
    assert s3.kv_bytes_per_token(2) == 36_864  # 2 x 36 layers x 2 KV heads x 128 x 2 B
    assert s7.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2
    cfg = shaped_config(s3)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
            t.num_key_value_heads) == (36, 2048, 11008, 16, 2)
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (32, 1280, 3420, 16, 2048)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31] and v.window_size == 112 and v.tokens_per_second == 2
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1e6
    assert t.vocab_size == 2048 and cfg.tie_word_embeddings is True
    assert shaped_config(s7).tie_word_embeddings is False
    # with the real vocabulary the parameter count is the published one of each checkpoint
    for shapes, published in ((s3, 3_754_622_976), (s7, 8_292_166_656)):
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(shaped_config(shapes, shapes.real_vocab_size))
        assert sum(p.numel() for p in model.parameters()) == published


def test_build_shaped_model_loads_and_streams(tmp_path, vtest_frames):
    import dataclasses

    from infinipot_ros.models import load_adapter
    from infinipot_ros.models.shapes import SHAPES, build_shaped_qwen2_5_vl

    # the 3B recipe, shrunk to one layer and one vision block so a CPU builds it in seconds
    small = dataclasses.replace(
        SHAPES["qwen2.5-vl-3b"], name="small", num_layers=1, hidden_size=256, intermediate_size=512, num_heads=2,
        num_kv_heads=1, vision_out_hidden_size=256, vision_depth=1, vision_hidden_size=64,
        vision_intermediate_size=128, vision_heads=2, fullatt_block_indexes=(0,),
    )
    a = build_shaped_qwen2_5_vl(tmp_path / "a", small, dtype="float32", device="cpu", seed=3)
    b = build_shaped_qwen2_5_vl(tmp_path / "b", small, dtype="float32", device="cpu", seed=3)
    weights = (a / "model.safetensors").read_bytes()
    assert zlib.crc32(weights) == zlib.crc32((b / "model.safetensors").read_bytes())  # seeded
    stamp = (a / "infinipot_shapes.json").stat().st_mtime_ns
    assert build_shaped_qwen2_5_vl(tmp_path / "a", small, dtype="float32", device="cpu", seed=3) == a
    assert (a / "infinipot_shapes.json").stat().st_mtime_ns == stamp  # complete build reused
    marker = json.loads((a / "infinipot_shapes.json").read_text())
    assert marker["vocab_size"] == 2048 and marker["shapes"]["num_layers"] == 1

    adapter = load_adapter(str(a), device="cpu", dtype="float32", max_pixels=64 * 28 * 28)
    assert (adapter.num_layers, adapter.num_kv_heads, adapter.head_dim) == (1, 1, 128)
    from infinipot_ros.engine import EngineConfig, StreamingAssistant

    eng = StreamingAssistant(EngineConfig(model=str(a), device="cpu", policy="none", max_new_tokens=4), adapter=adapter)
    frames, stamps = vtest_frames
    assert eng.ingest("cam", frames[0], stamps[0]).status == "buffered"
    assert eng.ingest("cam", frames[1], stamps[1]).status == "ingested"
    answer = eng.ask("What is happening?")
    assert answer.generated_tokens >= 1 or answer.stopped_by == "eos"
