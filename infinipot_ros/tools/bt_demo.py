"""infinipot-bt-demo: a py_trees tree that asks the assistant about the scene, periodically.

The tree (re-ticked from the root each time it finishes)::

    [-] periodic ask          Sequence, memory
        --> wait P s          py_trees.timers.Timer (wall time)
        --> ask last S s      infinipot_ros.bt.AskScene over <ns>/ask_stream

so every P seconds (plus the answer's own time) it asks the question about the
frames stamped in the last S seconds of the node's clock (sim time with
``--ros-args -p use_sim_time:=true``). The main thread ticks the tree every
``--tick-period`` seconds; an executor thread spins the rclpy node (the
behaviour never blocks or spins inside a tick). One line per finished ask::

    ask 1/3 SUCCESS in 0.84 s (8 frames, 5 tokens): <answer>
    ask 2/3 FAILURE in 0.01 s: NO_FRAMES: no frames ingested yet

    infinipot-bt-demo --question "Anyone at the door?" --last 30 --period 10 --asks 3 [--namespace robot1]

Exit codes: 0 the last ask succeeded, 1 it failed (or none finished), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Optional, Sequence

EPILOG = """\
tree: Sequence "periodic ask" (memory) = [Timer "wait P s", AskScene "ask last S s"], re-ticked from the
root whenever it finishes, so one ask every P seconds plus the answer's time. --asks counts finished asks
(SUCCESS or FAILURE of AskScene), not tick() calls; the tree is ticked every --tick-period seconds.
ROS arguments go after --ros-args, e.g. --ros-args -p use_sim_time:=true.
exit codes: 0 the last ask succeeded, 1 it failed or none finished, 2 bad arguments."""


def _split_ros_args(argv: Optional[Sequence[str]]) -> tuple[list, list]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        return argv[:i], argv[i:]
    return argv, []


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinipot-bt-demo", description="Ask the infinipot assistant from a py_trees behaviour tree.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--question", required=True, help="the question to ask")
    p.add_argument("--last", type=float, default=0.0, metavar="S",
                   help="only frames stamped in the last S seconds of the node's clock (0 = all cached frames)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="T",
                   help="behaviour timeout per ask, wall seconds (the goal is canceled; 0 = none; default 60)")
    p.add_argument("--period", type=float, default=5.0, metavar="P",
                   help="seconds the tree waits before each ask (default 5)")
    p.add_argument("--asks", "--ticks", dest="asks", type=int, default=1, metavar="K",
                   help="stop after K finished asks (0 = until Ctrl-C; default 1)")
    p.add_argument("--namespace", default="", metavar="NS",
                   help="namespace of the assistant: the action is /NS/ask_stream (default /ask_stream)")
    p.add_argument("--camera", action="append", default=[], help="restrict to this camera topic (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap (0 = node default)")
    p.add_argument("--server-wait", type=float, default=10.0, metavar="S",
                   help="seconds each ask waits for the action server to appear (default 10)")
    p.add_argument("--tick-period", type=float, default=0.1, metavar="S", help="tick period (default 0.1 s)")
    return p


def build_tree(node, args: argparse.Namespace):
    """The demo tree: Sequence(memory) [Timer(period), AskScene(last S s)]; returns (root, ask)."""
    import py_trees

    from ..ros.bt import AskScene

    ask = AskScene(f"ask last {args.last:g} s" if args.last else "ask", node, args.question, last_s=args.last,
                   camera_ids=args.camera, timeout_s=args.timeout, max_new_tokens=args.max_new_tokens,
                   server_wait_s=args.server_wait)
    wait = py_trees.timers.Timer(f"wait {args.period:g} s", duration=args.period)
    root = py_trees.composites.Sequence("periodic ask", memory=True, children=[wait, ask])
    return root, ask


def format_outcome(index: int, total: int, outcome) -> str:
    """One line for a finished ask (status, latency, answer or error)."""
    head = f"ask {index}/{total or '-'} {outcome.status.name} in {outcome.latency_s:.2f} s"
    if outcome.status.name == "SUCCESS":
        r = outcome.result
        text = outcome.answer.replace("\n", " ")
        return f"{head} ({r.frames_in_context} frames, {r.generated_tokens} tokens): {text}"
    return f"{head}: {outcome.error}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point (see module docstring); returns the exit code."""
    own, ros_args = _split_ros_args(argv)
    p = _parser()
    try:
        args = p.parse_args(own)
    except SystemExit as exc:  # --help (0) or bad arguments (2)
        return int(exc.code or 0)
    bad = [f"--{name} must be {rule}" for name, ok, rule in (
        ("question", args.question.strip(), "non-empty"), ("last", args.last >= 0, ">= 0"),
        ("timeout", args.timeout >= 0, ">= 0"), ("period", args.period >= 0, ">= 0"),
        ("asks", args.asks >= 0, ">= 0"), ("max-new-tokens", args.max_new_tokens >= 0, ">= 0"),
        ("server-wait", args.server_wait >= 0, ">= 0"), ("tick-period", args.tick_period > 0, "> 0"),
    ) if not ok]
    if bad:
        print(f"infinipot-bt-demo: {'; '.join(bad)}", file=sys.stderr)
        return 2

    import py_trees
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    # Own context: main() can run beside other rclpy users of the default context (tests, embedding).
    context = rclpy.Context()
    rclpy.init(args=[sys.argv[0], *ros_args], context=context)
    node = rclpy.create_node("infinipot_bt_demo", namespace=args.namespace.strip("/"), context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    def spin() -> None:
        try:
            executor.spin()
        except ExternalShutdownException:
            pass

    spinner = threading.Thread(target=spin, name="infinipot-bt-demo-spin", daemon=True)
    spinner.start()
    root, ask = build_tree(node, args)
    tree = py_trees.trees.BehaviourTree(root)
    finished = 0
    last_ok = False
    try:
        tree.setup()  # creates the action client; never waits (the ask waits, ticking, up to --server-wait)
        while context.ok() and (args.asks == 0 or finished < args.asks):
            t0 = time.monotonic()
            tree.tick()
            if root.status in (py_trees.common.Status.SUCCESS, py_trees.common.Status.FAILURE):
                # the Timer cannot fail: the root ends exactly when the ask ended
                finished += 1
                last_ok = ask.outcome.status == py_trees.common.Status.SUCCESS
                print(format_outcome(finished, args.asks, ask.outcome), flush=True)
                continue  # next round starts (waits its period) on the next tick
            time.sleep(max(0.0, args.tick_period - (time.monotonic() - t0)))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        root.stop(py_trees.common.Status.INVALID)  # cancels a running goal
        tree.shutdown()
        executor.shutdown()
        node.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)
        spinner.join(2.0)
    return 0 if last_ok else 1


if __name__ == "__main__":
    sys.exit(main())
