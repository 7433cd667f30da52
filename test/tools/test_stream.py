"""infinipot-stream: questions during the stream (--ask-at) on the real video and the embedded model.

The CLI runs in this process (its JSON lines captured); the session test drives
:class:`VideoSession` with the shared tiny adapter. Nothing here asserts timing
or what the (random-weight) model answers, only when and from what it answers.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from infinipot_ros.engine import EngineConfig, StreamingAssistant
from infinipot_ros.tools import stream
from infinipot_ros.tools.stream import TimedQuestion, VideoSession, parse_ask_at

FPS = 2.0
PATCH_S = 2 / FPS  # a temporal patch holds 2 sampled frames


def test_parse_ask_at():
    assert parse_ask_at("3.5:What is on the grass?") == TimedQuestion("What is on the grass?", 3.5)
    assert parse_ask_at(" 12 : Who: is there? ") == TimedQuestion("Who: is there?", 12.0)  # only the first ':' splits
    assert parse_ask_at("0:q").at_s == 0.0
    for bad in ("no colon", "x:question", "-1:question", "5:", "5:   ", "inf:q", "nan:q", ":q"):
        with pytest.raises(ValueError):
            parse_ask_at(bad)


def _run_cli(capsys, *argv) -> tuple[int, list[dict], str]:
    """Exit code, the JSON lines printed and stderr of one in-process run."""
    rc = stream.main(list(argv))
    cap = capsys.readouterr()
    return rc, [json.loads(line) for line in cap.out.splitlines() if line.startswith("{")], cap.err


def test_bad_ask_at_is_exit_2(capsys, vtest_path):
    rc, lines, err = _run_cli(capsys, "--video", vtest_path, "--ask-at", "soon:what?")
    assert rc == 2 and not lines and "--ask-at" in err


def test_ask_at_answers_mid_stream_from_the_cache_of_that_moment(capsys, vtest_path, tiny_model_dir):
    m = 512
    timed = [("3.2", "What is on the grass?"), ("12.34", "Who: is there?"), ("25", "What moved?"),
             ("0", "Too early?"), ("99", "Past the end?")]
    rc, lines, _ = _run_cli(
        capsys, "--video", vtest_path, "--model", tiny_model_dir, "--device", "cpu", "--fps", str(FPS),
        "--max-frames", "400", "--max-tokens", str(m), "--max-new-tokens", "6", "--json",
        *[a for at, q in timed for a in ("--ask-at", f"{at}:{q}")], "--ask", "And now?",
    )
    assert rc == 0
    summary = lines[-1]["summary"]
    events = lines[:-1]
    frames = [e for e in events if "frame" in e]
    answers = [e for e in events if "question" in e]
    last_stamp = 399 / 10.0  # vtest.avi: 10 fps, 400 frames read
    # asked in time order, past-the-end ones after the last frame, then --ask
    assert [a["question"] for a in answers] == ["Too early?", "What is on the grass?", "Who: is there?", "What moved?",
                                                "Past the end?", "And now?"]
    assert [a["at"] for a in answers] == [0.0, 3.2, 12.34, 25.0, 99.0, last_stamp]
    assert answers[0]["error"].startswith("NO_FRAMES") and answers[0]["answer"] == ""  # only a buffered frame yet
    assert summary["questions"] == 6 and summary["max_vision_tokens"] == m

    compressions = 0
    for i, e in enumerate(events):
        if "frame" in e:
            compressions += e["compressed"]
            assert e["vision_tokens"] <= m and e["kv_bytes"] <= summary["kv_bytes_budget"]  # the cap holds
            continue
        before = [f for f in events[:i] if "frame" in f]
        after = [f for f in events[i + 1:] if "frame" in f]
        if before:  # the cache after the answer is the cache before it: the Q/A tokens are gone
            prev = before[-1]
            assert (e["vision_tokens"], e["kv_tokens"], e["kv_bytes"]) == (
                prev["vision_tokens"], prev["kv_tokens"], prev["kv_bytes"])
        assert e["compressions"] == compressions  # answering never compressed the vision region
        if e.get("error"):
            continue
        assert e["vision_tokens"] <= m
        assert e["kv_bytes_during"] > e["kv_bytes"]  # question + answer were in the (scratch) cache meanwhile
        assert e["kv_bytes_during"] <= summary["kv_bytes_reserved"]
        assert e["generated_tokens"] > 0 and e["frames_in_context"] > 0
        if e["at"] < last_stamp:  # mid-stream: every frame stamped <= at was offered, none later
            assert before[-1]["stamp"] <= e["at"] < after[0]["stamp"]
            assert e["at"] - PATCH_S < e["newest_stamp"] <= e["at"]  # at most one patch still waiting for its pair
        else:
            assert not after and e["newest_stamp"] <= last_stamp
    assert compressions > 0 and answers[3]["compressions"] > 0  # the 25 s answer came from a compressed cache
    assert summary["kv_bytes_budget"] < summary["kv_bytes_peak"] <= summary["kv_bytes_reserved"]


def test_questions_leave_the_stream_unchanged(vtest_path, tiny_adapter):
    """Answers and the final K/V are the same whether or not other questions were asked earlier in the stream."""

    def run(asks):
        cfg = EngineConfig(device="cpu", dtype="float32", frame_rate_hz=FPS, max_vision_tokens=256, max_new_tokens=8)
        engine = StreamingAssistant(cfg, adapter=tiny_adapter)
        session = VideoSession(engine, vtest_path, [TimedQuestion(q, at) for at, q in asks], max_frames=200)
        records = list(session.events())
        return engine, {r.question: r for r in records if isinstance(r, stream.AnswerRecord)}, session

    last = (16.0, "What is the person in the red jacket doing?")
    busy_engine, busy, busy_session = run([(4.0, "What do you see?"), (8.0, "Is anyone on the grass?"),
                                           (12.0, "How many people are there?"), last])
    quiet_engine, quiet, _ = run([last])
    a, b = busy[last[1]], quiet[last[1]]
    assert not a.error and a.answer == b.answer and a.generated_tokens == b.generated_tokens
    assert (a.vision_tokens, a.kv_bytes, a.compressions) == (b.vision_tokens, b.kv_bytes, b.compressions)
    assert a.compressions > 0
    sa, sb = busy_engine.cache.state_dict(), quiet_engine.cache.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa.keys() - {"last_compression"}:  # that one holds the wall ms of the last compression
        assert torch.equal(sa[key], sb[key]), key
    assert busy_session.frames_read == 200 and busy_session.kv_bytes_peak > 0
    assert math.isclose(busy_session.last_stamp_s, 19.9)


def test_parse_note_at():
    assert stream.parse_note_at("2.5:door: locked") == stream.TimedNote("door: locked", 2.5)
    for bad in ("no colon", "x:t", "-1:t", "5:", "inf:t"):
        with pytest.raises(ValueError):
            stream.parse_note_at(bad)


def test_note_at_appends_text_events_in_time_order(capsys, vtest_path, tiny_model_dir):
    """--note-at: in time order with the questions (a note first at equal time), kept under the cap,
    counted in the summary; a question before the note's time cannot see it (window ends before it)."""
    m = 96
    rc, lines, _ = _run_cli(
        capsys, "--video", vtest_path, "--model", tiny_model_dir, "--device", "cpu", "--fps", str(FPS),
        "--max-frames", "300", "--max-tokens", str(m), "--max-pixels", str(112 * 112), "--max-new-tokens", "2",
        "--json",
        "--note-at", "10:The robot's name is Zorblax.", "--note-at", "3:first note", "--note-at", "99:after the end",
        "--ask-at", "10:What is the robot's name?", "--ask-at", "2:Anything?",
    )
    assert rc == 0
    events = lines[:-1]
    order = [e.get("note") or e.get("question") for e in events if "frame" not in e]
    assert order == ["Anything?", "first note", "The robot's name is Zorblax.", "What is the robot's name?",
                     "after the end"]
    notes = [e for e in events if "note" in e]
    assert all(n["status"] == "ingested" and n["tokens"] > 0 for n in notes)
    frames = [e for e in events if "frame" in e]
    assert all(f["vision_tokens"] <= m and f["status"] in ("buffered", "ingested") for f in frames)
    summary = lines[-1]["summary"]
    assert summary["notes_ingested"] == 3 and summary["notes_rejected"] == 0 and summary["compressions"] >= 3
    # the note at 10 s came before the question at 10 s and after every frame stamped <= 10 s (like --ask-at)
    idx = {id(e): i for i, e in enumerate(events)}
    note10 = next(n for n in notes if n["at"] == 10)
    before = [f for f in frames if idx[id(f)] < idx[id(note10)]]
    assert max(f["stamp"] for f in before) <= 10 < min(f["stamp"] for f in frames if idx[id(f)] > idx[id(note10)])
