"""``steer-reward export-folded``: a one-output reward checkpoint with the shaping weights folded into its head."""

from __future__ import annotations

import argparse
from typing import Any

from steer_reward.commands.common import add_reward_args, reward_from_args

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-folded", help="fold weights (+ fixed normalization, decorrelation) into a num_labels=1 checkpoint",
        description="Writes a standard *ForSequenceClassification checkpoint with one bias-free 'score' output for "
                    "PPO loops and OpenRLHF's in-process reward model. The constant term (bias, normalization means) "
                    "goes to config.json as OpenRLHF's mean (= -offset, std = 1) and steer_reward.reward_offset.",
    )
    add_reward_args(parser, model_required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from steer_reward.folding import export_folded, shaper_weights

    reward = reward_from_args(args)
    folded = export_folded(reward, args.out)
    weights = ", ".join(f"{k}={v:g}" for k, v in shaper_weights(reward).items() if v)
    print(f"wrote {args.out}: one-output head folded from {reward.schema.name} ({weights}); "
          f"reward = logits[:, 0] + {folded.offset:.6g}")
    if folded.offset:
        print("  the offset is stored as config.json mean/std (OpenRLHF applies it with reward normalization on); "
              "a constant shift changes no group-relative advantage")
    return 0
