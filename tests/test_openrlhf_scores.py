"""What the reply's ``scores`` do inside OpenRLHF 0.11.2: its own rollout code (samples_generator.py: dispatch,
experiences, dynamic filtering; agent.py: generate, decode, call the reward) reads replies of a reward_func file.

OpenRLHF reads ``scores`` only for dynamic filtering (keep a prompt's samples when min < mean score < max, range
(0, 1) by default) and logs them as ``score``. Shaped rewards live outside (0, 1): sent as ``scores`` they make
the default filter drop every group; ``server.openrlhf_scores: sigmoid`` (the default) keeps every group.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from openrlhf_harness import OPENRLHF_DIR, EngineActor, ModuleSwap, ScriptedEngine, load_agent, load_samples_generator
from steer_reward.server.openrlhf import reward_scores

if OPENRLHF_DIR is None:
    pytest.skip("openrlhf is not installed (pip install --no-deps openrlhf==0.11.2)", allow_module_level=True)
pytest.importorskip("aiohttp")

PROMPTS = ["Name a prime number.", "What is the capital of France?", "Write one word about the sea."]
ANSWERS = ["Seven.", "Paris, of course.", "Waves.", "I do not know.", "Blue and deep.", "Eleven is prime."]
N_SAMPLES = 3


@pytest.fixture(scope="module")
def openrlhf():
    swap = ModuleSwap()
    agent = load_agent(swap)
    generator = load_samples_generator(swap)
    yield SimpleNamespace(agent=agent, generator=generator)
    swap.restore()


def _reward_func_file(tmp_path, demo_model_path, scores: str):
    from steer_reward.cli import main

    config = tmp_path / f"reward-{scores}.yaml"
    # bias 3: shaped rewards around 3, outside OpenRLHF's default filtering range, as shaped rewards usually are
    config.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu"},
                                      "shaping": {"weights": "steerlm-70b", "bias": 3.0},
                                      "server": {"openrlhf_scores": scores}}))
    out = tmp_path / f"reward_func_{scores}.py"
    assert main(["openrlhf-func", "--config", str(config), "--out", str(out)]) == 0
    return str(out)


def _generate(openrlhf, reward_func: str, tokenizer, filter_range=(0.0, 1.0)):
    """One training batch of len(PROMPTS) prompts through OpenRLHF's SamplesGenerator with dynamic filtering."""
    args = SimpleNamespace(
        algo=SimpleNamespace(dynamic_filtering_enable=True, dynamic_filtering_range=filter_range,
                             advantage=SimpleNamespace(is_correction_level="off")),
        rollout=SimpleNamespace(batch_size=len(PROMPTS), n_samples_per_prompt=N_SAMPLES,
                                vllm_generate_batch_size=None),
        vllm=SimpleNamespace(enable_sleep=False))
    executor = openrlhf.agent.SingleTurnAgentExecutor(remote_rm_url=reward_func)
    engine = ScriptedEngine(tokenizer, tokenizer.eos_token, lambda ids, call: ANSWERS[call % len(ANSWERS)])
    batches = [(["demo"], [p], [""], [None]) for p in PROMPTS]  # (datasources, prompts, labels, images)
    generator = openrlhf.generator.SamplesGenerator(SimpleNamespace(args=args), batches, None, tokenizer,
                                                    [EngineActor(executor, engine)])
    experiences, pass_rate, consumed, _ = generator.generate_samples(max_new_tokens=16, max_len=256,
                                                                      n_samples_per_prompt=N_SAMPLES)
    return experiences, pass_rate, engine


@pytest.fixture(scope="module")
def policy_tokenizer(demo_policy_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_policy_path)


def test_rewards_sent_as_scores_make_the_default_filter_drop_every_group(openrlhf, tmp_path, demo_model_path,
                                                                        policy_tokenizer):
    experiences, pass_rate, engine = _generate(openrlhf, _reward_func_file(tmp_path, demo_model_path, "reward"),
                                               policy_tokenizer)
    assert len(engine.calls) == len(PROMPTS) * N_SAMPLES  # every prompt was generated and scored...
    assert experiences == [] and pass_rate == 0.0  # ...and all of it thrown away by the (0, 1) filter


def test_sigmoid_scores_keep_every_group_and_rewards_are_untouched(openrlhf, tmp_path, demo_model_path,
                                                                  policy_tokenizer, make_reward):
    experiences, pass_rate, engine = _generate(openrlhf, _reward_func_file(tmp_path, demo_model_path, "sigmoid"),
                                               policy_tokenizer)
    assert len(experiences) == len(PROMPTS) * N_SAMPLES
    assert pass_rate == 100.0 * N_SAMPLES  # OpenRLHF 0.11.2 divides kept samples by consumed prompts
    prompts = [e.prompts[0] for e in experiences]
    answers = [policy_tokenizer.decode(ids[:-1]) for _, ids in engine.calls]
    rewards = torch.stack([e.rewards.flatten()[0] for e in experiences])
    scores = torch.stack([e.scores.flatten()[0] for e in experiences])
    # the experiences come back grouped by prompt in dispatch order, and the engine's calls were made in it too
    expected = make_reward({"weights": "steerlm-70b", "bias": 3.0}).score(prompts, answers).rewards
    assert bool((expected > 1.0).all())  # outside (0, 1): the first test's rewards-as-scores would be dropped
    torch.testing.assert_close(rewards, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, torch.tensor(reward_scores(expected.tolist(), "sigmoid")), atol=1e-5,
                               rtol=0)
    assert bool(((scores > 0) & (scores < 1)).all())
    assert all(float(e.info["reward_failed"].flatten()[0]) == 0.0 for e in experiences)


def test_a_filter_range_on_the_sigmoid_scale_still_filters(openrlhf, tmp_path, demo_model_path, policy_tokenizer):
    """Users who want dynamic filtering set the range on the score scale: sigmoid(3) ≈ 0.95 splits the groups."""
    reward_func = _reward_func_file(tmp_path, demo_model_path, "sigmoid")
    kept, _, _ = _generate(openrlhf, reward_func, policy_tokenizer, filter_range=(0.0, 0.5))
    assert kept == []  # every group's mean score is above sigmoid(0)
    kept, _, _ = _generate(openrlhf, reward_func, policy_tokenizer, filter_range=(0.5, 1.0))
    assert len(kept) == len(PROMPTS) * N_SAMPLES
