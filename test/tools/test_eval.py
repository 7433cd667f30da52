"""infinipot-eval: the benchmarks' own formats, strict answer parsing, scoring, per-policy runs, torchrun.

The end-to-end runs use the shipped items files (data/eval/*_vtest.json) on
the real vtest.avi with the embedded model, whose random weights answer
nonsense: they check the mechanics (when each question is asked, that every
reply is parsed by the rule and scored by it, one run per policy, the
gathered result of two torchrun processes equals one process's), not accuracy.
Accuracy arithmetic is checked on hand-made rows.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from infinipot_ros.tools import eval as ev

REPO = pathlib.Path(__file__).resolve().parents[2]
OVO_ITEMS = REPO / "data" / "eval" / "ovo_vtest.json"
SB_ITEMS = REPO / "data" / "eval" / "streamingbench_vtest.json"
FPS = 2.0
PATCH_S = 2 / FPS
#: Result fields that are wall-clock measurements or say which process did the work.
VOLATILE = {"latency_s", "rank", "ms_per_frame", "wall_s", "devices", "world_size", "backend", "items"}


@pytest.fixture(scope="module")
def video_root(vtest_path) -> str:
    """The folder the shipped items files' "vtest.avi" / "./vtest.avi" resolve in."""
    return os.path.dirname(vtest_path)


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D) a man walking", "D"), ("The answer is A.", "A"),
    ("Answer: E", "E"), ("  c", None), ("Because", None), ("ABC", None), ("B2", None), ("2B", None),
    ("F", None), ("", None), ("It is B or C", "B"), ("I think D", "D"), ("A man walks, B", "A"),
    ("option-B", "B"), ("B's", "B"),
])
def test_parse_letter_first_standalone_a_to_e(reply, letter):
    assert ev.parse_letter(reply) == letter


@pytest.mark.parametrize("reply, number", [
    ("3", "3"), ("03 times", "3"), ("They did it 12 times, not 13", "12"), ("2.", "2"), ("x2", None),
    ("2x", None), ("3.5", None), ("three", None), ("", None), ("A0 then 7", "7"),
])
def test_parse_number_first_standalone_integer(reply, number):
    assert ev.parse_number(reply) == number


def test_prompts_and_option_letters():
    assert ev.multiple_choice_prompt(" What is it? ", ["a tripod", " a bench "]) == (
        "What is it?\nA. a tripod\nB. a bench\nAnswer with the option's letter.")
    with pytest.raises(ev.EvalError):
        ev.multiple_choice_prompt("q", ["only one"])
    with pytest.raises(ev.EvalError):
        ev.multiple_choice_prompt("q", list("abcdef"))
    for a, b in (("A. White.", "B. Red."), ("A.White.", "B.Red."), ("(A) White.", "(B) Red."), ("a) White.", "b) Red."),
                 ("A: White.", "B: Red.")):
        assert ev.strip_option_letters([a, b]) == ["White.", "Red."]
    assert ev.strip_option_letters(["A.M. radio", "FM radio"]) == ["A.M. radio", "FM radio"]  # not lettered A, B
    assert ev.strip_option_letters(["B. x", "A. y"]) == ["B. x", "A. y"]
    assert [ev.parse_timestamp(t) for t in ("00:01:10", "01:10", "70", "0:00:09.5", 12)] == [70, 70, 70, 9.5, 12]
    for bad in ("1:2:3:4", "ab:cd", "", "-5", "00::10"):
        with pytest.raises(ev.EvalError):
            ev.parse_timestamp(bad)


# ------------------------------------------------------------------ loading
def test_load_shipped_ovo_file():
    doc = json.loads(OVO_ITEMS.read_text())
    probes = ev.load_ovo(doc, "/videos")
    assert len(doc) == 9 and len(probes) == 6 + 3 * 4  # 6 backward/real-time items, 3 forward items x 4 probes
    by_key = {p.key: p for p in probes}
    ojr = by_key["0"]
    assert (ojr.task, ojr.category, ojr.at_s, ojr.truth) == ("OJR", "realtime", 10.0, "B")
    assert ojr.kind is ev.AnswerKind.LETTER
    assert ojr.path == "/videos/vtest.avi" and ojr.video == "vtest.avi"
    assert ojr.prompt.splitlines()[1:] == ["A. A bicycle", "B. A camera tripod", "C. A traffic cone",
                                           "D. A wooden bench", ev.MC_INSTRUCTION]
    assert {p.category for p in probes if p.task in ("EPM", "HLD")} == {"backward"}
    crr = [by_key[f"6@{k}"] for k in range(4)]
    assert [p.at_s for p in crr] == [52, 56, 61, 66] and [p.truth for p in crr] == ["B", "B", "A", "A"]
    assert crr[0].prompt.endswith("A. Yes\nB. No\n" + ev.MC_INSTRUCTION)
    ssr = by_key["7@2"]
    assert "the person in the red jacket walks to the tripod" in ssr.prompt and ssr.truth == "B"
    rec = [by_key[f"8@{k}"] for k in range(4)]
    assert [p.truth for p in rec] == ["0", "0", "2", "2"] and {p.kind for p in rec} == {ev.AnswerKind.NUMBER}
    assert rec[0].prompt.endswith(ev.COUNT_INSTRUCTION)
    assert [p.order for p in probes] == list(range(len(probes)))
    # gt missing: the answer text picks the option; a dict of lists (per category) reads the same
    item = dict(doc[1])
    del item["gt"]
    assert ev.load_ovo({"realtime": [item]}, "/v")[0].truth == "C"


def test_load_shipped_streamingbench_file():
    probes = ev.load_streamingbench(json.loads(SB_ITEMS.read_text()), "/videos")
    assert [p.at_s for p in probes] == [10, 25, 35, 55, 70]
    assert [p.truth for p in probes] == ["B", "A", "D", "C", "A"]
    assert {p.path for p in probes} == {"/videos/vtest.avi"} and probes[0].video == "./vtest.avi"
    assert probes[0].prompt == ("What stands on the grass next to the lamp post?\nA. A bicycle.\nB. A camera tripod.\n"
                                "C. A dog.\nD. A wooden bench.\n" + ev.MC_INSTRUCTION)
    assert "\nA. A small yellow object.\nB. A red ball.\n" in probes[4].prompt  # options given as the CSV's list string
    assert [p.key for p in probes] == ["0#0", "0#1", "0#2", "0#3", "1#0"]


@pytest.mark.parametrize("doc", [
    {"not": "a list"},
    [{"id": 1, "task": "OJR", "video": "v.mp4", "realtime": 3, "question": "q", "options": ["a", "b"]}],  # no gt
    [{"id": 1, "task": "OJR", "video": "v.mp4", "realtime": 3, "question": "q", "options": ["a", "b"], "gt": 2}],
    [{"id": 1, "task": "CRR", "video": "v.mp4", "question": "q", "test_info": [{"realtime": 3, "type": 2}]}],
    [{"id": 1, "task": "REC", "video": "v.mp4", "activity": "jump", "test_info": [{"count": 1}]}],
    [{"id": 1, "task": "SSR", "video": "v.mp4", "test_info": []}],
    [{"id": 1, "task": "OJR", "video": "v.mp4", "realtime": "later", "question": "q", "options": ["a", "b"], "gt": 0}],
    [{"id": 1, "task": "OJR", "video": "v.mp4", "realtime": 1, "question": "q", "options": ["a", "b"], "gt": 0},
     {"id": 1, "task": "ATR", "video": "v.mp4", "realtime": 2, "question": "q", "options": ["a", "b"], "gt": 0}],
])
def test_load_ovo_refuses_malformed_items(doc):
    with pytest.raises(ev.EvalError):
        ev.load_ovo(doc, "/v")


@pytest.mark.parametrize("question", [
    {"question": "q", "time_stamp": "00:00:05", "options": ["A. x", "B. y"], "answer": "C"},
    {"question": "q", "time_stamp": "soon", "options": ["A. x", "B. y"], "answer": "A"},
    {"question": "q", "time_stamp": "00:00:05", "options": "not a list", "answer": "A"},
    {"question": "q", "time_stamp": "00:00:05", "answer": "A"},
])
def test_load_streamingbench_refuses_malformed_questions(question):
    with pytest.raises(ev.EvalError):
        ev.load_streamingbench([{"video_path": "./v.mp4", "questions": [question]}], "/v")


# ------------------------------------------------------------------ scoring
def _row(policy, task, truth, parsed, order):
    return {"policy": policy, "task": task, "truth": truth, "parsed": parsed, "correct": parsed == truth,
            "order": order}


def test_score_ovo_means_of_tasks_and_streamingbench_over_questions():
    rows = [
        _row("p", "EPM", "A", "A", 0), _row("p", "EPM", "B", "C", 1),  # EPM 50
        _row("p", "OJR", "D", "D", 2),  # OJR 100
        _row("p", "CRR", "A", "A", 3), _row("p", "CRR", "A", None, 4), _row("p", "CRR", "B", "A", 5),
        _row("p", "CRR", "B", "E", 6),  # CRR 25, one unanswered
        _row("q", "EPM", "A", None, 0),
    ]
    s = ev.score(ev.BenchFormat.OVO, rows, ["p", "q"])
    p = s["p"]
    assert {t: v["accuracy"] for t, v in p["tasks"].items()} == {"EPM": 50.0, "OJR": 100.0, "CRR": 25.0}
    assert p["tasks"]["CRR"] == {"n": 4, "correct": 1, "unanswered": 1, "accuracy": 25.0}
    assert p["categories"] == {"backward": 50.0, "realtime": 100.0, "forward": 25.0}
    assert p["overall"] == pytest.approx((50 + 100 + 25) / 3, abs=1e-4)  # OVO-Bench's total: mean over tasks
    assert (p["n"], p["correct"], p["unanswered"]) == (7, 3, 1)
    assert s["q"]["overall"] == 0.0 and s["q"]["unanswered"] == 1 and s["q"]["categories"] == {"backward": 0.0}
    sb = ev.score(ev.BenchFormat.STREAMINGBENCH, rows, ["p"])["p"]
    assert sb["overall"] == pytest.approx(100 * 3 / 7, abs=1e-4) and "categories" not in sb  # over all questions
    assert ev.task_order(ev.BenchFormat.OVO, rows) == ["EPM", "OJR", "CRR"]


# ------------------------------------------------------------------- split
def _stream(name, at):
    return ev.VideoStream(name, [ev.Probe(name, name, "T", "", name, name, at, "q", ev.AnswerKind.LETTER, "A", 0)])


def test_split_streams_longest_first_onto_least_loaded():
    streams = [_stream("a", 10), _stream("b", 50), _stream("c", 30), _stream("d", 25), _stream("e", 5)]
    shares = ev.split_streams(streams, 2)
    assert [[s.path for s in share] for share in shares] == [["b", "a"], ["c", "d", "e"]]
    assert ev.split_streams(streams, 2) == shares  # deterministic
    assert [s.path for s in ev.split_streams(streams, 1)[0]] == ["b", "c", "d", "a", "e"]
    four = ev.split_streams(streams[:1], 3)
    assert [len(s) for s in four] == [1, 0, 0]
    with pytest.raises(ValueError):
        ev.split_streams(streams, 0)


def test_group_streams_one_per_video_in_time_order():
    probes = ev.load_ovo(json.loads(OVO_ITEMS.read_text()), "/v")
    (s,) = ev.group_streams(probes)
    assert s.path == "/v/vtest.avi" and len(s.probes) == len(probes) and s.cost_s == 75
    assert [p.at_s for p in s.probes] == sorted(p.at_s for p in probes)


def test_dist_context_from_env():
    assert ev.DistContext.from_env({}) == ev.DistContext(0, 1, 0)
    ctx = ev.DistContext.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed) == (1, 2, 1, True)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ev.EvalError):
            ev.DistContext.from_env(bad)


# -------------------------------------------------------------- end to end
def _common(model_dir, root, *extra):
    return ["--video-root", root, "--model", model_dir, "--device", "cpu", "--fps", str(FPS),
            "--max-tokens", "1024", "--max-new-tokens", "6", *extra]


def _check_probe_rows(doc, probes, policies):
    """Every probe asked once per policy at its time and scored by the strict rule."""
    rows = doc["probes"]
    assert [(r["policy"], r["key"]) for r in rows] == [(pol, p.key) for pol in policies for p in probes]
    by_key = {p.key: p for p in probes}
    for r in rows:
        p = by_key[r["key"]]
        assert (r["at_s"], r["truth"], r["task"]) == (p.at_s, p.truth, p.task)
        assert not r["error"]
        assert r["parsed"] == ev.parse_answer(r["answer"], p.kind)
        assert r["correct"] == (r["parsed"] is not None and r["parsed"] == p.truth)
        assert p.at_s - PATCH_S < r["newest_stamp_s"] <= p.at_s  # answered from the stream at the question's time
    assert ev.score(ev.BenchFormat(doc["format"]), rows, policies) == {
        pol: {k: v for k, v in doc["results"][pol].items() if k in ("tasks", "categories", "overall", "n", "correct",
                                                                   "unanswered")} for pol in policies}


def test_eval_ovo_per_policy_on_the_real_video(tmp_path, capsys, tiny_model_dir, video_root):
    out = tmp_path / "ovo.json"
    rc = ev.main(["--format", "ovo", "--items", str(OVO_ITEMS), *_common(tiny_model_dir, video_root),
                  "--policies", "infinipot_v,uniform", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "overall (mean of tasks)" in table and "forward (mean of tasks)" in table and "CRR (4)" in table
    doc = json.loads(out.read_text())
    probes = ev.load_ovo(json.loads(OVO_ITEMS.read_text()), video_root)
    assert doc["policies"] == ["infinipot_v", "uniform"] and doc["questions"] == 18 and doc["videos"] == 1
    _check_probe_rows(doc, probes, doc["policies"])
    for pol in doc["policies"]:
        res = doc["results"][pol]
        assert set(res["tasks"]) == {"EPM", "HLD", "STU", "OJR", "ATR", "ACR", "REC", "SSR", "CRR"}
        assert set(res["categories"]) == {"backward", "realtime", "forward"}
        assert res["frames_read"] == 751  # read up to the last question (75 s), not to the end (795)
        assert res["frames_ingested"] == 150 and res["compressions"] > 0 and res["ms_per_frame"] > 0
        assert res["kv_bytes_budget"] < res["kv_bytes_peak"]  # a chunk on top of M while prefilled, plus the Q/A


def test_eval_streamingbench_json_to_stdout(capsys, tiny_model_dir, video_root):
    rc = ev.main(["--format", "streamingbench", "--items", str(SB_ITEMS), *_common(tiny_model_dir, video_root),
                  "--policies", "none", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    probes = ev.load_streamingbench(json.loads(SB_ITEMS.read_text()), video_root)
    _check_probe_rows(doc, probes, ["none"])
    res = doc["results"]["none"]
    assert res["kv_bytes_budget"] == 0 and res["compressions"] == 0 and res["frames_read"] == 701
    assert set(res["tasks"]) == {"Object Perception", "Attribute Perception", "Action Perception",
                                 "Spatial Understanding"} and res["tasks"]["Object Perception"]["n"] == 2


def test_eval_refuses_bad_input(tmp_path, capsys, tiny_model_dir, video_root):
    args = ["--model", tiny_model_dir, "--device", "cpu"]
    assert ev.main(["--format", "ovo", "--items", str(OVO_ITEMS), "--video-root", str(tmp_path), *args]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    assert ev.main(["--format", "ovo", "--items", str(bad), "--video-root", video_root, *args]) == 2
    assert ev.main(["--format", "streamingbench", "--items", str(OVO_ITEMS), "--video-root", video_root, *args]) == 2
    assert ev.main(["--format", "ovo", "--items", str(OVO_ITEMS), "--video-root", video_root, "--policies",
                    "uniform,uniform", *args]) == 2
    assert ev.main(["--format", "ovo", "--items", str(OVO_ITEMS), "--video-root", video_root, "--policies",
                    "bogus", *args]) == 2
    assert ev.main(["--format", "mlvu", "--items", str(OVO_ITEMS), "--video-root", video_root]) == 2


# ------------------------------------------------------------------ torchrun
def _torchrun() -> list[str]:
    exe = pathlib.Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [shutil.which("torchrun") or "torchrun"]


def _stable(doc: dict) -> dict:
    """The result without timing and process placement."""
    out = {k: v for k, v in doc.items() if k not in VOLATILE}
    out["probes"] = [{k: v for k, v in r.items() if k not in VOLATILE} for r in doc["probes"]]
    out["results"] = {p: {k: v for k, v in r.items() if k not in VOLATILE} for p, r in doc["results"].items()}
    return out


def test_torchrun_two_processes_gather_the_single_process_result(tmp_path, tiny_model_dir, vtest_path):
    """A real `torchrun --nproc_per_node 2` (gloo on CPU): each rank streams one of two videos; rank 0's
    gathered result equals one process's."""
    root = tmp_path / "videos"
    root.mkdir()
    for name in ("vtest.avi", "vtest_copy.avi"):  # two videos: the same file under two names
        (root / name).symlink_to(vtest_path)
    items = []
    for it in json.loads(OVO_ITEMS.read_text()):  # the shipped items up to 30 s, alternating between the videos
        if "test_info" in it:
            it["test_info"] = [t for t in it["test_info"] if t["realtime"] <= 30]
            if not it["test_info"]:
                continue
        elif it["realtime"] > 30:
            continue
        it["video"] = ("vtest.avi", "vtest_copy.avi")[len(items) % 2]
        items.append(it)
    items_path = tmp_path / "ovo_two_videos.json"
    items_path.write_text(json.dumps(items))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    common = ["--format", "ovo", "--items", str(items_path), *_common(tiny_model_dir, str(root)),
              "--policies", "infinipot_v,recent"]
    dist_json, single_json = tmp_path / "dist.json", tmp_path / "single.json"
    run = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "infinipot_ros.tools.eval",
                          *common, "--json", str(dist_json)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("infinipot-eval:") == 1  # only rank 0 reports
    single = subprocess.run([sys.executable, "-m", "infinipot_ros.tools.eval", *common, "--json", str(single_json)],
                            env={k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    d, s = json.loads(dist_json.read_text()), json.loads(single_json.read_text())
    assert (d["world_size"], d["backend"], d["devices"]) == (2, "gloo", ["cpu", "cpu"])
    assert (s["world_size"], s["backend"]) == (1, "")
    assert {r["rank"] for r in d["probes"]} == {0, 1}  # both ranks answered their video's questions
    assert {r["video"] for r in d["probes"] if r["rank"] == 0} != {r["video"] for r in d["probes"] if r["rank"] == 1}
    assert d["questions"] == len(items) == 5 and d["videos"] == 2  # 3 questions, SSR's and REC's probe at 30 s
    assert _stable(d) == _stable(s)
