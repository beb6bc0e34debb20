"""A/B of the GPU engine's decode step across source trees (issue 9).

    python3 bench/engine_ab.py --batches 1 32 main=.gpu_site/main new=.

Each NAME=TREE is a checkout of this repository (`git archive REV | tar -x -C DIR` makes
one). Rounds alternate the trees, and every measurement runs in a fresh process with its
tree first on `sys.path`, so the trees share nothing: not Triton's in-process caches, not
the allocator, not a warm GPU clock. Each measurement is `bench.engine_gpu.
engine_decode_rate` of the Llama-3-8B-shaped model (32 layers, INT4, 512-token context,
CUDA graphs) with the LM head in `--lm-head`; it prints the engine's tokens/s and the
replay time of one step's graph, which is what the trees' kernels change.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

MEASURE = """
import sys
sys.path.insert(0, {tree!r})
import torch
torch.set_grad_enabled(False)
from bench.engine_gpu import engine_decode_rate, llama3_8b
rate, replay_ms = engine_decode_rate(llama3_8b(32), {linear!r}, 64, {batch}, lm_head={head!r})
print("RATE", rate, replay_ms)
"""


def measure(tree: str, linear: str, head: str, batch: int) -> str:
    """One fresh process's engine tokens/s and graph replay of a step, or its error."""
    code = MEASURE.format(tree=tree, linear=linear, head=head, batch=batch)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        return "failed: " + done.stderr[-600:]
    rate, replay_ms = done.stdout.rsplit("RATE", 1)[1].split()
    return f"{float(rate):8.1f} tok/s  replay {float(replay_ms) * 1e3:7.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="NAME=TREE, two or more")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--linear", default="int4")
    parser.add_argument("--lm-head", default="int4")
    args = parser.parse_args()
    if any("=" not in arg for arg in args.trees):
        parser.error("each tree is NAME=TREE")
    trees = dict(arg.split("=", 1) for arg in args.trees)
    if len(trees) < 2:
        parser.error("give two or more NAME=TREE arguments with distinct names")
    for batch in args.batches:
        for rnd in range(args.rounds):
            for name, tree in trees.items():
                result = measure(tree, args.linear, args.lm_head, batch)
                print(f"b{batch} {args.linear} head={args.lm_head} round {rnd} {name}: {result}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
