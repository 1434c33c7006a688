"""Scale-out routing without starting Ray: the affinity key read from request bodies, rendezvous order, the merged
/metrics exposition, and the settings refused before anything starts (CLI exit 2, one line)."""

from __future__ import annotations

import json
import random

import pytest

from steer_reward.server.affinity import affinity_key, rendezvous_order

LLAMA3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a prime.<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


def test_samples_of_one_prompt_share_a_key_and_other_prompts_do_not():
    same = {affinity_key("/get_reward", _body({"query": [LLAMA3 + r + "<|eot_id|>"], "prompts": [LLAMA3]}))
            for r in ("7", "11", "13")}
    assert len(same) == 1 and None not in same
    other = affinity_key("/get_reward", _body({"query": [LLAMA3.replace("prime", "bird") + "x"],
                                               "prompts": [LLAMA3.replace("prime", "bird")]}))
    assert other not in same


def test_get_reward_without_prompts_keys_on_the_conversation_part_of_the_query():
    a = affinity_key("/get_reward", _body({"query": [LLAMA3 + "7<|eot_id|>"]}))
    b = affinity_key("/get_reward", _body({"query": [LLAMA3 + "11<|eot_id|>"]}))
    assert a is not None and a == b


def test_score_keys_on_the_first_prompt_strings_and_messages_alike():
    messages = [{"role": "user", "content": "Hi"}]
    assert affinity_key("/score", _body({"prompts": [messages], "completions": ["a"]})) == \
        affinity_key("/score", _body({"prompts": [messages], "completions": ["b"]}))
    assert affinity_key("/score", _body({"prompts": ["Hi", "Other"], "completions": ["a", "b"]})) == \
        affinity_key("/score", _body({"prompts": ["Hi"], "completions": ["c"]}))


@pytest.mark.parametrize("path, body", [
    ("/score", b'{"prompts": ['), ("/score", b"[1, 2]"), ("/score", b'{"prompts": []}'),
    ("/score", b'{"prompts": [42]}'), ("/score", b"\xff\xfe"), ("/get_reward", b'{"query": ["no markup"]}'),
    ("/get_reward", b'{"query": [1]}'), ("/info", b'{"prompts": ["Hi"]}'),
    ("/score", b'{"prompts": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),  # RecursionError in json.loads
    ("/score", b'{"prompts": [' + b"[" * 3_000 + b"]" * 3_000 + b"]}"),  # parses; too deep to re-serialize
    ("/score", b'{"prompts": ["Hi"], "weights": {"helpfulness": 1' + b"0" * 5000 + b"}}"),
])
def test_bodies_without_a_prompt_have_no_key(path, body):
    assert affinity_key(path, body) is None  # routed least-loaded; the replica answers the 4xx


def test_rendezvous_order_is_stable_and_moves_only_the_keys_of_a_replica_that_leaves():
    replicas = [f"r{i}" for i in range(4)]
    keys = [f"prompt-{i}" for i in range(400)]
    first = {k: rendezvous_order(k, replicas)[0] for k in keys}
    shuffled = replicas[:]
    random.Random(0).shuffle(shuffled)
    assert first == {k: rendezvous_order(k, shuffled)[0] for k in keys}  # order of listing does not matter
    counts = {r: sum(1 for v in first.values() if v == r) for r in replicas}
    assert min(counts.values()) > 60  # about 100 each: the load spreads
    after = {k: rendezvous_order(k, replicas[1:])[0] for k in keys}
    moved = {k for k in keys if after[k] != first[k]}
    assert moved == {k for k in keys if first[k] == "r0"}  # only the departed replica's prompts move
    assert all(after[k] == rendezvous_order(k, replicas)[1] for k in moved)  # each to its second choice


def test_metrics_of_replicas_merge_into_one_exposition_labelled_by_replica():
    pytest.importorskip("prometheus_client")
    ray_serve = pytest.importorskip("steer_reward.server.ray_serve", exc_type=ImportError)
    from prometheus_client.parser import text_string_to_metric_families

    def text(prefills: float, code: str) -> str:
        return ("# HELP steer_reward_prompt_prefills_total P\n# TYPE steer_reward_prompt_prefills_total counter\n"
                f"steer_reward_prompt_prefills_total {prefills}\n"
                "# HELP steer_reward_requests_total R\n# TYPE steer_reward_requests_total counter\n"
                f'steer_reward_requests_total{{code="{code}",endpoint="/score"}} 2.0\n')

    merged = ray_serve.merge_metrics({"a": text(3, "200"), "b": text(5, "422")}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    prefills = {s.labels["replica"]: s.value for s in families["steer_reward_prompt_prefills"].samples}
    assert prefills == {"a": 3.0, "b": 5.0}
    assert {(s.labels["replica"], s.labels["code"]) for s in families["steer_reward_requests"].samples} == {
        ("a", "200"), ("b", "422")}
    assert merged.count("# TYPE steer_reward_prompt_prefills_total") == 1  # one family, not one per replica


@pytest.mark.parametrize("flags, words", [
    (["--replicas", "2", "--min-replicas", "3", "--max-replicas", "4"], "min_replicas <= server.replicas"),
    (["--replicas", "2", "--max-replicas", "4"], "go together"),
    (["--replicas", "2", "--set", "shaping.normalization=running"], "running normalization"),
    (["--replicas", "2", "--set", "backend=remote", "--set", "remote.urls=[http://x]"], "in-process model"),
    (["--replicas", "1", "--set", "server.replica_max_ongoing=0"], "server.replica_max_ongoing"),
])
def test_serve_refuses_scale_out_settings_that_cannot_work(flags, words, capsys):
    pytest.importorskip("ray.serve")
    from steer_reward.cli import main

    assert main(["serve", "--model", "demo", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_build_app_reads_a_config_and_key_value_overrides(tmp_path, demo_model_path):
    """``serve run steer_reward.server.ray_serve:build_app config=... replicas=3 affinity=false``."""
    pytest.importorskip("ray.serve")
    import yaml

    from steer_reward.server.ray_serve import build_app

    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": demo_model_path}}))
    app = build_app({"config": str(path), "replicas": "3", "affinity": "false"})
    replicas = app._bound_deployment.init_args[0]  # the gateway's first argument: the replicas' deployment
    assert replicas._bound_deployment.num_replicas == 3
    assert replicas._bound_deployment.init_args[0]["server"]["affinity"] is False


def _counter(service, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(service.metrics.render().decode())
               for s in f.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_cancelled_replica_call_is_its_client_leaving(demo_model_path):
    """Ray Serve cancels a replica's call when the HTTP client disconnects at the proxy. The replica's app (no Ray
    started here: ``RewardReplica`` as a plain object, the demo model in-process) must take that as the client
    leaving: the request is dropped from the batch being cut (``max_wait_ms`` 2 s) before the model sees it,
    counted as 499 (not as the 503 of a shutdown), and the request merged with it gets its own right rewards."""
    ray_serve = pytest.importorskip("steer_reward.server.ray_serve", exc_type=ImportError)
    import asyncio

    replica = ray_serve.RewardReplica({"model": {"path": demo_model_path, "device": "cpu"},
                                       "server": {"max_wait_ms": 2000}})
    service = replica.service
    kept = {"prompts": [f"Kept question {i}?" for i in range(3)], "completions": [f"Answer {i}." for i in range(3)]}
    left = {"prompts": ["A question whose client leaves?"] * 4, "completions": [f"Reply {i}." for i in range(4)]}

    def post(body: dict):
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        return replica.forward("POST", "/score", b"", headers, data)

    async def scenario():
        kept_call, left_call = asyncio.ensure_future(post(kept)), asyncio.ensure_future(post(left))
        while service.batcher.pending_samples < 7:  # both encoded and in the batch waiting for more
            await asyncio.sleep(0.01)
        left_call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left_call
        return await kept_call

    try:
        status, _, content = asyncio.run(scenario())
        assert status == 200
        rewards = json.loads(content)["rewards"]
        expected = service.reward.score(kept["prompts"], kept["completions"]).rewards.tolist()
        assert rewards == pytest.approx(expected, abs=1e-5)
        assert _counter(service, "steer_reward_samples_scored_total") == 3  # the left request's 4 never ran
        assert _counter(service, "steer_reward_requests_total", endpoint="/score", code="499") == 1
        assert _counter(service, "steer_reward_requests_total", endpoint="/score", code="503") == 0
        assert service.batcher.pending_samples == 0
    finally:
        service.close()
