"""``steer-reward bench --backend deepspeed``: one GRPO workload on N ranks under ZeRO-3, three ways, in one run.

- (a) **TRL's ZeRO-3 reward path**: GRPOTrainer wraps a ``PreTrainedModel`` reward with ``trl.models.utils.
  prepare_deepspeed`` (the trainer's DeepSpeed config, its bucket sizes written as dotted keys DeepSpeed ignores)
  and runs ``reward_func(**inputs).logits[:, 0]`` on each rank's whole local batch, right-padded, in one forward.
- (b) **ZeRO-3 padded**: ``ZeroInferenceBackend`` with ``batching.strategy: padded`` (length-bucketed micro-batches,
  counts agreed across ranks).
- (c) **ZeRO-3 with steer-reward's plan**: the same backend with the configured strategy (``auto``: prefix sharing,
  many prompt groups per forward).

The samples are split across ranks in contiguous shares, as TRL's sampler hands a global batch to its processes
(groups may straddle two ranks). Every path runs between barriers, so a time is the slowest rank's; paths are
interleaved ``repeats`` times; the CPU seconds of all ranks are reported too. Launched by the command itself::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m steer_reward.bench.zero3 OPTIONS_JSON

Rank 0 prints one line ``ZERO3_BENCH {json}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

from steer_reward.bench.run import spread
from steer_reward.config import BatchingConfig

__all__ = ["REPORT_PREFIX", "main"]

REPORT_PREFIX = "ZERO3_BENCH "


def _barrier_time(run) -> tuple[float, float, object]:
    """(wall seconds of the slowest rank, CPU seconds summed over ranks, this rank's output)."""
    import torch.distributed as dist

    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = run()
    cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
    dist.barrier()
    elapsed = time.perf_counter() - start
    dist.all_reduce(cpu)
    return elapsed, float(cpu), out


def main(options: dict) -> dict | None:
    import deepspeed
    import torch.distributed as dist
    from trl.models.utils import prepare_deepspeed

    from steer_reward.backends.deepspeed import LastTokenHead, ZeroInferenceBackend, inference_config
    from steer_reward.bench.shapes import build_shape_model
    from steer_reward.bench.workloads import WorkloadSpec, build_workload
    from steer_reward.distributed import ensure_process_group, local_device, skip_cpu_shm_build
    from steer_reward.forward import pad_right

    skip_cpu_shm_build()
    ensure_process_group(options.get("timeout_s", 1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = local_device()
    dtype = options["dtype"]
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if rank == 0 else (lambda message: None)
    name = options["model"].removeprefix("shape:")

    # (a) TRL: a whole model on every rank, partitioned by deepspeed.initialize inside prepare_deepspeed.
    trl_model = build_shape_model(name, dtype=dtype, device=str(device))
    pad_id = trl_model.config.pad_token_id
    trainer_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == "bfloat16"},
                      "fp16": {"enabled": dtype == "float16"}, "steps_per_print": 2**31 - 1}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
        deepspeed_config=trainer_config)))
    trl_engine = prepare_deepspeed(trl_model, accelerator)
    # (b), (c): steer-reward's engine module on the same weights (same seed), partitioned with its own config.
    model = build_shape_model(name, dtype=dtype, device=str(device))
    engine, *_ = deepspeed.initialize(model=LastTokenHead(model),
                                      config=inference_config(dtype, model.config.hidden_size))
    engine.eval()
    batching = BatchingConfig(**options["batching"])
    padded = ZeroInferenceBackend(engine, pad_id, model.config.num_labels,
                                  dataclasses.replace(batching, strategy="padded"), device)
    steer = ZeroInferenceBackend(engine, pad_id, model.config.num_labels, batching, device)

    spec = WorkloadSpec("grpo", options["prompts"], options["group_size"], tuple(options["prompt_tokens"]),
                        tuple(options["completion_tokens"]), model.config.vocab_size, (pad_id,), options["seed"])
    everything = build_workload(spec)
    bounds = [len(everything) * r // world for r in range(world + 1)]
    samples = everything[bounds[rank]:bounds[rank + 1]]
    log(f"bench zero3: {world} ranks, {len(everything)} samples ({len(samples)} on rank 0), "
        f"{sum(len(s) for s in everything)} tokens")

    @torch.no_grad()
    def trl_path() -> torch.Tensor:
        input_ids, mask = pad_right([s.input_ids for s in samples], pad_id, device)
        return trl_engine(input_ids=input_ids, attention_mask=mask).logits.float().cpu()

    paths = {"trl_zero3": trl_path, "padded_zero3": lambda: padded.attributes(samples),
             "steer_zero3": lambda: steer.attributes(samples)}
    _barrier_time(lambda: padded.attributes(samples[:1]))  # warm-up: trace, allocator, thread pools
    timings: dict[str, list[float]] = {name: [] for name in paths}
    cpu_timings: dict[str, list[float]] = {name: [] for name in paths}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(options["repeats"]):
        for path, run in paths.items():
            elapsed, cpu, outputs[path] = _barrier_time(run)
            timings[path].append(elapsed)
            cpu_timings[path].append(cpu)
            log(f"bench zero3: repeat {repeat + 1}/{options['repeats']} {path}: {elapsed:.2f} s")
    diffs = torch.tensor([float((outputs[p] - outputs["trl_zero3"]).abs().max()) if len(samples) else 0.0
                          for p in paths], dtype=torch.float64)
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    forwards = torch.tensor([len(padded.plan(samples)), len(steer.plan(samples))])
    dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
    seconds = {p: min(t) for p, t in timings.items()}
    cpu_seconds = {p: min(t) for p, t in cpu_timings.items()}
    total = sum(len(s) for s in everything)
    report = {
        "workload": {"name": "grpo", "model": options["model"], "dtype": dtype, "device": str(device),
                     "ranks": world, "samples": len(everything), "prompts": options["prompts"],
                     "group_size": options["group_size"], "tokens": total, "repeats": options["repeats"]},
        "paths": {p: {"seconds": seconds[p], "seconds_spread": spread(timings[p]), "tokens_per_s": total / seconds[p],
                      "cpu_seconds": cpu_seconds[p], "cpu_seconds_spread": spread(cpu_timings[p]),
                      "max_abs_diff_vs_trl": float(d)} for p, d in zip(paths, diffs.tolist())},
        "steer_strategy": steer.strategy,
        "forwards_per_rank": {"padded_zero3": int(forwards[0]), "steer_zero3": int(forwards[1])},
        "speedup_vs_trl_zero3": seconds["trl_zero3"] / seconds["steer_zero3"],
        "speedup_vs_padded_zero3": seconds["padded_zero3"] / seconds["steer_zero3"],
        "speedup_vs_padded_zero3_spread": spread([p / s for p, s in zip(timings["padded_zero3"],
                                                                         timings["steer_zero3"])]),
        "speedup_vs_trl_zero3_spread": spread([t / s for t, s in zip(timings["trl_zero3"], timings["steer_zero3"])]),
        # CPU seconds of all ranks together: on a machine shared with other jobs, time spent waiting for a core is
        # not counted (time waiting for another rank in a collective mostly is not either).
        "cpu_time": {"speedup_vs_trl_zero3": cpu_seconds["trl_zero3"] / cpu_seconds["steer_zero3"],
                     "speedup_vs_padded_zero3": cpu_seconds["padded_zero3"] / cpu_seconds["steer_zero3"]},
    }
    dist.barrier()
    if rank == 0:
        print(REPORT_PREFIX + json.dumps(report), flush=True)
    dist.destroy_process_group()
    return report if rank == 0 else None


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(json.loads(sys.argv[1]))
