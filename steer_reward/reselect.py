"""Steerable re-selection: pick the best candidate again under other reward configs, with no model at all.

A best-of-n file stores every candidate's attributes (all K outputs), its policy token count, the schema name and
the attribute names, which is everything shaping needs. Re-weighting is then arithmetic on a stored ``(N, K)``
matrix: the core of a steerable ablation over many weight vectors.

Running normalization (``shaping.normalization`` / ``reward_normalization: running``) has no training history
here: it normalizes by the statistics of the scored file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from steer_reward.config import SteerRewardConfig, load_config
from steer_reward.errors import InputError
from steer_reward.schema import AttributeSchema, schema_from_stored
from steer_reward.shaping import RewardShaper

__all__ = ["ScoredCandidates", "load_scored", "Selection", "select", "compare", "format_table", "plot_selections"]


@dataclass
class ScoredCandidates:
    """The candidates of a best-of-n file, flattened."""

    schema: AttributeSchema
    values: torch.Tensor
    """Attributes of every candidate. Shape: ``(N, K)``, float64."""
    lengths: torch.Tensor
    """Policy tokens of every candidate. Shape: ``(N,)``."""
    groups: list[range]
    """Candidate rows of each prompt."""
    original: list[int]
    """Index within its group of the candidate the file chose."""


def load_scored(path: str | Path) -> ScoredCandidates:
    """Read a ``steer-reward best-of-n`` output file."""
    from steer_reward.jsonl import read_jsonl

    schema = None
    values, lengths, groups, original = [], [], [], []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        try:
            names, candidates, chosen = row["attribute_names"], row["candidates"], int(row["chosen"])
            if schema is None:
                schema = schema_from_stored(str(row["schema"]), names, where)
            elif list(names) != list(schema.names):
                raise InputError(f"{where}: attribute names differ from the first row's")
            start = len(values)
            for candidate in candidates:
                attributes = candidate["attributes"]
                values.append([float(attributes[n]) for n in schema.names])
                lengths.append(int(candidate["completion_tokens"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{where}: not a best-of-n row with scored candidates ({type(err).__name__}: {err}); "
                             f"write it with steer-reward best-of-n") from None
        if not candidates:
            raise InputError(f"{where}: no candidates")
        groups.append(range(start, len(values)))
        original.append(chosen)
    if schema is None:
        raise InputError(f"{path}: no rows")
    return ScoredCandidates(schema, torch.tensor(values, dtype=torch.float64), torch.tensor(lengths), groups,
                            original)


@dataclass
class Selection:
    """What one reward config picks."""

    name: str
    chosen: list[int]
    """Index within its group of the picked candidate, per prompt."""
    rewards: torch.Tensor
    """Reward of every candidate. Shape: ``(N,)``."""
    chosen_means: dict[str, float]
    """Mean of each live attribute over the picked candidates."""
    chosen_tokens: float
    """Mean policy tokens of the picked candidates."""


def select(scored: ScoredCandidates, config: SteerRewardConfig, name: str = "config") -> Selection:
    """Pick per prompt the candidate with the highest reward under ``config``'s shaping (no model runs)."""
    shaper = RewardShaper(scored.schema, config.shaping)
    rewards = shaper(scored.values, scored.lengths, update_stats=shaper.has_running_state)
    chosen = [int(rewards[g.start:g.stop].argmax()) for g in scored.groups]
    rows = torch.tensor([g.start + c for g, c in zip(scored.groups, chosen)])
    means = {scored.schema.names[k]: float(scored.values[rows, k].mean()) for k in scored.schema.live}
    return Selection(name, chosen, rewards, means, float(scored.lengths[rows].double().mean()))


def compare(scored: ScoredCandidates, configs: Mapping[str, Any]) -> list[Selection]:
    """A ``Selection`` per named config (YAML path, dict or ``SteerRewardConfig``)."""
    return [select(scored, load_config(source), name) for name, source in configs.items()]


def _original(scored: ScoredCandidates) -> Selection:
    rows = torch.tensor([g.start + c for g, c in zip(scored.groups, scored.original)])
    means = {scored.schema.names[k]: float(scored.values[rows, k].mean()) for k in scored.schema.live}
    return Selection("file's choice", list(scored.original), torch.empty(0), means,
                     float(scored.lengths[rows].double().mean()))


def format_table(scored: ScoredCandidates, selections: Sequence[Selection]) -> str:
    """Per config: how many choices agree with the file's, and the picked candidates' attribute means."""
    live = [scored.schema.names[k] for k in scored.schema.live]
    width = max(14, *(len(s.name) for s in selections)) + 2
    cols = [max(9, len(n) + 1) for n in live]
    header = f"{'config':<{width}}{'same pick':>10}" + "".join(f"{n:>{w}}" for n, w in zip(live, cols)) + \
        f"{'tokens':>8}"
    lines = [f"{len(scored.groups)} prompts, {len(scored.values)} candidates, schema {scored.schema.name} "
             "(no model forwards: stored attributes re-weighted)", "", header]
    base = _original(scored)
    for sel in [base, *selections]:
        same = sum(a == b for a, b in zip(sel.chosen, scored.original))
        lines.append(f"{sel.name:<{width}}{f'{same}/{len(scored.groups)}':>10}"
                     + "".join(f"{sel.chosen_means[n]:>{w}.3f}" for n, w in zip(live, cols))
                     + f"{sel.chosen_tokens:>8.1f}")
    if len(selections) > 1:
        lines += ["", "pairwise agreement of the picks:"]
        for i, a in enumerate(selections):
            for b in selections[i + 1:]:
                same = sum(x == y for x, y in zip(a.chosen, b.chosen))
                lines.append(f"  {a.name} vs {b.name}: {same}/{len(scored.groups)}")
    return "\n".join(lines)


def plot_selections(scored: ScoredCandidates, selections: Sequence[Selection], path: str | Path) -> None:
    """Grouped bars: the picked candidates' mean of each live attribute, one bar per config."""
    from steer_reward.errors import require_extra

    matplotlib = require_extra("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = [scored.schema.names[k] for k in scored.schema.live]
    everything = [_original(scored), *selections]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(live)), 4))
    width = 0.8 / len(everything)
    for i, sel in enumerate(everything):
        ax.bar([x + i * width for x in range(len(live))], [sel.chosen_means[n] for n in live], width,
               label=sel.name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(live))], live, rotation=20)
    ax.set_ylabel("mean over picked candidates")
    ax.set_title(f"best-of-n picks per reward config ({len(scored.groups)} prompts)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
