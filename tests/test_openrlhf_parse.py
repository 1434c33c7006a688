"""Recovering (conversation, response) from actor-templated OpenRLHF queries: Llama-3, ChatML, plain, multi-turn,
trailing end-of-turn/EOS tokens; the reply shape, the fallback reward, the scores (templates of the other
families: test_openrlhf_templates.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steer_reward.errors import InputError
from steer_reward.server.openrlhf import (SampleFailure, check_openrlhf_options, empty_reply, openrlhf_reply,
                                          parse_query, reward_scores, strip_end_tokens)

L3_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
             "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
L3_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
CHATML_PROMPT = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n"
                 "<|im_start|>assistant\n")
CHATML_TURNS = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a color."}]


@pytest.mark.parametrize("tail", ["<|eot_id|>", "<|eot_id|><|end_of_text|>", "", "<|end_of_text|>"])
def test_llama3_multi_turn_with_and_without_the_prompt_field(tail):
    query = L3_PROMPT + "4, as\nfollows.\n" + tail
    for prompt in (L3_PROMPT, None):
        parsed = parse_query(query, prompt)
        assert parsed.template == "llama3"
        assert parsed.prompt == L3_TURNS
        assert parsed.response == "4, as\nfollows.\n"


@pytest.mark.parametrize("tail", ["<|im_end|>", "<|im_end|>\n", "<|im_end|><|endoftext|>", ""])
def test_chatml(tail):
    query = CHATML_PROMPT + "Blue." + tail
    for prompt in (CHATML_PROMPT, None):
        parsed = parse_query(query, prompt)
        assert (parsed.template, parsed.prompt, parsed.response) == ("chatml", CHATML_TURNS, "Blue.")


@pytest.mark.parametrize("prompt, turns", [
    # Phi-4: ChatML with <|im_sep|> instead of the newline
    ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
     "<|im_start|>assistant<|im_sep|>", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    # Mistral v7 (Mistral-Small-3): [SYSTEM_PROMPT] block
    ("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>[INST]2+2?[/INST]",
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]),
    # Zephyr: Phi-3's headers, </s> closing turns
    ("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n",
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    # DeepSeek-V3: no <think> in the generation prompt
    ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>",
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]),
    # Llama-3.1 with tools in the environment: the whole preamble is template text
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: "
     "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", [{"role": "user", "content": "Hi"}]),
])
def test_template_variants(prompt, turns):
    for query in (prompt + "Four.", prompt + "Four.</s>"):
        parsed = parse_query(query, prompt)
        assert (parsed.prompt, parsed.response) == (turns, "Four.")


def test_plain_prompt_is_a_prefix_and_bos_is_dropped():
    parsed = parse_query("<s>Question: 2+2?\nAnswer: 4</s>", "<s>Question: 2+2?\nAnswer:")
    assert (parsed.template, parsed.prompt, parsed.response) == ("plain", "Question: 2+2?\nAnswer:", " 4")


def test_actor_specific_eos_is_stripped():
    parsed = parse_query("Q: hi A: yo<custom_eos>", "Q: hi A:", end_tokens=("<custom_eos>",))
    assert parsed.response == " yo"


def test_empty_response_is_kept_not_refused():
    parsed = parse_query(L3_PROMPT + "<|eot_id|>", L3_PROMPT)
    assert parsed.response == "" and parsed.prompt == L3_TURNS


def test_queries_that_cannot_be_split_are_input_errors():
    with pytest.raises(InputError, match="send the templated prompt"):
        parse_query("just some text", None)
    with pytest.raises(InputError, match="does not start with its prompt"):
        parse_query("just some text", "other prompt")
    with pytest.raises(InputError, match="must end with an assistant turn"):
        parse_query("<|im_start|>user\nHi<|im_end|>\n", None)


def test_strip_end_tokens_keeps_the_responses_own_newline():
    assert strip_end_tokens("a\n") == "a\n"
    assert strip_end_tokens("a\n<|im_end|>\n") == "a\n"
    assert strip_end_tokens("a</s></s>") == "a"


def _scored(values, rewards, truncated=(0, 5)):
    from steer_reward.reward import ScoredBatch
    from steer_reward.scoring import AttributeScores

    n = len(rewards)
    attrs = AttributeScores(values, ("a", "b", "c", "d", "e", "f", "g", "h", "i"), torch.tensor([3] * n),
                            torch.tensor(list(truncated)[:n]), torch.tensor([0] * n))
    return ScoredBatch(attrs, torch.tensor(rewards))


def test_reply_shape_has_one_finite_number_per_sample_in_every_list():
    values = torch.arange(18, dtype=torch.float32).reshape(2, 9)
    reply = openrlhf_reply(2, ["e", "i"], _scored(values, [1.5, -2.0]), [0, 1], [], scores="reward")
    assert reply == {"rewards": [1.5, -2.0], "scores": [1.5, -2.0],
                     "extra_logs": {"e": [4.0, 13.0], "i": [8.0, 17.0], "prompt_truncated_tokens": [0.0, 5.0],
                                    "reward_failed": [0.0, 0.0]},
                     "failures": []}
    assert empty_reply(["e"]) == {"rewards": [], "scores": [], "failures": [],
                                  "extra_logs": {"e": [], "prompt_truncated_tokens": [], "reward_failed": []}}


def test_failed_and_non_finite_samples_get_the_fallback_reward_and_a_flag():
    """OpenRLHF turns a null reward into a crash of the training step: NaN/inf and failed samples are answered
    with the fallback reward, flagged in extra_logs (same keys in every reply) and listed."""
    values = torch.arange(27, dtype=torch.float32).reshape(3, 9)
    values[1, 4] = float("nan")
    scored = _scored(values, [0.5, float("nan"), float("inf")], truncated=(2, 0, 1))
    failures = [SampleFailure(1, "query", "query[1]: cannot split it")]
    # samples 0, 2, 3 were scored (rows 0, 1, 2); sample 1 could not be read
    reply = openrlhf_reply(4, ["e"], scored, [0, 2, 3], failures, fallback=-3.0, scores="reward")
    assert reply["rewards"] == [0.5, -3.0, -3.0, -3.0]
    assert reply["extra_logs"]["reward_failed"] == [0.0, 1.0, 1.0, 1.0]
    assert reply["extra_logs"]["e"] == [4.0, 0.0, 0.0, 0.0]
    assert reply["extra_logs"]["prompt_truncated_tokens"] == [2.0, 0.0, 0.0, 0.0]
    assert [(f["index"], f["reason"]) for f in reply["failures"]] == [(1, "query"), (2, "non_finite"),
                                                                      (3, "non_finite")]
    json.dumps(reply, allow_nan=False)  # what the server's JSON encoder does: no NaN anywhere


def test_sigmoid_scores_stay_strictly_inside_openrlhf_default_filter_range():
    scores = reward_scores([-1000.0, -3.0, 0.0, 2.0, 17.0, 1000.0], "sigmoid")
    assert scores[2] == 0.5 and scores[1] == pytest.approx(1 / (1 + math.exp(3.0)))
    assert all(0.0 < s < 1.0 for s in scores)
    assert all(0.0 < float(torch.tensor([s])) < 1.0 for s in scores)  # OpenRLHF holds scores as float32 tensors
    assert scores == sorted(scores)
    assert reward_scores([-2.5, 4.0], "reward") == [-2.5, 4.0]


def test_bad_openrlhf_options_are_config_errors():
    from steer_reward.config import ConfigError, ServerConfig

    check_openrlhf_options(ServerConfig())
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        check_openrlhf_options(ServerConfig(openrlhf_scores="sigmoids"))
    with pytest.raises(ConfigError, match="finite"):
        check_openrlhf_options(ServerConfig(fallback_reward=float("nan")))


def test_unreadable_queries_are_input_errors_naming_why():
    with pytest.raises(InputError, match="empty"):
        parse_query("   ", "x")
    with pytest.raises(InputError, match="surrogate"):
        parse_query("Q: hi A: \ud800", "Q: hi A:")
    with pytest.raises(InputError, match="holds no text"):
        parse_query("<s> hello", "<s>")  # /score refuses an empty prompt; so does /get_reward, per sample
