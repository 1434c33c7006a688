"""``steer-reward serve``: the reward server (``/score``, OpenRLHF's ``/get_reward``, health, info, metrics)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from steer_reward.commands.common import add_reward_args, reward_from_args
from steer_reward.errors import InputError, require_extra

__all__ = ["register", "run"]


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


def _replicas_asked(args: argparse.Namespace) -> bool:
    from steer_reward.config import load_config, parse_override

    config = load_config(args.config, dict(parse_override(o) for o in args.overrides))
    return bool(config.server.replicas)


def run(args: argparse.Namespace) -> int:
    uvicorn = require_extra("uvicorn", "server")
    from steer_reward.server.app import create_app

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
    if _replicas_asked(args):
        from steer_reward.commands.serve_ray import run_ray

        return run_ray(args)
    reward = reward_from_args(args)
    if reward.is_async:
        raise InputError("the server needs an in-process model: backend 'remote' would forward to another server")
    server = reward.config.server
    token = args.token or os.environ.get(server.token_env) or None
    app = create_app(reward, server, token)
    where = f"http://{server.host}:{server.port}"
    auth = "bearer token required" if token else f"no auth (set {server.token_env} to require a token)"
    print(f"steer-reward serving {reward.config.model.path} at {where} ({auth}); OpenRLHF: "
          f"--reward.remote_url {where}/get_reward", file=sys.stderr, flush=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level=args.log_level, access_log=False)
    return 0
