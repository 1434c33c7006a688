"""Worker for tests/test_deepspeed.py, launched on 2 CPU ranks: ZeRO-3 scoring, uneven inputs, synced statistics.

``python -m torch.distributed.run --nproc_per_node 2 tests/dist/zero3_scoring.py OUT_DIR`` writes
``OUT_DIR/rank{r}.json`` with everything the parent test checks against a single-process plain HF forward.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# Sample counts per rank in each scenario: (rank 0, rank 1). A rank with no samples still runs forwards.
SCENARIOS = {"empty_vs_37": (0, 37), "3_vs_17": (3, 17)}
STATS_ROUNDS = ((0, 5), (2, 9), (7, 0))  # with SCENARIOS, uses each of the 80 pairs once


def shard(pairs: list, counts: tuple[int, int], rank: int, offset: int) -> list:
    """This rank's contiguous share of ``pairs``, starting at ``offset`` (rank 0 first)."""
    start = offset + sum(counts[:rank])
    mine = pairs[start : start + counts[rank]]
    assert len(mine) == counts[rank], f"only {len(pairs)} pairs: shares past the end"
    return mine


def all_pairs() -> list[tuple[str, str]]:
    from steer_reward.demo import sample_rows

    rows = sample_rows()
    return [(r["prompt"], r["chosen"]) for r in rows] + [(r["prompt"], r["rejected"]) for r in rows]


def main(out_dir: str) -> None:
    from steer_reward.reward import SteerReward
    from steer_reward.shaping import RewardShaper

    config = {
        "backend": "deepspeed",
        "model": {"path": "demo", "max_length": 96},
        # A small budget so per-rank micro-batch counts differ a lot (and the dummy path runs).
        "batching": {"max_tokens": 256, "max_batch_size": 4},
        "shaping": {"weights": "steerlm-70b", "normalization": "running", "reward_normalization": "running"},
        "deepspeed": {"timeout_s": 120},
    }
    reward = SteerReward.from_config(config)
    rank = dist.get_rank()
    backend = reward.scorer.backend
    pairs = all_pairs()
    report: dict = {"rank": rank, "world_size": dist.get_world_size()}
    held, total = backend.partition_numel()
    report["numel"] = {"held": held, "total": total}
    report["module_numel_plain"] = sum(p.numel() for p in reward.scorer.model.parameters())

    offset = 0
    for name, counts in SCENARIOS.items():
        mine = shard(pairs, counts, rank, offset)
        offset += sum(counts)
        before = (backend.forward_calls, backend.dummy_calls)
        samples = reward.scorer.encode([p for p, _ in mine], [c for _, c in mine])
        scores = reward.scorer.score_encoded(samples)
        report[name] = {
            "input_ids": [list(s.input_ids) for s in samples],
            "attributes": scores.values.tolist(),
            "planned": len(backend.plan(samples)),
            "forward_calls": backend.forward_calls - before[0],
            "dummy_calls": backend.dummy_calls - before[1],
        }

    # Running statistics: several updates with uneven (and empty) shares; every rank must end bit-identical.
    stats_attributes = []
    for counts in STATS_ROUNDS:
        mine = shard(pairs, counts, rank, offset)
        offset += sum(counts)
        batch = reward.score([p for p, _ in mine], [c for _, c in mine], update_stats=True)
        stats_attributes += batch.attributes.values.tolist()
    report["stats_attributes"] = stats_attributes
    report["state"] = reward.state_dict()
    report["sync_calls"] = reward.scorer.moments_sync.calls

    # Rank 0 saves the state; every rank restores it into a fresh shaper and shapes the same attributes.
    state_file = Path(out_dir) / "state.json"
    if rank == 0:
        state_file.write_text(json.dumps(reward.state_dict()))
    dist.barrier()
    restored = RewardShaper(reward.schema, reward.config.shaping)
    restored.load_state_dict(json.loads(state_file.read_text()))
    probe = torch.linspace(-1, 1, 2 * reward.schema.num_outputs).reshape(2, -1)
    report["restored_rewards"] = restored(probe, torch.tensor([10, 20])).tolist()
    report["restored_state"] = restored.state_dict()

    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
