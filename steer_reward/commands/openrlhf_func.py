"""``steer-reward openrlhf-func``: write a ``reward_func.py`` for OpenRLHF's ``--reward.remote_url FILE``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from steer_reward.commands.common import add_reward_args, staged_output
from steer_reward.config import load_config, parse_override
from steer_reward.errors import InputError

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "openrlhf-func", help="write a reward_func.py that OpenRLHF loads with --reward.remote_url FILE",
        description="The file imports steer-reward and loads the reward model once per process, on first call.",
    )
    add_reward_args(parser)
    parser.add_argument("--out", required=True, help="file to write (e.g. reward_func.py)")
    parser.add_argument("--actor-tokenizer", metavar="DIR",
                        help="the actor's tokenizer folder (server.actor_tokenizer): its chat template decides how "
                             "queries are read; checked now")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.actor_tokenizer:
        overrides["server.actor_tokenizer"] = args.actor_tokenizer
    if overrides.get("server.actor_tokenizer"):  # the file is loaded from other working directories
        overrides["server.actor_tokenizer"] = os.path.abspath(str(overrides["server.actor_tokenizer"]))
    config = os.path.abspath(args.config) if args.config else None
    model = args.model
    if model is not None and model != "demo":
        model = os.path.abspath(model)
    # Check now, not inside OpenRLHF's engine processes where an error surfaces late.
    checked = load_config(config, {**overrides, **({"model.path": model} if model else {})})
    if checked.model.path is None:
        raise InputError("give --model (a reward model folder, or 'demo') or a --config with model.path")
    if checked.backend == "remote":
        raise InputError("a reward_func file scores in-process; for a server use --reward.remote_url "
                         "http://HOST:PORT/get_reward instead")
    from steer_reward.openrlhf_reward_func import reward_func_source
    from steer_reward.server.actor_templates import ActorTemplate
    from steer_reward.server.openrlhf import check_openrlhf_options

    check_openrlhf_options(checked.server)
    if checked.server.actor_tokenizer:
        actor = ActorTemplate.from_tokenizer(checked.server.actor_tokenizer)
        family = actor.family.name if actor.family else "plain text (no chat template)"
        print(f"actor template: {family}; generation prompt {actor.generation_prompt!r}")

    out = Path(args.out)
    with staged_output(out, inputs=[config, None if model == "demo" else model], flag="--out") as stage:
        stage.write_text(reward_func_source(config, model, overrides))
    print(f"wrote {out}; use it with: --reward.remote_url {out.resolve()}")
    return 0
