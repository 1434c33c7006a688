"""Arguments and helpers shared by CLI subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

from steer_reward.config import parse_override
from steer_reward.errors import InputError

__all__ = ["add_reward_args", "reward_from_args", "read_jsonl", "quiet_transformers"]


def add_reward_args(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    parser.add_argument("--model", required=model_required,
                        help="reward model folder, or 'demo' (tiny random-weight model); overrides model.path")
    parser.add_argument("--config", help="YAML config (e.g. configs/rewards/steerlm-70b.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted name, e.g. shaping.weights.verbosity=-1.0")


def quiet_transformers() -> None:
    """Transformers' own loading bars would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def reward_from_args(args: argparse.Namespace):
    from steer_reward.demo import DEMO_WARNING
    from steer_reward.reward import SteerReward

    quiet_transformers()
    overrides = dict(parse_override(o) for o in args.overrides)
    reward = SteerReward.from_config(args.config, model=args.model, overrides=overrides)
    if reward.config.model.path == "demo":
        print(DEMO_WARNING, file=sys.stderr)
    return reward


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a bad line is an ``InputError`` naming its number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            yield number, row
