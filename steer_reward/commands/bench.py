"""``steer-reward bench``: in one run, TRL's reward-model path vs padded micro-batches vs steer-reward's fast path.

``--workload openrlhf-client`` is the server benchmark (``steer_reward.server.bench``); it shares the generic
options and fills its own defaults.
"""

from __future__ import annotations

import argparse
import json
import sys

from steer_reward.commands.common import add_reward_args

__all__ = ["register"]

CPU_DEFAULTS = {"model": "shape:cpu-30m", "dtype": "float32", "prompts": 2}
CUDA_DEFAULTS = {"model": "shape:llama3-8b", "dtype": "bfloat16", "prompts": 32}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time TRL's RM path, padded micro-batches and steer-reward's fast path on one workload",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", choices=["grpo", "mixed", "openrlhf-client"], default="grpo",
                        help="grpo: prompts × group-size completions; mixed: groups and single completions "
                             "alternate; openrlhf-client: one-sample HTTP requests against the server")
    add_reward_args(parser)
    parser.set_defaults(model=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--prompts", type=int, default=None, help="unique prompts (default: 2 on cpu, 32 on cuda)")
    parser.add_argument("--group-size", type=int, default=None, help="completions per prompt (default: 8)")
    parser.add_argument("--prompt-tokens", default=None, metavar="LO-HI", help="prompt lengths (default: 256-1024; openrlhf-client: one number)")
    parser.add_argument("--completion-tokens", default=None, metavar="LO-HI",
                        help="completion lengths (default: 32-512; openrlhf-client: one number)")
    parser.add_argument("--in-flight", type=int, default=None, help="openrlhf-client: concurrent requests")
    parser.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                        help="openrlhf-client: the plain server against Ray Serve with 1 replica and with N "
                             "replicas (prompt affinity on and off), all up at once, measured in turns; needs "
                             "steer-reward[ray]")
    parser.add_argument("--trl-batch", type=int, default=16,
                        help="per-device batch of TRL's path: samples per right-padded forward (default: 16)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; each path keeps its fastest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak TFLOP/s (e.g. 989 for H100/H200 bf16 dense) to also report MFU")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace):
    from steer_reward.bench.run import BenchOptions
    from steer_reward.bench.workloads import parse_range
    from steer_reward.config import load_config, parse_override
    from steer_reward.errors import InputError

    device = args.device or "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    defaults = CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    config = load_config(args.config, dict(parse_override(o) for o in args.overrides))
    try:
        ranges = {"prompt_tokens": parse_range(args.prompt_tokens or "256-1024"),
                  "completion_tokens": parse_range(args.completion_tokens or "32-512", minimum=0)}
    except ValueError as err:
        raise InputError(str(err)) from None
    for name in ("prompts", "group_size", "trl_batch", "repeats"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return BenchOptions(
        workload=args.workload, model=args.model or defaults["model"], device=device,
        dtype=args.dtype or defaults["dtype"], prompts=args.prompts or defaults["prompts"],
        group_size=args.group_size or 8, batching=config.batching, trl_batch=args.trl_batch,
        repeats=args.repeats, seed=args.seed, peak_tflops=args.peak_tflops, **ranges,
    )


def _table(report: dict) -> str:
    w = report["workload"]
    lines = [f"{w['name']} on {w['model']} ({w['dtype']}, {w['device']}): "
             f"{w['samples']} samples, {w['tokens']} tokens, {w['unique_tokens']} unique, "
             f"{w['useful_gflop']:.1f} useful GFLOP",
             f"{'path':<10}{'seconds':>10}{'tokens/s':>12}{'roofline':>10}{'max|Δ| vs trl':>15}"]
    for name, path in report["paths"].items():
        lines.append(f"{name:<10}{path['seconds']:>10.2f}{path['tokens_per_s']:>12.0f}"
                     f"{report['roofline_fraction_by_path'][name]:>10.2f}"
                     f"{report['max_abs_diff_by_path'][name]:>15.2e}")
    lines.append(f"steer strategy: {report['paths']['steer']['strategy']}; speedup vs trl "
                 f"{report['speedup_vs_trl']:.2f}x, vs bucketed {report['speedup_vs_bucketed']:.2f}x; "
                 f"GEMM {report['gemm_gflops']:.0f} GFLOP/s, compute floor {report['compute_floor_s']:.2f} s")
    if "mfu" in report:
        lines.append(f"MFU of steer path: {report['mfu']:.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.workload == "openrlhf-client" and args.ray_replicas is not None:
        from steer_reward.server.ray_bench import run_ray_client_bench

        run_ray_client_bench(args)  # prints its own report
        return 0
    if args.workload == "openrlhf-client":
        from steer_reward.server.bench import run_openrlhf_client_bench

        run_openrlhf_client_bench(args)  # prints its own report
        return 0
    from steer_reward.bench.run import run_bench

    report = run_bench(_options(args))
    print(json.dumps(report) if args.json else _table(report), file=sys.stdout)
    return 0
