"""Slow, careless and malformed clients against the real server (a uvicorn subprocess on loopback): deadlines on
headers and bodies, idle connections, keep-alive, junk, clients that leave (their work dropped, counted as 499),
and a SIGTERM that finishes within the grace period while a client is stalled mid-body."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import pytest
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from steer_reward.server.process import ServerProcess  # noqa: E402

READ_TIMEOUT = 2.0
GOOD = {"prompts": ["What is 2 + 2?", "Name a colour."], "completions": ["4", "Blue."]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_path):
    folder = tmp_path_factory.mktemp("clients")
    config = folder / "server.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu"},
                                      "server": {"read_timeout_s": READ_TIMEOUT}}))
    with ServerProcess(["--config", str(config)], log_path=folder / "server.log") as process:
        yield process


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP/1.1 reply with a Content-Length; (0, {}, b"") if the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def good_request(server) -> float:
    """Seconds for one /score request on a fresh connection (checked to be right)."""
    start = time.monotonic()
    reply = httpx.post(server.url + "/score", json=GOOD, timeout=60)
    assert reply.status_code == 200 and len(reply.json()["rewards"]) == 2, reply.text
    return time.monotonic() - start


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if labels else " ")):
            return float(line.split()[-1])
    return 0.0


def test_partial_headers_get_408_and_are_closed_while_others_are_served(server):
    stalled = connect(server)
    stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    start = time.monotonic()
    good_request(server)  # served while the stalled connection waits
    status, headers, body = read_reply(stalled)
    waited = time.monotonic() - start
    assert status == 408 and "server.read_timeout_s" in json.loads(body)["error"]
    assert headers.get("connection") == "close" and closed_by_server(stalled)
    assert READ_TIMEOUT - 0.5 <= waited < READ_TIMEOUT + 10  # held for the deadline, not for as long as it likes
    stalled.close()


def test_a_connection_that_sends_nothing_is_closed(server):
    idle = connect(server)
    start = time.monotonic()
    assert closed_by_server(idle)  # quietly: no request was started, so no 408
    assert time.monotonic() - start < READ_TIMEOUT + 10
    idle.close()


def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(server):
    stalled = connect(server)
    stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                    b"\r\n{\"prompts\": [")
    good_request(server)
    status, headers, body = read_reply(stalled)
    assert status == 408 and "body" in json.loads(body)["error"]
    assert headers.get("connection") == "close" and closed_by_server(stalled)
    stalled.close()


def test_a_megabyte_of_junk_gets_a_4xx_and_the_server_keeps_serving(server):
    junk = os.urandom(1 << 20)
    head = connect(server)  # junk instead of a request head: h11 refuses it past 16 KiB
    try:
        head.sendall(junk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it all went out
    status, _, _ = read_reply(head)
    assert status in (0, 400)
    head.close()
    body = connect(server)  # a well-formed request whose JSON body is junk
    body.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(junk)).encode() + b"\r\n\r\n" + junk)
    status, _, reply = read_reply(body)
    assert status == 400 and json.loads(reply)["error"]
    body.close()
    good_request(server)


def _score_body(n: int, tag: str) -> bytes:
    return json.dumps({"prompts": [f"{tag} question {i}: tell me about number {i}." for i in range(n)],
                       "completions": [f"Number {i} is fine, because " + "it is. " * 10 for i in range(n)]}).encode()


def _post(sock: socket.socket, body: bytes) -> None:
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)


def _wait_pending(server, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(server.url + "/health", timeout=30).json()["pending_samples"] < at_least:
        assert time.monotonic() < deadline, f"never {at_least} samples pending"
        time.sleep(0.02)


def test_a_request_whose_client_left_is_not_computed(server):
    scored_before = metric(server, "steer_reward_samples_scored_total")
    closed_before = metric(server, "steer_reward_requests_total", code="499", endpoint="/score")
    a, b = connect(server), connect(server)
    _post(a, _score_body(400, "A"))
    _wait_pending(server, 400)  # A is running (the batcher takes it at once)
    _post(b, _score_body(400, "B"))
    _wait_pending(server, 800)  # B waits behind it
    b.close()  # B's client leaves
    status, _, body = read_reply(a)
    assert status == 200 and len(json.loads(body)["rewards"]) == 400
    a.close()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=30).json()["pending_samples"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(server, "steer_reward_samples_scored_total") - scored_before == 400  # not 800
    assert metric(server, "steer_reward_requests_total", code="499", endpoint="/score") == closed_before + 1


def test_a_client_leaving_mid_body_is_counted_499_not_a_server_error(server):
    before = metric(server, "steer_reward_requests_total", code="499", endpoint="/score")
    sock = connect(server)
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
                 b"\r\n{\"prompts\": [\"Hi\"")
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 10
    while metric(server, "steer_reward_requests_total", code="499", endpoint="/score") == before:
        assert time.monotonic() < deadline, "the disconnect was not counted as 499"
        time.sleep(0.05)
    assert metric(server, "steer_reward_requests_total", code="500", endpoint="/score") == 0
    assert "/score failed" not in server.log_path.read_text()
    good_request(server)


def test_sigterm_finishes_within_the_grace_period_with_a_client_stalled_mid_body(tmp_path, demo_model_path):
    grace = 4.0
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": demo_model_path, "device": "cpu"},
                                      "server": {"read_timeout_s": 60.0, "shutdown_grace_s": grace}}))
    with ServerProcess(["--config", str(config)], log_path=tmp_path / "server.log") as server:
        stalled = connect(server)
        stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100"
                        b"\r\n\r\n{\"prompts\": [")
        busy = connect(server)
        _post(busy, _score_body(20, "in flight"))
        _wait_pending(server, 20)
        replies: dict[str, tuple] = {}
        readers = [threading.Thread(target=lambda s=s, k=k: replies.__setitem__(k, read_reply(s)))
                   for k, s in (("stalled", stalled), ("busy", busy))]
        for reader in readers:
            reader.start()
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(grace + 30)
        took = time.monotonic() - start
        for reader in readers:
            reader.join(10)
    assert took < grace + 5, f"shutdown took {took:.1f} s with a grace period of {grace} s"
    assert replies["busy"][0] == 200, replies["busy"]  # in flight at SIGTERM: answered
    status, headers, body = replies["stalled"]
    assert status == 503 and re.search("shut(ting)? down", json.loads(body)["error"])  # failed cleanly
    print(f"\nSIGTERM with a client stalled mid-body: exited after {took:.1f} s (grace {grace:g} s); the request in "
          f"flight was answered 200, the stalled one 503")


KEEPALIVE_CONNECTIONS = int(os.environ.get("STEER_REWARD_KEEPALIVE_CONNECTIONS", 200))
KEEPALIVE_REQUESTS = int(os.environ.get("STEER_REWARD_KEEPALIVE_REQUESTS", 4))


def test_clients_reusing_connections_after_5_s_idle_never_meet_a_closed_one(server):
    """httpx (5 s idle expiry) reusing connections after idle gaps of 4.95-5.05 s: against uvicorn's former 5 s
    keep-alive, about 1 % of such reuses met a connection the server was closing (RemoteProtocolError, ReadError);
    the default server.keep_alive_s (75 s) outlives the client's idle timeout, so none do.
    ``STEER_REWARD_KEEPALIVE_SERVER_S=5`` runs the same against a server of its own with a 5 s keep-alive."""
    import asyncio
    import random

    outcomes: dict[str, int] = {}

    async def connection(url: str, c: int) -> None:
        rng = random.Random(c)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(keepalive_expiry=5.0)) as http:
            for j in range(KEEPALIVE_REQUESTS):
                if j:
                    await asyncio.sleep(rng.uniform(4.95, 5.05))
                try:
                    outcome = str((await http.get("/health")).status_code)
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def everyone(url: str) -> None:
        await asyncio.gather(*(connection(url, c) for c in range(KEEPALIVE_CONNECTIONS)))

    if "STEER_REWARD_KEEPALIVE_SERVER_S" in os.environ:
        folder = server.log_path.parent
        config = folder / "keepalive.yaml"
        keep_alive = float(os.environ["STEER_REWARD_KEEPALIVE_SERVER_S"])
        config.write_text(yaml.safe_dump({"model": {"path": "demo", "device": "cpu"},
                                          "server": {"keep_alive_s": keep_alive}}))
        with ServerProcess(["--config", str(config)], log_path=folder / "keepalive.log") as own:
            asyncio.run(everyone(own.url))
    else:
        asyncio.run(everyone(server.url))
    print(f"\nkeep-alive: {KEEPALIVE_CONNECTIONS} connections x {KEEPALIVE_REQUESTS} requests, ~5 s idle between: "
          f"{outcomes}")
    assert outcomes == {"200": KEEPALIVE_CONNECTIONS * KEEPALIVE_REQUESTS}, outcomes
