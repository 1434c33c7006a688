"""TRL scores evaluation batches with the training reward functions: only training batches may move running
statistics. A real GRPOTrainer with evaluation after every step, for the shaped and the per-attribute faces."""

from __future__ import annotations

import pytest
import torch
from recording import CallRecorder

from steer_reward.shaping import Moments

TRAIN = ["Say hi.", "Name a color.", "Count to three.", "Why?"]
EVAL = ["Evaluate this sentence.", "Evaluation prompt two."]


def _is_eval(prompts) -> bool:
    return prompts[0][0]["content"] in EVAL


@pytest.mark.slow
def test_evaluation_batches_leave_running_statistics_alone(demo_policy_path, make_reward, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    shaping = {"weights": "steerlm-70b", "normalization": "running"}
    shaped = make_reward({**shaping, "reward_normalization": "running"})
    per_attribute = make_reward(shaping)
    attribute_funcs, attribute_weights = per_attribute.trl_attribute_funcs()
    funcs = [CallRecorder(shaped.for_trl()), *[CallRecorder(f) for f in attribute_funcs]]

    torch.manual_seed(0)
    chat = lambda texts: [[{"role": "user", "content": t}] for t in texts]  # noqa: E731
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                          per_device_eval_batch_size=4, num_generations=2, max_completion_length=8,
                          eval_strategy="steps", eval_steps=1, logging_steps=1, report_to="none", save_strategy="no",
                          reward_weights=[1.0, *attribute_weights], seed=0, learning_rate=1e-5)
    trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(demo_policy_path), reward_funcs=funcs,
                              args=args, processing_class=AutoTokenizer.from_pretrained(demo_policy_path),
                              train_dataset=Dataset.from_dict({"prompt": chat(TRAIN) * 2}),
                              eval_dataset=Dataset.from_dict({"prompt": chat(EVAL)}))
    trainer.train()

    calls = funcs[0].calls
    train_calls = [c for c in calls if not _is_eval(c[0])]
    assert len(train_calls) == 2 and len(calls) - len(train_calls) >= 2  # evaluation ran after each step
    assert [c for c in funcs[1].calls] == calls  # every function saw the same batches
    trained = [(p, c) for prompts, completions in train_calls for p, c in zip(prompts, completions)]
    assert shaped.shaper.attribute_stats.count == per_attribute.shaper.attribute_stats.count == len(trained) == 8
    assert shaped.shaper.reward_stats.count == 8
    values = shaped.score([p for p, _ in trained], [c for _, c in trained]).attributes.values
    expected = Moments.of(values)
    for reward in (shaped, per_attribute):
        torch.testing.assert_close(reward.shaper.attribute_stats.mean, expected.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reward.shaper.attribute_stats.moments.m2, expected.m2, rtol=1e-5, atol=1e-5)
