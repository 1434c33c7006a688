"""Benchmark workloads as encoded samples: random token ids of realistic lengths (no tokenizer needed).

- ``grpo``: ``prompts`` prompts × ``group_size`` completions each, as GRPO / RLOO score them.
- ``mixed``: prompts alternate between a group of ``group_size`` completions and a single completion (best-of-n
  next to one-off scoring), so both the shared and the unshared paths run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from steer_reward.formatting import EncodedSample

__all__ = ["WorkloadSpec", "build_workload", "parse_range"]


def parse_range(text: str, minimum: int = 1) -> tuple[int, int]:
    """``"256-1024"`` → (256, 1024); ``"512"`` → (512, 512). Both bounds at least ``minimum``."""
    low, _, high = str(text).partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"expected a token range like 256-1024, got {text!r}") from None
    if not minimum <= bounds[0] <= bounds[1]:
        raise ValueError(f"token range {text!r} must be increasing and start at {minimum} or more")
    return bounds


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompts: int
    group_size: int
    prompt_tokens: tuple[int, int]
    completion_tokens: tuple[int, int]
    vocab_size: int
    """Token ids are drawn from ``[0, vocab_size)`` minus ``excluded``."""
    excluded: tuple[int, ...] = ()
    seed: int = 0


def build_workload(spec: WorkloadSpec) -> list[EncodedSample]:
    """Samples of the workload; the completions of a prompt are adjacent, as TRL passes them."""
    if spec.name not in ("grpo", "mixed"):
        raise ValueError(f"unknown workload {spec.name!r} (grpo, mixed)")
    rng = random.Random(spec.seed)
    excluded = set(spec.excluded)

    def token_ids(bounds: tuple[int, int]) -> tuple[int, ...]:
        out = []
        for _ in range(rng.randint(*bounds)):
            token = rng.randrange(spec.vocab_size)
            while token in excluded:
                token = rng.randrange(spec.vocab_size)
            out.append(token)
        return tuple(out)

    samples = []
    for p in range(spec.prompts):
        prompt = token_ids(spec.prompt_tokens)
        size = spec.group_size if spec.name == "grpo" or p % 2 == 0 else 1
        samples.extend(EncodedSample(prompt, token_ids(spec.completion_tokens)) for _ in range(size))
    return samples
