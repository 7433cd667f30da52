"""infinipot-bench: capped (InfiniPot-V, baselines) vs full KV cache on one video, side by side.

What is measured, per policy (--policies), while a video streams through the
engine (frames sampled at --fps by stamp, paired into temporal patches):

* per frame pair (patch): wall ms of the ingest (encode + prefill + compression,
  split), KV bytes in use and reserved after it;
* at 10, 25, 50 and 100 % of the policy's stream ("points"): KV bytes, process
  RSS (psutil), Python heap (tracemalloc, started at the 10 % point, so 25/50/100 %
  show any per-frame growth of Python objects), torch CUDA allocated / peak bytes
  (0 on CPU), then one question (--question) for time to first token (TTFT, s) and
  decode speed (tokens/s after the first). The ms columns of a point are means over
  the frame pairs of the 10 % of the stream that ends there.
* per run: compression_share = total compression ms / total ingest ms (all frames,
  whole stream), as a FRACTION 0..1 in --json-out / --csv-out (printed as %);
  RSS growth from 50 to 100 %; reserved / budget bytes; with --count-ops,
  top-level aten ops per decoded token and per compression (torch.profiler).
* ratios capped / full for every policy vs "none", at the frames of none's points.

How: every policy runs in its own child process (so RSS and CUDA figures are its
own), on the same decoded frames: each child reads the video with the one
OpenCV reader (infinipot_ros.tools.video) and reports a CRC-32 chained over the
bytes of every sampled frame; the parent checks that the digests agree over the
frames all runs share and fails if not. A warm-up question right after the first
frame pair (its time: warmup_ask_s) keeps one-time costs out of the 10 % point.
The child keeps per-patch rows in numpy arrays preallocated from the frame count,
so the bench itself adds nothing to the Python heap per frame; the JSON lists the
source lines whose live Python allocations grew most from 25 to 100 %.
tracemalloc slows Python allocations, which shows in the ms figures from the
10 % point on; --no-py-heap turns it off. On a shared CPU --threads 1 avoids
thread oversubscription (factors of 10-40 in ms per frame pair).

--policies takes names (infinipot_v, tar, van, van_pool, uniform, recent, none),
each optionally with a frame cap: "infinipot_v,none@600" streams all frames with
InfiniPot-V and only the first 600 with the full cache.
--shapes tiny runs the embedded model (builtin:tiny-qwen2.5-vl, fp32);
qwen2.5-vl-3b / qwen2.5-vl-7b build a random-weight model with the real
checkpoint's shapes once (infinipot_ros.models.shapes; tiny vocabulary) and
every child loads it (GPU: --device cuda, bf16).

--json-out FILE: {"runs": [{"policy", "kv_bytes_budget", "compression_share",
"compressions", "frames_read", "frames_skipped" (undecodable video frames),
"frames_missing" (announced by the video header, never read), "tokens_per_patch",
"bytes_per_token", "warmup_ask_s",
"points": [{"fraction", "frame", "stamp_s", "kv_bytes", "kv_bytes_reserved",
"rss_bytes", "py_heap_bytes", "cuda_allocated_bytes", "cuda_peak_bytes",
"ms_per_patch", "encode_ms", "prefill_ms", "compression_ms", "ttft_s",
"decode_tok_s", ...}], "patch_rows": {column: [one value per frame pair]}, ...}],
"ratios": [...], "frames_digest_match": true, "frames_digest": {...}, "settings": {...}}.
--csv-out FILE: one row per point per policy (the point keys, plus policy and
compression_share).

Units: bytes in JSON/CSV (MB = 1e6 B in tables), ms per frame pair, seconds,
tokens per second; stamps in seconds of video time (frame index / video fps,
continuing across --loops).

Exit codes: 0 ok, 2 bad arguments or unreadable video, 1 a child failed (its
output tail is printed) or the frame digests differ.

Example:
  infinipot-bench --video .cache/data/vtest.avi --fps 2 --max-tokens 2048 \\
      --policies infinipot_v,none --json-out bench.json --plot bench.png
"""
from __future__ import annotations

import argparse
import codecs
import collections
import csv
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..models.static_decode import DECODE_MODES
from .video import VideoReader, iter_video, probe_video

PROG = "infinipot-bench"
FRACTIONS = (0.10, 0.25, 0.50, 1.00)
WINDOW_FRACTION = 0.10  # ms figures of a point: mean over this share of the stream ending there
DEFAULT_QUESTION = "What is happening in the video?"
TINY_MODEL = "builtin:tiny-qwen2.5-vl"
SHAPE_NAMES = ("tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b")
CAMERA = "video"
OPS_TOKENS = (1, 9)  # answer lengths profiled for --count-ops
OPS_DROP_TOKENS = 300  # --count-ops compresses to this many tokens below the current vision length
ROW_FIELDS = ("frame", "stamp_s", "ms", "encode_ms", "prefill_ms", "compression_ms", "kv_bytes",
              "kv_bytes_reserved", "vision_tokens")
CSV_FIELDS = ("policy", "fraction", "frame", "stamp_s", "kv_bytes", "kv_bytes_reserved", "rss_bytes",
              "py_heap_bytes", "cuda_allocated_bytes", "cuda_peak_bytes", "ms_per_patch", "encode_ms",
              "prefill_ms", "compression_ms", "patches_in_window", "ttft_s", "decode_tok_s", "generated_tokens",
              "compression_share")


class BenchError(Exception):
    """A failure the parent reports with exit code ``code`` (2 = bad input, 1 = run failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="video file (anything OpenCV reads)")
    p.add_argument("--loops", type=int, default=1, help="play the video this many times, stamps continuing (default 1)")
    p.add_argument("--frames", type=int, default=0, help="at most this many video frames in all, loops included (0 = all)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second sampled by stamp (default 2; <= 0 = every frame)")
    p.add_argument("--max-tokens", type=int, default=2048, help="M: vision tokens per layer and KV head at the cap (default 2048)")
    p.add_argument("--policies", default="infinipot_v,none",
                   help="comma-separated policies, each optionally NAME@FRAMES (default infinipot_v,none)")
    p.add_argument("--shapes", choices=SHAPE_NAMES, default="tiny",
                   help="tiny = embedded model; qwen2.5-vl-3b/7b = random weights, real shapes (default tiny)")
    p.add_argument("--model", default=None, help="bench this model instead (local dir or HF id of real weights)")
    p.add_argument("--model-dir", default=None,
                   help="build the --shapes model here and keep it (reused when complete); default: a temp dir")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--dtype", default=None,
                   help="model dtype: float32, bfloat16, float16, auto (default: float32 for tiny, else auto = bf16 on CUDA)")
    p.add_argument("--max-pixels", type=int, default=None, help="cap on pixels per frame (default: the engine's, 200704)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length of the questions at the points (default 32)")
    p.add_argument("--decode-mode", default=None, choices=DECODE_MODES,
                   help="answer decoding of the engine (default: its own, auto = static step, CUDA graph on CUDA)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help=f"question asked at every point (default {DEFAULT_QUESTION!r})")
    p.add_argument("--count-ops", action="store_true",
                   help="after the stream: top-level aten ops per decoded token and per compression (torch.profiler)")
    p.add_argument("--no-py-heap", action="store_true",
                   help="do not trace the Python heap (tracemalloc slows Python allocations from the 10 %% point on)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in each child (default 0 = torch's default); 1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the --shapes model (default 0)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="write all results as JSON")
    p.add_argument("--csv-out", default=None, metavar="FILE", help="write one row per point per policy")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="KV bytes and ms per frame pair over stream time (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no child output unless a child fails")
    # hidden: the child process
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ref-frames", default="", help=argparse.SUPPRESS)
    p.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_policies(text: str) -> list[tuple[str, int]]:
    """``"infinipot_v,none@600"`` -> ``[("infinipot_v", 0), ("none", 600)]`` (0 = no frame cap).

    Raises:
        ValueError: empty list, unknown name, duplicate, or a cap that is not a positive integer.
    """
    from ..kv import POLICIES

    out: list[tuple[str, int]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, cap = item.partition("@")
        name = name.strip()
        if name != "none" and name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose none or one of {sorted(POLICIES)}")
        if any(name == n for n, _ in out):
            raise ValueError(f"policy {name!r} listed twice")
        frames = 0
        if cap:
            try:
                frames = int(cap)
            except ValueError:
                raise ValueError(f"frame cap of {item!r} is not an integer") from None
            if frames < 1:
                raise ValueError(f"frame cap of {item!r} must be >= 1")
        out.append((name, frames))
    if not out:
        raise ValueError("--policies is empty")
    return out


def point_frame(fraction: float, frames: int) -> int:
    """Index of the last frame of the first ``fraction`` of a ``frames``-frame stream."""
    return max(0, int(math.ceil(fraction * frames - 1e-9)) - 1)


def window_frames(frames: int) -> int:
    """Frames in the window of a point's ms means (10 % of the stream, at least 1)."""
    return max(1, int(math.ceil(WINDOW_FRACTION * frames - 1e-9)))


def window_mean(rows: dict, column: str, end_frame: int, width: int) -> tuple[Optional[float], int]:
    """Mean of ``rows[column]`` over the patches whose frame is in (end_frame - width, end_frame]; (None, 0) if none."""
    frame = np.asarray(rows["frame"])
    sel = (frame > end_frame - width) & (frame <= end_frame)
    n = int(sel.sum())
    if not n:
        return None, 0
    return float(np.asarray(rows[column], dtype=np.float64)[sel].mean()), n


# ------------------------------------------------------------------- child
class _Columns:
    """Per-patch rows in preallocated numpy arrays (grown by doubling only if the estimate was short)."""

    def __init__(self, names: Sequence[str], capacity: int, dtypes: Optional[dict] = None) -> None:
        dtypes = dtypes or {}
        self.n = 0
        self._cols = {k: np.zeros(max(1, capacity), dtype=dtypes.get(k, np.float64)) for k in names}

    def append(self, **values: float) -> None:
        if self.n == len(next(iter(self._cols.values()))):
            for k, a in self._cols.items():
                self._cols[k] = np.concatenate([a, np.zeros_like(a)])
        for k, v in values.items():
            self._cols[k][self.n] = v
        self.n += 1

    def view(self) -> dict:
        return {k: a[: self.n] for k, a in self._cols.items()}

    def lists(self) -> dict:
        return {k: a[: self.n].tolist() for k, a in self._cols.items()}


def count_top_level_aten_ops(fn) -> int:
    """Run ``fn`` under torch.profiler (CPU) and count aten::* events with no aten::* ancestor."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        n += parent is None
    return n


def _worker(args: argparse.Namespace) -> int:
    """Child process: stream one policy, write the result JSON to ``args.worker``."""
    import tracemalloc

    import torch
    from tqdm import tqdm

    from ..engine import AskError, EngineConfig, GateDecision, IngestStatus, StreamingAssistant

    (policy, frames), = parse_policies(args.policies)
    if frames < 1:
        raise BenchError("the worker needs an explicit frame count (NAME@FRAMES)", 2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    kw: dict[str, Any] = dict(model=args.model_path, device=args.device, dtype=args.dtype or "auto", policy=policy,
                              max_vision_tokens=args.max_tokens, frame_rate_hz=args.fps,
                              # the engine refuses answers longer than its max_new_tokens (the KV reserve is sized for it)
                              max_new_tokens=max(args.max_new_tokens, OPS_TOKENS[-1] if args.count_ops else 1))
    if args.decode_mode:
        kw["decode_mode"] = args.decode_mode
    if args.max_pixels is not None:
        kw["max_pixels"] = args.max_pixels
    eng = StreamingAssistant(EngineConfig(**kw))
    load_s = time.perf_counter() - t_start
    dev = eng.adapter.device
    cuda = dev.type == "cuda"

    def cuda_mem() -> tuple[int, int]:
        if not cuda:
            return 0, 0
        return int(torch.cuda.memory_allocated(dev)), int(torch.cuda.max_memory_allocated(dev))

    def ask(n_new: int):
        try:
            return eng.ask(args.question, max_new_tokens=n_new)
        except AskError as exc:
            print(f"{PROG}: {policy}: ask failed: {exc}", file=sys.stderr)
            return None

    fpp = max(1, int(getattr(eng.adapter, "frames_per_patch", 2)))
    rows = _Columns(ROW_FIELDS, frames // fpp + 2)
    digest = _Columns(("frame", "crc"), frames + 1, {"frame": np.int64, "crc": np.uint32})
    own: dict[int, list[float]] = {}  # frame -> fractions measured there (several in a very short stream)
    for f in FRACTIONS:
        own.setdefault(point_frame(f, frames), []).append(f)
    refs = {int(x) for x in args.ref_frames.split(",") if x.strip()} if args.ref_frames else set()
    refs = {r for r in refs if r < frames}
    width = window_frames(frames)
    points: list[dict] = []
    ref_points: list[dict] = []
    trace = not args.no_py_heap
    tracing = False
    crc = 0
    read = sampled = rejected = 0
    ingest_ms = compression_ms = 0.0
    warmup_ask_s: Optional[float] = None
    first_error = ""
    tokens_per_patch = 0
    heap_growth: Optional[list] = None
    snapshot_file = args.worker + ".heap"
    # the heap-growth diagnostic leaves out the bench itself and tracemalloc's own objects
    heap_filters = [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)]
    last = (-1, 0)  # (frame index, stamp ns) of the last frame read

    def heap_diagnostic(fractions: Sequence[float]) -> None:
        """Snapshot at 25 % (to a file: a live snapshot would count in the heap), top growth sites at 100 %."""
        nonlocal heap_growth
        if FRACTIONS[1] in fractions:
            tracemalloc.take_snapshot().filter_traces(heap_filters).dump(snapshot_file)
        if FRACTIONS[-1] in fractions and os.path.isfile(snapshot_file):
            now = tracemalloc.take_snapshot().filter_traces(heap_filters)
            diff = now.compare_to(tracemalloc.Snapshot.load(snapshot_file), "lineno")
            os.remove(snapshot_file)
            heap_growth = [
                {"where": _short_path(d.traceback[0].filename) + f":{d.traceback[0].lineno}",
                 "size_diff_bytes": int(d.size_diff), "count_diff": int(d.count_diff)}
                for d in sorted(diff, key=lambda d: -d.size_diff)[:8] if d.size_diff > 0
            ]

    def take_point(fractions: Sequence[float], frame: int, stamp_ns: int) -> dict:
        if tracing:
            gc.collect()
        st = eng.cache.stats()
        heap = int(tracemalloc.get_traced_memory()[0]) if tracing else None
        if tracing:
            heap_diagnostic(fractions)  # the same state as ``heap``: before the question
        alloc, peak = cuda_mem()
        view = rows.view()
        ms, n_win = window_mean(view, "ms", frame, width)
        pt = {
            "fraction": fractions[-1] if fractions else None, "frame": frame, "stamp_s": stamp_ns / 1e9, "kv_bytes": int(st.kv_bytes),
            "kv_bytes_reserved": int(st.kv_bytes_reserved), "vision_tokens": int(st.vision_tokens),
            "compressions": int(st.compressions), "chunks_in_cache": int(st.chunks_in_cache),
            "rss_bytes": int(eng.stats().rss_bytes),
            "py_heap_bytes": heap, "cuda_allocated_bytes": alloc, "cuda_peak_bytes": peak,
            "ms_per_patch": ms, "encode_ms": window_mean(view, "encode_ms", frame, width)[0],
            "prefill_ms": window_mean(view, "prefill_ms", frame, width)[0],
            "compression_ms": window_mean(view, "compression_ms", frame, width)[0], "patches_in_window": n_win,
        }
        res = ask(args.max_new_tokens)
        pt.update(ttft_s=res.ttft_s if res else None, decode_tok_s=res.decode_tok_s if res else None,
                  generated_tokens=res.generated_tokens if res else 0, ask_latency_s=res.latency_s if res else None)
        return pt

    def checkpoint(frame: int, stamp_ns: int, at_end: bool = False) -> None:
        nonlocal tracing
        fractions = own.pop(frame, [])
        is_ref = frame in refs
        refs.discard(frame)
        if at_end:  # stream shorter than expected: the remaining points all fall on its last frame
            fractions = sorted(f for fs in own.values() for f in fs)
            own.clear()
            if fractions:
                print(f"{PROG}: {policy}: stream ended at frame {frame}, before the frame count said; points "
                      f"{', '.join(f'{f:.0%}' for f in fractions)} taken there", file=sys.stderr)
        if not fractions and not is_ref:
            return
        pt = take_point(fractions, frame, stamp_ns)
        points.extend(dict(pt, fraction=f) for f in fractions)
        if is_ref:
            ref_points.append(pt)
        if trace and FRACTIONS[0] in fractions and not tracing:
            tracemalloc.start()
            tracing = True

    bar = tqdm(total=frames, unit="frame", desc=policy, disable=not args.progress, file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
    try:
        reader = VideoReader(args.video, max_frames=frames, loops=args.loops)
        for index, stamp_ns, frame in reader:
            read += 1
            last = (index, stamp_ns)
            if eng.admit(CAMERA, stamp_ns) in (GateDecision.ACCEPT, GateDecision.RESTART):
                sampled += 1
                crc = zlib.crc32(frame, crc)
                digest.append(frame=index, crc=crc)
                res = eng.ingest(CAMERA, frame, stamp_ns)
                ingest_ms += res.ms
                if res.status is IngestStatus.INGESTED:
                    compression_ms += res.compression_ms
                    st = eng.cache.stats()
                    rows.append(frame=index, stamp_s=stamp_ns / 1e9, ms=res.ms, encode_ms=res.encode_ms,
                                prefill_ms=res.prefill_ms, compression_ms=res.compression_ms, kv_bytes=st.kv_bytes,
                                kv_bytes_reserved=st.kv_bytes_reserved, vision_tokens=st.vision_tokens)
                    tokens_per_patch = tokens_per_patch or int(res.chunk_tokens)
                    if warmup_ask_s is None:
                        t0 = time.perf_counter()
                        ask(args.max_new_tokens)
                        warmup_ask_s = time.perf_counter() - t0
                    bar.set_postfix(kv_MB=f"{st.kv_bytes / 1e6:.1f}", compr=st.compressions, refresh=False)
                elif res.status is IngestStatus.REJECTED:
                    rejected += 1
                    first_error = first_error or f"frame {index}: {res.error}"
                    if rejected <= 3:
                        print(f"{PROG}: {policy}: frame {index} rejected: {res.error}", file=sys.stderr)
            checkpoint(index, stamp_ns)
            bar.update(1)
    finally:
        bar.close()
    if own:
        checkpoint(last[0], last[1], at_end=True)
    if tracing:
        tracemalloc.stop()
    if rejected:
        print(f"{PROG}: {policy}: {rejected} ingest calls rejected ({sampled} frames sampled)", file=sys.stderr)
    if not rows.n:
        raise BenchError(f"{policy}: no frame pair was ingested (first error: {first_error or 'none'})", 1)
    st = eng.cache.stats()
    result: dict[str, Any] = {
        "policy": policy, "model": eng.adapter.model_id, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(eng.adapter.dtype).replace("torch.", ""), "torch": torch.__version__,
        "frames": frames, "frames_read": read, "frames_sampled": sampled, "ingest_rejected": rejected,
        "frames_skipped": reader.stats.skipped, "frames_missing": reader.stats.missing,
        "patches": rows.n, "tokens_per_patch": tokens_per_patch, "bytes_per_token": int(st.bytes_per_token),
        "chunk_bytes": tokens_per_patch * int(st.bytes_per_token), "prefix_tokens": int(st.prefix_tokens),
        "max_vision_tokens": st.max_vision_tokens, "target_vision_tokens": st.target_vision_tokens,
        "kv_bytes_budget": int(st.kv_bytes_budget), "kv_bytes_final": int(st.kv_bytes),
        "kv_bytes_peak": int(max(rows.view()["kv_bytes"].max(initial=0), st.kv_bytes)),
        "kv_bytes_reserved_final": int(st.kv_bytes_reserved), "compressions": int(st.compressions),
        "tokens_evicted": int(st.tokens_evicted), "ingest_ms_total": ingest_ms, "compression_ms_total": compression_ms,
        "compression_share": compression_ms / ingest_ms if ingest_ms > 0 else 0.0,
        "warmup_ask_s": warmup_ask_s, "load_s": load_s, "py_heap": "tracemalloc" if trace else "off",
        "window_frames": width, "py_heap_growth_25_to_100": heap_growth, "threads": torch.get_num_threads(),
        "points": points, "ref_points": ref_points, "patch_rows": rows.lists(),
        "digest": digest.lists(),
    }
    if args.count_ops:
        result.update(_count_ops(eng, args.question))
    result["wall_s"] = time.perf_counter() - t_start
    tmp = args.worker + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args.worker)
    return 0


def _short_path(path: str) -> str:
    """The last three components of a source path (site-packages/... and repo paths alike)."""
    parts = path.replace(os.sep, "/").split("/")
    return "/".join(parts[-3:])


def _count_ops(eng, question: str) -> dict:
    """Top-level aten ops of one decoded token and of one compression (after the stream; changes the cache)."""
    out: dict[str, Any] = {"ops_per_decoded_token": None, "ops_per_compression": None}
    got: dict[int, int] = {}

    def answer(n: int):
        got[n] = eng.ask(question, max_new_tokens=n).generated_tokens

    counts = {}
    for n in OPS_TOKENS:
        counts[n] = count_top_level_aten_ops(lambda n=n: answer(n))
    lo, hi = OPS_TOKENS
    out["ops_answer_tokens"] = [got[lo], got[hi]]
    out["ops_answer_ops"] = [counts[lo], counts[hi]]
    if got[hi] > got[lo]:
        out["ops_per_decoded_token"] = (counts[hi] - counts[lo]) / (got[hi] - got[lo])
    else:
        print(f"{PROG}: --count-ops: answers stopped at {got[hi]} tokens; no per-token count", file=sys.stderr)
    if eng.config.policy != "none":
        vision = int(eng.cache.stats().vision_tokens)
        drop = min(OPS_DROP_TOKENS, vision // 2)
        if drop > 0:
            events = []
            n_ops = count_top_level_aten_ops(lambda: events.append(eng.cache.compress(vision - drop)))
            if events and events[0] is not None:
                out["ops_per_compression"] = n_ops
                out["ops_compression_tokens"] = [vision, vision - drop]
    return out


# ------------------------------------------------------------------ parent
class _Forwarder(threading.Thread):
    """Copies a child's output to our stderr (unless quiet) and keeps its tail."""

    def __init__(self, stream, echo: bool, tail_chars: int = 6000) -> None:
        super().__init__(daemon=True)
        self.stream, self.echo, self.tail_chars = stream, echo, tail_chars
        self._tail: collections.deque = collections.deque()
        self._size = 0

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self.stream.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            text = decoder.decode(data)
            if self.echo and text:
                sys.stderr.write(text)
                sys.stderr.flush()
            self._tail.append(text)
            self._size += len(text)
            while self._size > self.tail_chars and len(self._tail) > 1:
                self._size -= len(self._tail.popleft())

    def tail(self) -> str:
        return "".join(self._tail)[-self.tail_chars:]


def _run_child(argv: list[str], echo: bool) -> tuple[int, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "infinipot_ros.tools.bench", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    fwd = _Forwarder(proc.stdout, echo)
    fwd.start()
    rc = proc.wait()
    fwd.join()
    proc.stdout.close()
    return rc, fwd.tail()


def check_digests(runs: Sequence[dict]) -> dict:
    """Compare the chained frame CRCs of all runs over the frames they all read.

    Returns ``{"match", "common_frames", "sampled_frames", "digest", "first_mismatch_frame"}``; ``digest`` is
    the CRC-32 (hex) over the common sampled frames when they match.
    """
    common = min(int(r["frames_read"]) for r in runs)
    seqs = []
    for r in runs:
        fr = np.asarray(r["digest"]["frame"], dtype=np.int64)
        crc = np.asarray(r["digest"]["crc"], dtype=np.int64)
        k = int(np.searchsorted(fr, common))  # sampled frames with index < common
        seqs.append((fr[:k], crc[:k]))
    ref_fr, ref_crc = seqs[0]
    mismatch: Optional[int] = None
    for fr, crc in seqs[1:]:
        n = min(len(fr), len(ref_fr))
        bad = np.nonzero((fr[:n] != ref_fr[:n]) | (crc[:n] != ref_crc[:n]))[0]
        if len(bad):
            f = int(min(fr[bad[0]], ref_fr[bad[0]]))
            mismatch = f if mismatch is None else min(mismatch, f)
        elif len(fr) != len(ref_fr):
            f = int(fr[n] if len(fr) > n else ref_fr[n])
            mismatch = f if mismatch is None else min(mismatch, f)
    ok = mismatch is None
    return {"match": ok, "common_frames": common, "sampled_frames": int(len(ref_fr)),
            "digest": f"{int(ref_crc[-1]) if len(ref_crc) else 0:08x}" if ok else None,
            "first_mismatch_frame": mismatch}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


def compute_ratios(runs: Sequence[dict]) -> list[dict]:
    """capped / full at the frames of the "none" run's points, for every other policy."""
    full = next((r for r in runs if r["policy"] == "none"), None)
    if full is None:
        return []
    out = []
    width = full["window_frames"]
    for run in runs:
        if run is full:
            continue
        by_frame = {p["frame"]: p for p in run["ref_points"]}
        rows = []
        for ref in full["points"]:
            cap = by_frame.get(ref["frame"])
            if cap is None:
                continue
            ms = window_mean(run["patch_rows"], "ms", ref["frame"], width)[0]
            full_ms = window_mean(full["patch_rows"], "ms", ref["frame"], width)[0]
            rows.append({
                "fraction": ref["fraction"], "frame": ref["frame"],
                "kv": _ratio(cap["kv_bytes"], ref["kv_bytes"]), "rss": _ratio(cap["rss_bytes"], ref["rss_bytes"]),
                "ms_per_patch": _ratio(ms, full_ms), "ttft": _ratio(cap["ttft_s"], ref["ttft_s"]),
                "decode_tok_s": _ratio(cap["decode_tok_s"], ref["decode_tok_s"]),
            })
        out.append({"policy": run["policy"], "vs": "none", "points": rows})
    return out


def _f(x: Optional[float], fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def _mb(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1e6


def print_report(runs: Sequence[dict], ratios: Sequence[dict], digests: dict, out=sys.stdout) -> None:
    """The tables: per policy at 10/25/50/100 %, per-run summary, ratios capped / full."""
    w = out.write
    r0 = runs[0]
    w(f"model {r0.get('model_label') or r0['model']} on {r0['device_name']}, {r0['dtype']}, torch {r0['torch']}; "
      f"{r0['tokens_per_patch']} vision tokens per frame pair, {r0['bytes_per_token']:,} KV bytes per token\n")
    w(f"frames identical in all runs: {'yes' if digests['match'] else 'NO'} "
      f"(CRC-32 {digests['digest']} over {digests['sampled_frames']} sampled of the first {digests['common_frames']} frames)\n")
    for r in runs:
        budget = f"budget {r['kv_bytes_budget'] / 1e6:.2f} MB" if r["kv_bytes_budget"] else "no cap"
        w(f"\n{r['policy']}: {r['frames_read']} frames read, {r['frames_sampled']} sampled, {r['patches']} frame pairs, "
          f"{budget}\n")
        w(f"{'at':>5} {'frame':>6} {'ms/pair':>8} {'encode':>7} {'prefill':>8} {'compr':>6} {'KV_MB':>8} "
          f"{'resv_MB':>8} {'RSS_MB':>8} {'heap_MB':>8} {'cuda_alloc/peak_MB':>19} {'TTFT_s':>7} {'tok/s':>7}\n")
        for p in r["points"]:
            cuda = f"{p['cuda_allocated_bytes'] / 1e6:.0f}/{p['cuda_peak_bytes'] / 1e6:.0f}"
            w(f"{p['fraction']:>5.0%} {p['frame']:>6} {_f(p['ms_per_patch'], '.1f', 8)} {_f(p['encode_ms'], '.1f', 7)} "
              f"{_f(p['prefill_ms'], '.1f', 8)} {_f(p['compression_ms'], '.1f', 6)} {p['kv_bytes'] / 1e6:>8.2f} "
              f"{p['kv_bytes_reserved'] / 1e6:>8.2f} {p['rss_bytes'] / 1e6:>8.1f} {_f(_mb(p['py_heap_bytes']), '.3f', 8)} "
              f"{cuda:>19} {_f(p['ttft_s'], '.3f', 7)} {_f(p['decode_tok_s'], '.1f', 7)}\n")
    w("\n(ms columns: mean over the frame pairs of the 10 % of the stream ending at the point; heap: tracemalloc "
      "from the 10 % point on)\n")
    w(f"\n{'policy':<12} {'budget_MB':>10} {'compr':>6} {'compr_ms':>9} {'compr_share':>12} {'RSS_50->100':>12} "
      f"{'resv/budget':>12} {'warmup_ask_s':>13} {'ops/token':>10} {'ops/compr':>10}\n")
    for r in runs:
        pts = {p["fraction"]: p for p in r["points"]}
        growth = None
        if 0.5 in pts and 1.0 in pts and pts[0.5]["rss_bytes"]:
            growth = 100.0 * (pts[1.0]["rss_bytes"] / pts[0.5]["rss_bytes"] - 1.0)
        mean_c = r["compression_ms_total"] / r["compressions"] if r["compressions"] else None
        resv = r["kv_bytes_reserved_final"] / r["kv_bytes_budget"] if r["kv_bytes_budget"] else None
        growth_s = "-" if growth is None else f"{growth:+.2f} %"
        w(f"{r['policy']:<12} {_f(_mb(r['kv_bytes_budget']) or None, '.2f', 10)} {r['compressions']:>6} "
          f"{_f(mean_c, '.2f', 9)} {100 * r['compression_share']:>10.2f} % {growth_s:>12} {_f(resv, '.3f', 12)} "
          f"{_f(r['warmup_ask_s'], '.3f', 13)} {_f(r.get('ops_per_decoded_token'), '.0f', 10)} "
          f"{_f(r.get('ops_per_compression'), '.0f', 10)}\n")
    for r in runs:
        pts = {p["fraction"]: p for p in r["points"]}
        a, b = (pts.get(FRACTIONS[1]) or {}).get("py_heap_bytes"), (pts.get(1.0) or {}).get("py_heap_bytes")
        if a is not None and b is not None:
            top = r.get("py_heap_growth_25_to_100") or []
            sites = ", ".join(f"{g['where']} {g['size_diff_bytes'] / 1e3:+.1f} kB" for g in top[:3]) or "none"
            w(f"py heap {r['policy']}: {(b - a) / 1e3:+.1f} kB from 25 to 100 % "
              f"({(b - a) / max(1, r['patches'] * (1 - FRACTIONS[1])):+.0f} B per frame pair); largest sites: {sites}\n")
    for rt in ratios:
        w(f"\nratios {rt['policy']} / {rt['vs']} at the frames of {rt['vs']}'s points:\n")
        w(f"{'at':>5} {'frame':>6} {'kv':>7} {'RSS':>7} {'ms/pair':>8} {'TTFT':>7} {'tok/s':>7}\n")
        for p in rt["points"]:
            w(f"{p['fraction']:>5.0%} {p['frame']:>6} {_f(p['kv'], '.3f', 7)} {_f(p['rss'], '.3f', 7)} "
              f"{_f(p['ms_per_patch'], '.3f', 8)} {_f(p['ttft'], '.3f', 7)} {_f(p['decode_tok_s'], '.3f', 7)}\n")
    out.flush()


def write_csv(path: str, runs: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in runs:
            for p in r["points"]:
                wr.writerow({**p, "policy": r["policy"], "compression_share": r["compression_share"]})


def write_plot(path: str, runs: Sequence[dict]) -> None:
    """Two panels over stream time (s): KV MB per frame pair, ms per frame pair; one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kv, ax_ms) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5))
    for r in runs:
        rows = r["patch_rows"]
        t = np.asarray(rows["stamp_s"])
        (line,) = ax_kv.plot(t, np.asarray(rows["kv_bytes"]) / 1e6, label=r["policy"], lw=1.2)
        if r["kv_bytes_budget"]:
            ax_kv.axhline(r["kv_bytes_budget"] / 1e6, color=line.get_color(), ls="--", lw=0.8)
        ax_ms.plot(t, rows["ms"], label=r["policy"], lw=0.8, color=line.get_color())
    ax_kv.set_ylabel("KV cache in use (MB)")
    ax_kv.set_title(f"{runs[0].get('model_label') or runs[0]['model']} on {runs[0]['device_name']} (dashed: budget)")
    ax_kv.legend()
    ax_kv.grid(alpha=0.3)
    ax_ms.set_ylabel("ms per frame pair")
    ax_ms.set_xlabel("stream time (s of video)")
    ax_ms.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _public_run(r: dict) -> dict:
    out = {k: v for k, v in r.items() if k != "digest"}
    return out


def _prepare_model(args: argparse.Namespace, tmp: str) -> tuple[str, Optional[str]]:
    """(model path or id for the children, child dtype)."""
    if args.model:
        return args.model, args.dtype
    if args.shapes == "tiny":
        return TINY_MODEL, args.dtype or "float32"
    from ..models import resolve_device
    from ..models.shapes import build_shaped_qwen2_5_vl

    dev = resolve_device(args.device)
    build_dtype = args.dtype if args.dtype in ("float32", "float16", "bfloat16") else "bfloat16"
    out = args.model_dir or os.path.join(tmp, args.shapes)
    if not args.quiet:
        print(f"{PROG}: building the {args.shapes}-shaped model ({build_dtype}, random weights) in {out} ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    path = build_shaped_qwen2_5_vl(out, args.shapes, dtype=build_dtype, device=str(dev), seed=args.seed)
    if dev.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    if not args.quiet:
        print(f"{PROG}: model ready after {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return str(path), args.dtype


def _child_argv(args: argparse.Namespace, policy: str, frames: int, model: str, dtype: Optional[str],
                ref_frames: Iterable[int], result: str) -> list[str]:
    # NAME=VALUE forms: values that start with "-" (a question, a path) stay values
    argv = [f"--worker={result}", f"--video={args.video}", f"--loops={args.loops}", f"--fps={args.fps!r}",
            f"--max-tokens={args.max_tokens}", f"--policies={policy}@{frames}", f"--model-path={model}",
            f"--device={args.device}", f"--max-new-tokens={args.max_new_tokens}", f"--question={args.question}"]
    if dtype:
        argv.append(f"--dtype={dtype}")
    if args.decode_mode:
        argv.append(f"--decode-mode={args.decode_mode}")
    if args.max_pixels is not None:
        argv.append(f"--max-pixels={args.max_pixels}")
    if args.count_ops:
        argv.append("--count-ops")
    if args.no_py_heap:
        argv.append("--no-py-heap")
    if args.threads:
        argv.append(f"--threads={args.threads}")
    refs = sorted(set(ref_frames))
    if refs:
        argv.append("--ref-frames=" + ",".join(map(str, refs)))
    if args.progress:
        argv.append("--progress")
    return argv


def _validate(args: argparse.Namespace) -> tuple[list[tuple[str, int]], int]:
    """Checked policies and the frame count of the whole stream; raises BenchError(code 2)."""
    for name, value, low in (("--loops", args.loops, 1), ("--frames", args.frames, 0), ("--max-tokens", args.max_tokens, 2),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--threads", args.threads, 0)):
        if value < low:
            raise BenchError(f"{name} must be >= {low}, got {value}", 2)
    if args.max_new_tokens > 2048:
        raise BenchError("--max-new-tokens must be <= 2048", 2)
    if not args.question.strip():
        raise BenchError("--question is empty", 2)
    try:
        policies = parse_policies(args.policies)
        from ..engine import EngineConfig

        for name, _ in policies:
            kw: dict[str, Any] = dict(policy=name, max_vision_tokens=args.max_tokens, frame_rate_hz=args.fps)
            if args.max_pixels is not None:
                kw["max_pixels"] = args.max_pixels
            EngineConfig(**kw)
    except ValueError as exc:
        raise BenchError(str(exc), 2) from None
    if not os.path.isfile(args.video):
        raise BenchError(f"no such video file: {args.video}", 2)
    try:
        info = probe_video(args.video)
    except OSError as exc:
        raise BenchError(str(exc), 2) from None
    total = info.total_frames(args.loops, args.frames)
    if info.frame_count <= 0:  # header does not say: count by decoding once
        per_pass = sum(1 for _ in iter_video(args.video))
        total = per_pass * args.loops if not args.frames else min(per_pass * args.loops, args.frames)
    if total <= 0:
        raise BenchError(f"{args.video} has no frames", 2)
    return policies, total


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the bench (or, with the hidden --worker, one child); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad arguments, 0 for --help
        return int(exc.code or 0)
    if args.worker:
        try:
            return _worker(args)
        except BenchError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return exc.code
    try:
        return _parent(args)
    except BenchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code


def _parent(args: argparse.Namespace) -> int:
    policies, total = _validate(args)
    args.progress = sys.stderr.isatty() and not args.quiet
    plan = [(name, min(total, cap) if cap else total) for name, cap in policies]
    full_frames = next((n for name, n in plan if name == "none"), None)
    ref = [point_frame(f, full_frames) for f in FRACTIONS] if full_frames else []
    runs = []
    with tempfile.TemporaryDirectory(prefix="infinipot-bench-") as tmp:
        model, dtype = _prepare_model(args, tmp)
        for name, frames in plan:
            result = os.path.join(tmp, f"{name}.json")
            if not args.quiet:
                print(f"{PROG}: {name}: streaming {frames} frames in a child process ...", file=sys.stderr, flush=True)
            rc, tail = _run_child(_child_argv(args, name, frames, model, dtype, ref if name != "none" else [], result),
                                  echo=not args.quiet)
            if rc != 0 or not os.path.isfile(result):
                sys.stderr.write(f"{PROG}: the {name} child failed (exit {rc}); its last output:\n{tail}\n")
                return 1
            with open(result, encoding="utf-8") as f:
                runs.append(json.load(f))
            if not args.model and args.shapes != "tiny":
                runs[-1]["model_label"] = f"{args.shapes} shapes (random weights, tiny vocabulary)"
    digests = check_digests(runs)
    ratios = compute_ratios(runs)
    print_report(runs, ratios, digests)
    for r in runs:
        if r["frames_read"] != r["frames"]:
            print(f"{PROG}: warning: {r['policy']} read {r['frames_read']} frames, the header promised {r['frames']}",
                  file=sys.stderr)
    doc = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "model_path", "ref_frames", "progress")},
        "frames_total": total, "frames_digest_match": digests["match"], "frames_digest": digests,
        "compression_share_unit": "fraction (0..1) of total ingest ms",
        "runs": [_public_run(r) for r in runs], "ratios": ratios,
    }
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    if args.csv_out:
        write_csv(args.csv_out, runs)
    if args.plot:
        write_plot(args.plot, runs)
    if not digests["match"]:
        print(f"{PROG}: ERROR: the runs decoded different frames (first difference at frame "
              f"{digests['first_mismatch_frame']}); their figures are not comparable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
