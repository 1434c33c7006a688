"""TRL faces: the callables' contract, pickling, one forward per batch, async, checkpointed normalization state,
and the real GRPOTrainer / RLOOTrainer for 2 steps on the offline demo policy and reward model."""

from __future__ import annotations

import asyncio
import inspect
import math
import pickle

import pytest
import torch

from steer_reward.config import ConfigError
from steer_reward.integrations.trl import (
    STATE_FILE,
    AsyncAttributeRewardFunc,
    AsyncSteerRewardFunc,
    ShaperStateCallback,
    SteerRewardFunc,
    attribute_reward_funcs,
    policy_lengths,
)

PROMPTS = ["What is the capital of France?"] * 2 + [[{"role": "user", "content": "Name a prime number."}]] * 2
COMPLETIONS = ["Paris.", "It is Paris, a city on the Seine.", [{"role": "assistant", "content": "7"}],
               [{"role": "assistant", "content": "Eleven is prime, and so is seven."}]]
IDS = [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12], [9], [1, 2, 3, 4, 5, 6, 0, 0]]


class Recorder:
    """Captures TRL's log_metric / log_extra calls."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name, value):
        self.metrics[name] = value

    def log_extra(self, column, values):
        self.extra[column] = values


def trl_call(func, prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, recorder=None):
    recorder = recorder or Recorder()
    return func(prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=None,
                log_extra=recorder.log_extra, log_metric=recorder.log_metric, answer=["x"] * len(prompts))


def test_callable_matches_steer_reward_and_logs_attributes(make_reward):
    reward = make_reward({"weights": "steerlm-70b"})
    func = reward.for_trl()
    recorder = Recorder()
    out = trl_call(func, recorder=recorder)
    assert isinstance(func, SteerRewardFunc) and not inspect.iscoroutinefunction(func.__call__)
    expected = reward(PROMPTS, COMPLETIONS)
    assert out == pytest.approx(expected, abs=1e-6) and all(isinstance(x, float) for x in out)
    attributes = reward.score(PROMPTS, COMPLETIONS).attributes
    for name in reward.schema.live_names:
        assert recorder.metrics[f"{func.__name__}/{name}"] == pytest.approx(float(attributes.column(name).mean()))
        assert recorder.extra[f"{func.__name__}/{name}"] == pytest.approx(attributes.column(name).tolist())
    assert "steer_reward/quality" not in recorder.metrics  # dead outputs are not logged


def test_names_are_unique(make_reward):
    reward = make_reward()
    a, b = reward.for_trl(), reward.for_trl()
    assert a.__name__ != b.__name__ and a.__name__.startswith("steer_reward")
    assert reward.for_trl(name="rm").__name__ == "rm"


def test_length_penalty_uses_policy_tokens_when_given(make_reward):
    reward = make_reward({"weights": "helpfulness", "length_penalty": {"alpha": 1.0, "target_tokens": 2}})
    eos = 0  # the last row is padded after its EOS, as OnlineDPO passes rows
    assert policy_lengths(IDS, eos_token_ids=[eos]) == [3, 8, 1, 7]
    func = reward.for_trl(policy_eos_token_id=eos, policy_pad_token_id=eos)
    attributes = reward.score(PROMPTS, COMPLETIONS).attributes
    base = attributes.column("helpfulness")
    penalty = torch.tensor([1 / 2, 6 / 2, 0.0, 5 / 2])
    assert trl_call(func) == pytest.approx((base - penalty).tolist(), abs=1e-5)
    # Without completion_ids the reward model's own completion token counts are used.
    rm_penalty = (attributes.completion_lengths - 2).clamp(min=0) / 2
    assert trl_call(func, completion_ids=None) == pytest.approx((base - rm_penalty).tolist(), abs=1e-5)


def test_pickle_round_trip_gives_equal_rewards(make_reward):
    reward = make_reward({"weights": {"correctness": 1.0, "verbosity": -0.5}, "normalization": "running"})
    func = reward.for_trl()
    trl_call(func)  # updates the running stats, which must travel with the pickle
    clone = pickle.loads(pickle.dumps(func))
    assert clone.__name__ == func.__name__ and clone._reward is None  # the model is rebuilt lazily
    assert trl_call(clone) == pytest.approx(trl_call(func), abs=1e-5)
    funcs, weights = reward.trl_attribute_funcs()
    clones = pickle.loads(pickle.dumps(funcs))
    assert clones[0].shared is clones[-1].shared  # still one shared forward after the round trip
    assert [c.__name__ for c in clones] == [f.__name__ for f in funcs]
    for f, c in zip(funcs, clones):
        assert trl_call(c) == pytest.approx(trl_call(f), abs=1e-5)


def test_attribute_funcs_share_one_forward_and_sum_to_reward(make_reward):
    reward = make_reward({"weights": "steerlm-70b", "length_penalty": {"alpha": 0.5, "target_tokens": 4}})
    funcs, weights = reward.trl_attribute_funcs(policy_pad_token_id=0, policy_eos_token_id=0)
    assert [f.__name__ for f in funcs][:5] == list(reward.schema.live_names) or all(
        f.__name__.startswith(n) for f, n in zip(funcs, reward.schema.live_names))
    assert weights == pytest.approx([0.65, 0.8, 0.45, 0.55, -0.4, 1.0])
    backend = reward.scorer.backend
    before = backend.forward_calls
    per_func = [trl_call(f) for f in funcs]
    one_batch = backend.forward_calls - before
    assert one_batch == len(backend.plan(reward.scorer.encode(PROMPTS, COMPLETIONS)))  # one scoring of the batch
    # A new step with the same texts is a new batch and is scored again, exactly once.
    for f in funcs:
        trl_call(f, prompts=list(PROMPTS), completions=list(COMPLETIONS))
    assert backend.forward_calls - before == 2 * one_batch
    combined = torch.tensor(per_func).T @ torch.tensor(weights)
    expected = reward(PROMPTS, COMPLETIONS, lengths=policy_lengths(IDS, eos_token_ids=[0]))
    assert combined.tolist() == pytest.approx(expected, abs=1e-5)


def test_attribute_funcs_refuse_clip_and_reward_normalization(make_reward):
    with pytest.raises(ConfigError, match="clip"):
        make_reward({"clip": [-1, 1]}).trl_attribute_funcs()
    with pytest.raises(ConfigError, match="reward_normalization"):
        make_reward({"reward_normalization": "running"}).trl_attribute_funcs()


def test_async_callable_and_async_attribute_funcs(make_reward):
    reward = make_reward({"weights": "nemotron-340b"})
    func = AsyncSteerRewardFunc(reward)
    assert inspect.iscoroutinefunction(func.__call__)
    assert asyncio.run(trl_call(func)) == pytest.approx(reward(PROMPTS, COMPLETIONS), abs=1e-6)
    funcs, weights = attribute_reward_funcs(reward, asynchronous=True)
    assert all(isinstance(f, AsyncAttributeRewardFunc) for f in funcs)
    backend = reward.scorer.backend
    before = backend.forward_calls

    async def gather():  # TRL awaits all async reward functions together
        return await asyncio.gather(*[trl_call(f) for f in funcs])

    per_func = asyncio.run(gather())
    # one scoring of the batch for all functions: exactly the forwards one plain scoring plans
    assert backend.forward_calls - before == len(backend.plan(reward.scorer.encode(PROMPTS, COMPLETIONS)))
    expected = reward.score(PROMPTS, COMPLETIONS).attributes
    for f, values in zip(funcs, per_func):
        assert values == pytest.approx(expected.column(f.attribute).tolist(), abs=1e-6)


def test_callback_resume_restores_running_normalization(make_reward, tmp_path):
    """Rewards after resuming from a checkpoint equal those of an uninterrupted run."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    shaping = {"weights": "steerlm-70b", "normalization": "running", "reward_normalization": "running"}
    batches = [(PROMPTS, COMPLETIONS), (PROMPTS[::-1], COMPLETIONS[::-1]), (PROMPTS, COMPLETIONS[::-1])]
    uninterrupted = make_reward(shaping).for_trl()
    expected = [trl_call(uninterrupted, p, c) for p, c in batches]

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    first = make_reward(shaping).for_trl()
    callback = ShaperStateCallback(first)
    for p, c in batches[:2]:
        trl_call(first, p, c)
    callback.on_save(args, TrainerState(global_step=2), TrainerControl())
    assert (tmp_path / "checkpoint-2" / STATE_FILE).is_file()

    resumed = make_reward(shaping).for_trl()
    restore = ShaperStateCallback(resumed)
    restore.on_train_begin(args, TrainerState(global_step=2), TrainerControl())
    assert restore.restored_from == tmp_path / "checkpoint-2" / STATE_FILE
    assert trl_call(resumed, *batches[2]) == pytest.approx(expected[2], abs=1e-6)
    fresh = make_reward(shaping).for_trl()
    assert trl_call(fresh, *batches[2]) != pytest.approx(expected[2], abs=1e-3)  # the state matters


# -- real trainers -------------------------------------------------------------------------------------------------

class RecordingFunc:
    """Forwards TRL's call to a reward function and keeps the texts and outputs (module level, so it pickles)."""

    def __init__(self, func) -> None:
        self.func = func
        self.__name__ = func.__name__
        self.calls: list[tuple[list, list, list, list[float]]] = []

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        out = self.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        self.calls.append((list(prompts), list(completions), [list(i) for i in completion_ids], out))
        return out


def _run_trainer(kind, policy_path, reward_funcs, weights, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    prompts = [[{"role": "user", "content": t}] for t in ("Say hi.", "Name a color.", "Count to three.", "Why?")]
    common = dict(output_dir=str(tmp_path / kind), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                  num_generations=2, max_completion_length=8, logging_steps=1, report_to="none",
                  save_strategy="no", reward_weights=weights, seed=0, learning_rate=1e-5)
    if kind == "grpo":
        args, trainer_cls = trl.GRPOConfig(**common), trl.GRPOTrainer
    else:
        args, trainer_cls = trl.RLOOConfig(**common), trl.RLOOTrainer
    trainer = trainer_cls(model=policy, reward_funcs=reward_funcs, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts * 2}))
    trainer.train()
    return [row for row in trainer.state.log_history if any(k.startswith("rewards/") for k in row)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_trainer_with_callable(kind, demo_policy_path, make_reward, tmp_path):
    reward = make_reward({"weights": "steerlm-70b"})
    func = RecordingFunc(reward.for_trl(policy_pad_token_id=None))
    logs = _run_trainer(kind, demo_policy_path, [func], None, tmp_path)
    assert len(logs) == 2 and len(func.calls) >= 2
    for prompts, completions, ids, out in func.calls:
        assert all(math.isfinite(x) for x in out)
        assert out == pytest.approx(reward(prompts, completions, lengths=[len(i) for i in ids]), abs=1e-5)
    for row, (_, _, _, out) in zip(logs, func.calls):
        assert row[f"rewards/{func.__name__}/mean"] == pytest.approx(sum(out) / len(out), abs=1e-4)
        for name in reward.schema.live_names:
            assert math.isfinite(row[f"{func.__name__}/{name}"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_trainer_with_attribute_funcs(kind, demo_policy_path, make_reward, tmp_path):
    reward = make_reward({"weights": "steerlm-70b"})
    funcs, weights = reward.trl_attribute_funcs()
    recorded = [RecordingFunc(f) for f in funcs]
    before = reward.scorer.backend.forward_calls
    logs = _run_trainer(kind, demo_policy_path, recorded, weights, tmp_path)
    calls = len(recorded[0].calls)
    assert calls >= 2 and all(len(r.calls) == calls for r in recorded)
    forwards = reward.scorer.backend.forward_calls - before
    planned = sum(len(reward.scorer.backend.plan(reward.scorer.encode(r[0], r[1]))) for r in recorded[0].calls)
    assert forwards == planned  # one scoring per batch, not one per function
    for step in range(calls):
        prompts, completions, _, _ = recorded[0].calls[step]
        attributes = reward.score(prompts, completions).attributes
        for rec in recorded:
            assert rec.calls[step][3] == pytest.approx(attributes.column(rec.func.attribute).tolist(), abs=1e-5)
    for row, step in zip(logs, range(calls)):
        for rec in recorded:
            out = rec.calls[step][3]
            assert math.isfinite(row[f"rewards/{rec.__name__}/mean"])
            assert row[f"rewards/{rec.__name__}/mean"] == pytest.approx(sum(out) / len(out), abs=1e-4)


@pytest.mark.slow
def test_trainer_resume_restores_running_normalization(demo_policy_path, make_reward, tmp_path):
    """A GRPO run resumed from checkpoint-1 ends with the same normalization state as an uninterrupted run."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    shaping = {"weights": "steerlm-70b", "normalization": "running", "reward_normalization": "running"}
    prompts = [[{"role": "user", "content": t}] for t in ("Say hi.", "Name a color.", "Count to three.", "Why?")]

    def train(output_dir, max_steps, resume=False):
        reward = make_reward(shaping)
        func = RecordingFunc(reward.for_trl())
        args = trl.GRPOConfig(output_dir=str(output_dir), use_cpu=True, max_steps=max_steps,
                              per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                              logging_steps=1, report_to="none", save_strategy="steps", save_steps=1, seed=0,
                              learning_rate=1e-5)
        trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(demo_policy_path), reward_funcs=[func],
                                  args=args, processing_class=AutoTokenizer.from_pretrained(demo_policy_path),
                                  train_dataset=Dataset.from_dict({"prompt": prompts * 4}),
                                  callbacks=[ShaperStateCallback(func.func)])
        trainer.train(resume_from_checkpoint=resume or None)
        return reward, func

    full, full_calls = train(tmp_path / "full", 2)
    train(tmp_path / "cut", 1)
    assert (tmp_path / "cut" / "checkpoint-1" / STATE_FILE).is_file()
    resumed, resumed_calls = train(tmp_path / "cut", 2, resume=True)
    assert resumed.shaper.attribute_stats.count == full.shaper.attribute_stats.count == 8  # 4 per step
    assert resumed_calls.calls[-1][1] == full_calls.calls[-1][1]  # the same step-2 completions
    assert resumed_calls.calls[-1][3] == pytest.approx(full_calls.calls[-1][3], abs=1e-5)
    torch.testing.assert_close(resumed.shaper.attribute_stats.mean, full.shaper.attribute_stats.mean)
    torch.testing.assert_close(resumed.shaper.reward_stats.moments.m2, full.shaper.reward_stats.moments.m2)


def test_a_zero3_reward_refuses_to_pickle(demo_scorer):
    """A sharded reward rebuilt in a spawned process could never join the ranks' collectives."""
    import pickle

    from steer_reward.config import load_config
    from steer_reward.reward import SteerReward
    from steer_reward.shaping import RewardShaper

    config = load_config({"backend": "deepspeed", "model": {"path": "demo"}})
    reward = SteerReward(demo_scorer, RewardShaper(demo_scorer.schema, config.shaping), config)
    with pytest.raises(TypeError, match="backend: remote"):
        pickle.dumps(reward.for_trl())
