"""Faults and soak against real servers on loopback, bounded in time and count (sizes from the environment, so
the full-size runs reported in the README use the same code):

- many clients through ``RemoteScorer`` with two URLs while each server is SIGKILLed and restarted: every
  request answered once, with its own sample's in-process reward;
- a poison sample (its forward really fails) among 500 good ones: exactly one error;
- a soak: resident memory growth after warm-up under 10 %, no file-descriptor growth, p50/p99 latency printed;
- slow and malformed clients (bodies that never finish, half-open connections, 1 MB of junk, clients that
  leave) while good clients are served within the latency budget.

    STEER_REWARD_FAULT_CLIENTS=64 STEER_REWARD_FAULT_REQUESTS=200 STEER_REWARD_SOAK_REQUESTS=20000 \\
        pytest -s tests/test_server_faults.py
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time

import pytest
import torch
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import fault_injection  # noqa: E402

from steer_reward.client import RemoteScorer  # noqa: E402
from steer_reward.reward import SteerReward  # noqa: E402
from steer_reward.server.process import ServerProcess, free_port  # noqa: E402

FAULT_CLIENTS = int(os.environ.get("STEER_REWARD_FAULT_CLIENTS", 8))
FAULT_REQUESTS = int(os.environ.get("STEER_REWARD_FAULT_REQUESTS", 16))
SOAK_REQUESTS = int(os.environ.get("STEER_REWARD_SOAK_REQUESTS", 400))
SOAK_WARMUP = 200
READ_TIMEOUT = 30.0

pytestmark = pytest.mark.slow


def sample_pool(n: int = 97) -> tuple[list[str], list[str]]:
    """Distinct (prompt, completion) pairs; requests pick from them, and replies are checked against them."""
    prompts = [f"Question {i % 13}: how would you explain topic number {i % 13}?" for i in range(n)]
    completions = [f"Reply {i}: " + "a careful explanation. " * (1 + i % 7) for i in range(n)]
    return prompts, completions


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, demo_model_path):
    path = tmp_path_factory.mktemp("faults") / "server.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu", "max_length": 512},
                                    "server": {"read_timeout_s": READ_TIMEOUT}}))
    return path


@pytest.fixture(scope="module")
def in_process(config_path):
    """The pool scored in-process: what every server reply must equal."""
    prompts, completions = sample_pool()
    return SteerReward.from_config(config_path).score(prompts, completions)


@pytest.fixture(scope="module")
def expected(in_process):
    return in_process.rewards


@pytest.fixture(scope="module")
def poisoned_server(config_path, tmp_path_factory):
    """The real demo model, whose forward raises on the poison token."""
    port = free_port()
    log = tmp_path_factory.mktemp("poisoned") / "server.log"
    with ServerProcess(command=fault_injection.command(config_path, port, "--poison"), port=port,
                       log_path=log) as process:
        yield process


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_two_servers_killed_and_restarted_every_request_answered_once_with_its_own_reward(config_path, in_process,
                                                                                            tmp_path):
    """Server 0 is SIGKILLed at a quarter of the answers and server 1 at 60 %, both while requests are in flight;
    each is restarted on its port. Clients pause at their half and three-quarter marks until the restarted server
    is up (and the client no longer skips it as failed), so the kills always land mid-traffic and both restarted
    servers serve again."""
    prompts, completions = sample_pool()
    ports = [free_port(), free_port()]
    log = tmp_path / "servers.log"
    servers = [ServerProcess(["--config", str(config_path)], port=p, log_path=log) for p in ports]
    scorer = RemoteScorer([s.url for s in servers], retries=60, backoff_s=0.05, max_backoff_s=1.0, timeout=60,
                          unhealthy_s=1.0)
    total = FAULT_CLIENTS * FAULT_REQUESTS
    answers: dict[tuple[int, int], list[torch.Tensor]] = {}
    errors: list[str] = []
    gates = [threading.Event(), threading.Event()]  # the restarted server 0, then server 1, is up

    async def client(c: int) -> None:
        for j in range(FAULT_REQUESTS):
            for gate, mark in zip(gates, (FAULT_REQUESTS // 2, 3 * FAULT_REQUESTS // 4)):
                while j >= mark and not gate.is_set():
                    await asyncio.sleep(0.05)
            k = (c * FAULT_REQUESTS + j) % len(prompts)
            try:
                scores = await scorer.ascore([prompts[k]], [completions[k]])
            except Exception as err:  # noqa: BLE001 - counted below
                errors.append(f"client {c} request {j}: {err}")
                continue
            answers.setdefault((c, j), []).append(scores.values[0])

    def run_clients() -> None:
        async def everyone():
            await asyncio.gather(*(client(c) for c in range(FAULT_CLIENTS)))
            await scorer.aclose()

        asyncio.run(everyone())

    killed_at, in_flight = [], []
    thread = threading.Thread(target=run_clients, daemon=True)
    start = time.monotonic()
    try:
        for server in servers:
            server.start()
        thread.start()
        for victim, at in ((0, total // 4), (1, 6 * total // 10)):
            while len(answers) < at and thread.is_alive():
                time.sleep(0.005)
            in_flight.append(httpx.get(servers[victim].url + "/health", timeout=30).json()["pending_samples"])
            servers[victim].kill()
            killed_at.append(len(answers))
            servers[victim] = ServerProcess(["--config", str(config_path)], port=ports[victim], log_path=log)
            servers[victim].start()
            # The client skips a server for unhealthy_s after its last failure, all of which came before the restart
            # answered /health: past that, the clients held at the gate are sure to be sent to it too.
            time.sleep(scorer.unhealthy_s)
            gates[victim].set()
        thread.join(timeout=900)
        assert not thread.is_alive(), "the clients did not finish within 900 s"
        served_after = [metric(s.url, "steer_reward_samples_scored_total") for s in servers]
    finally:
        for gate in gates:
            gate.set()
        for server in servers:
            server.stop()
    seconds = time.monotonic() - start
    assert not errors, errors[:5]
    assert killed_at[0] < total // 2 and killed_at[1] < 3 * total // 4  # both kills landed mid-run
    assert all(n > 0 for n in served_after)  # both restarted servers served
    assert sorted(answers) == [(c, j) for c in range(FAULT_CLIENTS) for j in range(FAULT_REQUESTS)]  # none lost
    assert all(len(v) == 1 for v in answers.values())  # none answered twice
    got = torch.stack([v[0] for _, v in sorted(answers.items())])
    want = in_process.attributes.values[[(c * FAULT_REQUESTS + j) % len(prompts) for c, j in sorted(answers)]]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # each reply is its own sample's attributes
    print(f"\nkill/restart: {FAULT_CLIENTS} clients x {FAULT_REQUESTS} requests = {total} in {seconds:.1f} s; server 0 "
          f"SIGKILLed at {killed_at[0]} answers ({in_flight[0]} samples in it), server 1 at {killed_at[1]} "
          f"({in_flight[1]} in it), each restarted; restarted servers then scored {served_after[0]:.0f} and "
          f"{served_after[1]:.0f} samples; 0 lost, 0 duplicated, 0 mismatched")


def test_a_poison_sample_among_500_good_ones_gives_exactly_one_error(poisoned_server, expected):
    prompts, completions = sample_pool()
    requests = [(k % len(prompts), prompts[k % len(prompts)], completions[k % len(prompts)]) for k in range(500)]
    requests.insert(237, (-1, "Question: what breaks?", f"This {fault_injection.POISON} breaks."))
    failed_before = metric(poisoned_server.url, "steer_reward_isolated_failures_total")

    async def send():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=poisoned_server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(http.post("/score", json={"prompts": [p], "completions": [c]})
                                          for _, p, c in requests))

    replies = asyncio.run(send())
    bad = [i for i, r in enumerate(replies) if r.status_code != 200]
    assert bad == [237], [(i, replies[i].status_code, replies[i].text[:200]) for i in bad[:5]]
    assert replies[237].status_code == 500 and "poison" in replies[237].json()["error"]
    got = torch.tensor([r.json()["rewards"][0] for i, r in enumerate(replies) if i != 237])
    torch.testing.assert_close(got, expected[[k for k, _, _ in requests if k >= 0]], atol=1e-4, rtol=1e-4)
    assert metric(poisoned_server.url, "steer_reward_isolated_failures_total") == failed_before + 1
    merged = metric(poisoned_server.url, "steer_reward_isolation_calls_total")
    print(f"\npoison: 1 of 501 requests failed, 500 answered with their own rewards; {merged:.0f} extra scorer calls "
          f"to isolate it")


def _slow_and_malformed_clients(port: int, stop: threading.Event, seen: dict, hold: int = 100) -> None:
    """Until ``stop``: bodies that never finish and half-open connections (up to ``hold`` held at once), 1 MB of
    junk where a request should be, clients that leave mid-request."""
    junk = os.urandom(1 << 20)
    held: list[socket.socket] = []

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=30)

    while not stop.is_set():
        try:
            while len(held) < hold:
                sock = connect()
                if len(held) % 2:  # a body that never finishes
                    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 5000\r\n\r\n{\"prompts\": [\"")
                else:  # half-open: half a request line, then silence
                    sock.sendall(b"GET /hea")
                held.append(sock)
            sock = connect()  # a megabyte of junk where a request should be
            with sock:
                try:
                    sock.sendall(junk)
                except OSError:
                    pass
                seen["junk"] = seen.get("junk", 0) + 1
            sock = connect()  # a client that leaves mid-request
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            sock.close()
            seen["left"] = seen.get("left", 0) + 1
        except OSError as err:
            seen.setdefault("errors", []).append(repr(err))
        stop.wait(0.2)
    seen["held"] = len(held)
    for sock in held:
        sock.close()


def _good_traffic(url: str, n: int, concurrency: int, prompts, completions) -> tuple[list[float], list, list]:
    latencies: list[float] = []
    results: list[tuple[int, float]] = []
    failures: list[str] = []
    queue = list(range(n))

    async def worker(http):
        while queue:
            i = queue.pop()
            k = (i * 7) % len(prompts)
            start = time.perf_counter()
            try:
                reply = await http.post("/score", json={"prompts": [prompts[k]], "completions": [completions[k]]})
            except httpx.HTTPError as err:
                failures.append(f"request {i}: {type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            if reply.status_code != 200:
                failures.append(f"request {i}: {reply.status_code} {reply.text[:200]}")
            else:
                results.append((k, reply.json()["rewards"][0]))

    async def run():
        limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=4.0)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            await asyncio.gather(*(worker(http) for _ in range(concurrency)))

    asyncio.run(run())
    return latencies, results, failures


def _check(results, expected) -> None:
    got = torch.tensor([r for _, r in results])
    torch.testing.assert_close(got, expected[[k for k, _ in results]], atol=1e-4, rtol=1e-4)


def test_slow_and_malformed_clients_do_not_hold_the_server(poisoned_server, expected):
    """Good requests run first alone, then while 100 connections are held by stalled bodies and half-open
    connections, junk arrives and clients leave mid-request: every good request is answered right, and none
    waits for a stalled one (those hold up to server.read_timeout_s, 30 s)."""
    prompts, completions = sample_pool()
    baseline, results, failures = _good_traffic(poisoned_server.url, 100, 8, prompts, completions)
    stop, seen = threading.Event(), {}
    troublemaker = threading.Thread(target=_slow_and_malformed_clients, args=(poisoned_server.port, stop, seen),
                                    daemon=True)
    troublemaker.start()
    try:
        while "left" not in seen and troublemaker.is_alive():  # the 100 stalls are in place
            time.sleep(0.05)
        latencies, more, fail = _good_traffic(poisoned_server.url, 200, 8, prompts, completions)
        results += more
        failures += fail
        open_fds = poisoned_server.open_fds()
    finally:
        stop.set()
        troublemaker.join(60)
    assert not failures, failures[:5]
    _check(results, expected)
    assert seen.get("held") == 100 and seen.get("junk", 0) >= 1 and not seen.get("errors"), seen
    lat, base = torch.tensor(latencies), torch.tensor(baseline)
    assert float(lat.max()) < READ_TIMEOUT / 2, f"a good request took {float(lat.max()):.2f} s"
    print(f"\nslow/malformed: 200 good requests (8 at a time) all answered right while 100 connections were held "
          f"(stalled bodies, half-open), {seen['junk']} MB of junk and {seen['left']} clients leaving mid-request "
          f"came in; good p50 {lat.quantile(0.5) * 1000:.0f} ms, p99 {lat.quantile(0.99) * 1000:.0f} ms (alone "
          f"before: p50 {base.quantile(0.5) * 1000:.0f} ms, p99 {base.quantile(0.99) * 1000:.0f} ms); server fds "
          f"{open_fds}")


def test_soak_memory_and_descriptors_stay_flat(poisoned_server, expected):
    prompts, completions = sample_pool()
    url = poisoned_server.url
    _, _, failures = _good_traffic(url, SOAK_WARMUP, 32, prompts, completions)
    assert not failures, failures[:5]
    time.sleep(0.5)
    rss0, fds0 = poisoned_server.rss_bytes(), poisoned_server.open_fds()
    start = time.monotonic()
    latencies, results, failures = [], [], []
    rng = random.Random(0)
    done = 0
    while done < SOAK_REQUESTS:  # rounds with new connections each time (connection churn) and keep-alive within
        n = min(500, SOAK_REQUESTS - done)
        lat, res, fail = _good_traffic(url, n, rng.choice([8, 32, 64]), prompts, completions)
        latencies += lat
        results += res
        failures += fail
        done += n
    seconds = time.monotonic() - start
    time.sleep(0.5)  # let the last connections close
    rss1, fds1 = poisoned_server.rss_bytes(), poisoned_server.open_fds()
    assert not failures, failures[:5]
    assert len(results) == SOAK_REQUESTS
    _check(results, expected)
    lat = torch.tensor(latencies)
    growth = (rss1 - rss0) / rss0
    print(f"\nsoak: {SOAK_REQUESTS} requests in {seconds:.1f} s ({SOAK_REQUESTS / seconds:.0f} req/s), p50 "
          f"{lat.quantile(0.5) * 1000:.0f} ms, p99 {lat.quantile(0.99) * 1000:.0f} ms; server RSS "
          f"{rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB ({growth:+.1%}) after {SOAK_WARMUP} warm-up requests, "
          f"open fds {fds0} -> {fds1}")
    assert growth < 0.10
    assert fds1 <= fds0
