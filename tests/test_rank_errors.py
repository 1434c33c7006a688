"""An error on ONE rank of a colocated reward ends the call on EVERY rank at once, with the same error naming it.

Two CPU ranks (gloo) run tests/dist/rank_errors.py: under ZeRO-3 (backend: deepspeed) and under plain data parallel
(backend: local, statistics merged as the TRL faces merge them). In each scenario rank 1's call fails on that rank
alone (refused lengths, a completion holding tool results, a pad token without EOS, a sample that cannot be
encoded) while rank 0's is good. Before, rank 1 raised alone and rank 0 waited in the next collective (the ZeRO-3
count agreement or the statistics merge) until the process group's timeout, or paired it with rank 1's next call
and merged that call's statistics into this one. Now both raise the same error within seconds, and a following
good call on both ranks gives the rewards one process gives for both ranks' samples.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
LAUNCH_TIMEOUT_S = 300


def worker():
    spec = importlib.util.spec_from_file_location("dist_rank_errors", DIST / "rank_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER = worker()
LENGTHS = "rank 1: ValueError: got 2 lengths for 3 samples"
TOOLS = "rank 1: ValueError: completion 0 holds tool results"
SCORING = "a rank could not start this scoring call, so no rank scored this batch ("
MERGE = "a rank failed before merging the running statistics, so no rank updated them or shaped this batch ("
EXPECTED = {  # (kind, scenario): (error type on every rank, where the ranks agreed it, rank 1's cause)
    ("zero3", "score_lengths"): ("ValueError", SCORING, LENGTHS),
    ("zero3", "score_lengths_no_update"): ("ValueError", SCORING, LENGTHS),
    ("zero3", "rewards_lengths"): ("ValueError", MERGE, LENGTHS),
    ("zero3", "trl_tool_results"): ("ValueError", SCORING, TOOLS),
    ("zero3", "trl_attribute_tool_results"): ("ValueError", SCORING, TOOLS),
    ("ddp", "score_formatting"): ("FormattingError", MERGE, "rank 1: FormattingError: sample 1: a completion must be"),
    ("ddp", "score_lengths"): ("ValueError", MERGE, LENGTHS),
    ("ddp", "rewards_lengths"): ("ValueError", MERGE, LENGTHS),
    ("ddp", "trl_tool_results"): ("ValueError", MERGE, TOOLS),
    ("ddp", "trl_missing_eos"): ("ValueError", MERGE, "rank 1: ValueError: completion rows padded with policy_pad"),
    ("ddp", "trl_attribute_tool_results"): ("ValueError", MERGE, TOOLS),
    ("ddp", "trl_async_formatting"): ("FormattingError", MERGE, "rank 1: FormattingError: sample 2: completion"),
}
assert sorted(EXPECTED) == sorted((k, s) for k, names in WORKER.SCENARIOS.items() for s in names)


_runs: dict[str, list[dict]] = {}


@pytest.fixture
def run(demo_model_path, tmp_path_factory):
    """``run(kind)``: the two rank reports of one 2-rank run of every ``kind`` scenario (launched once per module;
    the parent builds the demo model first so ranks never race to build it)."""

    def launch(kind: str) -> list[dict]:
        if kind not in _runs:
            if kind == "zero3":
                pytest.importorskip("deepspeed")
            out = tmp_path_factory.mktemp(f"rank_errors_{kind}")
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(DIST / "rank_errors.py"), kind, str(out)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
            assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
            _runs[kind] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        return _runs[kind]

    return launch


_replays: dict[str, dict] = {}


@pytest.fixture
def single_process(demo_model_path):
    """``single_process(kind, reports)``: what one process gives for both ranks' good calls in order,
    ``{scenario: (ScoredBatch, state after it)}`` (computed once per kind)."""
    from steer_reward.reward import SteerReward

    def replay(kind: str, reports: list[dict]) -> dict:
        if kind not in _replays:
            reward = SteerReward.from_config({"backend": "local", "model": {"path": demo_model_path,
                                                                            "max_length": 128},
                                              "shaping": WORKER.SHAPING})
            scored = {}
            for name in WORKER.SCENARIOS[kind]:
                pairs = [pair for report in reports for pair in report[name]["after"]["pairs"]]
                scored[name] = (reward.score([p for p, _ in pairs], [c for _, c in pairs], update_stats=True),
                                reward.state_dict())
            _replays[kind] = scored
        return _replays[kind]

    return replay


@pytest.mark.slow
@pytest.mark.parametrize("kind, scenario", sorted(EXPECTED))
def test_an_error_on_one_rank_ends_the_call_on_every_rank_and_the_next_call_works(run, single_process, kind,
                                                                                  scenario):
    reports = run(kind)
    kind_of_error, stage, cause = EXPECTED[kind, scenario]
    first, second = (report[scenario] for report in reports)
    assert first["error"] == second["error"] == kind_of_error, (first, second)
    assert first["message"] == second["message"]
    assert first["message"].startswith(stage) and cause in first["message"], first["message"]
    assert "rank 0:" not in first["message"]  # only the failing rank is named
    assert max(first["elapsed_s"], second["elapsed_s"]) < WORKER.TIMEOUT_S / 4  # not the process-group timeout

    # Still in step: the next call, good on both ranks, merged both ranks' samples and nothing of the failed call.
    expected, state = single_process(kind, reports)[scenario]
    after = [report[scenario]["after"] for report in reports]
    assert "error" not in after[0] and "error" not in after[1], after
    assert after[0]["state"] == after[1]["state"]  # bit-identical on both ranks
    assert after[0]["state"]["attribute_stats"]["count"] == state["attribute_stats"]["count"]
    got_attributes = torch.tensor(after[0]["attributes"] + after[1]["attributes"])
    torch.testing.assert_close(got_attributes, expected.attributes.values, atol=1e-4, rtol=0)
    got_rewards = torch.tensor(after[0]["rewards"] + after[1]["rewards"])
    torch.testing.assert_close(got_rewards, expected.rewards, atol=1e-4, rtol=0)
    for key in ("mean", "m2"):
        torch.testing.assert_close(torch.tensor(after[0]["state"]["attribute_stats"][key], dtype=torch.float64),
                                   torch.tensor(state["attribute_stats"][key], dtype=torch.float64),
                                   atol=1e-4, rtol=1e-5)
