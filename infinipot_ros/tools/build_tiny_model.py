"""infinipot-build-model: build the embedded tiny Qwen2.5-VL into a directory.

Usage::

    infinipot-build-model [--out DIR] [--seed N] [--force]

Writes config, safetensors weights, tokenizer, processors and chat template
(see :mod:`infinipot_ros.models.tiny`) and prints the output directory on
stdout. Without ``--force`` an existing complete build of the same recipe and
seed is kept as is. Exit status 0 on success, 1 when the output directory
cannot be used (e.g. a non-empty directory not written by this tool), 2 on bad
arguments.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from infinipot_ros.models.tiny import TINY_MODEL_NAME, build_tiny_qwen2_5_vl, default_cache_dir


def _parser() -> argparse.ArgumentParser:
    default_out = default_cache_dir() / "models" / TINY_MODEL_NAME
    parser = argparse.ArgumentParser(
        prog="infinipot-build-model",
        description="Build the tiny random-weight Qwen2.5-VL used as infinipot_ros' default model.",
    )
    parser.add_argument(
        "--out",
        default=str(default_out),
        help=f"output directory (default: {default_out})",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if the directory already holds a complete build of this seed",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return the process exit status (0 ok, 1 unusable output dir)."""
    args = _parser().parse_args(argv)
    try:
        path = build_tiny_qwen2_5_vl(args.out, seed=args.seed, overwrite=args.force)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        print(f"infinipot-build-model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
