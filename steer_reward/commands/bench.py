"""``steer-reward bench``: in one run, TRL's reward-model path vs padded micro-batches vs steer-reward's fast path.

``--workload openrlhf-client`` is the server benchmark (``steer_reward.server.bench``); it shares the generic
options and fills its own defaults. ``--backend deepspeed`` runs the grpo workload under ZeRO-3 on ``--ranks``
processes it launches itself (``steer_reward.bench.zero3``): TRL's ZeRO-3 reward path vs ZeRO-3 padded micro-batches
vs ZeRO-3 with steer-reward's plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
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
    parser.add_argument("--prompt-tokens", default=None, metavar="LO-HI",
                        help="prompt lengths (default: 256-1024; openrlhf-client: one number)")
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
    parser.add_argument("--backend", choices=["local", "deepspeed"], default="local",
                        help="deepspeed: the grpo workload under ZeRO-3 on --ranks processes launched by this command "
                             "(needs the deepspeed and trl extras)")
    parser.add_argument("--ranks", type=int, default=2, help="--backend deepspeed: processes (default: 2)")
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
             f"{'path':<10}{'seconds':>10}{'(median, max)':>16}{'tokens/s':>10}{'roofline':>10}{'peak MiB':>10}"
             f"{'max|Δ| vs trl':>15}"]
    for name, path in report["paths"].items():
        spread = "({median:.2f}, {max:.2f})".format(**path["seconds_spread"])
        memory = "-" if path["peak_memory_mb"] is None else f"{path['peak_memory_mb']:.0f}"
        lines.append(f"{name:<10}{path['seconds']:>10.2f}{spread:>16}{path['tokens_per_s']:>10.0f}"
                     f"{report['roofline_fraction_by_path'][name]:>10.2f}{memory:>10}"
                     f"{report['max_abs_diff_by_path'][name]:>15.2e}")
    trl, bucketed = report["speedup_vs_trl_spread"], report["speedup_vs_bucketed_spread"]
    lines.append(f"steer strategy: {report['paths']['steer']['strategy']} ({report['paths']['steer']['forwards']} "
                 f"forwards); speedup vs trl {report['speedup_vs_trl']:.2f}x (per repeat {trl['min']:.2f}–"
                 f"{trl['max']:.2f}), vs bucketed {report['speedup_vs_bucketed']:.2f}x (per repeat "
                 f"{bucketed['min']:.2f}–{bucketed['max']:.2f}); GEMM {report['gemm_gflops']:.0f} GFLOP/s, compute "
                 f"floor {report['compute_floor_s']:.2f} s")
    if "cpu_time" in report:
        cpu = report["cpu_time"]
        lines.append(f"CPU time of this process (less sensitive to other jobs on the machine): speedup vs trl "
                     f"{cpu['speedup_vs_trl']:.2f}x, vs bucketed {cpu['speedup_vs_bucketed']:.2f}x, roofline "
                     f"{cpu['roofline_fraction']:.2f} (GEMM {cpu['gemm_gflops_per_cpu_s']:.0f} GFLOP per CPU-s)")
    if report.get("memory_vs_bucketed"):
        lines.append(f"peak memory of steer / bucketed: {report['memory_vs_bucketed']:.2f}")
    if "mfu" in report:
        lines.append(f"MFU of steer path: {report['mfu']:.3f}")
    return "\n".join(lines)


def _zero3_table(report: dict) -> str:
    w = report["workload"]
    lines = [f"{w['name']} on {w['model']} ({w['dtype']}, {w['device']}), ZeRO-3 on {w['ranks']} ranks: "
             f"{w['samples']} samples, {w['tokens']} tokens",
             f"{'path':<14}{'seconds':>10}{'(median, max)':>16}{'tokens/s':>10}{'max|Δ| vs trl':>15}"]
    for name, path in report["paths"].items():
        spread = "({median:.2f}, {max:.2f})".format(**path["seconds_spread"])
        lines.append(f"{name:<14}{path['seconds']:>10.2f}{spread:>16}{path['tokens_per_s']:>10.0f}"
                     f"{path['max_abs_diff_vs_trl']:>15.2e}")
    padded = report["speedup_vs_padded_zero3_spread"]
    lines.append(f"steer strategy: {report['steer_strategy']}; forwards per rank {report['forwards_per_rank']}; "
                 f"speedup vs TRL ZeRO-3 {report['speedup_vs_trl_zero3']:.2f}x, vs ZeRO-3 padded "
                 f"{report['speedup_vs_padded_zero3']:.2f}x (per repeat {padded['min']:.2f}–{padded['max']:.2f})")
    cpu = report["cpu_time"]
    lines.append(f"CPU time of all ranks: speedup vs TRL ZeRO-3 {cpu['speedup_vs_trl_zero3']:.2f}x, vs ZeRO-3 padded "
                 f"{cpu['speedup_vs_padded_zero3']:.2f}x")
    return "\n".join(lines)


def run_zero3(args: argparse.Namespace) -> dict:
    """Launch ``steer_reward.bench.zero3`` on ``--ranks`` processes and return rank 0's report."""
    import importlib.util

    from steer_reward.bench.zero3 import REPORT_PREFIX
    from steer_reward.errors import InputError, MissingExtraError

    # Found, not imported: importing deepspeed here prints to stdout, which --json keeps for the report.
    for module, extra in (("deepspeed", "deepspeed"), ("trl", "trl")):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(f"{module} is not installed; install it with: pip install 'steer-reward[{extra}]'")
    options = _options(args)
    if options.workload != "grpo":
        raise InputError("--backend deepspeed runs the grpo workload only")
    if not options.model.startswith("shape:"):
        raise InputError("--backend deepspeed benchmarks a named shape (--model shape:NAME); it builds the same "
                         "seeded weights on every rank")
    if args.ranks < 1:
        raise InputError(f"--ranks must be positive, got {args.ranks}")
    payload = {"model": options.model, "dtype": options.dtype, "prompts": options.prompts,
               "group_size": options.group_size, "prompt_tokens": options.prompt_tokens,
               "completion_tokens": options.completion_tokens, "repeats": options.repeats, "seed": options.seed,
               "batching": dataclasses.asdict(options.batching)}
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
           "-m", "steer_reward.bench.zero3", json.dumps(payload)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(REPORT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the ZeRO-3 benchmark ranks exited with {proc.returncode} (their log is above)")
    return json.loads(lines[-1][len(REPORT_PREFIX):])


def run(args: argparse.Namespace) -> int:
    if args.backend == "deepspeed":
        report = run_zero3(args)
        print(json.dumps(report) if args.json else _zero3_table(report), file=sys.stdout)
        return 0
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
