"""The reward server as Ray Serve replicas behind one URL, for real: a local Ray instance on loopback, the demo model.

Two applications share one Ray instance: ``open`` (2 replicas, no token, the OpenRLHF client's view) and
``secured`` (1 replica, bearer token, the bad-input corpus of tests/test_server.py). OpenRLHF 0.11.2's own client
code sends the GRPO pattern; every reward must equal in-process scoring of its own sample, each distinct prompt
must be prefilled once across the replicas, and killing a replica process mid-run must lose no reward.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

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
    # 200 while one replica can score (a load balancer must not drop the only URL); the body says how many are up.
    assert (health["status"], health["replicas_up"], health["replicas_configured"]) == ("ok", 2, 2)


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



# -- clients that leave -------------------------------------------------------------------------------------------
SLOW_BATCH_S = 5.0
"""How long the batch in flight lasts at scale 1 (sized from a measured batch): the clients behind it leave, or time
out at the gateway, within its first 3 s."""


@pytest.fixture
def one_replica(ray_urls, demo_model_path):
    """``deploy(**server)``: a one-replica application at ``/cancel`` (long samples allowed), removed afterwards;
    returns (its URL, an in-process reward of the same config, the replica's pid)."""
    from ray import serve

    from steer_reward.config import load_config
    from steer_reward.server.ray_serve import reward_application

    def deploy(**server):
        config = load_config({"model": {"path": demo_model_path, "device": "cpu", "max_length": 2048},
                              "batching": {"strategy": "prefix"},
                              "server": {"replicas": 1, "replica_cpus": 0.5, "max_items_per_request": 1024,
                                         "max_body_bytes": 8 << 20, **server}})
        serve.run(reward_application(config), name="cancel", route_prefix="/cancel")
        url = ray_urls["open"] + "/cancel"
        pid = httpx.get(url + "/health", timeout=60).json()["replicas"][0]["pid"]
        return url, SteerReward.from_config(config), pid

    yield deploy
    serve.delete("cancel")


def _body(tag: str, n: int, words: int) -> dict:
    return {"prompts": [f"{tag} question {i}: tell me about the number {i}." for i in range(n)],
            "completions": [f"The number {i} is fine, because " + "it is. " * words for i in range(n)]}


def _post(url: str, payload: dict) -> socket.socket:
    """POST /score on a connection of its own, the reply left unread (closing it is the client leaving)."""
    from urllib.parse import urlsplit

    where = urlsplit(url)
    data = json.dumps(payload).encode()
    sock = socket.create_connection((where.hostname, where.port), timeout=120)
    sock.sendall(f"POST {where.path}/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _slow_batch(url: str, scale: int = 1) -> dict:
    """A /score body whose batch lasts about ``scale * SLOW_BATCH_S`` on this machine, sized from the fastest of two
    timed batches of 16 long samples (after one to warm up): a hiccup while timing makes the batch longer, never
    shorter."""
    times = []
    for _ in range(3):
        start = time.monotonic()
        reply = httpx.post(url + "/score", json=_body("Timing", 16, 250), timeout=120)
        times.append(time.monotonic() - start)
        assert reply.status_code == 200, reply.text
    return _body("Slow", max(16, min(1024 * scale, int(16 * scale * SLOW_BATCH_S / min(times[1:])))), 250)


def _pending(url: str) -> int:
    return httpx.get(url + "/health", timeout=60).json()["pending_samples"]


def _wait_pending(url: str, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while _pending(url) < at_least:
        assert time.monotonic() < deadline, f"never {at_least} samples pending"
        time.sleep(0.02)


def _wait_idle(url: str) -> None:
    deadline = time.monotonic() + 120
    while _pending(url):
        assert time.monotonic() < deadline, "the replica never finished"
        time.sleep(0.05)


def _counters(url: str) -> dict[str, float]:
    """Samples scored, prompt prefills, clients the gateway saw leave, and /score replies by code (every replica)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[tuple, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for s in family.samples:
            if s.name.endswith("_total"):
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica")))
                totals[key] = totals.get(key, 0.0) + s.value
    return {"scored": totals.get(("steer_reward_samples_scored_total", ()), 0.0),
            "prefills": totals.get(("steer_reward_prompt_prefills_total", ()), 0.0),
            "closed": totals.get(("steer_reward_gateway_client_closed_total", ()), 0.0),
            **{code: totals.get(("steer_reward_requests_total", (("code", code), ("endpoint", "/score"))), 0.0)
               for code in ("200", "499", "500", "503")}}


def _read_rewards(sock: socket.socket, payload: dict, reference: SteerReward) -> None:
    from test_server_clients import read_reply

    status, _, content = read_reply(sock)
    sock.close()
    assert status == 200, content
    expected = reference.score(payload["prompts"], payload["completions"]).rewards
    torch.testing.assert_close(torch.tensor(json.loads(content)["rewards"]), expected, atol=1e-4, rtol=1e-4)


def _assert_no_traceback(pid: int) -> None:
    """Clients leaving are counted, not logged as failures: no traceback in the application's Serve logs or in the
    replica's stderr."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [*(logs / "serve").glob("replica_cancel_*.log"), *logs.glob(f"worker-*-{pid}.err")]
    assert len(files) >= 3, files
    for file in files:
        assert "Traceback" not in file.read_text(errors="replace"), file


def test_clients_that_leave_have_their_work_dropped_in_the_gateway_and_the_replica(one_replica):
    """A slow batch in flight on the only replica; behind it, requests waiting in the replica's batcher and in the
    gateway's queue for a replica (``replica_max_ongoing`` 4), some of whose clients disconnect. The proxy cancels
    the gateway's call, the gateway cancels its replica call, and the replica drops the request before the model,
    counting it as 499. The replica computes exactly what is still wanted; the requests queued with the abandoned
    ones get their own right rewards."""
    url, reference, pid = one_replica(replica_max_ongoing=4)
    slow = _slow_batch(url, 2)  # it must outlast every step below, which cannot retry once a client has left
    n = len(slow["prompts"])
    kept, gone = [_body("Kept", 2, 5), _body("Queued", 2, 6)], [_body(f"Gone {g}", 3, 5) for g in range(3)]
    before = _counters(url)
    in_flight = _post(url, slow)
    _wait_pending(url, n)  # encoded and taken: its forward runs
    gone_socks, kept_socks = [_post(url, gone[0])], [_post(url, kept[0])]
    _wait_pending(url, n + 3 + 2)  # both wait in the replica's batcher; 3 of its 4 places are taken
    gone_socks += [_post(url, gone[1]), _post(url, gone[2])]  # the replica is full: the second waits in the gateway
    kept_socks.append(_post(url, kept[1]))  # in the gateway's queue behind it
    time.sleep(0.5)
    gone_socks[2].close()  # the one still queued for a replica leaves first (never sent), then the two inside it
    time.sleep(0.3)
    for sock in gone_socks[:2]:
        sock.close()

    _read_rewards(in_flight, slow, reference)
    for sock, payload in zip(kept_socks, kept):
        _read_rewards(sock, payload, reference)
    _wait_idle(url)
    after = _counters(url)
    added = {k: after[k] - before[k] for k in after}
    wanted = n + 2 + 2
    assert added["scored"] == wanted, added  # not one sample of the clients that left
    assert added["prefills"] == wanted, added  # every prompt distinct: one prefill each
    assert added["closed"] == 3, added  # the gateway saw all three leave
    # The two held by the replica are counted there as 499 (the queued one too if a place freed before it left).
    assert 2 <= added["499"] <= 3 and added["500"] == added["503"] == 0, added
    _assert_no_traceback(pid)
    print(f"\nclients leaving behind a batch of {n} samples: {added}")


def test_a_request_the_gateway_gives_up_on_is_not_computed_by_the_replica(one_replica):
    """``server.replica_timeout_s`` passes while a request waits behind a slow batch: the gateway answers 503 (with
    Retry-After, which OpenRLHF retries) and cancels the replica's call, so the replica does not score a request
    whose answer nobody reads (it used to, doubling the load exactly when the replicas are too slow)."""
    from test_server_clients import read_reply

    timeout = 2.5
    url, reference, pid = one_replica(replica_timeout_s=timeout)
    for scale in (1, 2, 4):
        slow = _slow_batch(url, scale)
        n = len(slow["prompts"])
        before = _counters(url)
        in_flight = _post(url, slow)
        _wait_pending(url, n)
        start = time.monotonic()
        waiting = httpx.post(url + "/score", json=_body("Waiting", 3, 5), timeout=60)
        waited = time.monotonic() - start
        if waiting.status_code != 200 or waited >= timeout:
            break
        # Answered within the timeout: correct, but this machine ran the slow batch faster than it was sized for.
        read_reply(in_flight)
        in_flight.close()
        _wait_idle(url)
    else:
        pytest.fail(f"even a batch of {n} samples ended within {timeout} s of a request queued behind it")
    assert waiting.status_code == 503 and waiting.headers["retry-after"] == "1", (round(waited, 2), waiting.text)
    assert "no reply within" in waiting.json()["error"] and waited < timeout + 2

    assert read_reply(in_flight)[0] == 503  # its own forward outlasted the timeout too: it ran, unread
    in_flight.close()
    _wait_idle(url)
    added = {k: v - before[k] for k, v in _counters(url).items()}
    assert added["scored"] == n, added  # the slow batch alone: the waiting request never reached the model
    assert added["499"] == 2 and added["closed"] == 0, added
    _assert_no_traceback(pid)
