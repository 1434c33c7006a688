"""The reward server as Ray Serve replicas behind one URL, for real: a local Ray instance on loopback, the demo model.

Two applications share one Ray instance: ``open`` (2 replicas, no token, the OpenRLHF client's view) and
``secured`` (1 replica, bearer token, the bad-input corpus of tests/test_server.py). OpenRLHF 0.11.2's own client
code sends the GRPO pattern; every reward must equal in-process scoring of its own sample, each distinct prompt
must be prefilled once across the replicas, and killing a replica process mid-run must lose no reward.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch
import yaml

pytest.importorskip("ray.serve")
pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")

from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.openrlhf import parse_query  # noqa: E402
from steer_reward.server.process import ServerProcess, free_port  # noqa: E402
from test_openrlhf_remote import MESSAGES, SamplingParams, actor, agent_module  # noqa: E402,F401
from test_server import AUTH, CORPUS, GOOD, MAX_BODY, MAX_ITEMS, MAX_LENGTH, TOKEN  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray instance and five model replicas: about a minute on a 2-core machine

GROUP = 8  # samples per prompt, like --rollout.n_samples_per_prompt in GRPO


def _config(model: str, replicas: int, **server) -> dict:
    return {"model": {"path": model, "device": "cpu", "max_length": MAX_LENGTH},
            # Every prompt through the prompt cache, so a prompt's prefills are counted exactly.
            "batching": {"strategy": "prefix"},
            "server": {"max_body_bytes": MAX_BODY, "max_items_per_request": MAX_ITEMS, "replicas": replicas,
                       "replica_cpus": 0.5, **server}}


@pytest.fixture(scope="module")
def configs(tmp_path_factory, demo_model_path):
    folder = tmp_path_factory.mktemp("ray")
    paths = {}
    # The open application waits up to 0.5 s to fill a batch, so a replica visibly holds requests when it is killed.
    for name, data in (("open", _config(demo_model_path, 2, max_wait_ms=500)),
                       ("secured", _config(demo_model_path, 1))):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(data))
    return paths


@pytest.fixture(scope="module")
def ray_urls(configs):
    import ray
    from ray import serve

    from steer_reward.config import load_config
    from steer_reward.server.ray_serve import reward_application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(reward_application(load_config(configs["open"])), name="open", route_prefix="/")
        serve.run(reward_application(load_config(configs["secured"]), TOKEN), name="secured",
                  route_prefix="/secured")
        base = f"http://127.0.0.1:{port}"
        yield {"open": base, "secured": base + "/secured"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(configs):
    return SteerReward.from_config(configs["open"])


def _prefills(url: str, headers: dict | None = None) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=60).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "steer_reward_prompt_prefills")
    return {s.labels["replica"]: s.value for s in family.samples}


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


def test_openrlhf_grpo_rewards_match_in_process_and_each_prompt_is_prefilled_once(agent_module, actor, ray_urls,
                                                                                  reference):
    url = ray_urls["open"]
    assert len(httpx.get(url + "/health", timeout=60).json()["replicas"]) == 2
    before = _prefills(url)
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=url + "/get_reward")
    prompts = [actor.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
               for m in MESSAGES for _ in range(GROUP)]

    async def rollouts():  # one sample per request, all in flight at once (OpenRLHF >= 0.9.1)
        return await asyncio.gather(*(executor.execute(p, None, SamplingParams(seed=i), 512, actor.tokenizer, actor)
                                      for i, p in enumerate(prompts)))

    outputs = asyncio.run(rollouts())
    responses = []
    for output in outputs:
        assert output["reward"] is not None, "OpenRLHF got no reward"
        start, end = output["action_ranges"][0]
        ids = output["observation_tokens"][start:end]
        if ids and ids[-1] == actor.tokenizer.eos_token_id:
            ids = ids[:-1]
        responses.append(actor.tokenizer.decode(ids, skip_special_tokens=False))
    expected = reference.score([m for m in MESSAGES for _ in range(GROUP)], responses)
    torch.testing.assert_close(torch.tensor([o["reward"][0] for o in outputs]), expected.rewards, atol=1e-4,
                               rtol=1e-4)
    for name in reference.schema.live_names:
        torch.testing.assert_close(torch.tensor([o["extra_logs"][name][0] for o in outputs]),
                                   expected.attributes.column(name), atol=1e-4, rtol=1e-4)
    after = _prefills(url)
    added = {r: after[r] - before.get(r, 0.0) for r in after}
    # Affinity: the 8 samples of each prompt met its cached prefill on one replica, so 3 prompts cost 3 prefills.
    assert sum(added.values()) == len(MESSAGES), added


def test_bad_input_corpus_gets_the_single_servers_replies(ray_urls, configs, tmp_path):
    """Every case of tests/test_server.py's corpus: the same status and the same JSON body as the single server,
    and a good request still right after each."""
    single_config = tmp_path / "single.yaml"
    data = yaml.safe_load(configs["secured"].read_text())
    data["server"]["replicas"] = 0
    single_config.write_text(yaml.safe_dump(data))
    with ServerProcess(["--config", str(single_config)], env={"STEER_REWARD_TOKEN": TOKEN},
                       log_path=tmp_path / "single.log") as single, \
            httpx.Client(base_url=single.url, timeout=60) as plain, \
            httpx.Client(base_url=ray_urls["secured"], timeout=60) as scaled:
        good = plain.post("/score", json=GOOD, headers=AUTH).json()
        for case, method, path, body, extra_headers, status in CORPUS:
            headers = {k: v for k, v in {"Content-Type": "application/json", **AUTH, **extra_headers}.items() if v}
            content = body if method == "POST" else None
            want = plain.request(method, path, content=content, headers=headers)
            got = scaled.request(method, path, content=content, headers=headers)
            assert want.status_code == status, case
            assert (got.status_code, got.json()) == (want.status_code, want.json()), case
            assert got.headers["content-type"].startswith("application/json"), case
            assert got.headers.get("www-authenticate") == want.headers.get("www-authenticate"), case
            again = scaled.post("/score", json=GOOD, headers=AUTH)
            assert again.status_code == 200 and again.json()["rewards"] == pytest.approx(good["rewards"], abs=1e-4)


def test_health_info_and_metrics_speak_for_every_replica(ray_urls):
    secured = ray_urls["secured"]
    assert httpx.get(secured + "/health", timeout=60).json()["status"] == "ok"  # open, as on the single server
    assert httpx.get(secured + "/info", timeout=60).status_code == 401
    assert httpx.get(secured + "/metrics", timeout=60).status_code == 401
    info = httpx.get(secured + "/info", headers=AUTH, timeout=60).json()
    assert info["scale_out"] == {"engine": "ray-serve", "replicas": 1, "routing": "prompt-affinity"}
    assert info["limits"]["max_items_per_request"] == MAX_ITEMS
    health = httpx.get(ray_urls["open"] + "/health", timeout=60).json()
    assert set(_prefills(ray_urls["open"])) == {r["replica"] for r in health["replicas"]}


def test_killing_a_replica_mid_run_loses_no_reward(agent_module, actor, ray_urls, reference):
    """48 one-sample requests (6 prompts x 8) from OpenRLHF's HTTP client, all in flight; the replica holding
    requests is SIGKILLed. Its requests are retried on the other replica; every reward comes back, right."""
    url = ray_urls["open"]
    words = "the quick brown fox jumps over a lazy dog while seven wise owls watch".split()
    queries, prompts = [], []
    for p in range(6):
        prompt = actor.tokenizer.apply_chat_template([{"role": "user", "content": f"Question {p}: {words[p]}?"}],
                                                     add_generation_prompt=True, tokenize=False)
        for s in range(GROUP):
            prompts.append(prompt)
            queries.append(prompt + " ".join(words[(p + s) % 7:(p + s) % 7 + 6]) + actor.tokenizer.eos_token)
    executor = agent_module.SingleTurnAgentExecutor(remote_rm_url=url + "/get_reward")
    retries_before = _metric(url, "steer_reward_gateway_retries")

    async def run():
        sends = [asyncio.create_task(executor._fetch_rewards_via_http([q], [p], [None]))
                 for q, p in zip(queries, prompts)]
        victim = None
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = time.monotonic() + 60
            while victim is None and time.monotonic() < deadline:
                replicas = (await client.get(url + "/health")).json()["replicas"]
                holding = [r for r in replicas if r["pending_samples"] > 0]
                victim = holding[0] if holding else None
                if victim is None:
                    await asyncio.sleep(0.02)
        assert victim is not None, "no replica ever held a request"
        os.kill(victim["pid"], signal.SIGKILL)
        return victim, await asyncio.gather(*sends)

    victim, replies = asyncio.run(run())
    rewards = [reply[0]["rewards"][0] for reply in replies]
    parsed = [parse_query(q, p) for q, p in zip(queries, prompts)]
    expected = reference.score([x.prompt for x in parsed], [x.response for x in parsed]).rewards
    torch.testing.assert_close(torch.tensor(rewards), expected, atol=1e-4, rtol=1e-4)
    assert _metric(url, "steer_reward_gateway_retries") > retries_before, "the killed replica's requests were retried"
