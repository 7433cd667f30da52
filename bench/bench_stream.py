#!/usr/bin/env python3
"""Capped (InfiniPot-V) vs uncapped KV on one video, side by side, from `infinipot-stream --json`.

Each configuration runs in its own process (so RSS is its own), on the same
video, model, device and sampling rate. Printed: KV bytes, process RSS and
ms per sampled frame at 25 %, 50 % and 100 % of the stream, answer latency,
and the ratios capped / uncapped.

    python bench/bench_stream.py --video .cache/data/vtest.avi [--max-tokens 2048] [--fps 2]
        [--policies infinipot_v none] [--device cpu] [--json-out results.json]

ms per frame at X % is the mean over the sampled frames in the 10 % of the
stream ending at X % (the first frame of a Qwen temporal patch only buffers,
the second pays for encoding + prefill + any compression).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

POINTS = (0.25, 0.5, 1.0)
QUESTION = "What is happening in the video?"


def run_stream(args: argparse.Namespace, policy: str) -> dict:
    cmd = [
        sys.executable, "-m", "infinipot_ros.tools.stream", "--video", args.video, "--fps", str(args.fps),
        "--json", "--device", args.device, "--ask", QUESTION, "--ask", "How many people can you see?",
        "--max-new-tokens", str(args.max_new_tokens),
    ]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_pixels:
        cmd += ["--max-pixels", str(args.max_pixels)]
    if policy == "none":
        cmd += ["--no-compress"]
    else:
        cmd += ["--policy", policy, "--max-tokens", str(args.max_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    frames, answers, summary = [], [], None
    for line in out.splitlines():
        obj = json.loads(line)
        if "summary" in obj:
            summary = obj["summary"]
        elif "question" in obj:
            answers.append(obj)
        else:
            frames.append(obj)
    return {"policy": policy, "frames": frames, "answers": answers, "summary": summary, "cmd": " ".join(cmd)}


def at(frames: list, frac: float) -> dict:
    n = len(frames)
    end = max(1, int(round(frac * n)))
    window = frames[max(0, end - max(1, n // 10)) : end]
    rec = frames[end - 1]
    return {
        "frame": rec["frame"],
        "kv_bytes": rec["kv_bytes"],
        "kv_tokens": rec["kv_tokens"],
        "rss_bytes": rec["rss_bytes"],
        "ms_per_frame": sum(r["ms"] for r in window) / len(window),
    }


def summarize(run: dict) -> dict:
    frames = run["frames"]
    pts = {f"{int(p * 100)}%": at(frames, p) for p in POINTS}
    s = run["summary"]
    first_comp = next((i for i, r in enumerate(frames) if r["compressed"]), None)
    after = frames[first_comp:] if first_comp is not None else []
    return {
        "policy": run["policy"],
        "points": pts,
        "answer_latency_s": [a["latency_s"] for a in run["answers"]],
        "kv_bytes_budget": s["kv_bytes_budget"],
        "kv_bytes_peak": s["kv_bytes_peak"],
        "max_kv_after_first_compression": max((r["kv_bytes"] for r in after), default=None),
        "compressions": s["compressions"],
        "frames_sampled": s["frames_sampled"],
        "ms_per_patch_mean": s["ms_per_patch_mean"],
        "rss_growth_50_to_100_pct": 100.0 * (pts["100%"]["rss_bytes"] / pts["50%"]["rss_bytes"] - 1.0),
        "kv_growth_50_to_100_pct": 100.0 * (pts["100%"]["kv_bytes"] / pts["50%"]["kv_bytes"] - 1.0),
        "last_compression_ms": s["last_compression_ms"],
        "cmd": run["cmd"],
    }


def print_table(results: list) -> None:
    print(f"\n{'policy':<12} {'at':>5} {'frame':>6} {'kv_tokens':>10} {'kv_MB':>9} {'rss_MB':>9} {'ms/frame':>9}")
    for r in results:
        for name, p in r["points"].items():
            print(f"{r['policy']:<12} {name:>5} {p['frame']:>6} {p['kv_tokens']:>10} {p['kv_bytes'] / 1e6:>9.3f} "
                  f"{p['rss_bytes'] / 1e6:>9.1f} {p['ms_per_frame']:>9.1f}")
    print(f"\n{'policy':<12} {'budget_MB':>10} {'peak_kv_MB':>11} {'max_kv_after_1st_comp_MB':>25} {'compr':>6} "
          f"{'rss +% 50->100':>15} {'kv +% 50->100':>14} {'answer_s':>16}")
    for r in results:
        mk = r["max_kv_after_first_compression"]
        lat = "/".join(f"{x:.2f}" for x in r["answer_latency_s"])
        print(f"{r['policy']:<12} {r['kv_bytes_budget'] / 1e6:>10.3f} {r['kv_bytes_peak'] / 1e6:>11.3f} "
              f"{(mk / 1e6 if mk else float('nan')):>25.3f} {r['compressions']:>6} "
              f"{r['rss_growth_50_to_100_pct']:>15.2f} {r['kv_growth_50_to_100_pct']:>14.2f} {lat:>16}")
    if len(results) == 2:
        a, b = results
        print(f"\nratios {a['policy']} / {b['policy']}:")
        for name in a["points"]:
            pa, pb = a["points"][name], b["points"][name]
            print(f"  at {name:>4}: kv {pa['kv_bytes'] / pb['kv_bytes']:.3f}  rss {pa['rss_bytes'] / pb['rss_bytes']:.3f}  "
                  f"ms/frame {pa['ms_per_frame'] / pb['ms_per_frame']:.3f}")
        la = sum(a["answer_latency_s"]) / len(a["answer_latency_s"])
        lb = sum(b["answer_latency_s"]) / len(b["answer_latency_s"])
        print(f"  answer latency: {la / lb:.3f}")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default=os.environ.get("INFINIPOT_VIDEO", ".cache/data/vtest.avi"))
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--policies", nargs="+", default=["infinipot_v", "none"])
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    results = []
    for pol in args.policies:
        print(f"running {pol} ...", file=sys.stderr, flush=True)
        results.append(summarize(run_stream(args, pol)))
    print_table(results)
    for r in results:
        print(f"# {r['policy']}: {r['cmd']}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
