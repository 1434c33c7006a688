"""Useful FLOPs of a workload and the machine's measured GEMM throughput for a model's linear shapes.

Useful FLOPs count each unique token once (a prompt shared by G completions counts once): ``2·N`` per token for
the non-embedding parameters, and ``4·L·d·c`` for attention (QKᵀ and AV over the token's ``c`` context
positions) — for one sequence of T tokens that sums to DESIGN.md's ``2·N·T + 2·L·d·T²``.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from steer_reward.formatting import EncodedSample
from steer_reward.planning import key_value_shape
from steer_reward.prefix_sharing import group_by_prompt

__all__ = ["useful_flops", "unique_tokens", "linear_shapes", "gemm_throughput", "synchronize"]


def _context_sum(start: int, count: int) -> int:
    """Σ of context lengths for ``count`` tokens at positions start..start+count-1 (context = position + 1)."""
    return count * start + count * (count + 1) // 2


def unique_tokens(samples: Sequence[EncodedSample]) -> int:
    return sum(len(g.prompt_ids) + sum(len(samples[i].completion_ids) for i in g.members)
               for g in group_by_prompt(samples))


def useful_flops(samples: Sequence[EncodedSample], non_embedding_params: int, layers: int, hidden: int) -> float:
    """FLOPs of the unique tokens of ``samples`` for a decoder with these dimensions."""
    tokens = contexts = 0
    for group in group_by_prompt(samples):
        prompt = len(group.prompt_ids)
        tokens += prompt
        contexts += _context_sum(0, prompt)
        for i in group.members:
            completion = len(samples[i].completion_ids)
            tokens += completion
            contexts += _context_sum(prompt, completion)
    return 2.0 * non_embedding_params * tokens + 4.0 * layers * hidden * contexts


def linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of each linear map of one decoder layer (q, k, v, o, gate, up, down)."""
    d = config.hidden_size
    kv_heads, head_dim = key_value_shape(config)
    q = config.num_attention_heads * head_dim
    kv = kv_heads * head_dim
    inter = config.intermediate_size
    return [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def gemm_throughput(config, dtype: torch.dtype, device: torch.device | str, rows: int = 2048,
                    min_seconds: float = 0.5, trials: int = 3, clock=time.perf_counter) -> float:
    """FLOP/s of ``rows × in @ in × out`` products over one layer's linear shapes; the best of ``trials``.

    The best trial is the machine's rate when undisturbed, which is what a roofline needs. ``clock`` may be
    ``time.process_time`` (FLOPs per CPU-second of this process, for a CPU shared with other jobs).
    """
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    pairs = [(torch.randn(rows, i, generator=generator).to(device, dtype),
              torch.randn(i, o, generator=generator).to(device, dtype)) for i, o in linear_shapes(config)]
    flops_per_pass = sum(2.0 * rows * a.shape[1] * b.shape[1] for a, b in pairs)
    for a, b in pairs:  # warm up kernels and caches
        a @ b
    best = 0.0
    for _ in range(trials):
        passes, start = 0, clock()
        synchronize(device)
        while True:
            for a, b in pairs:
                a @ b
            passes += 1
            synchronize(device)
            elapsed = clock() - start
            if elapsed >= min_seconds:
                break
        best = max(best, passes * flops_per_pass / elapsed)
    return best
