"""``steer-reward serve --replicas N``: the reward server as N Ray Serve replicas behind one URL."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from steer_reward.errors import InputError, require_extra

__all__ = ["run_ray", "absolute_paths"]


def absolute_paths(overrides: dict, config) -> dict:
    """Overrides turning the config's relative file paths into absolute ones: replicas do not share the CLI's
    working directory."""
    from pathlib import Path

    fixed = dict(overrides)
    for key, value in (("model.path", config.model.path), ("model.adapter", config.model.adapter),
                       ("shaping.stats_file", config.shaping.stats_file),
                       ("server.actor_tokenizer", config.server.actor_tokenizer)):
        if value and value != "demo" and Path(value).expanduser().exists():
            fixed[key] = str(Path(value).expanduser().resolve())
    return fixed


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_ray(args: argparse.Namespace) -> int:
    require_extra("ray", "ray")
    from steer_reward.quiet import quiet_transformers
    from steer_reward.config import load_config, parse_override
    from steer_reward.demo import DEMO_WARNING
    from steer_reward.modeling import model_folder
    from steer_reward.server.ray_serve import APP_NAME, check_scale_out, reward_application, start_ray

    quiet_transformers()
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.model is not None:
        overrides["model.path"] = args.model
    config = load_config(args.config, overrides)
    check_scale_out(config)
    model_folder(config.model.path)  # a missing folder fails here, once, not in every replica; builds the demo
    config = load_config(args.config, absolute_paths(overrides, config))
    if config.model.path == "demo":
        print(DEMO_WARNING, file=sys.stderr)
    server = config.server
    token = args.token or os.environ.get(server.token_env) or None

    from ray import serve

    start_ray(config)
    # After ray.init, which installs a SIGTERM handler that aborts the process: stop cleanly instead, also while
    # the replicas are still starting.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(reward_application(config, token), name=APP_NAME, route_prefix="/")
        where = f"http://{server.host}:{server.port}"
        scaling = (f"{server.min_replicas}-{server.max_replicas} replicas (autoscaling, {server.replicas} at start)"
                   if server.min_replicas is not None else f"{server.replicas} replicas")
        auth = "bearer token required" if token else f"no auth (set {server.token_env} to require a token)"
        print(f"steer-reward serving {config.model.path} on Ray Serve, {scaling}, routed by "
              f"{'prompt affinity' if server.affinity else 'least load'}, at {where} ({auth}); OpenRLHF: "
              f"--reward.remote_url {where}/get_reward", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C
        pass
    except RuntimeError as err:  # Ray Serve's deployment failures (a replica that cannot start) are RuntimeErrors
        raise InputError(f"the Ray Serve application did not start: {err}") from None
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return 0
