#!/usr/bin/env python3
"""Qwen2.5-VL-3B-shaped streaming benchmark: capped vs full KV on one GPU, side by side.

Real weights cannot be downloaded here, so this builds a model with the
*shapes* of Qwen2.5-VL-3B-Instruct (36 layers, hidden 2048, 16 heads / 2 KV
heads of 128, a 32-block vision tower of width 1280) and random bf16 weights:
compute and memory per frame are those of the real model, answers are not.
The vocabulary is the tiny model's 2,048 tokens (the real 151,936 would add
0.3 B embedding parameters and one larger lm_head matmul per token).
It streams a video (looped --loops times, stamps continuing) at --fps through
the engine once with InfiniPot-V at --max-tokens and once with the full
cache, and prints per-policy tables and ratios measured in one run:

* ms per frame pair (encode + prefill + compression) at 25/50/100 % of the stream
* compression ms and its share of ingest time (paper: ~0.5 %)
* KV bytes, torch CUDA allocated / peak memory at those points
* answer: prefill latency of a question (TTFT) and decode tokens/s

    python bench/bench_3b_shapes.py --video .cache/data/vtest.avi --loops 4 [--max-tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def build_3b_shaped(out_dir: str, tiny_dir: str) -> str:
    """Save a random-weight model with Qwen2.5-VL-3B's shapes and the tiny model's tokenizer/processor."""
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny_cfg = Qwen2_5_VLConfig.from_pretrained(tiny_dir)
    ids = {k: getattr(tiny_cfg, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id")}
    text = dict(
        vocab_size=tiny_cfg.text_config.vocab_size, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        use_sliding_window=False, tie_word_embeddings=True, initializer_range=0.02,
    )
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_chans=3, initializer_range=0.02)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(f"3B-shaped model: {n / 1e9:.2f} B parameters -> {out_dir}", file=sys.stderr)
    return out_dir


def stream(adapter, model_dir: str, video: str, policy: str, args) -> dict:
    import cv2

    from infinipot_ros.engine import EngineConfig, FrameSampler, StreamingAssistant

    cfg = EngineConfig(model=model_dir, device="cuda", dtype="bfloat16", policy=policy,
                       max_vision_tokens=args.max_tokens, frame_rate_hz=args.fps, max_new_tokens=args.new_tokens)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    eng = StreamingAssistant(cfg, adapter=adapter)
    sampler = FrameSampler(args.fps)
    rows = []
    comp_ms = 0.0
    ingest_ms = 0.0
    offset = 0
    for _ in range(args.loops):
        cap = cv2.VideoCapture(video)
        fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            stamp = offset + int(i * 1e9 / fps)
            i += 1
            if not sampler.accept("cam", stamp):
                continue
            res = eng.ingest("cam", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), stamp)
            if res.status != "ingested":
                continue
            ingest_ms += res.ms
            if res.compression is not None:
                comp_ms += res.compression.ms
            st = eng.cache.stats()
            rows.append({"ms": res.ms, "kv": st.kv_bytes, "alloc": torch.cuda.memory_allocated(),
                         "peak": torch.cuda.max_memory_allocated(), "tokens": st.tokens,
                         "comp_ms": res.compression.ms if res.compression else 0.0})
        cap.release()
        offset += int((i + 1) * 1e9 / fps)
    # answer: TTFT = question prefill + first token (max_new_tokens=1); decode tok/s from the difference
    q = "Describe what is happening in the video."

    def timed(n_new: int):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a = eng.adapter.generate(eng.cache, q, max_new_tokens=n_new)
        torch.cuda.synchronize()
        return time.perf_counter() - t, a

    timed(1)  # warm-up
    ttft, _ = timed(1)
    total, ans = timed(args.new_tokens)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed(8)
        print(f"--- profile: generate(8 tokens), {policy}", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
        if eng.cache.compressions:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                eng.cache.compress(eng.cache.target_vision_tokens - 234)
            print(f"--- profile: one compression, {policy}", file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    n = len(ans.token_ids)
    decode_tps = (n - 1) / max(1e-9, total - ttft) if n > 1 else float("nan")
    out = {"policy": policy, "rows": rows, "comp_ms_total": comp_ms, "ingest_ms_total": ingest_ms,
           "compressions": eng.cache.compressions, "ttft_s": ttft, "decode_tok_s": decode_tps,
           "answer_tokens": n, "kv_budget": eng.cache.stats().kv_bytes_budget,
           "bytes_per_token": eng.cache.bytes_per_token, "patches": len(rows),
           "tokens_per_patch": rows[0]["tokens"] - eng.cache.prefix_length if rows else 0}
    del eng
    torch.cuda.empty_cache()
    return out


def report(results: list) -> None:
    print(f"\n{'policy':<12} {'at':>5} {'patch':>6} {'ms/patch':>9} {'kv_MB':>9} {'cuda_alloc_MB':>14} {'cuda_peak_MB':>13}")
    for r in results:
        rows = r["rows"]
        n = len(rows)
        for frac in (0.25, 0.5, 1.0):
            end = max(1, int(round(frac * n)))
            win = rows[max(0, end - max(1, n // 10)) : end]
            ms = sum(x["ms"] for x in win) / len(win)
            x = rows[end - 1]
            print(f"{r['policy']:<12} {int(frac * 100):>4}% {end:>6} {ms:>9.1f} {x['kv'] / 1e6:>9.1f} "
                  f"{x['alloc'] / 1e6:>14.0f} {x['peak'] / 1e6:>13.0f}")
    print(f"\n{'policy':<12} {'patches':>8} {'tok/patch':>10} {'B/token':>8} {'budget_MB':>10} {'compr':>6} "
          f"{'compr_ms_mean':>14} {'compr_share_%':>14} {'TTFT_s':>7} {'decode_tok/s':>13}")
    for r in results:
        mean_c = r["comp_ms_total"] / r["compressions"] if r["compressions"] else 0.0
        share = 100.0 * r["comp_ms_total"] / r["ingest_ms_total"]
        print(f"{r['policy']:<12} {r['patches']:>8} {r['tokens_per_patch']:>10} {r['bytes_per_token']:>8} "
              f"{r['kv_budget'] / 1e6:>10.1f} {r['compressions']:>6} {mean_c:>14.2f} {share:>14.2f} "
              f"{r['ttft_s']:>7.3f} {r['decode_tok_s']:>13.1f}")
    if len(results) == 2:
        a, b = results
        last_a, last_b = a["rows"][-1], b["rows"][-1]
        print(f"\nratios {a['policy']} / {b['policy']} at the end of the stream: "
              f"kv {last_a['kv'] / last_b['kv']:.3f}, cuda alloc {last_a['alloc'] / last_b['alloc']:.3f}, "
              f"cuda peak {last_a['peak'] / last_b['peak']:.3f}, last-10% ms/patch "
              f"{sum(x['ms'] for x in a['rows'][-len(a['rows']) // 10:]) / sum(x['ms'] for x in b['rows'][-len(b['rows']) // 10:]):.3f}, "
              f"TTFT {a['ttft_s'] / b['ttft_s']:.3f}, decode tok/s {a['decode_tok_s'] / b['decode_tok_s']:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default=os.environ.get("INFINIPOT_VIDEO", ".cache/data/vtest.avi"))
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--loops", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--policies", nargs="+", default=["infinipot_v", "none"])
    p.add_argument("--json-out", default=None)
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of decoding and one compression")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from infinipot_ros.models.tiny import build_tiny_qwen2_5_vl

    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(build_tiny_qwen2_5_vl(os.path.join(tmp, "tiny")))
        model_dir = build_3b_shaped(os.path.join(tmp, "qwen2.5-vl-3b-shaped"), tiny)
        from infinipot_ros.models import load_adapter

        adapter = load_adapter(model_dir, device="cuda", dtype="bfloat16")
        weights_mb = torch.cuda.memory_allocated() / 1e6
        print(f"weights on GPU: {weights_mb:.0f} MB", file=sys.stderr)
        results = [stream(adapter, model_dir, args.video, pol, args) for pol in args.policies]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    report(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
