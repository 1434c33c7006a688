"""Worker for tests/test_rank_errors.py, launched on 2 CPU ranks: an error on ONE rank ends the call on every rank.

``python -m torch.distributed.run --nproc_per_node 2 tests/dist/rank_errors.py zero3|ddp OUT_DIR [SCENARIO...]``
builds one reward (``zero3``: backend deepspeed, ZeRO-3; ``ddp``: backend local in a plain gloo process group, the
statistics merged as TRL's data-parallel faces merge them), then runs each scenario: rank 1 makes a call that fails on
that rank alone while rank 0 makes the same call with good input; then both ranks make a good call that updates the
running statistics. It writes ``OUT_DIR/rank{r}.json``: per scenario the error each rank raised (type, message,
seconds), and the good call's attributes and the statistics after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

TIMEOUT_S = 60
"""The process group's timeout: a rank left waiting in a collective would give up only after this long."""
SHAPING = {"weights": "steerlm-70b", "normalization": "running",
           "length_penalty": {"alpha": 0.5, "target_tokens": 8}}
BAD_COMPLETION = 12345
"""Not a string nor messages: ``FormattingError`` on the rank that gets it."""
TOOL_TURN = [{"role": "assistant", "content": "Let me look."}, {"role": "tool", "content": "42"},
             {"role": "assistant", "content": "It is 42."}]
"""A completion holding tool results: the length penalty cannot count the policy's own tokens in its ids."""
SCENARIOS = {
    "zero3": ("score_lengths", "score_lengths_no_update", "rewards_lengths", "trl_tool_results",
              "trl_attribute_tool_results"),
    "ddp": ("score_formatting", "score_lengths", "rewards_lengths", "trl_tool_results", "trl_missing_eos",
            "trl_attribute_tool_results", "trl_async_formatting"),
}


def good_pairs(rank: int, call: int) -> list[tuple[str, str]]:
    """Three (prompt, completion) pairs for this rank's ``call``-th call, different on the two ranks."""
    from steer_reward.demo import sample_rows

    rows = sample_rows()
    pairs = [(r["prompt"], r["chosen"]) for r in rows] + [(r["prompt"], r["rejected"]) for r in rows]
    start = 3 * (2 * call + rank) % (len(pairs) - 2)
    return pairs[start : start + 3]


def chat(pairs: list[tuple[str, str]]) -> tuple[list, list]:
    """TRL's conversational form of ``pairs``: (prompts, completions) as message lists."""
    return ([[{"role": "user", "content": p}] for p, _ in pairs],
            [[{"role": "assistant", "content": c}] for _, c in pairs])


def build(kind: str):
    from steer_reward.reward import SteerReward

    if kind == "zero3":
        return SteerReward.from_config({"backend": "deepspeed", "model": {"path": "demo", "max_length": 128},
                                        "shaping": SHAPING, "deepspeed": {"timeout_s": TIMEOUT_S}})
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return SteerReward.from_config({"backend": "local", "model": {"path": "demo", "max_length": 128},
                                    "shaping": SHAPING})


def bad_call(name: str, reward, rank: int, pairs: list[tuple[str, str]]) -> None:
    """The call of scenario ``name``: bad on rank 1, good on rank 0."""
    from steer_reward.distributed import data_parallel_sync
    from steer_reward.integrations.trl import AsyncSteerRewardFunc

    bad = rank == 1
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    # Under ZeRO-3 the shaper merges through the backend's own sync; under DDP the caller passes one, as TRL faces do.
    sync = data_parallel_sync(reward.shaper.sync)
    if name == "score_formatting":  # the scorer itself refuses rank 1's batch (backend: local scores alone)
        completions[1] = BAD_COMPLETION if bad else completions[1]
        reward.score(prompts, completions, update_stats=True, sync=sync)
    elif name in ("score_lengths", "score_lengths_no_update"):  # lengths refused before scoring
        lengths = [5, 9] if bad else [5, 9, 14]
        reward.score(prompts, completions, lengths=lengths, update_stats=name == "score_lengths", sync=sync)
    elif name == "rewards_lengths":  # scored on every rank, then lengths refused before the merge
        attributes = reward.scorer.score(prompts, completions)
        reward.rewards(attributes, [5, 9] if bad else [5, 9, 14], update_stats=True, sync=sync)
    elif name.startswith("trl_"):
        prompts, completions = chat(pairs)
        ids = [[7] * (5 + i) for i in range(len(pairs))]
        if name in ("trl_tool_results", "trl_attribute_tool_results") and bad:
            completions[0] = TOOL_TURN
        if name == "trl_attribute_tool_results":
            funcs, _ = reward.trl_attribute_funcs(update_stats=True)
            funcs[0](prompts=prompts, completions=completions, completion_ids=ids)
        elif name == "trl_missing_eos":  # a face built on rank 1 with a pad token but no EOS: counting would guess
            reward.for_trl(update_stats=True, policy_pad_token_id=0 if bad else None)(
                prompts=prompts, completions=completions, completion_ids=ids)
        elif name == "trl_async_formatting":  # an async face whose scoring fails on rank 1 (TRL awaits it)
            completions[2] = [{"role": "assistant", "content": BAD_COMPLETION}] if bad else completions[2]
            asyncio.run(AsyncSteerRewardFunc(reward, update_stats=True)(prompts=prompts, completions=completions,
                                                                        completion_ids=ids))
        else:
            reward.for_trl(update_stats=True)(prompts=prompts, completions=completions, completion_ids=ids)
    else:
        raise KeyError(name)


def main(kind: str, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    from steer_reward.distributed import data_parallel_sync

    reward = build(kind)
    rank = dist.get_rank()
    report: dict = {"rank": rank}
    for call, name in enumerate(names or SCENARIOS[kind]):
        start = time.monotonic()
        try:
            bad_call(name, reward, rank, good_pairs(rank, 2 * call))
            outcome = {"error": None}
        except Exception as err:  # noqa: BLE001 - what each rank raised is the result
            outcome = {"error": type(err).__name__, "message": str(err)}
        outcome["elapsed_s"] = time.monotonic() - start
        # The ranks must still be in step: a good call that updates the statistics on both.
        pairs = good_pairs(rank, 2 * call + 1)
        try:
            scored = reward.score([p for p, _ in pairs], [c for _, c in pairs], update_stats=True,
                                  sync=data_parallel_sync(reward.shaper.sync))
            outcome["after"] = {"pairs": pairs, "attributes": scored.attributes.values.tolist(),
                                "rewards": scored.rewards.tolist(), "state": reward.state_dict()}
        except Exception as err:  # noqa: BLE001
            outcome["after"] = {"error": f"{type(err).__name__}: {err}"}
        report[name] = outcome
        print(f"rank {rank} {name}: {outcome['error']} in {outcome['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
