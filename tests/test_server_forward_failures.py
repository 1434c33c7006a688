"""/get_reward and the reward_func file when the model's forward fails on a sample (a poison input, out of memory even alone): that sample
gets the fallback reward, reported per sample, the others in its request and batch get their own rewards; a model
that fails on every sample past ``server.fallback_streak_limit`` is answered as broken (500, /health 503), never
trained on constants. In-process app (httpx's ASGI transport) on the real demo model with a poison hook."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fault_injection import POISON, poison_model  # noqa: E402

from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.app import create_app  # noqa: E402

HEAD = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>" \
       "<|start_header_id|>assistant<|end_header_id|>\n\n"
PROMPT = HEAD.format("What is two plus two?")
GOOD = [f"It is {4 + i}, I think." for i in range(5)]


@pytest.fixture(scope="module")
def poisoned_reward(demo_model_path):
    """A reward with a model of its own whose forward raises on the poison token (the shared scorer stays clean)."""
    reward = SteerReward.from_config({"model": {"path": demo_model_path, "device": "cpu"}})
    poison_model(reward.scorer)
    return reward


@pytest.fixture(scope="module")
def clean_rewards(demo_model_path):
    reward = SteerReward.from_config({"model": {"path": demo_model_path, "device": "cpu"}})
    return reward([[{"role": "user", "content": "What is two plus two?"}]] * len(GOOD), GOOD)


def post(app, bodies):
    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/get_reward", json=b) for b in bodies))
            health = await client.get("/health")
        return replies, health

    return asyncio.run(send())


def query(response: str) -> dict:
    return {"query": [PROMPT + response + "<|eot_id|>"], "prompts": [PROMPT]}


def test_a_poison_sample_gets_the_fallback_and_the_others_their_rewards(poisoned_reward, clean_rewards):
    app = create_app(poisoned_reward, type(poisoned_reward.config.server)(fallback_reward=-3.0, max_wait_ms=200))
    try:
        # One request holding the poison among good samples, and one-sample requests batched with it.
        mixed = {"query": [PROMPT + r + "<|eot_id|>" for r in (GOOD[0], f"It is {POISON}.", GOOD[1])],
                 "prompts": [PROMPT] * 3}
        replies, health = post(app, [mixed, query(GOOD[2]), query(f"Four {POISON}"), query(GOOD[3])])
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        first = replies[0].json()
        assert first["rewards"][1] == -3.0 and first["extra_logs"]["reward_failed"] == [0.0, 1.0, 0.0]
        assert [f["reason"] for f in first["failures"]] == ["forward"]
        assert first["rewards"][0] == pytest.approx(clean_rewards[0], abs=1e-4)
        assert first["rewards"][2] == pytest.approx(clean_rewards[1], abs=1e-4)
        assert replies[1].json()["rewards"][0] == pytest.approx(clean_rewards[2], abs=1e-4)
        assert replies[2].json()["rewards"] == [-3.0] and replies[2].json()["failures"][0]["reason"] == "forward"
        assert replies[3].json()["rewards"][0] == pytest.approx(clean_rewards[3], abs=1e-4)
        assert health.status_code == 200
    finally:
        app.state.service.close()


def test_a_model_that_fails_every_forward_is_answered_as_broken_not_with_constants(poisoned_reward):
    app = create_app(poisoned_reward, type(poisoned_reward.config.server)(fallback_streak_limit=2, max_wait_ms=1))
    try:
        replies, health = post(app, [query(f"{POISON} {i}") for i in range(2)])
        assert [r.json()["failures"][0]["reason"] for r in replies] == ["forward", "forward"]
        assert health.status_code == 200
        replies, health = post(app, [query(f"{POISON} again")])
        assert replies[0].status_code == 500 and health.status_code == 503
        assert "fallback_streak_limit" in health.json()["error"]
        replies, health = post(app, [query(GOOD[4])])  # a forward that works: the model is trusted again
        assert replies[0].status_code == 200 and health.status_code == 200
    finally:
        app.state.service.close()


def test_the_reward_func_file_falls_back_the_same_way(demo_model_path, clean_rewards):
    from steer_reward.openrlhf_reward_func import OpenRLHFRewardFunc

    func = OpenRLHFRewardFunc({"model": {"path": demo_model_path, "device": "cpu"},
                               "server": {"fallback_reward": -3.0, "fallback_streak_limit": 1}})
    poison_model(func.reward.scorer)
    queries = [PROMPT + r + "<|eot_id|>" for r in (GOOD[0], f"It is {POISON}.", GOOD[1])]
    reply = func(queries, [PROMPT] * 3, [None] * 3)  # OpenRLHF sends one sample; several are split the same way
    assert reply["rewards"][1] == -3.0 and reply["extra_logs"]["reward_failed"] == [0.0, 1.0, 0.0]
    assert reply["rewards"][0] == pytest.approx(clean_rewards[0], abs=1e-4)
    assert reply["rewards"][2] == pytest.approx(clean_rewards[1], abs=1e-4)
    assert func([PROMPT + f"{POISON}<|eot_id|>"], [PROMPT], [None])["rewards"] == [-3.0]  # streak 1 of 1
    with pytest.raises(RuntimeError, match="poison"):
        func([PROMPT + f"{POISON}!<|eot_id|>"], [PROMPT], [None])  # streak 2: the model is taken for broken


def test_the_reward_func_file_refuses_backends_it_cannot_run(demo_model_path):
    from steer_reward.config import ConfigError
    from steer_reward.openrlhf_reward_func import OpenRLHFRewardFunc

    func = OpenRLHFRewardFunc({"model": {"path": demo_model_path}, "backend": "remote",
                               "remote": {"urls": ["http://127.0.0.1:9"]}})
    with pytest.raises(ConfigError, match="backend: local or vllm"):
        func([PROMPT + "Four.<|eot_id|>"], [PROMPT], [None])
