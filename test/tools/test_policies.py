"""infinipot-policies on vtest.avi with the embedded model: overlaps, cap and what happens to a note per policy."""
from __future__ import annotations

import json

from infinipot_ros.tools import policies


def test_policies_side_by_side(capsys, vtest_path, tiny_model_dir):
    m = 96
    rc = policies.main([
        "--video", vtest_path, "--model", tiny_model_dir, "--device", "cpu", "--max-frames", "600",
        "--max-tokens", str(m), "--max-pixels", str(112 * 112), "--policies", "infinipot_v,tar,van,recent",
        "--note-at", "1:The robot's name is Zorblax.", "--ask", "What is the robot's name?", "--expect", "Zorblax",
        "--max-new-tokens", "2", "--json",
    ])
    assert rc == 0
    rows = {r["policy"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(rows) == ["infinipot_v", "tar", "van", "recent"]
    ref = rows["infinipot_v"]
    assert ref["overlap"] == 1.0 and ref["compressions"] >= 10
    for name, r in rows.items():
        assert r["vision_tokens"] <= m and r["compressions"] == ref["compressions"]
        assert r["kv_bytes_peak"] == ref["kv_bytes_peak"]  # same cap, same chunks
        assert len(r["answers"]) == 1 and set(r["answers"][0]) == {"question", "answer", "recalled"}
        if name != "infinipot_v":
            assert 0.0 < r["overlap"] < 1.0, name
    # the note (1 s into a 40 s stream): the sliding window forgets it, TaR (never redundant) keeps it
    assert rows["recent"]["note_tokens"] == 0
    assert rows["tar"]["note_tokens"] > 0 and rows["infinipot_v"]["note_tokens"] > 0


def test_overlap_is_jaccard():
    a = [[[{1, 2, 3}, {4}]]]
    b = [[[{2, 3, 5}, {4}]]]
    assert policies.overlap(a, b) == (2 / 4 + 1.0) / 2
    assert policies.overlap(a, a) == 1.0


def test_bad_policy_is_exit_2(capsys, vtest_path):
    assert policies.main(["--video", vtest_path, "--policies", "infinipot_v,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
