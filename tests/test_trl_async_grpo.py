"""AsyncGRPO (trl.experimental.async_grpo) sums its reward functions with weight 1 and scores in a spawned rollout
process. What cannot be right there is refused when TRL's own rollout worker spawns that process; what can (one
shaped reward that does not update statistics) is sent as usual.

The worker's generation needs a vLLM server, which does not run on this CPU-only machine: the tests drive TRL's
real ``AsyncRolloutWorker.start()`` (its availability check for vLLM answered yes) up to the spawn, which is where
the reward functions are pickled and the refusal happens.
"""

from __future__ import annotations

import pytest

from steer_reward.config import ConfigError

pytest.importorskip("aiohttp")


def test_async_grpo_has_no_reward_weights():
    """The fact the per-attribute refusal rests on: revisit it when AsyncGRPO learns reward_weights."""
    from trl.experimental.async_grpo import AsyncGRPOConfig

    assert "reward_weights" not in AsyncGRPOConfig.__dataclass_fields__


def _worker(monkeypatch, demo_policy_path, reward_funcs, **options):
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.chat_template_utils import llama3_template
    from trl.experimental.async_grpo import async_rollout_worker

    monkeypatch.setattr(async_rollout_worker, "is_vllm_available", lambda: True)
    PartialState(cpu=True)  # the worker logs through accelerate, whose state the trainer would have created
    tokenizer = AutoTokenizer.from_pretrained(demo_policy_path)
    tokenizer.response_template = llama3_template  # the demo policy's template is Llama-3 style, not TRL-known
    return async_rollout_worker.AsyncRolloutWorker(
        model_name="demo-policy", dataset=Dataset.from_dict({"prompt": ["Say hi."] * 4}), reward_funcs=reward_funcs,
        processing_class=tokenizer, eos_token_ids=[tokenizer.eos_token_id], vllm_server_url="http://127.0.0.1:9",
        **options)


@pytest.mark.parametrize("mode", ["per_attribute", "running_statistics"])
def test_trl_rollout_worker_refuses_what_cannot_be_right(monkeypatch, demo_policy_path, make_reward, mode):
    if mode == "per_attribute":
        funcs, _ = make_reward({"weights": "steerlm-70b"}).trl_attribute_funcs()
        message = "AsyncGRPO sums reward functions with weight 1.*reward.for_trl"
    else:
        funcs = [make_reward({"normalization": "running"}).for_trl()]
        message = "running statistics.*update_running_stats: false"
    worker = _worker(monkeypatch, demo_policy_path, funcs)
    try:
        with pytest.raises(ConfigError, match=message):
            worker.start()
    finally:
        worker.stop()


@pytest.mark.slow
def test_trl_rollout_worker_takes_one_shaped_reward_without_updates(monkeypatch, demo_policy_path, make_reward):
    """Sent to the spawned process, which unpickles it and comes up ready (generation would then need vLLM)."""
    reward = make_reward({"normalization": "running", "update_running_stats": False})
    worker = _worker(monkeypatch, demo_policy_path, [reward.for_trl()], child_ready_timeout=240)
    try:
        worker.start()
        assert worker._process is not None and worker._process.is_alive()
    finally:
        worker.stop()
