#!/usr/bin/env python
"""GPU benchmark, one command, a few minutes: a Llama-3-8B-shaped random reward model in bf16 on one GPU.

Times, in one run and on the same samples: (a) TRL's reward-model path (right-padded chunks of the per-device
batch), (b) length-bucketed padded micro-batches, (c) steer-reward's prefix-shared path (and packed rows), then
prints one JSON object: tokens/s of each path, the speedups, the measured bf16 GEMM rate for the model's shapes,
the roofline fraction against it, MFU against the device's peak, peak GPU memory of each path and the max abs
difference of (c) vs (a).

Needs only torch (CUDA) and transformers next to this checkout (``pip install -e . --no-deps``); nothing is
downloaded. Any ``steer-reward bench`` option can be appended, e.g.::

    python benchmarks/gpu_bench.py                       # 8 prompts × G=8, prompts 256–1024, completions 32–512
    python benchmarks/gpu_bench.py --prompts 32 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULTS = [
    "bench", "--workload", "grpo", "--model", "shape:llama3-8b", "--device", "cuda", "--dtype", "bfloat16",
    "--prompts", "8", "--group-size", "8", "--repeats", "2",
    # H100/H200 SXM dense bf16 peak; pass --peak-tflops for another device.
    "--peak-tflops", "989",
    # A GPU forward costs milliseconds of kernel launches whatever its size, so trade padding for fewer forwards
    # a little more than on a CPU; much more (8192 was tried) makes auto skip prefix sharing for 8 × ~640-token
    # prompts and loses its 1.8x over bucketing (measured on an H200).
    "--set", "batching.forward_overhead_tokens=512",
    "--json",
]


def main() -> int:
    import torch

    from steer_reward.commands import bench

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible; run steer-reward bench --device cpu instead", file=sys.stderr)
        return 2
    # Only the bench subcommand is built, so optional extras of other subcommands need not be installed.
    parser = argparse.ArgumentParser(prog="gpu_bench")
    bench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(DEFAULTS + sys.argv[1:])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
