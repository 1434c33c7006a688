"""The reward server as a real uvicorn subprocess: a bad-input corpus (each a 4xx JSON error, then a good request
still right), auth, limits, per-request weights, truncation reports, /info, /health, /metrics."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.process import ServerProcess  # noqa: E402

TOKEN = "test-token-5f2c"
MAX_BODY = 64 * 1024
MAX_ITEMS = 16
MAX_LENGTH = 256
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, demo_model_path):
    path = tmp_path_factory.mktemp("server") / "server.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": demo_model_path, "device": "cpu", "max_length": MAX_LENGTH},
        "server": {"max_body_bytes": MAX_BODY, "max_items_per_request": MAX_ITEMS},
    }))
    return path


@pytest.fixture(scope="module")
def server(config_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with ServerProcess(["--config", str(config_path)], env={"STEER_REWARD_TOKEN": TOKEN}, log_path=log) as process:
        yield process


@pytest.fixture(scope="module")
def reference(config_path):
    return SteerReward.from_config(config_path)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


GOOD = {"prompts": ["What is the capital of France?", [{"role": "user", "content": "Name a prime."}]],
        "completions": ["Paris.", [{"role": "assistant", "content": "7"}]]}


def check_good(client, reference):
    reply = client.post("/score", json=GOOD, headers=AUTH)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = reference.score(GOOD["prompts"], GOOD["completions"])
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected.rewards, atol=1e-4, rtol=1e-4)
    for name in reference.schema.names:
        torch.testing.assert_close(torch.tensor(body["attributes"][name]), expected.attributes.column(name),
                                   atol=1e-4, rtol=1e-4)


LLAMA3_PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _score(**changes) -> bytes:
    body = {"prompts": ["Hi"], "completions": ["Hello"]}
    body.update(changes)
    return _json({k: v for k, v in body.items() if v is not ...})


# (case, method, path, raw body, headers over the defaults, expected status)
CORPUS = [
    ("malformed json", "POST", "/score", b'{"prompts": [', {}, 400),
    ("trailing garbage", "POST", "/score", b'{"prompts": []} x', {}, 400),
    ("empty body", "POST", "/score", b"", {}, 400),
    ("top-level array", "POST", "/score", b"[1, 2]", {}, 422),
    ("top-level string", "POST", "/score", b'"hi"', {}, 422),
    ("top-level null", "POST", "/score", b"null", {}, 422),
    ("missing prompts", "POST", "/score", _score(prompts=...), {}, 422),
    ("missing completions", "POST", "/score", _score(completions=...), {}, 422),
    ("prompts not a list", "POST", "/score", _score(prompts="Hi"), {}, 422),
    ("completions a number", "POST", "/score", _score(completions=3), {}, 422),
    ("mismatched lengths", "POST", "/score", _score(prompts=["a", "b"]), {}, 422),
    ("prompt a number", "POST", "/score", _score(prompts=[42]), {}, 422),
    ("prompt null", "POST", "/score", _score(prompts=[None]), {}, 422),
    ("completion a dict", "POST", "/score", _score(completions=[{"role": "assistant"}]), {}, 422),
    ("empty prompt", "POST", "/score", _score(prompts=[""]), {}, 422),
    ("blank prompt", "POST", "/score", _score(prompts=["   \n"]), {}, 422),
    ("empty message list", "POST", "/score", _score(prompts=[[]]), {}, 422),
    ("message without role", "POST", "/score", _score(prompts=[[{"content": "x"}]]), {}, 422),
    ("message content not a string", "POST", "/score", _score(prompts=[[{"role": "user", "content": 5}]]), {}, 422),
    ("unknown top-level key", "POST", "/score", _score(prompt=["Hi"]), {}, 422),
    ("unknown attribute", "POST", "/score", _score(weights={"helpfullness": 1.0}), {}, 422),
    ("dead attribute", "POST", "/score", _score(weights={"humor": 1.0}), {}, 422),
    ("unknown preset", "POST", "/score", _score(preset="steerlm-7b"), {}, 422),
    ("preset not a string", "POST", "/score", _score(preset=5), {}, 422),
    ("weights a list", "POST", "/score", _score(weights=[1.0]), {}, 422),
    ("weights empty", "POST", "/score", _score(weights={}), {}, 422),
    ("NaN weight", "POST", "/score", b'{"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfulness": NaN}}',
     {}, 400),
    ("Infinity weight", "POST", "/score",
     b'{"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfulness": Infinity}}', {}, 400),
    ("-Infinity weight", "POST", "/score",
     b'{"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfulness": -Infinity}}', {}, 400),
    ("overflowing weight", "POST", "/score",
     b'{"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfulness": 1e999}}', {}, 422),
    ("string weight", "POST", "/score", _score(weights={"helpfulness": "1"}), {}, 422),
    ("bool weight", "POST", "/score", _score(weights={"helpfulness": True}), {}, 422),
    ("too many items", "POST", "/score", _score(prompts=["Hi"] * 17, completions=["a"] * 17), {}, 413),
    ("oversize body", "POST", "/score", _score(completions=["x" * (MAX_BODY + 10)]), {}, 413),
    ("non-UTF-8 bytes", "POST", "/score", b'{"prompts": ["\xff\xfe"], "completions": ["a"]}', {}, 400),
    ("text/plain content type", "POST", "/score", _score(), {"Content-Type": "text/plain"}, 415),
    ("form content type", "POST", "/score", _score(), {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("wrong token", "POST", "/score", _score(), {"Authorization": "Bearer wrong"}, 401),
    ("no token", "POST", "/score", _score(), {"Authorization": ""}, 401),
    ("basic auth scheme", "POST", "/score", _score(), {"Authorization": f"Basic {TOKEN}"}, 401),
    ("token prefix only", "POST", "/score", _score(), {"Authorization": f"Bearer {TOKEN[:-1]}"}, 401),
    ("GET on /score", "GET", "/score", b"", {}, 405),
    ("unknown path", "POST", "/scores", _score(), {}, 404),
    ("query not a list", "POST", "/get_reward", _json({"query": "x", "prompts": ["x"]}), {}, 422),
    ("query item a number", "POST", "/get_reward", _json({"query": [1], "prompts": ["x"]}), {}, 422),
    ("query/prompts mismatch", "POST", "/get_reward", _json({"query": ["a", "b"], "prompts": ["a"]}), {}, 422),
    ("labels mismatch", "POST", "/get_reward",
     _json({"query": [LLAMA3_PROMPT + "Yo"], "prompts": [LLAMA3_PROMPT], "labels": [1, 2]}), {}, 422),
    ("prompt item not a string", "POST", "/get_reward", _json({"query": ["abc"], "prompts": [["a"]]}), {}, 422),
    ("missing query", "POST", "/get_reward", _json({"prompts": ["x"]}), {}, 422),
    ("misspelled query key", "POST", "/get_reward", _json({"queries": ["x"]}), {}, 422),
    # A sample /get_reward cannot read is answered with the fallback reward, not an error (OpenRLHF would stop
    # training): see test_openrlhf_remote.py. Only a request malformed as a whole is refused.
    # Inputs that used to reach the model code and come back 500 (which clients retry): each is a 4xx now.
    ("lone surrogate in a prompt", "POST", "/score", b'{"prompts": ["Hi \\ud800"], "completions": ["a"]}', {}, 400),
    ("lone surrogate in a completion", "POST", "/score", b'{"prompts": ["Hi"], "completions": ["\\udfff"]}', {}, 400),
    ("lone surrogate in a role", "POST", "/score",
     b'{"prompts": [[{"role": "\\ud800", "content": "x"}]], "completions": ["a"]}', {}, 400),
    ("lone surrogate in a key", "POST", "/score", b'{"prompts": ["Hi"], "completions": ["a"], "\\ud800": 1}', {}, 400),
    ("400-digit integer weight", "POST", "/score",
     b'{"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfulness": 1' + b"0" * 400 + b"}}", {}, 422),
    ("5000-digit integer weight", "POST", "/score",
     b'{"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfulness": 1' + b"0" * 5000 + b"}}", {}, 400),
    ("JSON nested 30,000 levels", "POST", "/score", b'{"prompts": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", {}, 400),
    ("JSON nested 500 levels", "POST", "/get_reward",
     b'{"query": ["Q: hi A: yo"], "labels": ' + b"[" * 500 + b"]" * 500 + b"}", {}, 400),
    ("gzip-encoded body", "POST", "/score", gzip.compress(_score()), {"Content-Encoding": "gzip"}, 415),
    ("completion message from the user", "POST", "/score",
     _score(completions=[[{"role": "user", "content": "x"}]]), {}, 422),
    ("completion message from the system", "POST", "/score",
     _score(completions=[[{"role": "assistant", "content": "x"}, {"role": "system", "content": "y"}]]), {}, 422),
]


def test_bad_input_corpus_each_gets_a_4xx_json_error_and_the_server_keeps_serving(client, reference):
    assert len(CORPUS) >= 40
    for case, method, path, body, extra_headers, status in CORPUS:
        headers = {"Content-Type": "application/json", **AUTH, **extra_headers}
        headers = {k: v for k, v in headers.items() if v}
        reply = client.request(method, path, content=body if method == "POST" else None, headers=headers)
        assert reply.status_code == status, f"{case}: {reply.status_code} {reply.text[:300]}"
        assert reply.headers["content-type"].startswith("application/json"), case
        error = reply.json()
        assert isinstance(error.get("error"), str) and error["error"], case
        if status == 401:
            assert reply.headers.get("www-authenticate") == "Bearer", case
        check_good(client, reference)


def test_error_messages_name_the_problem(client):
    reply = client.post("/score", json={"prompts": ["Hi"], "completions": ["a"], "weights": {"helpfullness": 1}},
                        headers=AUTH)
    assert "helpfulness" in reply.json()["error"]  # the did-you-mean hint
    reply = client.post("/score", json={"prompts": ["Hi"] * 17, "completions": ["a"] * 17}, headers=AUTH)
    assert "max_items_per_request" in reply.json()["error"]


def test_health_is_open_and_info_needs_the_token(client, reference):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/info").status_code == 401
    info = client.get("/info", headers=AUTH).json()
    assert info["names"] == list(reference.schema.names)
    assert info["live_names"] == list(reference.schema.live_names)
    assert info["limits"]["max_items_per_request"] == MAX_ITEMS
    assert info["limits"]["max_tokens_per_item"] == MAX_LENGTH
    assert info["auth"] is True
    assert set(info["weights"]) == {"helpfulness", "correctness", "coherence", "complexity", "verbosity"}


def test_per_request_weights_and_preset_reuse_the_model(client, reference):
    expected = reference.score(GOOD["prompts"], GOOD["completions"])
    for extra, variant in (({"preset": "helpfulness"}, reference.with_weights("helpfulness")),
                           ({"weights": {"correctness": 2.0, "verbosity": -1.0}},
                            reference.with_weights({"correctness": 2.0, "verbosity": -1.0})),
                           ({"preset": "nemotron-340b", "weights": {"verbosity": 0.0}},
                            reference.with_weights({"preset": "nemotron-340b", "verbosity": 0.0}))):
        reply = client.post("/score", json={**GOOD, **extra}, headers=AUTH)
        assert reply.status_code == 200, reply.text
        torch.testing.assert_close(torch.tensor(reply.json()["rewards"]), variant.rewards(expected.attributes),
                                   atol=1e-4, rtol=1e-4)


def test_long_prompt_is_truncated_from_the_left_and_reported(client, reference):
    prompt = "Please summarise the following text. " + "The quick brown fox jumps over the lazy dog. " * 80
    reply = client.post("/score", json={"prompts": [prompt], "completions": ["A fox jumps."]}, headers=AUTH)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = reference.score([prompt], ["A fox jumps."])
    assert body["prompt_truncated_tokens"][0] == int(expected.attributes.prompt_truncated[0]) > 0
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected.rewards, atol=1e-4, rtol=1e-4)


def test_overlong_completion_is_scored_cut_and_reported_under_truncate(client, reference):
    completions = ["Short answer.", "hello world " * 400]  # the second alone is over model.max_length
    reply = client.post("/score", json={"prompts": ["Hi", "Hi"], "completions": completions}, headers=AUTH)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = reference.score(["Hi", "Hi"], completions)
    assert body["completion_truncated_tokens"] == expected.attributes.completion_truncated.tolist()
    assert body["completion_truncated_tokens"][0] == 0 and body["completion_truncated_tokens"][1] > 0
    assert body["prompt_truncated_tokens"] == expected.attributes.prompt_truncated.tolist()
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected.rewards, atol=1e-4, rtol=1e-4)


def test_overlong_completion_is_a_413_naming_the_item_under_reject(demo_model_path):
    from steer_reward.server.app import create_app

    reward = SteerReward.from_config({"model": {"path": demo_model_path, "device": "cpu", "max_length": 64,
                                                "overlong": "reject"}})
    app = create_app(reward)

    async def post(path, body):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=60) as http:
            return await http.post(path, json=body)

    import asyncio

    try:
        ok = asyncio.run(post("/score", {"prompts": ["Hi", "Hi"], "completions": ["Fine.", "Also fine."]}))
        assert ok.status_code == 200 and ok.json()["completion_truncated_tokens"] == [0, 0]
        reply = asyncio.run(post("/score", {"prompts": ["Hi", "Hi", "Hi"],
                                            "completions": ["Fine.", "hello world " * 100, "ok"]}))
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"].startswith("item 1: ") and "model.max_length" in reply.json()["error"]
        # a completion that fits the window alone but not beside the prompt's reserved tokens is refused too
        formatter = app.state.service.scorer.formatter
        near = "word " * (formatter.max_length - formatter.prompt_reserve // 2)
        tokens = len(formatter.tokenizer(formatter.texts("Hi", near)[1], add_special_tokens=False)["input_ids"])
        assert formatter.max_length - formatter.prompt_reserve < tokens <= formatter.max_length
        assert asyncio.run(post("/score", {"prompts": ["Hi"], "completions": [near]})).status_code == 413
        # /get_reward never answers an error for one sample (OpenRLHF would stop): the fallback reward, reported.
        queries = [LLAMA3_PROMPT + "Fine.<|eot_id|>", LLAMA3_PROMPT + "hello world " * 100 + "<|eot_id|>"]
        reply = asyncio.run(post("/get_reward", {"query": queries, "prompts": [LLAMA3_PROMPT] * 2}))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["extra_logs"]["reward_failed"] == [0.0, 1.0]
        assert body["failures"][0]["index"] == 1 and "model.max_length" in body["failures"][0]["error"]
    finally:
        app.state.service.close()


def test_empty_lists_get_empty_replies(client):
    assert client.post("/score", json={"prompts": [], "completions": []}, headers=AUTH).json()["rewards"] == []
    reply = client.post("/get_reward", json={"query": [], "prompts": [], "labels": []}, headers=AUTH).json()
    assert reply["rewards"] == [] and reply["scores"] == []


def test_metrics_count_requests_and_batches(client):
    client.post("/score", json=GOOD, headers=AUTH)
    assert client.get("/metrics").status_code == 401
    text = client.get("/metrics", headers=AUTH).text
    assert 'steer_reward_requests_total{code="200",endpoint="/score"}' in text
    for name in ("steer_reward_batch_samples_bucket", "steer_reward_batch_tokens_sum", "steer_reward_queue_depth",
                 "steer_reward_request_latency_seconds_bucket", "steer_reward_tokens_scored_total"):
        assert name in text, name
