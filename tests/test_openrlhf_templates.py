"""OpenRLHF queries rendered by the real chat templates of common actor families (tests/data/actor_templates, in
tiny offline tokenizers): the conversation and the response come back exactly, with the actor tokenizer given
(``server.actor_tokenizer``) and without it, whole and left-truncated the way OpenRLHF truncates prompts; and
OpenRLHF's own rollout code (agent.py) through a reward_func file gets the reward of that conversation."""

from __future__ import annotations

import asyncio

import pytest
import torch
import yaml

from openrlhf_harness import ACTORS, OPENRLHF_DIR, ModuleSwap, SamplingParams, ScriptedEngine, build_actor_tokenizer, \
    load_agent
from steer_reward.errors import InputError
from steer_reward.server.actor_templates import ActorTemplate
from steer_reward.server.openrlhf import QueryParser, parse_query

SYSTEM, USER1, ANSWER1, USER2 = "Be terse.", "Hi there", "Hello!", "Tell me a joke about cats."
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER1},
                {"role": "assistant", "content": ANSWER1}, {"role": "user", "content": USER2}]
RESPONSE = "A cat walks into a bar.\nIt orders nothing."
REASONING = "<think>\nThe user wants a joke.\n</think>\n\n"

# What each family's conversation reads back as: templates that fold the system message into a user turn keep it
# there (the actor saw it as user text); Gemma 2 has no system role at all.
EXPECTED = {
    "qwen3": CONVERSATION, "llama31": CONVERSATION, "llama2": CONVERSATION, "phi3": CONVERSATION,
    "deepseek_r1": CONVERSATION,
    "mistral": [CONVERSATION[1], CONVERSATION[2], {"role": "user", "content": f"{SYSTEM}\n\n{USER2}"}],
    "gemma2": CONVERSATION[1:],
}
FAMILY = {"qwen3": "chatml", "llama31": "llama3", "mistral": "mistral", "llama2": "mistral", "gemma2": "gemma",
          "phi3": "phi3", "deepseek_r1": "deepseek"}
GENERATION_PROMPT = {"qwen3": "<|im_start|>assistant\n", "llama31": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "mistral": "[/INST]", "llama2": "[/INST]", "gemma2": "<start_of_turn>model\n",
                     "phi3": "<|assistant|>\n", "deepseek_r1": "<｜Assistant｜><think>\n"}


@pytest.fixture(scope="module")
def actors(tmp_path_factory):
    """name → (tokenizer, folder)."""
    built = {}
    for name in ACTORS:
        folder = tmp_path_factory.mktemp(f"actor-{name}")
        built[name] = (build_actor_tokenizer(name, folder), str(folder))
    return built


def _input_messages(name):
    return CONVERSATION[1:] if name == "gemma2" else CONVERSATION


def _openrlhf_query(tokenizer, prompt: str, response: str, stop: str, keep_last: int | None = None) -> str:
    """What OpenRLHF 0.11's agent.py sends: decode(prompt_ids[-keep:] + response_ids, skip_special_tokens=False)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if keep_last is not None:
        prompt_ids = prompt_ids[-keep_last:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(stop)]
    return tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)


def test_the_actor_tokenizer_names_its_family_generation_prompt_and_end_tokens(actors):
    for name, (tokenizer, folder) in actors.items():
        actor = ActorTemplate.from_tokenizer(folder)
        assert actor.family.name == FAMILY[name], name
        assert actor.generation_prompt == GENERATION_PROMPT[name], name
        assert tokenizer.eos_token in actor.end_tokens, name


@pytest.mark.parametrize("name", list(ACTORS))
@pytest.mark.parametrize("with_actor", [True, False], ids=["actor-tokenizer", "auto"])
def test_conversation_and_response_come_back(actors, name, with_actor):
    tokenizer, folder = actors[name]
    actor = ActorTemplate.from_tokenizer(folder) if with_actor else None
    prompt = tokenizer.apply_chat_template(_input_messages(name), tokenize=False, add_generation_prompt=True)
    full_ids = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    generated = RESPONSE if name != "deepseek_r1" else REASONING.removeprefix("<think>\n") + RESPONSE
    for keep in (None, full_ids - 3, full_ids - 12):  # whole, and left-truncated the way OpenRLHF truncates
        query = _openrlhf_query(tokenizer, prompt, generated, ACTORS[name].stop, keep)
        parsed = parse_query(query, prompt, actor=actor)
        assert parsed.template == FAMILY[name], (name, keep)
        assert parsed.prompt == EXPECTED[name], (name, keep, query)
        assert parsed.response == RESPONSE, (name, keep, query)


def test_llama31_system_block_is_template_text_not_a_system_turn(actors):
    tokenizer, folder = actors["llama31"]
    actor = ActorTemplate.from_tokenizer(folder)
    for messages in ([{"role": "user", "content": USER2}], CONVERSATION):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "Cutting Knowledge Date" in prompt
        query = _openrlhf_query(tokenizer, prompt, RESPONSE, "<|eot_id|>")
        for parser_actor in (actor, None):
            assert parse_query(query, prompt, actor=parser_actor).prompt == messages


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking-on", "thinking-off"])
def test_qwen3_reasoning_is_neither_a_turn_nor_scored_unless_asked(actors, thinking):
    tokenizer, folder = actors["qwen3"]
    actor = ActorTemplate.from_tokenizer(folder)
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=thinking)
    generated = REASONING + RESPONSE if thinking else RESPONSE
    query = _openrlhf_query(tokenizer, prompt, generated, "<|im_end|>")
    for parser_actor in (actor, None):
        stripped = parse_query(query, prompt, actor=parser_actor, strip_reasoning=True)
        assert stripped.prompt == CONVERSATION  # thinking off: the empty <think> block is no assistant turn
        assert stripped.response == RESPONSE
        kept = parse_query(query, prompt, actor=parser_actor, strip_reasoning=False)
        assert kept.prompt == CONVERSATION
        # an empty block is template text either way; real reasoning stays when asked to
        assert kept.response == (REASONING + RESPONSE if thinking else RESPONSE)


def test_unfinished_reasoning_scores_an_empty_answer(actors):
    tokenizer, _ = actors["qwen3"]
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    query = prompt + "<think>\nStill thinking about"  # hit max_tokens inside the block: no end token either
    assert parse_query(query, prompt).response == ""
    assert parse_query(query, prompt, strip_reasoning=False).response == "<think>\nStill thinking about"


def test_deepseek_reasoning_and_end_of_sentence_are_removed(actors):
    tokenizer, folder = actors["deepseek_r1"]
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    query = _openrlhf_query(tokenizer, prompt, "Joke time.\n</think>\n\n" + RESPONSE, "<｜end▁of▁sentence｜>")
    assert query.endswith("<｜end▁of▁sentence｜>")
    parsed = parse_query(query, prompt, actor=ActorTemplate.from_tokenizer(folder))
    assert parsed.response == RESPONSE
    assert all("｜" not in m["content"] for m in parsed.prompt)


def test_legacy_sentencepiece_decode_is_not_a_prefix_of_the_prompt_yet_parses(actors):
    """Llama-2's sentencepiece decode puts a space after <s>: the query no longer starts with the prompt."""
    tokenizer, folder = actors["llama2"]
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    query = _openrlhf_query(tokenizer, prompt, RESPONSE, "</s>")
    assert not query.startswith(prompt)
    parsed = parse_query(query, prompt, actor=ActorTemplate.from_tokenizer(folder))
    assert (parsed.prompt, parsed.response) == (CONVERSATION, RESPONSE)


def test_a_response_repeating_the_user_message_and_markup_does_not_move_the_split(actors):
    tokenizer, _ = actors["llama2"]
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    tricky = f"You said: {USER2} [/INST] and so on."
    query = _openrlhf_query(tokenizer, prompt, tricky, "</s>")
    assert parse_query(query, prompt).response == tricky


def test_the_prompt_field_is_what_the_conversation_is_read_from_after_truncation(actors):
    """A prompt cut inside its first turn still yields the whole conversation (the prompt field is whole)."""
    tokenizer, _ = actors["qwen3"]
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    query = _openrlhf_query(tokenizer, prompt, RESPONSE, "<|im_end|>", keep_last=8)
    assert "system" not in query and "<|im_start|>user" not in query  # only the last header survived
    parsed = parse_query(query, prompt)
    assert (parsed.prompt, parsed.response) == (CONVERSATION, RESPONSE)


def test_plain_prompts_with_an_actor_tokenizer_and_left_truncation(actors):
    tokenizer, folder = actors["qwen3"]
    parser = QueryParser(ActorTemplate.from_tokenizer(folder))
    prompt = "Question: which animal says meow, and why do cats purr when they are content?\nAnswer:"
    for keep in (None, 10):
        query = _openrlhf_query(tokenizer, prompt, " A cat.", "<|im_end|>", keep)
        parsed = parser.parse(query, prompt)
        assert (parsed.template, parsed.prompt, parsed.response) == ("plain", prompt, " A cat.")


def test_a_tokenizer_without_chat_template_means_plain_prompts(tmp_path, actors):
    tokenizer, _ = actors["phi3"]
    tokenizer = type(tokenizer).from_pretrained(actors["phi3"][1])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    actor = ActorTemplate.from_tokenizer(str(tmp_path))
    assert actor.family is None and actor.end_tokens == ("<|endoftext|>",)
    assert parse_query("Say hi: hi<|endoftext|>", "Say hi:", actor=actor).response == " hi"


def test_an_unknown_template_is_refused_at_startup(tmp_path, actors):
    tokenizer = type(actors["phi3"][0]).from_pretrained(actors["phi3"][1])
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="none of the families"):
        ActorTemplate.from_tokenizer(str(tmp_path))
    with pytest.raises(InputError, match="cannot load a tokenizer"):
        ActorTemplate.from_tokenizer(str(tmp_path / "missing"))
    tokenizer.chat_template = "{{ raise_exception('roles must be special') }}"
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="cannot render .*roles must be special"):
        ActorTemplate.from_tokenizer(str(tmp_path))


# -- OpenRLHF's own rollout code ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_module():
    if OPENRLHF_DIR is None:
        pytest.skip("openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)")
    pytest.importorskip("aiohttp")
    swap = ModuleSwap()
    yield load_agent(swap)
    swap.restore()


@pytest.mark.parametrize("name", ["qwen3", "llama31", "mistral", "gemma2", "phi3", "deepseek_r1"])
def test_openrlhf_rollout_through_a_reward_func_file_scores_the_recovered_conversation(
        agent_module, actors, name, demo_model_path, tmp_path, make_reward):
    """OpenRLHF's SingleTurnAgentExecutor tokenizes the templated prompt, LEFT-TRUNCATES it to fit max_length,
    generates (scripted engine), decodes the query and calls the reward_func file: the reward is the one of the
    whole conversation and the response, and no sample fell back."""
    from steer_reward.cli import main

    tokenizer, folder = actors[name]
    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu"},
                                      "shaping": {"weights": "steerlm-70b"}}))
    out = tmp_path / "reward_func.py"
    assert main(["openrlhf-func", "--config", str(config), "--actor-tokenizer", folder, "--out", str(out)]) == 0
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=str(out))
    generated = RESPONSE if name != "deepseek_r1" else "Joke time.\n</think>\n\n" + RESPONSE
    engine = ScriptedEngine(tokenizer, ACTORS[name].stop, lambda ids, call: generated)
    prompt = tokenizer.apply_chat_template(_input_messages(name), tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    max_new = 40
    for max_length in (prompt_tokens + max_new, prompt_tokens + max_new - 6):  # the second truncates the prompt
        output = asyncio.run(executor.execute(prompt, None, SamplingParams(max_tokens=max_new), max_length,
                                              tokenizer, engine))
        assert output["reward"] is not None
        expected = make_reward({"weights": "steerlm-70b"}).score([EXPECTED[name]], [RESPONSE])
        torch.testing.assert_close(torch.tensor(output["reward"]), expected.rewards, atol=1e-4, rtol=1e-4)
        assert output["extra_logs"]["reward_failed"] == [0.0]


def test_openrlhf_func_checks_the_actor_tokenizer_when_it_writes_the_file(tmp_path, capsys, actors):
    from steer_reward.cli import main

    out = tmp_path / "reward_func.py"
    assert main(["openrlhf-func", "--model", "demo", "--actor-tokenizer", str(tmp_path / "nope"),
                 "--out", str(out)]) == 2
    assert "server.actor_tokenizer" in capsys.readouterr().err and not out.exists()
    assert main(["openrlhf-func", "--model", "demo", "--actor-tokenizer", actors["qwen3"][1], "--out", str(out)]) == 0
    assert "actor template: chatml" in capsys.readouterr().out
    assert actors["qwen3"][1] in out.read_text()  # an absolute path: OpenRLHF loads the file from elsewhere
