"""Formatting: templates, separate prompt/completion tokenization, left truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steer_reward.formatting import FormattingError, RewardFormatter, completion_text

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def tokenizer(demo_scorer):
    return demo_scorer.tokenizer


def test_chat_template_prompt_ids_are_shared_and_concatenate_to_the_full_text(tokenizer):
    formatter = RewardFormatter(tokenizer, "chat_template")
    samples = formatter.encode(["What is 2+2?"] * 3, ["4", "four", ""])
    assert samples[0].prompt_ids == samples[1].prompt_ids == samples[2].prompt_ids
    full = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": "four"}], tokenize=False)
    assert tokenizer.decode(samples[1].input_ids) == full
    assert full.count("<|begin_of_text|>") == 1  # no second BOS from add_special_tokens
    assert samples[2].completion_ids  # an empty completion still has its end-of-turn token to score


def test_conversational_inputs(tokenizer):
    formatter = RewardFormatter(tokenizer, "chat_template")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    (sample,) = formatter.encode([messages], [[{"role": "assistant", "content": "Goodbye."}]])
    text = tokenizer.decode(sample.input_ids)
    assert text.index("Be brief.") < text.index("Hello.") < text.index("Bye") < text.index("Goodbye.")
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    with pytest.raises(FormattingError, match="role"):
        formatter.encode([[{"content": "no role"}]], ["x"])
    with pytest.raises(FormattingError, match="2 prompts but 1 completions"):
        formatter.encode(["a", "b"], ["x"])


def test_steerlm_template_matches_nemo_aligner_training_text(tokenizer):
    """The SteerLM template reproduces NeMo-Aligner's regression-RM text byte for byte."""
    rows = [json.loads(line) for line in (DATA / "helpsteer2_sample/helpsteer2_rows_from_test-rm.jsonl").open()]
    texts = [json.loads(line)["text"] for line in (DATA / "helpsteer2_sample/test-rm.jsonl").open()]
    formatter = RewardFormatter(tokenizer, "steerlm")
    for row, expected in zip(rows, texts):
        prompt_text, response_text = formatter.texts(row["prompt"], row["response"])
        assert prompt_text + response_text == expected


def test_steerlm_multi_turn(tokenizer):
    formatter = RewardFormatter(tokenizer, "steerlm", system_prompt="SYS")
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c"}]
    p, c = formatter.texts(prompt, "d")
    assert p + c == ("<extra_id_0>System\nSYS\n<extra_id_1>User\na\n<extra_id_1>Assistant\nb\n"
                     "<extra_id_1>User\nc\n<extra_id_1>Assistant\nd\n<extra_id_2>")


def test_raw_template_adds_one_bos(tokenizer):
    formatter = RewardFormatter(tokenizer, "raw")
    (sample,) = formatter.encode(["Question: why?"], [" Because."])
    assert sample.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(sample.input_ids) == "<|begin_of_text|>Question: why? Because."


def test_left_truncation_keeps_bos_and_the_whole_completion(tokenizer):
    formatter = RewardFormatter(tokenizer, "chat_template", max_length=40)
    long_prompt = "word " * 200
    (sample,) = formatter.encode([long_prompt], ["the answer"])
    full = RewardFormatter(tokenizer, "chat_template", max_length=100_000).encode([long_prompt], ["the answer"])[0]
    assert len(sample) == 40
    assert sample.completion_ids == full.completion_ids
    assert sample.prompt_ids[0] == tokenizer.bos_token_id
    assert sample.prompt_ids[1:] == full.prompt_ids[-(len(sample.prompt_ids) - 1):]
    assert sample.prompt_truncated == len(full.prompt_ids) - len(sample.prompt_ids)
    (huge,) = formatter.encode(["q"], ["answer " * 100])
    assert len(huge) == 40 and huge.completion_truncated > 0 and huge.prompt_ids == ()


def test_missing_chat_template_is_a_clear_error(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(FormattingError, match="no chat template"):
        RewardFormatter(NoTemplate(), "chat_template")
