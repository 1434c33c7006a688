"""One benchmark run: the same samples through (a) TRL's reward-model path, (b) length-bucketed padded micro-batches
and (c) steer-reward's configured fast path (plus packed rows, for the packing-vs-bucketing choice).

(a) is what GRPOTrainer does with a ``PreTrainedModel`` reward: the per-device batch right-padded to its longest
sequence and one forward of the model (``model(input_ids, attention_mask).logits``), in chunks of
``trl_batch`` samples. Paths run interleaved ``repeats`` times; each reports its fastest repeat (and the median and
slowest, the spread), so a burst of load from other processes on a shared machine shows as one slow repeat rather
than a wrong ratio.

Peak memory of each path: on a GPU, torch's allocator peak during the timed runs; on the CPU, the peak of the bytes
torch allocated during one extra, untimed run of the path (``cpu_peak_allocated``), so paths are compared at the
same ``batching.max_tokens``.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from steer_reward.backends.local import LocalBackend
from steer_reward.bench.roofline import gemm_throughput, synchronize, unique_tokens, useful_flops
from steer_reward.bench.shapes import build_shape_model, non_embedding_params
from steer_reward.bench.workloads import WorkloadSpec, build_workload
from steer_reward.config import BatchingConfig
from steer_reward.formatting import EncodedSample
from steer_reward.forward import pad_right

__all__ = ["BenchOptions", "run_bench", "load_bench_model", "cpu_peak_allocated", "spread"]


@dataclass
class BenchOptions:
    workload: str = "grpo"
    model: str = "shape:cpu-30m"
    device: str = "cpu"
    dtype: str = "float32"
    prompts: int = 2
    group_size: int = 8
    prompt_tokens: tuple[int, int] = (256, 1024)
    completion_tokens: tuple[int, int] = (32, 512)
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    """Batching of paths (b) and (c); (b) forces ``strategy: padded``."""
    trl_batch: int = 16
    repeats: int = 2
    seed: int = 0
    peak_tflops: float | None = None
    """Vendor peak of the device in TFLOP/s, for MFU next to the measured-GEMM roofline."""
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)


def load_bench_model(name: str, device: str, dtype: str):
    """(model, pad id, vocab size, special ids) for ``shape:NAME``, ``demo`` or a reward-model folder."""
    if name.startswith("shape:"):
        model = build_shape_model(name[len("shape:"):], dtype=dtype, device=device)
        pad = model.config.pad_token_id
        return model, pad, model.config.vocab_size, (pad,)
    from steer_reward.quiet import quiet_transformers
    from steer_reward.config import ModelConfig
    from steer_reward.modeling import load_reward_model

    quiet_transformers()
    model, tokenizer, _ = load_reward_model(ModelConfig(path=name, device=device, dtype=dtype))
    return model.eval(), tokenizer.pad_token_id, len(tokenizer), tuple(tokenizer.all_special_ids)


def cpu_peak_allocated(run: Callable[[], object]) -> float:
    """Peak MiB that torch's CPU allocator held for tensors allocated during ``run()`` (over what it held before).

    Read from the allocation events of ``torch.profiler`` with ``profile_memory``: each event carries the running
    total of bytes allocated and not yet freed since profiling started.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
    return peak / 2**20


def spread(values: Sequence[float]) -> dict:
    """Fastest, median and slowest of the repeats."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@torch.inference_mode()
def trl_path(model, samples: Sequence[EncodedSample], pad_id: int, chunk: int) -> torch.Tensor:
    """GRPOTrainer's reward-model path: right-padded chunks of the per-device batch. Shape: ``(n, K)``."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(samples), chunk):
        input_ids, mask = pad_right([s.input_ids for s in samples[start:start + chunk]], pad_id, device)
        parts.append(model(input_ids=input_ids, attention_mask=mask).logits.float().cpu())
    return torch.cat(parts)


PathFactory = Callable[[torch.nn.Module, int, Sequence[EncodedSample]], Callable[[], torch.Tensor]]
"""``(model, pad id, samples) → run`` for an extra path: ``run()`` returns ``(n, K)`` scores in input order."""


def run_bench(options: BenchOptions, extra_paths: dict[str, PathFactory] | None = None) -> dict:
    """Time the paths on one workload and return the report (see ``steer-reward bench --help``); ``extra_paths``
    are timed alongside (e.g. a compiled variant of the fast path)."""
    log = options.log
    device = torch.device(options.device)
    log(f"bench: building model {options.model} ({options.dtype} on {device})")
    model, pad_id, vocab, special = load_bench_model(options.model, options.device, options.dtype)
    config = model.config
    spec = WorkloadSpec(options.workload, options.prompts, options.group_size, options.prompt_tokens,
                        options.completion_tokens, vocab, tuple(special), options.seed)
    samples = build_workload(spec)
    total = sum(len(s) for s in samples)
    unique = unique_tokens(samples)
    n_params = non_embedding_params(model)
    flops = useful_flops(samples, n_params, config.num_hidden_layers, config.hidden_size)
    log(f"bench: {len(samples)} samples, {total} tokens ({unique} unique), {flops / 1e9:.1f} useful GFLOP")

    bucketed = LocalBackend(model, pad_id, dataclasses.replace(options.batching, strategy="padded"))
    steer = LocalBackend(model, pad_id, options.batching)
    packed = LocalBackend(model, pad_id, dataclasses.replace(options.batching, strategy="packed"))
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "trl": lambda: trl_path(model, samples, pad_id, options.trl_batch),
        "bucketed": lambda: bucketed.attributes(samples),
        "steer": lambda: steer.attributes(samples),
    }
    if packed.strategy == "packed" and steer.strategy != "packed":
        paths["packed"] = lambda: packed.attributes(samples)
    for name, factory in (extra_paths or {}).items():
        paths[name] = factory(model, pad_id, samples)

    with torch.inference_mode():  # warm-up: kernels, allocator, thread pools
        trl_path(model, samples[:1], pad_id, 1)
    timings: dict[str, list[float]] = {name: [] for name in paths}
    cpu_timings: dict[str, list[float]] = {name: [] for name in paths}
    peak: dict[str, float | None] = {name: None for name in paths}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(options.repeats):
        for name, run in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = run()
            synchronize(device)
            elapsed = time.perf_counter() - start
            timings[name].append(elapsed)
            cpu_timings[name].append(time.process_time() - cpu_start)
            if device.type == "cuda":
                peak[name] = max(peak[name] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
            log(f"bench: repeat {repeat + 1}/{options.repeats} {name}: {elapsed:.2f} s")
    seconds = {name: min(values) for name, values in timings.items()}
    if device.type == "cpu":
        log("bench: measuring peak CPU memory of each path (one untimed run each)")
        for name, run in paths.items():
            peak[name] = cpu_peak_allocated(run)

    log("bench: measuring GEMM throughput for the model's linear shapes")
    gemm = gemm_throughput(config, next(model.parameters()).dtype, device)
    cpu_seconds = {name: min(values) for name, values in cpu_timings.items()}
    report_paths = {
        name: {"seconds": seconds[name], "seconds_spread": spread(timings[name]), "tokens_per_s": total / seconds[name],
               "unique_tokens_per_s": unique / seconds[name], "peak_memory_mb": peak[name]}
        for name in paths
    }
    report_paths["steer"]["strategy"] = steer.strategy
    report_paths["steer"]["forwards"] = len(steer.plan(samples))
    report_paths["bucketed"]["forwards"] = len(bucketed.plan(samples))
    reference = outputs["trl"]
    report = {
        "workload": {"name": options.workload, "model": options.model, "device": str(device),
                     "dtype": options.dtype, "samples": len(samples), "prompts": options.prompts,
                     "group_size": options.group_size, "tokens": total, "unique_tokens": unique,
                     "non_embedding_params": n_params, "useful_gflop": flops / 1e9, "trl_batch": options.trl_batch,
                     "repeats": options.repeats},
        "paths": report_paths,
        "speedup_vs_trl": seconds["trl"] / seconds["steer"],
        "speedup_vs_bucketed": seconds["bucketed"] / seconds["steer"],
        # Per repeat (paths interleaved): how far the ratio moved while the machine's load changed.
        "speedup_vs_trl_spread": spread([t / s for t, s in zip(timings["trl"], timings["steer"])]),
        "speedup_vs_bucketed_spread": spread([b / s for b, s in zip(timings["bucketed"], timings["steer"])]),
        "memory_vs_bucketed": (peak["steer"] / peak["bucketed"]) if peak["steer"] and peak["bucketed"] else None,
        "gemm_gflops": gemm / 1e9,
        "compute_floor_s": flops / gemm,
        "roofline_fraction": flops / (seconds["steer"] * gemm),
        "roofline_fraction_by_path": {name: flops / (s * gemm) for name, s in seconds.items()},
        "max_abs_diff": float((outputs["steer"] - reference).abs().max()),
        "max_abs_diff_by_path": {name: float((out - reference).abs().max()) for name, out in outputs.items()},
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cpu":
        # CPU time of this process: on a CPU shared with other jobs, time spent waiting for a core is not counted,
        # so these ratios move much less with the machine's load than wall-clock ones.
        gemm_cpu = gemm_throughput(config, next(model.parameters()).dtype, device, clock=time.process_time)
        for name in paths:
            report_paths[name]["cpu_seconds"] = cpu_seconds[name]
            report_paths[name]["cpu_seconds_spread"] = spread(cpu_timings[name])
        report["cpu_time"] = {
            "speedup_vs_trl": cpu_seconds["trl"] / cpu_seconds["steer"],
            "speedup_vs_bucketed": cpu_seconds["bucketed"] / cpu_seconds["steer"],
            "gemm_gflops_per_cpu_s": gemm_cpu / 1e9,
            "roofline_fraction": flops / (cpu_seconds["steer"] * gemm_cpu),
            "roofline_fraction_by_path": {name: flops / (s * gemm_cpu) for name, s in cpu_seconds.items()},
        }
    if options.peak_tflops:
        report["mfu"] = flops / (seconds["steer"] * options.peak_tflops * 1e12)
        report["mfu_by_path"] = {name: flops / (s * options.peak_tflops * 1e12) for name, s in seconds.items()}
    return report
