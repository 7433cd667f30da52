"""infinipot-stream: stream a video file through the engine without ROS, then ask questions.

Frames are read with OpenCV, stamped index / video fps, sampled at --fps by
stamp (like the node), paired into temporal patches and prefilled onto the
capped KV cache. Questions are asked after the last frame. With --json the
tool prints one JSON object per line:

* per sampled frame: {"frame", "stamp", "status", "kv_tokens", "kv_bytes", "rss_bytes", "ms", "compressed"}
* per answer: {"question", "answer", "latency_s", "kv_tokens", "generated_tokens"}
* one summary object: {"summary": {...}}

Exit codes: 0 ok, 2 bad arguments or unreadable video, 1 engine failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from ..models.static_decode import DECODE_MODES
from .video import iter_video

log = logging.getLogger("infinipot-stream")


def _default(name: str):
    """EngineConfig's default for ``name``: the one place defaults live."""
    from ..engine import EngineConfig

    return EngineConfig.__dataclass_fields__[name].default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinipot-stream",
        description="Stream a video into a multimodal LLM under a hard KV-cache cap (InfiniPot-V), then ask.",
    )
    p.add_argument("--video", required=True, help="video file (anything OpenCV reads)")
    p.add_argument("--model", default=None, help="builtin:tiny-qwen2.5-vl (default), a local dir or an HF id")
    p.add_argument("--device", default=_default("device"), help="auto, cpu, cuda, cuda:N (default %(default)s)")
    p.add_argument("--dtype", default=_default("dtype"), help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16 (default %(default)s)")
    p.add_argument("--fps", type=float, default=_default("frame_rate_hz"),
                   help="frames per second sampled by stamp (default %(default)s)")
    p.add_argument("--max-frames", type=int, default=0, help="read at most this many video frames (0 = all)")
    p.add_argument("--max-pixels", type=int, default=None, help=f"cap on pixels per frame (default {_default('max_pixels')})")
    p.add_argument("--max-tokens", type=int, default=None, help=f"M: max vision tokens per layer and head (default {_default('max_vision_tokens')})")
    p.add_argument("--budget-mb", type=float, default=None, help="cap on the resident KV cache in MB instead of --max-tokens")
    p.add_argument("--target-ratio", type=float, default=None, help=f"C/M after a compression (default {_default('target_ratio')})")
    p.add_argument("--policy", default=None,
                   help="infinipot_v (default), tar, van, van_pool, uniform, recent, or none")
    p.add_argument("--no-compress", action="store_true", help="full KV cache, no cap (same as --policy none)")
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="question asked after the last frame (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"answer length cap (default {_default('max_new_tokens')})")
    p.add_argument("--decode-mode", default=None, choices=DECODE_MODES,
                   help="answer decoding: auto (static step; CUDA graph on CUDA), eager, compile, dynamic")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _config_from_args(args: argparse.Namespace):
    from ..engine import EngineConfig

    kw: dict = {"device": args.device, "dtype": args.dtype, "frame_rate_hz": args.fps}
    if args.model:
        kw["model"] = args.model
    if args.max_pixels is not None:
        kw["max_pixels"] = args.max_pixels
    if args.max_tokens is not None:
        kw["max_vision_tokens"] = args.max_tokens
    if args.budget_mb is not None:
        kw["budget_mb"] = args.budget_mb
    if args.target_ratio is not None:
        kw["target_ratio"] = args.target_ratio
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.decode_mode is not None:
        kw["decode_mode"] = args.decode_mode
    if args.no_compress:
        if args.policy not in (None, "none"):
            raise ValueError("--no-compress contradicts --policy " + args.policy)
        kw["policy"] = "none"
    elif args.policy:
        kw["policy"] = args.policy
    return EngineConfig(**kw)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(args.video):
        print(f"infinipot-stream: no such video file: {args.video}", file=sys.stderr)
        return 2
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"infinipot-stream: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from ..engine import AskError, StreamingAssistant

    t_start = time.perf_counter()
    try:
        engine = StreamingAssistant(config)
    except (ValueError, OSError) as exc:
        print(f"infinipot-stream: cannot load model: {exc}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t_start
    camera = "video"
    records = []
    read = 0
    peak_kv = 0
    peak_rss = 0
    try:
        frames = iter_video(args.video, args.max_frames)
        bar = tqdm(frames, unit="frame", disable=args.quiet or args.json or not sys.stderr.isatty())
        for index, stamp_ns, frame in bar:
            read += 1
            result = engine.offer(camera, frame, stamp_ns)
            if result is None:  # not sampled
                continue
            st = engine.stats()
            rec = {
                "frame": index,
                "stamp": stamp_ns / 1e9,
                "status": result.status.value,
                "kv_tokens": st.cache.tokens,
                "kv_bytes": st.cache.kv_bytes,
                "rss_bytes": st.rss_bytes,
                "ms": round(result.ms, 3),
                "compressed": result.compression is not None,
            }
            if result.error:
                rec["error"] = result.error
            peak_kv = max(peak_kv, st.cache.kv_bytes)
            peak_rss = max(peak_rss, st.rss_bytes)
            records.append(rec)
            if args.json:
                _emit(rec)
            else:
                bar.set_postfix(kv_MB=f"{st.cache.kv_bytes / 1e6:.1f}", comp=st.cache.compressions)
    except OSError as exc:
        print(f"infinipot-stream: {exc}", file=sys.stderr)
        return 2

    answers = []
    for question in args.ask:
        try:
            res = engine.ask(question)
            ans = {
                "question": question,
                "answer": res.answer,
                "latency_s": round(res.latency_s, 4),
                "kv_tokens": engine.stats().cache.tokens,
                "generated_tokens": res.generated_tokens,
            }
        except AskError as exc:
            ans = {"question": question, "answer": "", "error": str(exc), "latency_s": 0.0,
                   "kv_tokens": engine.stats().cache.tokens, "generated_tokens": 0}
        answers.append(ans)
        if args.json:
            _emit(ans)

    st = engine.stats()
    ingested = [r for r in records if r["status"] == "ingested"]
    summary = {
        "model": st.model_id,
        "device": st.device,
        "policy": st.policy,
        "video": args.video,
        "frames_read": read,
        "frames_sampled": st.frames.sampled,
        "frames_ingested": st.frames.ingested,
        "frames_rejected": st.frames.rejected,
        "patches": len(ingested),
        "bytes_per_token": st.cache.bytes_per_token,
        "prefix_tokens": st.cache.prefix_tokens,
        "max_vision_tokens": st.cache.max_vision_tokens,
        "target_vision_tokens": st.cache.target_vision_tokens,
        "kv_bytes_budget": st.cache.kv_bytes_budget,
        "kv_bytes_final": st.cache.kv_bytes,
        "kv_bytes_peak": peak_kv,
        "kv_bytes_reserved": st.cache.kv_bytes_reserved,
        "compressions": st.cache.compressions,
        "tokens_evicted": st.cache.tokens_evicted,
        "last_compression_ms": round(st.cache.last_compression_ms, 3),
        "ms_per_patch_mean": round(sum(r["ms"] for r in ingested) / max(1, len(ingested)), 3),
        "rss_bytes_final": st.rss_bytes,
        "rss_bytes_peak": peak_rss,
        "load_s": round(load_s, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    if args.json:
        _emit({"summary": summary})
    else:
        _print_table(records, answers, summary)
    return 0


def _print_table(records: list, answers: list, summary: dict) -> None:
    n = len(records)
    print(f"{'at':>5} {'frame':>6} {'kv_tokens':>10} {'kv_MB':>8} {'rss_MB':>8} {'ms':>8}")
    for frac in (0.25, 0.5, 1.0):
        if not n:
            break
        r = records[max(0, int(round(frac * n)) - 1)]
        print(f"{int(frac * 100):>4}% {r['frame']:>6} {r['kv_tokens']:>10} {r['kv_bytes'] / 1e6:>8.2f} "
              f"{r['rss_bytes'] / 1e6:>8.1f} {r['ms']:>8.1f}")
    for a in answers:
        print(f"Q: {a['question']}\nA: {a.get('answer') or a.get('error')}  ({a['latency_s']:.2f} s)")
    for k, v in summary.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
