"""ShaperStateCallback on 2 gloo ranks: rank 0's checkpoint state reaches every rank on resume, also a rank that
cannot see the checkpoint file, and a missing explicit state file fails on every rank instead of hanging one."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from steer_reward.integrations.trl import STATE_FILE

STATE = {"attribute_stats": {"count": 4.0, "mean": [0.5] * 9, "m2": [2.0] * 9},
         "reward_stats": {"count": 4.0, "mean": [1.5], "m2": [3.0]}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, folders: list[str], resume_from: str | None, results) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from steer_reward.config import load_config
    from steer_reward.integrations.trl import ShaperStateCallback
    from steer_reward.reward import SteerReward
    from steer_reward.schema import STEERLM9
    from steer_reward.shaping import RewardShaper

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shaper = RewardShaper(STEERLM9, load_config({"shaping": {"normalization": "running"}}).shaping)
        # The callback only touches the shaper: a SteerReward without a scorer (no model) stands for the real one.
        callback = ShaperStateCallback(SteerReward(None, shaper), resume_from=resume_from)
        args = TrainingArguments(output_dir=folders[rank], use_cpu=True, report_to="none")
        try:
            callback.on_train_begin(args, TrainerState(global_step=3), TrainerControl())
            results[rank] = json.dumps(shaper.state_dict())
        except FileNotFoundError as err:
            results[rank] = f"error: {err}"
    finally:
        torch.distributed.destroy_process_group()


def _run(folders: list[str], resume_from: str | None = None) -> list[str]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, port, folders, resume_from, results)) for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
            assert proc.exitcode == 0, "a rank failed or hung"
        return [results[0], results[1]]


@pytest.mark.timeout(300)
def test_every_rank_resumes_from_rank0_state_even_without_the_file(tmp_path):
    seen, blind = tmp_path / "rank0", tmp_path / "rank1"
    (seen / "checkpoint-3").mkdir(parents=True)
    (seen / "checkpoint-3" / STATE_FILE).write_text(json.dumps(STATE))
    blind.mkdir()  # rank 1's node-local output_dir holds no checkpoint
    states = [json.loads(s) for s in _run([str(seen), str(blind)])]
    assert states[0] == states[1] == STATE


@pytest.mark.timeout(300)
def test_a_missing_explicit_state_file_fails_on_every_rank(tmp_path):
    os.makedirs(tmp_path / "out", exist_ok=True)
    results = _run([str(tmp_path / "out")] * 2, resume_from=str(tmp_path / "nowhere.json"))
    assert all(r.startswith("error: no steer-reward shaper state") for r in results), results
