"""ShaperStateCallback on 2 gloo ranks: rank 0's checkpoint state reaches every rank on resume, also a rank that
cannot see the checkpoint file, and a missing or unreadable state file fails on every rank instead of hanging one."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta

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


PG_TIMEOUT_S = 60
"""The process group's timeout: a rank left waiting in the broadcast would give up only after this long."""


def _rank_main(rank: int, port: int, folders: list[str], resume_from: str | None, results,
               retry_from: str | None = None) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from steer_reward.config import load_config
    from steer_reward.integrations.trl import ShaperStateCallback
    from steer_reward.reward import SteerReward
    from steer_reward.schema import STEERLM9
    from steer_reward.shaping import RewardShaper

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        for key, source in (("first", resume_from), ("retry", retry_from)):
            if key == "retry" and retry_from is None:
                break
            shaper = RewardShaper(STEERLM9, load_config({"shaping": {"normalization": "running"}}).shaping)
            # The callback only touches the shaper: a SteerReward without a scorer (no model) stands for the real one.
            callback = ShaperStateCallback(SteerReward(None, shaper), resume_from=source)
            args = TrainingArguments(output_dir=folders[rank], use_cpu=True, report_to="none")
            start = time.monotonic()
            try:
                callback.on_train_begin(args, TrainerState(global_step=3), TrainerControl())
                result = json.dumps(shaper.state_dict())
            except (FileNotFoundError, ValueError) as err:
                result = f"error: {err}"
                results[rank, key, "type"] = type(err).__name__
            results[rank, key, "elapsed_s"] = time.monotonic() - start
            if key == "first":
                results[rank] = result
            results[rank, key] = result
    finally:
        torch.distributed.destroy_process_group()


def _run(folders: list[str], resume_from: str | None = None, retry_from: str | None = None) -> list:
    """Rank 0's and rank 1's result (``results[r]``), or with ``retry_from`` every result the ranks left."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, port, folders, resume_from, results, retry_from))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
            if proc.exitcode is None:
                proc.kill()
            assert proc.exitcode == 0, "a rank failed or hung"
        return [dict(results)] if retry_from is not None else [results[0], results[1]]


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_state_file_rank0_cannot_read_fails_on_every_rank_at_once(tmp_path):
    """Rank 0 reads the state while rank 1 waits in the broadcast: a file rank 0 cannot parse must reach rank 1 as
    the same error (before, rank 0 raised alone and rank 1 waited out the process group's timeout), and a later
    resume from a good file still works on both ranks."""
    os.makedirs(tmp_path / "out", exist_ok=True)
    corrupt, good = tmp_path / "corrupt.json", tmp_path / "good.json"
    corrupt.write_text('{"attribute_stats": {"count": 4.0, "mean": [0.5')  # cut short, as by a full disk
    good.write_text(json.dumps(STATE))
    (results,) = _run([str(tmp_path / "out")] * 2, resume_from=str(corrupt), retry_from=str(good))
    first = [results[r, "first"] for r in range(2)]
    assert first[0] == first[1], first
    assert first[0].startswith(f"error: rank 0 cannot read the steer-reward shaper state {corrupt} (JSONDecodeError:")
    assert [results[r, "first", "type"] for r in range(2)] == ["ValueError"] * 2
    assert max(results[r, "first", "elapsed_s"] for r in range(2)) < PG_TIMEOUT_S / 4
    assert [json.loads(results[r, "retry"]) for r in range(2)] == [STATE, STATE]
