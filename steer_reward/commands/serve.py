"""``steer-reward serve``: the reward server (``/score``, OpenRLHF's ``/get_reward``, health, info, metrics)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Any

from steer_reward.commands.common import add_reward_args, reward_from_args
from steer_reward.config import load_config, parse_override
from steer_reward.errors import InputError, require_extra

__all__ = ["register", "run", "reserve_port", "reachable_host", "is_loopback"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a reward model over HTTP (OpenRLHF --reward.remote_url, steer-reward remote backend)",
        description="Binds 127.0.0.1 unless --host says otherwise. A bearer token is required when --token or the "
                    "environment variable named by server.token_env (default STEER_REWARD_TOKEN) is set.",
    )
    add_reward_args(parser, model_required=False)
    parser.add_argument("--host", help="address to bind (server.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (server.port; default 8000)")
    parser.add_argument("--token", help="bearer token clients must send (prefer the environment variable: "
                                        "command lines are visible to other users)")
    parser.add_argument("--max-wait-ms", type=float, help="server.max_wait_ms: longest wait for a batch to fill")
    parser.add_argument("--max-batch-tokens", type=int, help="server.max_batch_tokens: token budget of one batch")
    parser.add_argument("--actor-tokenizer", metavar="DIR",
                        help="server.actor_tokenizer: the OpenRLHF actor's tokenizer folder; its chat template "
                             "decides how /get_reward queries are read")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    scale = parser.add_argument_group("scale-out (Ray Serve; pip install 'steer-reward[ray]')")
    scale.add_argument("--replicas", type=int, help="server.replicas: scoring replicas behind this one URL, routed "
                                                    "by prompt affinity (default 0: one in-process model, no Ray)")
    scale.add_argument("--min-replicas", type=int, help="server.min_replicas: autoscaling lower limit")
    scale.add_argument("--max-replicas", type=int, help="server.max_replicas: autoscaling upper limit")
    scale.add_argument("--replica-gpus", type=float, help="server.replica_gpus: GPUs per replica")
    scale.add_argument("--ray-address", help="server.ray_address: Ray cluster to join (default: start a local one)")
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reachable_host(host: str) -> str:
    """An address other machines can use for a server bound to ``host``: for a wildcard bind (0.0.0.0, ::), this
    machine's outward IP address (the one its default route uses), else its hostname."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    probe = ("2001:db8::1", 9) if family == socket.AF_INET6 else ("192.0.2.1", 9)  # documentation ranges
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(probe)  # UDP connect sends nothing; it only picks the outgoing interface
            address = sock.getsockname()[0]
        if not ipaddress.ip_address(address).is_unspecified:
            return f"[{address}]" if ":" in address else address
    except OSError:
        pass
    return socket.gethostname()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) but not listening yet: the port is checked and held before the model
    loads (clients get "connection refused", and fail over, until uvicorn listens on it). InputError when the
    port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise InputError(f"cannot bind --host {host!r}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not block
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise InputError(f"port {port} on {host} is already in use or not allowed ({err.strerror}); stop the "
                         f"other server or choose another --port") from None
    return sock


def run(args: argparse.Namespace) -> int:
    require_extra("uvicorn", "server")
    from steer_reward.server.app import check_server_config, create_app

    for flag, key in (("host", "server.host"), ("port", "server.port"), ("max_wait_ms", "server.max_wait_ms"),
                      ("max_batch_tokens", "server.max_batch_tokens"), ("actor_tokenizer", "server.actor_tokenizer"),
                      ("replicas", "server.replicas"), ("min_replicas", "server.min_replicas"),
                      ("max_replicas", "server.max_replicas"), ("replica_gpus", "server.replica_gpus"),
                      ("ray_address", "server.ray_address")):
        value = getattr(args, flag)
        if value is not None:
            args.overrides.append(f"{key}={value}")
    if args.model is None and args.config is None:
        raise InputError("give --model (a reward model folder, or 'demo') or --config with model.path")
    # The port and the server settings are checked before the model loads (minutes for a large one).
    server = load_config(args.config, dict(parse_override(o) for o in args.overrides)).server
    check_server_config(server)
    token = args.token or os.environ.get(server.token_env) or None
    sock = reserve_port(server.host, server.port)
    if not token and not is_loopback(server.host):
        print(f"warning: serving on {server.host} without a token: anyone who can reach port {server.port} can "
              f"use this reward model; set {server.token_env} (clients send 'Authorization: Bearer ...')",
              file=sys.stderr, flush=True)
    if server.replicas:
        sock.close()  # Ray Serve's proxy binds the port itself; it was free a moment ago
        from steer_reward.commands.serve_ray import run_ray

        return run_ray(args)
    try:
        reward = reward_from_args(args)
        if reward.is_async:
            raise InputError("the server needs an in-process model: backend 'remote' would forward to another server")
        server = reward.config.server
        app = create_app(reward, server, token)
        from steer_reward.server.transport import serve

        where = f"http://{reachable_host(server.host)}:{server.port}"
        auth = "bearer token required" if token else f"no auth (set {server.token_env} to require a token)"
        print(f"steer-reward serving {reward.config.model.path} at {where} ({auth}); OpenRLHF: "
              f"--reward.remote_url {where}/get_reward", file=sys.stderr, flush=True)
        serve(app, app.state.service, server.host, server.port, sock=sock, log_level=args.log_level)
    finally:
        sock.close()
    return 0
