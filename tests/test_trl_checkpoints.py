"""ShaperStateCallback: built from any face of a reward, and exact about generation boundaries when GRPO scores
one generation batch for several steps (``steps_per_generation > 1``)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from recording import CallRecorder

from steer_reward.integrations.trl import (
    STATE_FILE,
    AsyncSteerRewardFunc,
    ShaperStateCallback,
    attribute_reward_funcs,
)

PROMPTS = ["What is the capital of France?", "Name a prime number."]
COMPLETIONS = ["Paris.", "Seven."]


def _faces(reward):
    funcs, _ = reward.trl_attribute_funcs()
    async_funcs, _ = attribute_reward_funcs(reward, asynchronous=True)
    return {"SteerReward": reward, "SteerRewardFunc": reward.for_trl(), "AsyncSteerRewardFunc":
            AsyncSteerRewardFunc(reward), "AttributeRewardFunc": funcs[0], "AsyncAttributeRewardFunc":
            async_funcs[-1], "SharedAttributeForward": funcs[0].shared}


def test_callback_accepts_every_face_of_a_reward(make_reward, tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    reward = make_reward({"weights": "steerlm-70b", "normalization": "running"})
    reward.score(PROMPTS, COMPLETIONS, update_stats=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    for step, (kind, face) in enumerate(_faces(reward).items(), start=1):
        callback = ShaperStateCallback(face)
        callback.on_save(args, TrainerState(global_step=step), TrainerControl())
        saved = json.loads((tmp_path / f"checkpoint-{step}" / STATE_FILE).read_text())
        assert saved == reward.state_dict(), kind
        fresh = make_reward({"weights": "steerlm-70b", "normalization": "running"})
        restore = ShaperStateCallback(_faces(fresh)[kind])
        restore.on_train_begin(args, TrainerState(global_step=step), TrainerControl())
        assert fresh.state_dict() == reward.state_dict(), kind
    with pytest.raises(TypeError, match="SteerReward or one of its TRL functions"):
        ShaperStateCallback(lambda prompts, completions, **_: [0.0] * len(prompts))


def test_async_face_restores_before_its_first_call(make_reward, tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    source = make_reward({"normalization": "running"})
    source.score(PROMPTS, COMPLETIONS, update_stats=True)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / STATE_FILE).write_text(json.dumps(source.state_dict()))
    reward = make_reward({"normalization": "running"})
    funcs, _ = attribute_reward_funcs(reward, asynchronous=True)
    ShaperStateCallback(funcs[1]).on_train_begin(
        TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), TrainerState(global_step=3),
        TrainerControl())
    out = asyncio.run(funcs[1](prompts=PROMPTS, completions=COMPLETIONS))
    expected = source.shaper.normalized(source.shaper.decorrelated(source.score(PROMPTS, COMPLETIONS).attributes.values))
    assert out == pytest.approx(expected[:, reward.schema.index(funcs[1].attribute)].tolist(), abs=1e-5)


@pytest.mark.slow
def test_mid_cycle_resume_counts_each_generation_batch_once(demo_policy_path, make_reward, tmp_path):
    """steps_per_generation=2: a checkpoint after step 1 interrupts a generation cycle. The resumed run generates
    and scores that cycle's prompts again, so the checkpoint holds the statistics of the cycle's start and the
    regenerated batch takes the interrupted one's place: 2 generation batches counted, as in an uninterrupted run."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    from steer_reward.shaping import Moments

    prompts = [[{"role": "user", "content": t}] for t in ("Say hi.", "Name a color.", "Count to three.", "Why?")]

    def train(output_dir, max_steps, resume=False):
        reward = make_reward({"weights": "steerlm-70b", "normalization": "running"})
        funcs, weights = reward.trl_attribute_funcs()
        recorders = [CallRecorder(f) for f in funcs]
        args = trl.GRPOConfig(output_dir=str(output_dir), use_cpu=True, max_steps=max_steps,
                              per_device_train_batch_size=4, steps_per_generation=2, num_generations=2,
                              max_completion_length=6, logging_steps=1, report_to="none", save_strategy="steps",
                              save_steps=1, seed=0, learning_rate=1e-5, reward_weights=weights)
        trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(demo_policy_path), args=args,
                                  reward_funcs=recorders, processing_class=AutoTokenizer.from_pretrained(demo_policy_path),
                                  train_dataset=Dataset.from_dict({"prompt": prompts * 4}),
                                  callbacks=[ShaperStateCallback(funcs[0])])  # a per-attribute face
        trainer.train(resume_from_checkpoint=resume or None)
        return reward, recorders[0].calls

    def saved_count(run, step):
        return json.loads((tmp_path / run / f"checkpoint-{step}" / STATE_FILE).read_text())["attribute_stats"]["count"]

    full, full_calls = train(tmp_path / "full", 4)
    assert len(full_calls) == 2 and full.shaper.attribute_stats.count == 16  # 2 generations of 4 prompts x 2
    assert [saved_count("full", s) for s in (1, 2, 3, 4)] == [0, 8, 8, 16]  # mid-cycle: the cycle's start

    _, cut_calls = train(tmp_path / "cut", 1)
    assert saved_count("cut", 1) == 0
    resumed, resumed_calls = train(tmp_path / "cut", 4, resume=True)
    assert len(resumed_calls) == 2
    # the resumed run regenerated the interrupted cycle's prompts first
    assert sorted(str(p) for p in resumed_calls[0][0]) == sorted(str(p) for p in cut_calls[0][0])
    assert resumed.shaper.attribute_stats.count == full.shaper.attribute_stats.count == 16
    samples = [(p, c) for ps, cs in resumed_calls for p, c in zip(ps, cs)]
    expected = Moments.of(resumed.score([p for p, _ in samples], [c for _, c in samples]).attributes.values)
    torch.testing.assert_close(resumed.shaper.attribute_stats.mean, expected.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed.shaper.attribute_stats.moments.m2, expected.m2, rtol=1e-5, atol=1e-4)
