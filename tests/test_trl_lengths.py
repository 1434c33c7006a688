"""The length penalty counts the policy's completion tokens the way TRL counts them: through the end-of-sequence
token (EOS included), whatever the policy's pad token is, and never tool results."""

from __future__ import annotations

import pytest

from steer_reward.integrations.trl import policy_lengths

EOS, PAD = 5, 2


def test_unpadded_rows_count_whole_whatever_the_pad_token():
    """GRPO/RLOO pass each completion cut after its first EOS; TRL's completion_mask counts that EOS."""
    rows = [[7, 8, EOS], [7, EOS], [7, 8, 9]]
    for pad in (None, PAD, EOS):  # pad == EOS is common (Llama-3 tokenizers have no pad token)
        assert policy_lengths(rows, pad_token_id=pad, unpadded=True) == [3, 2, 3]
    assert policy_lengths(rows, eos_token_ids=[EOS]) == [3, 2, 3]
    assert policy_lengths(None) is None


def test_padded_rows_count_through_the_first_eos():
    """OnlineDPO pads rows after the EOS (TRL's truncate_right mask keeps the EOS), with pad == EOS or not."""
    assert policy_lengths([[7, 8, EOS, EOS, EOS], [7, 8, 9, 10, 11]], eos_token_ids=[EOS], pad_token_id=EOS) == [3, 5]
    assert policy_lengths([[7, EOS, PAD, PAD], [7, 8, 9, EOS]], eos_token_ids=(EOS, 6), pad_token_id=PAD) == [2, 4]
    with pytest.raises(ValueError, match="policy_eos_token_id"):  # the pad may be the EOS: counting would guess
        policy_lengths([[7, 8, PAD, PAD]], pad_token_id=PAD)


def test_completions_with_tool_results_are_refused():
    """TRL masks tool results out of its count but passes reward functions no mask."""
    completions = [[{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]},
                    {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "It is 5."}]]
    with pytest.raises(ValueError, match="tool results.*length_penalty.alpha: 0"):
        policy_lengths([[7, 8, 9, 10, 11, 12]], completions, unpadded=True)
    assert policy_lengths([[7, 8]], [[{"role": "assistant", "content": "hi"}]], unpadded=True) == [2]


def test_tool_results_do_not_stop_rewards_without_a_length_penalty(make_reward):
    reward = make_reward({"weights": "helpfulness"})  # no length penalty: lengths are never counted
    completions = [[{"role": "assistant", "content": "Adding."}, {"role": "tool", "content": "5"}]]
    out = reward.for_trl()(prompts=["2+3?"], completions=completions, completion_ids=[[7, 8, 9]])
    assert out == pytest.approx(reward(["2+3?"], completions), abs=1e-6)


class Recorder:
    def __init__(self, func) -> None:
        self.func = func
        self.__name__ = func.__name__
        self.ids: list[list[int]] = []
        self.out: list[float] = []

    def __call__(self, completion_ids=None, **kwargs):
        out = self.func(completion_ids=completion_ids, **kwargs)
        self.ids += [list(i) for i in completion_ids]
        self.out += out
        return out


@pytest.mark.slow
def test_grpo_length_penalty_counts_what_trl_counts_with_pad_equal_to_eos(demo_policy_path, make_reward, tmp_path):
    """A real GRPOTrainer whose tokenizer pads with its EOS, the reward built as the README says
    (``policy_pad_token_id=tokenizer.pad_token_id``): the penalty's lengths are TRL's own completion lengths."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    tokenizer = AutoTokenizer.from_pretrained(demo_policy_path)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    reward = make_reward({"weights": "helpfulness", "length_penalty": {"alpha": 1.0, "target_tokens": 1}})
    funcs, weights = reward.trl_attribute_funcs(policy_pad_token_id=tokenizer.pad_token_id)
    penalty = Recorder(funcs[-1])
    assert funcs[-1].attribute is None  # the length-penalty column: -(len - 1) for len >= 1
    prompts = [[{"role": "user", "content": t}] for t in ("Say hi.", "Name a color.", "Count to three.", "Why?")]
    torch.manual_seed(0)
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=8,
                          num_generations=4, max_completion_length=8, logging_steps=1, report_to="none",
                          save_strategy="no", reward_weights=weights, seed=0, learning_rate=1e-5,
                          generation_kwargs={"sequence_bias": [[[eos], 4.5]]})  # some completions stop early
    trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(demo_policy_path),
                              reward_funcs=[*funcs[:-1], penalty], args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts * 4}))
    trainer.train()

    counted = [round(1 - v) for v in penalty.out]
    assert counted == [len(ids) for ids in penalty.ids]
    ends_with_eos = sum(ids[-1] == eos for ids in penalty.ids)
    assert 0 < ends_with_eos < len(penalty.ids)  # both kinds occurred: EOS-ended and cut at the length limit
    logged = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    assert logged == pytest.approx([sum(counted[:8]) / 8, sum(counted[8:]) / 8])  # TRL's own count
