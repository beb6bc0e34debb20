"""A/B of the GPU engine's decode step across source trees (issue 9).

    python3 bench/engine_ab.py --batches 1 32 main=.gpu_site/main new=.

Each NAME=TREE is a checkout of this repository (`git archive REV | tar -x -C DIR` makes
one). Rounds alternate the trees, and every measurement runs in a fresh process with its
tree first on `sys.path`, so the trees share nothing: not Triton's in-process caches, not
the allocator, not a warm GPU clock. Each measurement is `bench.engine_gpu.
engine_decode_rate` of the Llama-3-8B-shaped model (32 layers, INT4, 512-token context,
CUDA graphs) with the LM head in `--lm-head`; it prints the engine's tokens/s and the
replay time of one step's graph, which is what the trees' kernels change
(`bench.engine_gpu.tree_decode_rate`, which `engine_gpu.py --baseline` uses too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_gpu import tree_decode_rate


def measure(tree: str, linear: str, head: str, batch: int, sampled: bool) -> str:
    """One fresh process's engine tokens/s and graph replay of a step, or its error."""
    try:
        rate, replay_ms = tree_decode_rate(tree, 32, linear, batch, head, sampled)
    except subprocess.CalledProcessError as exc:
        return "failed: " + exc.stderr[-600:]
    replay = "?" if replay_ms is None else f"{replay_ms * 1e3:7.1f}"
    return f"{rate:8.1f} tok/s  replay {replay} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="NAME=TREE, two or more")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--linear", default="int4")
    parser.add_argument("--lm-head", default="int4")
    parser.add_argument(
        "--sampled", action="store_true", help="temperature 0.8 and top-p 0.9, not greedy"
    )
    args = parser.parse_args()
    if any("=" not in arg for arg in args.trees):
        parser.error("each tree is NAME=TREE")
    trees = dict(arg.split("=", 1) for arg in args.trees)
    if len(trees) < 2:
        parser.error("give two or more NAME=TREE arguments with distinct names")
    for batch in args.batches:
        for rnd in range(args.rounds):
            for name, tree in trees.items():
                result = measure(tree, args.linear, args.lm_head, batch, args.sampled)
                mode = " sampled" if args.sampled else ""
                print(f"b{batch} {args.linear} head={args.lm_head}{mode} round {rnd} {name}: "
                      f"{result}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
