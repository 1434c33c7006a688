#!/usr/bin/env python
"""GPU benchmark, one command, a few minutes: a Llama-3-8B-shaped random reward model in bf16 on one GPU.

Measures, in one run, and prints one JSON object:

1. **scoring paths**, on the same 8 prompts × G=8 samples (prompts 256–1024, completions 32–512 tokens):
   (a) TRL's reward-model path (right-padded chunks of the per-device batch), (b) length-bucketed padded
   micro-batches, (c) steer-reward's path (prefix sharing, many prompt groups per ragged forward), and with
   ``--compile`` (c) again with ``torch.compile``d decoder MLPs and RMSNorms (dynamic shapes: ragged forwards change
   length every call, so no CUDA graphs); tokens/s, the measured bf16 GEMM rate, MFU of every path against the
   device's peak (``--peak-tflops``, default 989 for H100/H200 SXM dense bf16), peak GPU memory and max |Δ| vs (a);
2. **the server on OpenRLHF's GRPO request pattern** (one sample per request, all in flight): ``steer-reward serve``
   against a serve_rm.py-style baseline doing one forward per request, and in-process batched scoring
   (``--server-prompts 0`` skips it).

Needs only torch (CUDA) and transformers next to this checkout (``pip install -e . --no-deps``; the server part
also needs the ``server`` extra); nothing is downloaded::

    python benchmarks/gpu_bench.py                       # everything above, --compile to add the compiled variant
    python benchmarks/gpu_bench.py --prompts 32 --set batching.forward_overhead_tokens=1024

``--device cpu --model shape:tiny`` runs the same code end to end on a CPU in seconds (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="shape:llama3-8b", help="shape:NAME (random weights) or a model folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", default="256-1024")
    parser.add_argument("--completion-tokens", default="32-512")
    parser.add_argument("--trl-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100/H200 SXM bf16: 989)")
    parser.add_argument("--compile", action="store_true", help="also time (c) with torch.compile'd MLPs and norms")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use eager)")
    parser.add_argument("--server-prompts", type=int, default=16, help="server benchmark prompts (0: skip it)")
    parser.add_argument("--server-in-flight", type=int, default=64)
    parser.add_argument("--server-prompt-tokens", type=int, default=600)
    parser.add_argument("--server-completion-tokens", type=int, default=150)
    # A GPU forward costs milliseconds of kernel launches whatever its size (measured on an H200).
    parser.add_argument("--set", dest="overrides", action="append",
                        default=["batching.forward_overhead_tokens=512"], metavar="KEY=VALUE")
    parser.add_argument("--out", help="also write the JSON here")
    return parser.parse_args(argv)


@contextlib.contextmanager
def compiled_pointwise(backbone, backend: str = "inductor"):
    """Within the block, every decoder layer's MLP and RMSNorms (and the final norm) run ``torch.compile``d.

    Only the element-wise chains around the GEMMs fuse (RMSNorm's five passes, SiLU·up); attention keeps the ragged
    attention function. Compiled with dynamic shapes because ragged forwards change length every call; CUDA graphs
    would need one graph per length. Compiled functions are cached on the modules across blocks.
    """
    import torch

    modules = [backbone.norm] + [m for layer in backbone.layers
                                 for m in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)]
    previous = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        if "_steer_compiled" not in module.__dict__:
            module.__dict__["_steer_compiled"] = torch.compile(type(module).forward.__get__(module), dynamic=True,
                                                                 backend=backend)
        module.forward = module.__dict__["_steer_compiled"]
    try:
        yield
    finally:
        for module, forward in zip(modules, previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def scoring_paths(args: argparse.Namespace) -> dict:
    import torch

    from steer_reward.backends.local import LocalBackend
    from steer_reward.bench import run as bench_run
    from steer_reward.bench.workloads import parse_range
    from steer_reward.config import load_config, parse_override

    config = load_config(None, dict(parse_override(o) for o in args.overrides))
    options = bench_run.BenchOptions(
        workload="grpo", model=args.model, device=args.device, dtype=args.dtype, prompts=args.prompts,
        group_size=args.group_size, prompt_tokens=parse_range(args.prompt_tokens),
        completion_tokens=parse_range(args.completion_tokens, minimum=0), batching=config.batching,
        trl_batch=args.trl_batch, repeats=args.repeats, peak_tflops=args.peak_tflops)
    extra = {}
    if args.compile:
        def compiled(model, pad_id, samples):
            backend = LocalBackend(model, pad_id, config.batching)

            def run() -> torch.Tensor:
                with compiled_pointwise(backend.head.backbone, args.compile_backend):
                    return backend.attributes(samples)
            return run
        extra["steer_compiled"] = compiled
    return bench_run.run_bench(dataclasses.replace(options), extra_paths=extra)


def server_pattern(args: argparse.Namespace) -> dict:
    from steer_reward.server.bench import run_openrlhf_client_bench

    namespace = SimpleNamespace(model=args.model, dtype=args.dtype, device=args.device, prompts=args.server_prompts,
                                group_size=args.group_size, prompt_tokens=args.server_prompt_tokens,
                                completion_tokens=args.server_completion_tokens, in_flight=args.server_in_flight,
                                overrides=args.overrides, config=None, json=None)
    with contextlib.redirect_stdout(sys.stderr):  # its table goes to the log; stdout carries one JSON object
        return run_openrlhf_client_bench(namespace)


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible; pass --device cpu (with --model shape:tiny for a smoke run)",
              file=sys.stderr)
        return 2
    report = {"scoring": scoring_paths(args)}
    if args.server_prompts > 0:
        report["server"] = server_pattern(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
