"""``steer-reward serve`` before the model loads: a taken port and impossible server settings are one line and exit
2 at once; a bind open to the network without a token warns and prints an address clients can use."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from steer_reward.commands.serve import is_loopback, reachable_host  # noqa: E402
from steer_reward.server.process import ServerProcess, free_port  # noqa: E402

MODEL_LOADED = "RANDOM weights"  # the demo model's note, printed once the model is loaded


def test_a_taken_port_and_an_impossible_setting_are_one_line_and_exit_2_before_the_model_loads():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "steer_reward.cli", "serve", "--model", "demo"]
        runs = [subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for args in (["--port", str(port)], ["--port", str(free_port()), "--set", "server.read_timeout_s=0"])]
        (_, in_use), (_, setting) = (run.communicate(timeout=300) for run in runs)
    assert [run.returncode for run in runs] == [2, 2], (in_use, setting)
    lines = in_use.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is already in use" in lines[0], in_use
    assert "server.read_timeout_s must be positive" in setting
    assert MODEL_LOADED not in in_use + setting


def test_reachable_host_never_gives_a_wildcard():
    for wildcard in ("0.0.0.0", ""):
        host = reachable_host(wildcard)
        assert host and host not in ("0.0.0.0", "::")
    assert reachable_host("127.0.0.1") == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_an_open_bind_without_a_token_warns_and_prints_a_usable_url(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "steer_reward.cli", "serve", "--model", "demo", "--host", "0.0.0.0",
               "--port", str(port)]
    with ServerProcess(command=command, port=port, log_path=log, env={"STEER_REWARD_TOKEN": ""}):
        pass  # healthy on 127.0.0.1 (a wildcard bind answers there too), then stopped
    text = log.read_text()
    assert re.search(rf"warning: serving on 0\.0\.0\.0 without a token: anyone who can reach port {port}", text)
    url = re.search(r"--reward\.remote_url http://(\S+):(\d+)/get_reward", text)
    assert url and int(url.group(2)) == port
    host = url.group(1).strip("[]")
    assert host not in ("0.0.0.0", "::")
    try:
        assert not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        assert host == socket.gethostname()  # no routable address: the hostname
