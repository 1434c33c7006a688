"""Measures what ZeRO-3 costs against an unsharded model, as ratios within one 2-rank run (not a test).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/zero3_bench.py [ROUNDS]

Rank 0 prints one JSON line: seconds per scoring call through the ZeRO-3 engine and through a whole local copy of
the same model on the same samples, their ratio, a dummy micro-batch's cost relative to a real one, and the cost of
one running-statistics sync.
"""

from __future__ import annotations

import json
import os
import sys
import time


def best_of(rounds: int, fn) -> float:
    """Fastest of ``rounds`` timed calls (every rank calls ``fn`` the same number of times)."""
    import torch.distributed as dist

    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from steer_reward.backends.local import LocalBackend
    from steer_reward.config import load_config
    from steer_reward.demo import sample_rows
    from steer_reward.modeling import load_reward_model
    from steer_reward.reward import SteerReward
    from steer_reward.shaping import Moments

    config = {"backend": "deepspeed", "model": {"path": "demo", "max_length": 256},
              "batching": {"max_tokens": 2048, "max_batch_size": 16}}
    reward = SteerReward.from_config(config)
    rank = dist.get_rank()
    rows = sample_rows()
    mine = rows[rank::2]
    samples = reward.scorer.encode([r["prompt"] for r in mine], [r["chosen"] for r in mine])
    zero3 = reward.scorer.backend
    local = LocalBackend(load_reward_model(load_config(config).model)[0], zero3.pad_id, zero3.batching)

    zero3_s = best_of(rounds, lambda: zero3.attributes(samples))
    local_s = best_of(rounds, lambda: local.attributes(samples))
    longest_batch = zero3.plan(samples)[0]
    real_s = best_of(rounds, lambda: zero3.run_microbatch([samples[i].input_ids for i in longest_batch]))
    dummy_s = best_of(rounds, lambda: zero3.run_microbatch([(zero3.pad_id,)]))
    moments = Moments.of(torch.randn(16, 9))
    sync_s = best_of(rounds, lambda: reward.scorer.moments_sync(moments))
    if rank == 0:
        tokens = sum(len(s) for s in samples)
        print(json.dumps({
            "samples_per_rank": len(samples), "tokens_per_rank": tokens, "micro_batches": len(zero3.plan(samples)),
            "zero3_s": round(zero3_s, 4), "local_s": round(local_s, 4), "zero3_over_local": round(zero3_s / local_s, 2),
            "dummy_over_real_microbatch": round(dummy_s / real_s, 3), "sync_ms": round(sync_s * 1e3, 3),
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
