"""``steer-reward bench --workload openrlhf-client --ray-replicas N``: OpenRLHF's GRPO request pattern against the
plain server and Ray Serve deployments of the same model, all up at once and measured in turns.

Targets: (a) ``steer-reward serve`` (one process); (d1) Ray Serve with 1 replica (what the gateway hop costs);
(dN) N replicas with prompt affinity; (dN') N replicas, least-loaded routing only. Every target is up during the
whole run and the timed runs alternate between targets (repeat r times, each keeps its fastest), so a machine whose
load changes (a shared CI box) changes every target alike. Each repeat sends new prompts (another seed), so no
prompt is cached from an earlier repeat; prompt prefills are counted from each target's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["run_ray_client_bench"]


def _opt(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def run_ray_client_bench(args: Any) -> dict:
    """Run the comparison, print a table and ratios; returns the numbers (JSON on stdout with ``--json``)."""
    import ray
    from ray import serve

    from steer_reward.quiet import quiet_transformers
    from steer_reward.config import load_config, parse_override
    from steer_reward.errors import InputError
    from steer_reward.server.bench import (bench_model_dir, drive_requests, grpo_workload, prompt_prefills,
                                           shape_model_dir)
    from steer_reward.server.process import ServerProcess, free_port
    from steer_reward.server.ray_serve import reward_application

    quiet_transformers()
    replicas = int(args.ray_replicas)
    if replicas < 1:
        raise InputError(f"--ray-replicas must be at least 1, got {replicas}")
    dtype, device = _opt(args, "dtype", "float32"), _opt(args, "device", "cpu")
    model = _opt(args, "model", None) or str(bench_model_dir())
    if model.startswith("shape:"):
        model = str(shape_model_dir(model.split(":", 1)[1], dtype, device))
    prompts, group = int(_opt(args, "prompts", 8)), int(_opt(args, "group_size", 8))
    prompt_tokens, completion_tokens = int(_opt(args, "prompt_tokens", 300)), int(_opt(args, "completion_tokens", 80))
    in_flight, repeats = int(_opt(args, "in_flight", 64)), int(_opt(args, "repeats", 2))
    overrides = dict(parse_override(o) for o in _opt(args, "overrides", []))
    overrides.update({"model.path": model, "model.dtype": dtype, "model.device": device})
    config_path = _opt(args, "config", None)
    load_config(config_path, overrides)  # a bad override fails here, before anything starts
    workloads = [grpo_workload(_tokenizer(model), prompts, group, prompt_tokens, completion_tokens, seed=r)
                 for r in range(repeats + 1)]  # the last one warms every target up, untimed
    log = sys.stderr
    cpus = os.cpu_count() or 1
    print(f"OpenRLHF GRPO pattern: {prompts} prompts x {group} samples = {prompts * group} one-sample requests, "
          f"{in_flight} in flight, prompts ~{prompt_tokens} and completions ~{completion_tokens} tokens; model {model} "
          f"({dtype}, {device}); Ray Serve with 1 and {replicas} replicas; {repeats} interleaved repeats",
          file=log, flush=True)

    logs = Path(tempfile.mkdtemp(prefix="steer-reward-ray-bench-"))
    serve_args = (["--config", config_path] if config_path else []) + ["--model", model] + [
        a for k, v in overrides.items() if k != "model.path" for a in ("--set", f"{k}={v}")]
    plain = ServerProcess(serve_args, log_path=logs / "server.log")
    apps = {"ray_1": (1, True), f"ray_{replicas}_affinity": (replicas, True),
            f"ray_{replicas}_no_affinity": (replicas, False)}
    if replicas == 1:
        del apps["ray_1_affinity"]
    # Logical CPUs: every replica of every application gets the share it would have alone on this machine.
    ray.init(num_cpus=cpus * len(apps), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls = {}
        for name, (count, affinity) in apps.items():
            config = load_config(config_path, {**overrides, "server.replicas": count, "server.affinity": affinity,
                                               "server.replica_cpus": max(0.5, cpus / count)})
            serve.run(reward_application(config), name=name, route_prefix=f"/{name}")
            urls[name] = f"http://127.0.0.1:{port}/{name}"
        with plain:
            urls = {"server": plain.url, **urls}
            results = _measure(urls, workloads, in_flight, drive_requests, prompt_prefills, log)
    finally:
        serve.shutdown()
        ray.shutdown()
    return _report(results, replicas, prompts, getattr(args, "json", False))


def _tokenizer(model: str) -> Any:
    from steer_reward.modeling import load_tokenizer, model_folder

    return load_tokenizer(model_folder(model))


def _measure(urls: dict, workloads: list, in_flight: int, drive: Any, prefills: Any, log: Any) -> dict:
    warm = workloads[-1]
    for url in urls.values():
        asyncio.run(drive(url + "/get_reward", warm[:8], 8))
    results = {name: {"seconds": float("inf"), "prompt_prefills": [], "rewards": []} for name in urls}
    for repeat, bodies in enumerate(workloads[:-1]):
        for name, url in urls.items():
            before = prefills(url)
            rewards, latencies, seconds = asyncio.run(drive(url + "/get_reward", bodies, in_flight))
            after = prefills(url)
            run = results[name]
            run["prompt_prefills"].append(None if before is None or after is None else after - before)
            run["rewards"].append(rewards)
            if seconds < run["seconds"]:
                run.update(seconds=seconds, requests_per_s=len(bodies) / seconds,
                           p50_ms=1000 * sorted(latencies)[len(latencies) // 2])
            print(f"  repeat {repeat + 1} {name}: {len(bodies) / seconds:.2f} req/s, prompt prefills "
                  f"{run['prompt_prefills'][-1]}", file=log, flush=True)
    return results


def _report(results: dict, replicas: int, prompts: int, as_json: bool) -> dict:
    import torch

    plain = results["server"]
    on = results["ray_1" if replicas == 1 else f"ray_{replicas}_affinity"]
    off = results[f"ray_{replicas}_no_affinity"]
    summary = {
        "requests_per_s": {name: r["requests_per_s"] for name, r in results.items()},
        "p50_ms": {name: r["p50_ms"] for name, r in results.items()},
        "prompt_prefills_per_repeat": {name: r["prompt_prefills"] for name, r in results.items()},
        "distinct_prompts_per_repeat": prompts,
        "ray_1_over_server": results["ray_1"]["requests_per_s"] / plain["requests_per_s"],
        "affinity_over_no_affinity": on["requests_per_s"] / off["requests_per_s"],
        "max_abs_reward_diff_vs_server": {
            name: max(float(torch.tensor(a).sub(torch.tensor(b)).abs().max())
                      for a, b in zip(r["rewards"], plain["rewards"])) for name, r in results.items()},
    }
    lines = [f"\n{'':<28}{'req/s':>9}{'p50 ms':>9}  prompt prefills per repeat ({prompts} distinct prompts)"]
    for name, r in results.items():
        lines.append(f"{name:<28}{r['requests_per_s']:>9.2f}{r['p50_ms']:>9.0f}  {r['prompt_prefills']}")
    lines.append(f"\nRay 1 replica / plain server = {100 * summary['ray_1_over_server']:.0f}%   affinity on / off with "
                 f"{replicas} replicas = {summary['affinity_over_no_affinity']:.2f}x   max |reward - server| = "
                 f"{max(summary['max_abs_reward_diff_vs_server'].values()):.2e}")
    print("\n".join(lines), file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(json.dumps(summary, indent=2))
    return summary
