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
    assert sample.completion_truncated == 0


def _uncut(tokenizer, prompt, completion):
    return RewardFormatter(tokenizer, "chat_template", max_length=100_000).encode([prompt], [completion])[0]


@pytest.mark.parametrize("prompt", ["q", "Tell me everything about the printing press. " * 20])
def test_overlong_completion_keeps_the_prompt_end_and_the_completion_end(tokenizer, prompt):
    """A completion longer than max_length: the prompt keeps its BOS and its last max_length // 4 tokens (the
    assistant header the score depends on), the completion its end; both cuts are reported."""
    formatter = RewardFormatter(tokenizer, "chat_template", max_length=40)
    completion = "answer " * 100
    full = _uncut(tokenizer, prompt, completion)
    (sample,) = formatter.encode([prompt], [completion])
    keep = min(len(full.prompt_ids), formatter.prompt_reserve)
    assert len(sample) == 40 and len(sample.prompt_ids) == keep == 10
    assert sample.prompt_ids[0] == tokenizer.bos_token_id
    assert sample.prompt_ids[1:] == full.prompt_ids[-(keep - 1):]
    assert tokenizer.decode(sample.prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert sample.completion_ids == full.completion_ids[-(40 - keep):]
    assert sample.prompt_truncated == len(full.prompt_ids) - keep
    assert sample.completion_truncated == len(full.completion_ids) - (40 - keep) > 0


def test_prompt_reserve_is_continuous(tokenizer):
    """The completion is cut only past what fits beside the prompt's reserve, one token at a time."""
    formatter = RewardFormatter(tokenizer, "raw", max_length=32)
    prompt_ids, completion_ids = tuple(range(100, 160)), tuple(range(200, 260))
    for n in range(20, 30):
        sample = formatter.fit(prompt_ids, completion_ids[:n])
        assert len(sample) == 32 and sample.completion_truncated == max(0, n - 24)
        assert len(sample.prompt_ids) == max(8, 32 - n)


def test_overlong_reject_names_the_sample_and_its_lengths(tokenizer):
    formatter = RewardFormatter(tokenizer, "chat_template", max_length=40, overlong="reject")
    long_prompt = "word " * 200
    cut_prompt, fits = formatter.encode([long_prompt, "q"], ["the answer", "a"])  # prompts may still be cut
    assert cut_prompt.prompt_truncated > 0 and cut_prompt.completion_truncated == 0
    completion = "answer " * 100
    tokens = len(_uncut(tokenizer, "q", completion).completion_ids)
    with pytest.raises(FormattingError, match=rf"sample 1: the completion has {tokens} tokens .* at most 30 "
                                              r"completion tokens fit model.max_length 40") as caught:
        formatter.encode(["q", "q"], ["a", completion])
    assert caught.value.index == 1 and "overlong" in caught.value.reason


def test_model_config_reaches_the_formatter(tokenizer, demo_model_path):
    from steer_reward.config import load_config
    from steer_reward.scoring import AttributeScorer

    config = load_config({"model": {"path": demo_model_path, "device": "cpu", "max_length": 48,
                                    "overlong": "reject", "template": "steerlm", "system_prompt": "S"}})
    formatter = AttributeScorer.from_config(config).formatter
    assert (formatter.overlong, formatter.max_length, formatter.template, formatter.system_prompt) == \
        ("reject", 48, "steerlm", "S")


def test_attribute_scores_report_both_cuts(make_reward):
    """The library's AttributeScores: a 6000-token completion at the default max_length 4096."""
    reward = make_reward()
    completion = "answer " * 6000
    scored = reward.score(["q", "q"], ["short", completion])
    formatter = reward.scorer.formatter
    samples = formatter.encode(["q", "q"], ["short", completion])
    assert scored.attributes.completion_truncated.tolist() == [0, samples[1].completion_truncated]
    assert samples[1].completion_truncated > 0 and len(samples[1]) == 4096
    assert scored.attributes.prompt_truncated.tolist() == [0, samples[1].prompt_truncated]
    assert scored.attributes.completion_lengths.tolist()[1] == len(samples[1].completion_ids)


def test_refusals_of_the_template_or_text_name_the_sample(tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with "
                            "a user turn') }}{% endif %}" + tokenizer.chat_template)
    formatter = RewardFormatter(strict, "chat_template")
    with pytest.raises(FormattingError, match="sample 1: TemplateError: must start with a user turn"):
        formatter.encode(["ok", [{"role": "assistant", "content": "x"}]], ["a", "b"])
    with pytest.raises(FormattingError, match=r"sample 2: the completion holds a lone surrogate '\\ud800'"):
        RewardFormatter(tokenizer, "chat_template").encode(["a", "b", "c"], ["x", "y", "bad \ud800"])
    with pytest.raises(FormattingError, match="sample 0: .*prompt holds a lone surrogate"):
        RewardFormatter(tokenizer, "steerlm").encode(["\udfff"], ["x"])
    with pytest.raises(FormattingError, match="sample 0: prompt message 0: role must be a string"):
        RewardFormatter(tokenizer, "steerlm").encode([[{"role": None, "content": "x"}]], ["x"])


def test_missing_chat_template_is_a_clear_error(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(FormattingError, match="no chat template"):
        RewardFormatter(NoTemplate(), "chat_template")


def test_remote_replies_carry_both_cuts_into_attribute_scores():
    """A server reply's completion_truncated_tokens reaches AttributeScores (zeros from servers without the key,
    which refuse cut completions)."""
    from steer_reward.client import attribute_scores_from_reply

    reply = {"names": ["a"], "attributes": {"a": [1.0, 2.0]}, "rewards": [1.0, 2.0], "completion_lengths": [3, 9],
             "prompt_truncated_tokens": [0, 4], "completion_truncated_tokens": [0, 7]}
    scores = attribute_scores_from_reply(reply)
    assert scores.prompt_truncated.tolist() == [0, 4] and scores.completion_truncated.tolist() == [0, 7]
    del reply["completion_truncated_tokens"]
    assert attribute_scores_from_reply(reply).completion_truncated.tolist() == [0, 0]


def test_every_backend_builds_its_formatter_from_the_model_config():
    """A formatter built field by field skips model.overlong (and any later model option): backends use
    RewardFormatter.from_config."""
    source = Path(__file__).resolve().parents[1] / "steer_reward"
    direct = [f"{path.relative_to(source)}:{number}" for path in sorted(source.rglob("*.py"))
              if path.name != "formatting.py"
              for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
              if "RewardFormatter(" in line]
    assert not direct, f"use RewardFormatter.from_config at {direct}"
