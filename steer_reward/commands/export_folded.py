"""``steer-reward export-folded``: a one-output reward checkpoint with the shaping weights folded into its head."""

from __future__ import annotations

import argparse
import json
from typing import Any

from steer_reward.commands.common import add_reward_args, check_output, reward_from_args, staged_output

__all__ = ["register", "openrlhf_notes"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-folded", help="fold weights (+ fixed normalization, decorrelation) into a num_labels=1 checkpoint",
        description="Writes a standard *ForSequenceClassification checkpoint with one bias-free 'score' output for "
                    "PPO loops and OpenRLHF's in-process reward model: logits[:, 0] + c is the shaped reward. "
                    "OpenRLHF: keep --reward.normalize_enable off (see the README.md written next to it).",
    )
    add_reward_args(parser, model_required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=run)


def openrlhf_notes(offset: float) -> list[str]:
    """What holds when OpenRLHF 0.11 loads the folded checkpoint as its in-process reward model (measured with
    OpenRLHF 0.11.2's own loader, transformers 5.24): one line each."""
    constant = (f"The constant c = {offset:.6g} is not in the head (Llama-family score heads have no bias), so "
                f"OpenRLHF's reward is logits[:, 0] = shaped reward - c. A constant shift changes no group-relative "
                f"advantage (--algo.advantage.estimator group_norm, rloo, reinforce_baseline, dr_grpo) and no "
                f"preference; with gae the critic absorbs it, with reinforce it adds variance only. For the exact "
                f"shaped reward (in the reward config's dtype), serve it instead: steer-reward serve or "
                f"steer-reward openrlhf-func, with --reward.remote_url.") if offset else (
                "The folded head has no constant term (c = 0): logits[:, 0] is the shaped reward.")
    return [
        "Keep OpenRLHF's reward normalization OFF (no --reward.normalize_enable). OpenRLHF copies config.json's "
        "mean/std into non-persistent buffers that transformers 5.x leaves uninitialized unless ZeRO-3 builds the "
        "model (--ds.zero_stage 3; the default 2 loads the reward model without ZeRO); normalization then returns "
        "(r - garbage) / garbage (measured up to 1e38). Under ZeRO-3 the buffers hold mean = -c, std = 1 and "
        "normalization adds c back.",
        constant,
        "OpenRLHF runs the reward model in bf16 or fp16 (--ds.param_dtype): expect rewards within about 1e-2 of "
        "steer-reward's float32 reward (measured 9e-3 to 1.2e-2 on the demo model), not 1e-6.",
    ]


def run(args: argparse.Namespace) -> int:
    from steer_reward.folding import FOLDED_METADATA_KEY, export_folded, shaper_weights

    # Staged into a new folder renamed at the end: --out may not be the model or hold an input, and replaces only
    # an earlier export (which has steer_reward_folded.json), never another folder.
    staged = dict(inputs=[None if args.model == "demo" else args.model, args.config], directory=True,
                  replaceable="steer_reward_folded.json", flag="--out")
    check_output(args.out, **staged)
    reward = reward_from_args(args)
    with staged_output(args.out, **staged) as stage:
        folded = export_folded(reward, stage)
        notes = openrlhf_notes(folded.offset)
        # The notes travel with the checkpoint: in config.json next to the offset, and in a README for people.
        config_path = stage / "config.json"
        config = json.loads(config_path.read_text())
        config.setdefault(FOLDED_METADATA_KEY, {})["openrlhf"] = notes
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        weights = ", ".join(f"{k}={v:g}" for k, v in shaper_weights(reward).items() if v)
        (stage / "README.md").write_text(
            f"# Folded steer-reward head\n\nOne-output reward model folded from {reward.schema.name} ({weights}).\n"
            f"The shaped reward is `logits[:, 0] + {folded.offset:.6g}` (float32; `steer_reward.reward_offset` in "
            f"config.json).\n\n## OpenRLHF\n\n" + "".join(f"- {note}\n" for note in notes))
    print(f"wrote {args.out}: one-output head folded from {reward.schema.name} ({weights}); "
          f"reward = logits[:, 0] + {folded.offset:.6g}")
    print("OpenRLHF (also in its README.md):")
    for note in notes:
        print(f"  - {note}")
    return 0
