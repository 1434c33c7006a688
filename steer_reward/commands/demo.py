"""``steer-reward demo``: score the bundled LLMBar sample and show what each weight preset would choose."""

from __future__ import annotations

import argparse
from typing import Any

from steer_reward.commands.common import add_reward_args, reward_from_args

__all__ = ["register", "run_demo"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="score the bundled LLMBar sample and print a table (default model: the random demo RM)")
    add_reward_args(parser)
    parser.set_defaults(func=run, model="demo")


def run_demo(reward: Any) -> str:
    """The demo table as text: per-attribute means and, per preset, how often the chosen response wins."""
    import torch

    from steer_reward.demo import sample_rows

    rows = sample_rows()
    prompts = [r["prompt"] for r in rows]
    scored = reward.score(prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    n, schema = len(rows), reward.schema
    values = scored.attributes.values
    lines = [f"{len(rows)} LLMBar preference pairs (bundled sample), schema {schema.name}", "",
             f"{'attribute':<16}{'chosen mean':>12}{'rejected mean':>15}"]
    for k in schema.live:
        lines.append(f"{schema.names[k]:<16}{values[:n, k].mean():>12.3f}{values[n:, k].mean():>15.3f}")
    lines += ["", f"{'weights':<22}{'chosen wins':>12}{'mean margin':>13}   (no re-scoring: same attributes)"]
    candidates = [(name, reward.with_weights(name)) for name in schema.presets]
    candidates.append(("config", reward))
    for name, variant in candidates:
        rewards = variant.rewards(scored.attributes)
        margin = rewards[:n] - rewards[n:]
        wins = int((margin > 0).sum())
        lines.append(f"{name:<22}{f'{wins}/{n}':>12}{float(margin.mean()):>13.3f}")
    subsets = sorted({r["subset"] for r in rows})
    lines += ["", "chosen-wins by subset under the config's weights:"]
    margin = scored.rewards[:n] - scored.rewards[n:]
    for subset in subsets:
        mask = torch.tensor([r["subset"] == subset for r in rows])
        lines.append(f"  {subset:<26}{int((margin[mask] > 0).sum())}/{int(mask.sum())}")
    cut = {part: int((getattr(scored.attributes, f"{part}_truncated") > 0).sum()) for part in ("prompt", "completion")}
    if any(cut.values()):
        lines += ["", f"cut to fit model.max_length: {cut['prompt']} prompts, {cut['completion']} completions "
                      "(their scores read only the part that fit)"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    reward = reward_from_args(args)
    print(run_demo(reward))
    return 0
