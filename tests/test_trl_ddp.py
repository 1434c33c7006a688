"""TRL reward functions under plain data parallel (DDP, 2 CPU ranks, gloo) with backend: local: running statistics
are merged across ranks at every training update, so both ranks hold bit-identical statistics, equal to those of
one process that saw every rank's training samples; evaluation batches merge nothing and count nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
LAUNCH_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dist_ddp_grpo", DIST / "ddp_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_reports(demo_model_path, demo_policy_path, tmp_path_factory):
    """One 2-rank run of tests/dist/ddp_grpo.py (the parent builds the demo models first, so ranks never race)."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               TRL_EXPERIMENTAL_SILENCE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(DIST / "ddp_grpo.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_running_statistics_are_merged_across_ddp_ranks(ddp_reports, make_reward):
    from steer_reward.shaping import Moments

    first, second = ddp_reports
    assert first["world_size"] == second["world_size"] == 2 and first["steps"] == 2
    assert first["ddp"] == "DistributedDataParallel"
    eval_prompts = set(_worker().EVAL)
    for name in first["states"]:
        assert first["states"][name] == second["states"][name], name  # bit-identical on both ranks
        samples = [(p, c) for report in ddp_reports for prompts, completions in report["calls"][name]
                   if prompts[0][0]["content"] not in eval_prompts for p, c in zip(prompts, completions)]
        assert len(samples) == 2 * 2 * 4  # 2 ranks x 2 steps x 4 completions; evaluation batches left out
        state = first["states"][name]["attribute_stats"]
        assert state["count"] == len(samples), name
        values = make_reward().score([p for p, _ in samples], [c for _, c in samples]).attributes.values
        expected = Moments.of(values)  # one process seeing every rank's samples
        torch.testing.assert_close(torch.tensor(state["mean"], dtype=torch.float64), expected.mean,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(state["m2"], dtype=torch.float64), expected.m2, rtol=1e-5, atol=1e-4)
    assert first["states"]["shaped"]["reward_stats"]["count"] == 16
