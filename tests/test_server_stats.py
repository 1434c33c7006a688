"""/get_reward's running normalization statistics: updated once per model batch (after a warm-up), so the 8
one-sample requests of a GRPO group are shaped exactly like the same 8 samples scored as one batch; persisted in
server.state_file; never touched by /score. In-process app (httpx's ASGI transport) on the real demo model."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.app import create_app  # noqa: E402

SHAPING = {"weights": "steerlm-70b", "normalization": "running", "bias": 0.25}
HEAD = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>" \
       "<|start_header_id|>assistant<|end_header_id|>\n\n"


def group(question: str, n: int = 8) -> tuple[str, list[str], list[str]]:
    """(actor-templated prompt, n OpenRLHF queries, n responses): one GRPO group."""
    prompt = HEAD.format(question)
    responses = [f"Answer {i}: " + "the result is clear. " * (i + 1) for i in range(n)]
    return prompt, [prompt + r + "<|eot_id|>" for r in responses], responses


@pytest.fixture(scope="module")
def server_reward(demo_model_path):
    """A reward with a scorer of its own (the server sets its prompt cache; the shared demo_scorer stays as is)."""
    return SteerReward.from_config({"model": {"path": demo_model_path, "device": "cpu"}, "shaping": SHAPING})


def fresh_server(server_reward, **server):
    reward = SteerReward(server_reward.scorer, type(server_reward.shaper)(server_reward.schema,
                                                                            server_reward.config.shaping),
                         server_reward.config)
    return create_app(reward, type(server_reward.config.server)(**server))


def one_sample_requests(app, prompt, queries):
    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/get_reward", json={"query": [q], "prompts": [prompt]})
                                             for q in queries))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return torch.tensor([r.json()["rewards"][0] for r in replies])

    return asyncio.run(send())


def batch_reference(make_reward, groups):
    """Each group scored in-process as one batch, updating the statistics (the library's semantics)."""
    reference = make_reward(SHAPING)
    return [reference.score([[{"role": "user", "content": q}]] * len(r), r, update_stats=True).rewards
            for q, r in groups]


@pytest.mark.parametrize("settings,groups", [({"stats_warmup_samples": 8, "max_wait_ms": 1.0}, 1),
                                             ({"stats_warmup_samples": 0, "max_wait_ms": 300.0}, 2)],
                         ids=["held-for-the-warm-up", "one-batch-per-group"])
def test_the_8_one_sample_requests_of_a_group_equal_the_group_scored_as_one_batch(server_reward, make_reward,
                                                                                     settings, groups):
    """Warm-up: the group's requests are held until 8 samples are in, whatever batches they fell in. After it: a
    group that falls in one model batch (the batcher waits up to max_wait_ms) updates the statistics once."""
    questions = ["What is the capital of France?", "Name three prime numbers."][:groups]
    app = fresh_server(server_reward, **settings)
    try:
        got = []
        for question in questions:
            prompt, queries, _ = group(question)
            got.append(one_sample_requests(app, prompt, queries))
        stats = app.state.service.training
        assert stats.samples_seen == 8 * groups and stats.updates == groups  # one update per group, not per request
    finally:
        app.state.service.close()
    expected = batch_reference(make_reward, [(q, group(q)[2]) for q in questions])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], torch.full_like(got[0], SHAPING["bias"]))  # the first rewards are not the bias


def test_the_warm_up_wait_shapes_a_short_group_after_at_most_its_wait(server_reward, make_reward):
    app = fresh_server(server_reward, stats_warmup_samples=1000, stats_warmup_wait_ms=300.0)
    prompt, queries, responses = group("Why is the sky blue?", n=5)
    try:
        got = one_sample_requests(app, prompt, queries)
        assert app.state.service.training.updates == 1
    finally:
        app.state.service.close()
    torch.testing.assert_close(got, batch_reference(make_reward, [("Why is the sky blue?", responses)])[0],
                               atol=1e-5, rtol=1e-5)


def test_statistics_persist_in_the_state_file_and_score_never_updates_them(server_reward, tmp_path):
    state = tmp_path / "state" / "stats.json"
    settings = {"stats_warmup_samples": 0, "max_wait_ms": 300.0, "state_file": str(state), "state_save_s": 3600.0}
    app = fresh_server(server_reward, **settings)
    prompt, queries, responses = group("Explain photosynthesis.")
    try:
        one_sample_requests(app, prompt, queries)
        before = app.state.service.training.samples_seen

        async def score():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=60) as client:
                return await client.post("/score", json={"prompts": ["Hi"] * 3, "completions": ["a", "b", "c"]})

        assert asyncio.run(score()).status_code == 200
        assert app.state.service.training.samples_seen == before == 8
        assert not state.exists()  # state_save_s not reached yet: written at shutdown
        saved_stats = app.state.service.reward.state_dict()
    finally:
        app.state.service.close()
    data = json.loads(state.read_text())
    assert data["samples"] == 8 and data["shaping"] == saved_stats

    restarted = fresh_server(server_reward, **settings)
    try:
        assert restarted.state.service.training.samples_seen == 8
        assert restarted.state.service.reward.state_dict() == saved_stats
    finally:
        restarted.state.service.close()

    state.write_text("{not json")
    from steer_reward.config import ConfigError

    with pytest.raises(ConfigError, match="server.state_file"):
        fresh_server(server_reward, **settings)


def test_the_state_file_is_written_periodically(server_reward, tmp_path):
    state = tmp_path / "stats.json"
    app = fresh_server(server_reward, stats_warmup_samples=0, max_wait_ms=300.0, state_file=str(state),
                       state_save_s=0.001)
    try:
        prompt, queries, _ = group("Write a haiku.")
        one_sample_requests(app, prompt, queries)
        assert json.loads(state.read_text())["samples"] == 8  # written after the update, before any shutdown
    finally:
        app.state.service.close()
