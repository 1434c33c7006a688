"""Recovering (conversation, response) from actor-templated OpenRLHF queries: Llama-3, ChatML, plain, multi-turn,
trailing end-of-turn/EOS tokens; and the reply shape."""

from __future__ import annotations

import pytest
import torch

from steer_reward.errors import InputError
from steer_reward.server.openrlhf import empty_reply, openrlhf_reply, parse_query, strip_end_tokens

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


def test_reply_shape_has_one_list_per_live_attribute():
    from steer_reward.reward import ScoredBatch
    from steer_reward.scoring import AttributeScores

    values = torch.arange(18, dtype=torch.float32).reshape(2, 9)
    attrs = AttributeScores(values, ("a", "b", "c", "d", "e", "f", "g", "h", "i"), torch.tensor([3, 4]),
                            torch.tensor([0, 5]), torch.tensor([0, 0]))
    reply = openrlhf_reply(ScoredBatch(attrs, torch.tensor([1.5, float("nan")])), ["e", "i"])
    assert reply == {"rewards": [1.5, None], "scores": [1.5, None],
                     "extra_logs": {"e": [4.0, 13.0], "i": [8.0, 17.0], "prompt_truncated_tokens": [0.0, 5.0]}}
    assert empty_reply(["e"]) == {"rewards": [], "scores": [], "extra_logs": {"e": [], "prompt_truncated_tokens": []}}
