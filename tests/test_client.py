"""``RemoteScorer`` and ``backend: remote`` against real server subprocesses: failover past a dead URL, 4xx
raised at once, backpressure 503 + Retry-After retried, pickling, and a server killed mid-run and restarted on the
same port while the client's retries deliver every reward."""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import threading
import time

import httpx
import pytest
import torch
import yaml

pytest.importorskip("fastapi")

from steer_reward.client import RemoteError, RemoteScorer  # noqa: E402
from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.process import ServerProcess, free_port  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name a prime number.", "Say hi."] * 2
COMPLETIONS = ["Paris.", "7", "Hi!", "Lyon, I think.", "Nine.", "Hello there, friend."]


def _write_config(path, model, **server):
    path.write_text(yaml.safe_dump({"model": {"path": model, "device": "cpu"}, "server": server}))
    return path


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, demo_model_path):
    # A tiny queue and a long batching wait make backpressure easy to reach.
    return _write_config(tmp_path_factory.mktemp("client") / "c.yaml", demo_model_path, max_queue=2, max_wait_ms=150)


@pytest.fixture(scope="module")
def server(config_path, tmp_path_factory):
    with ServerProcess(["--config", str(config_path)], log_path=tmp_path_factory.mktemp("log") / "s.log") as process:
        yield process


@pytest.fixture(scope="module")
def reference(config_path):
    return SteerReward.from_config(config_path)


def test_failover_skips_a_dead_server(server, reference):
    dead = f"http://127.0.0.1:{free_port()}"
    scorer = RemoteScorer([dead, server.url], retries=3, backoff_s=0.01)
    for _ in range(3):
        scores = scorer.score(PROMPTS, COMPLETIONS)
        torch.testing.assert_close(scores.values, reference.score(PROMPTS, COMPLETIONS).attributes.values,
                                   atol=1e-4, rtol=1e-4)
    assert scorer._unhealthy_until[dead] > time.monotonic()  # skipped for a while
    assert scorer._unhealthy_until[server.url] == 0.0


def test_client_errors_are_raised_at_once_with_the_server_message(server):
    scorer = RemoteScorer(server.url, retries=5, backoff_s=5.0)  # a retry would wait 2.5 s at least
    start = time.monotonic()
    with pytest.raises(RemoteError, match="helpfullness.*did you mean 'helpfulness'") as err:
        scorer.score(["Hi"], ["Hello"], weights={"helpfullness": 1.0})
    assert err.value.status == 422
    assert time.monotonic() - start < 2.5  # no retries on a 4xx


def test_no_server_gives_a_clear_error_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError, match=f"after 3 tries.*{url}"):
        RemoteScorer(url, retries=3, backoff_s=0.01).score(["Hi"], ["Hello"])


def test_backpressure_503_with_retry_after_and_the_client_retries_through_it(server, reference):
    async def raw():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(server.url + "/score", json={"prompts": [p], "completions": [c]})
                                          for p, c in zip(PROMPTS, COMPLETIONS)))

    replies = asyncio.run(raw())
    busy = [r for r in replies if r.status_code == 503]
    assert busy and all(int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"] for r in busy)

    scorer = RemoteScorer(server.url, retries=20, backoff_s=0.05)

    async def one_each():
        return await asyncio.gather(*(scorer.ascore([p], [c]) for p, c in zip(PROMPTS, COMPLETIONS)))

    parts = asyncio.run(one_each())
    got = torch.cat([p.values for p in parts])
    torch.testing.assert_close(got, reference.score(PROMPTS, COMPLETIONS).attributes.values, atol=1e-4, rtol=1e-4)


def test_remote_backend_steer_reward_is_async_and_matches_local(server, reference):
    remote = SteerReward.from_config({"backend": "remote", "remote": {"urls": [server.url]},
                                      "shaping": {"weights": "nemotron-340b"}})
    local = reference.with_weights("nemotron-340b")
    assert remote.is_async and remote.schema.names == reference.schema.names
    expected = local.score(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(remote.score(PROMPTS, COMPLETIONS).rewards, expected.rewards, atol=1e-4, rtol=1e-4)
    scored = asyncio.run(remote.ascore(PROMPTS, COMPLETIONS))
    torch.testing.assert_close(scored.rewards, expected.rewards, atol=1e-4, rtol=1e-4)
    assert scored.attributes.completion_lengths.tolist() == expected.attributes.completion_lengths.tolist()


def test_remote_backend_config_errors():
    from steer_reward.config import ConfigError

    with pytest.raises(ConfigError, match="remote.urls is empty"):
        SteerReward.from_config({"backend": "remote"})


def test_remote_scorer_pickles(server, reference):
    scorer = RemoteScorer(server.url, token=None, retries=2)
    scorer.score(["Hi"], ["Hello"])
    clone = pickle.loads(pickle.dumps(scorer))
    torch.testing.assert_close(clone.score(["Hi"], ["Hello"]).values,
                               reference.score(["Hi"], ["Hello"]).attributes.values, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted_every_reward_arrives(demo_model_path, tmp_path, reference):
    config = _write_config(tmp_path / "r.yaml", demo_model_path)
    port, log = free_port(), tmp_path / "restart.log"
    n = 40
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    completions = [f"{COMPLETIONS[i % len(COMPLETIONS)]} ({i})" for i in range(n)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    scorer = RemoteScorer(f"http://127.0.0.1:{port}", retries=60, backoff_s=0.1, max_backoff_s=1.0, timeout=30)

    def run_client():
        try:
            for i in range(n):
                results[i] = scorer.score([prompts[i]], [completions[i]]).values[0]
                time.sleep(0.05)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    first = ServerProcess(["--config", str(config)], port=port, log_path=log)
    second = ServerProcess(["--config", str(config)], port=port, log_path=log)
    thread = threading.Thread(target=run_client, daemon=True)
    try:
        first.start()
        thread.start()
        deadline = time.monotonic() + 60
        while len(results) < 10 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert len(results) >= 10, "the client made no progress before the kill"
        first.kill()
        killed_at = len(results)
        second.start()
        thread.join(timeout=240)
        assert not thread.is_alive(), "the client did not finish within 240 s"
    finally:
        first.stop()
        second.stop()
    assert not errors, errors
    assert killed_at < n and len(results) == n
    expected = reference.score(prompts, completions).attributes.values
    torch.testing.assert_close(torch.stack([results[i] for i in range(n)]), expected, atol=1e-4, rtol=1e-4)


class _ScriptedServer:
    """A loopback HTTP/1.1 server for the client's connection handling: it answers every request with a fixed
    /score reply, keeping the connection open, except that the requests numbered in ``drop`` (counted over the
    whole run, from 0) are read and then met with a closed connection and no reply, as when the server closes
    an idle keep-alive connection just as the client reuses it."""

    REPLY = json.dumps({"rewards": [0.5], "attributes": {"a": [1.5]}, "names": ["a"], "completion_lengths": [1],
                        "prompt_truncated_tokens": [0], "completion_truncated_tokens": [0]}).encode()

    def __init__(self, drop=()):
        self.drop = set(drop)
        self.requests = 0
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                number, self.requests = self.requests, self.requests + 1
                if number in self.drop:
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(self.REPLY)).encode() + b"\r\n\r\n" + self.REPLY)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_connection_closed_under_a_request_is_resent_at_once_without_using_a_try(mode):
    server = _ScriptedServer(drop={1})
    scorer = RemoteScorer(server.url, retries=1, backoff_s=5.0)  # one try: a counted retry would fail the test

    async def twice_async():
        return [await scorer.ascore(["Hi"], ["Hello"]) for _ in range(2)]

    try:
        start = time.monotonic()
        results = asyncio.run(twice_async()) if mode == "async" else [scorer.score(["Hi"], ["Hello"]) for _ in range(2)]
        took = time.monotonic() - start
    finally:
        server.close()
    assert [r.values.item() for r in results] == [1.5, 1.5]
    assert server.requests == 3 and server.connections == 2  # the dropped request went again on a new connection
    assert scorer._unhealthy_until[server.url] == 0.0  # not marked unhealthy
    assert took < 5.0  # no backoff


def test_idle_connections_are_dropped_before_the_server_closes_them():
    from steer_reward.config import RemoteConfig, ServerConfig

    assert RemoteConfig().idle_timeout_s < ServerConfig().keep_alive_s
    server = _ScriptedServer()
    scorer = RemoteScorer(server.url, retries=1, idle_timeout_s=0.2)
    try:
        scorer.score(["Hi"], ["Hello"])
        scorer.score(["Hi"], ["Hello"])
        assert server.connections == 1  # reused while fresh
        time.sleep(0.5)
        scorer.score(["Hi"], ["Hello"])
        assert server.connections == 2  # idle past idle_timeout_s: a new connection, the old one is not risked
    finally:
        server.close()
