"""infinipot-ask / infinipot-status: small rclpy clients of the assistant node.

``ros2 service call /ask infinipot_ros/srv/Ask "{question: ...}"`` and
``ros2 topic echo /infinipot/status`` do the same where ros2cli is
installed; these tools exist for machines without it, for scripts (exit
codes, --json) and for a readable one-line status.

    infinipot-ask "What is happening?" [--camera /cam/image_raw] [--last 120] [--timeout 30]
    infinipot-status [--follow] [--wait-ready 60]

Exit codes: 0 answered / ready, 1 the node answered with an error or timed
out, 2 bad arguments or no node.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence


def _split_ros_args(argv: Optional[Sequence[str]]) -> tuple[list, list]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        return argv[:i], argv[i:]
    return argv, []


def format_status(msg) -> str:
    """One line: state, KV bytes vs budget, tokens, compressions, frames, memory."""
    from ..ros.status import STATE_NAMES

    state = STATE_NAMES.get(msg.state, str(msg.state)).upper()
    budget = f"{msg.kv_bytes_budget / 1e6:.2f} MB" if msg.kv_bytes_budget else "no cap"
    line = (
        f"[{state}] kv {msg.kv_bytes_used / 1e6:.2f} MB / {budget} | vision tokens {msg.vision_tokens}"
        f"/{msg.vision_tokens_budget or '-'} | compressions {msg.compressions_total} | frames rx {msg.frames_received}"
        f" sampled {msg.frames_sampled} ingested {msg.frames_ingested} dropped {msg.frames_dropped}"
        f" rejected {msg.frames_rejected} in-cache {msg.frames_in_cache} | chunk {msg.last_chunk_ms:.0f} ms"
        f" | rss {msg.process_rss_bytes / 1e6:.0f} MB"
    )
    if msg.device_memory_total_bytes:
        line += f" | gpu {msg.device_memory_used_bytes / 1e6:.0f} MB"
    if msg.frames_stamp_dropped or msg.time_jumps:
        line += f" | stamp-dropped {msg.frames_stamp_dropped} time-jumps {msg.time_jumps}"
    if len(msg.cameras) > 1:
        line += " | " + ", ".join(f"{c.camera_id}: {c.frames_ingested} in, {c.tokens_in_cache} tok"
                                  for c in msg.cameras)
    if msg.memory_source and msg.memory_source != "empty":
        line += f" | memory: {msg.memory_source}"
    if msg.error_message:
        line += f" | {msg.error_message}"
    return line


def ask_main(argv: Optional[Sequence[str]] = None) -> int:
    own, ros_args = _split_ros_args(argv)
    p = argparse.ArgumentParser(prog="infinipot-ask", description="Ask the infinipot assistant node a question.")
    p.add_argument("question")
    p.add_argument("--service", default="/ask", help="service name (default /ask)")
    p.add_argument("--camera", action="append", default=[], help="restrict to this camera topic (repeatable)")
    p.add_argument("--last", type=float, default=0.0, metavar="S",
                   help="only frames stamped in the last S seconds of ROS time")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--timeout", type=float, default=0.0, help="node-side answer timeout (0 = node default)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the service to appear")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    args = p.parse_args(own)

    import rclpy

    from ..ros.stamps import ns_to_time, time_to_ns
    from ..srv import Ask

    rclpy.init(args=[sys.argv[0], *ros_args])
    node = rclpy.create_node("infinipot_ask_client")
    try:
        client = node.create_client(Ask, args.service)
        if not client.wait_for_service(timeout_sec=args.wait):
            print(f"infinipot-ask: service {args.service} not available", file=sys.stderr)
            return 2
        req = Ask.Request(question=args.question, camera_ids=args.camera, max_new_tokens=args.max_new_tokens,
                          timeout_s=args.timeout)
        if args.last > 0:
            req.since = ns_to_time(node.get_clock().now().nanoseconds - int(args.last * 1e9))
        fut = client.call_async(req)
        rclpy.spin_until_future_complete(node, fut, timeout_sec=(args.timeout or 60.0) + 30.0)
        if not fut.done():
            print("infinipot-ask: no response", file=sys.stderr)
            return 1
        res = fut.result()
        if args.json:
            print(json.dumps({
                "success": res.success, "answer": res.answer, "error": res.error,
                "oldest_frame_stamp": time_to_ns(res.oldest_frame_stamp) / 1e9,
                "newest_frame_stamp": time_to_ns(res.newest_frame_stamp) / 1e9,
                "frames_in_context": res.frames_in_context, "context_tokens": res.context_tokens,
                "generated_tokens": res.generated_tokens, "latency_s": res.latency_s,
            }))
        elif res.success:
            print(f"A: {res.answer}\n   ({res.frames_in_context} frames, {res.context_tokens} cached tokens, "
                  f"{res.generated_tokens} tokens, {res.latency_s:.2f} s)")
        else:
            print(f"error: {res.error}")
        return 0 if res.success else 1
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


def status_main(argv: Optional[Sequence[str]] = None) -> int:
    own, ros_args = _split_ros_args(argv)
    p = argparse.ArgumentParser(prog="infinipot-status", description="Print the assistant's cache status.")
    p.add_argument("--topic", default="/infinipot/status")
    p.add_argument("--follow", action="store_true", help="print status messages until Ctrl-C")
    p.add_argument("--interval", type=float, default=0.0, metavar="S",
                   help="with --follow: print at most one line every S seconds")
    p.add_argument("--wait-ready", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for state READY (exit 1 on ERROR or timeout)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a first message")
    args = p.parse_args(own)

    import rclpy
    from rclpy.executors import ExternalShutdownException

    from ..msg import CacheStatus
    from ..ros.node import STATUS_QOS

    rclpy.init(args=[sys.argv[0], *ros_args])
    node = rclpy.create_node("infinipot_status_client")
    last = []
    node.create_subscription(CacheStatus, args.topic, last.append, STATUS_QOS)
    try:
        deadline = time.monotonic() + max(args.timeout, args.wait_ready)
        printed = 0
        last_print = 0.0
        while rclpy.ok():
            rclpy.spin_once(node, timeout_sec=0.1)
            while printed < len(last):
                msg = last[printed]
                printed += 1
                if args.follow and time.monotonic() - last_print >= args.interval:
                    print(format_status(msg), flush=True)
                    last_print = time.monotonic()
                elif not args.follow and not args.wait_ready:
                    print(format_status(msg), flush=True)
                if args.wait_ready:
                    if msg.state == CacheStatus.STATE_READY:
                        print(format_status(msg), flush=True)
                        return 0
                    if msg.state == CacheStatus.STATE_ERROR:
                        print(format_status(msg), flush=True)
                        return 1
                elif not args.follow:
                    return 0
            if not args.follow and time.monotonic() > deadline:
                print(f"infinipot-status: nothing {'ready ' if args.wait_ready else ''}on {args.topic}", file=sys.stderr)
                return 1 if last else 2
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


main = ask_main

if __name__ == "__main__":
    sys.exit(ask_main())
