"""Worker for tests/test_deepspeed.py, launched on 2 CPU ranks: ZeRO-3 scoring, uneven inputs, synced statistics.

``python -m torch.distributed.run --nproc_per_node 2 tests/dist/zero3_scoring.py OUT_DIR`` writes
``OUT_DIR/rank{r}.json`` with everything the parent test checks against a single-process plain HF forward.

Scenarios run prefix sharing with many prompt groups per forward (``batching.strategy: auto``): one rank with no
samples, groups split across ranks, one rank with only groups of 1, a prompt cached on one rank only, and a rank
whose batch fails to encode.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# Sample counts per rank in each contiguous-share scenario: (rank 0, rank 1). A rank with no samples still runs
# forwards. Contiguous shares of the pairs are distinct prompts (groups of 1).
SCENARIOS = {"3_vs_17": (3, 17)}
STATS_ROUNDS = ((0, 5), (2, 9), (7, 0))
GROUP_SCENARIOS = ("empty_vs_37", "groups_split_across_ranks", "singles_vs_groups")
"""Scenarios with prompt groups (``group_scenario``): several completions of one prompt."""
CACHE_SCENARIOS = ("prompt_cache_warmup", "prompt_cache_hit_vs_miss")
"""With the prompt cache on: rank 0 caches a prompt, then both ranks score completions of it — a completion forward
against the cache on rank 0, a prefill of whole sequences on rank 1 (different kinds of forward per rank)."""
BAD_COMPLETION = 12345
"""Not a string nor messages: ``FormattingError`` on the rank that gets it."""


def group_scenario(name: str, rank: int) -> list[tuple[str, str]]:
    """This rank's (prompt, completion) pairs in a group scenario; completions of a prompt are other rows' answers,
    so groups have mixed lengths, and members of a group are not adjacent."""
    from steer_reward.demo import sample_rows

    rows = sample_rows()
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]

    def group(prompt_row: int, size: int, first: int) -> list[tuple[str, str]]:
        return [(rows[prompt_row]["prompt"], answers[(first + 7 * k) % len(answers)]) for k in range(size)]

    if name == "empty_vs_37":  # rank 0 nothing; rank 1: 4 groups of 8 interleaved, and 5 single prompts
        if rank == 0:
            return []
        groups = [group(p, 8, 3 * p) for p in (0, 1, 2, 3)]
        mixed = [pair for members in zip(*groups) for pair in members]
        return mixed + [(rows[p]["prompt"], rows[p]["chosen"]) for p in range(10, 15)]
    if name == "groups_split_across_ranks":  # one group of 8 split 3 / 5, one of 6 split 4 / 2, one only on rank 1
        a, b, c = group(4, 8, 1), group(5, 6, 2), group(6, 4, 5)
        return a[:3] + b[:4] if rank == 0 else b[4:] + a[3:] + c
    if name == "singles_vs_groups":  # rank 0 only groups of 1; rank 1 three groups of 6
        if rank == 0:
            return [(rows[p]["prompt"], rows[p]["rejected"]) for p in range(20, 29)]
        return [pair for p in (7, 8, 9) for pair in group(p, 6, p)]
    if name == "prompt_cache_warmup":  # rank 0: a group of 6 (shared, so its prompt is cached); rank 1 nothing
        return group(31, 6, 0) if rank == 0 else []
    if name == "prompt_cache_hit_vs_miss":  # two more completions of that prompt on each rank
        return group(31, 8, 0)[6:] if rank == 0 else group(31, 8, 1)[6:]
    raise KeyError(name)


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

    report["strategy"] = backend.strategy

    def scored(name: str, mine: list[tuple[str, str]]) -> None:
        before = (backend.forward_calls, backend.dummy_calls, dict(backend.kind_calls), backend.groups.cache_hits)
        samples = reward.scorer.encode([p for p, _ in mine], [c for _, c in mine])
        planned = len(backend.plan(samples))
        scores = reward.scorer.score([p for p, _ in mine], [c for _, c in mine])
        report[name] = {
            "input_ids": [list(s.input_ids) for s in samples],
            "attributes": scores.values.tolist(),
            "planned": planned,
            "forward_calls": backend.forward_calls - before[0],
            "dummy_calls": backend.dummy_calls - before[1],
            "kind_calls": {k: v - before[2][k] for k, v in backend.kind_calls.items()},
            "cache_hits": backend.groups.cache_hits - before[3],
        }

    offset = 0
    for name, counts in SCENARIOS.items():
        scored(name, shard(pairs, counts, rank, offset))
        offset += sum(counts)
    for name in GROUP_SCENARIOS:
        scored(name, group_scenario(name, rank))
    backend.groups.set_cache_tokens(4096)
    for name in CACHE_SCENARIOS:
        scored(name, group_scenario(name, rank))
    backend.groups.set_cache_tokens(0)

    # A batch that fails to encode on rank 1 only: every rank raises the same error at once (the timeout is 120 s),
    # and the ranks stay in step for the calls that follow.
    import time

    from steer_reward.formatting import FormattingError

    good = group_scenario("singles_vs_groups", 0)[:3]
    completions: list = [c for _, c in good]
    if rank == 1:
        completions[1] = BAD_COMPLETION
    start = time.monotonic()
    try:
        reward.scorer.score([p for p, _ in good], completions)
        report["bad_sample"] = {"error": None}
    except (FormattingError, RuntimeError) as err:
        report["bad_sample"] = {"error": type(err).__name__, "message": str(err),
                                "elapsed_s": time.monotonic() - start}

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
