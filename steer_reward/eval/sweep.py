"""Weight sweeps: a grid over some attributes' weights, the others fixed from a base config, each point evaluated
from stored attributes (no model), and the accuracy / length Pareto front.

Spec: ``"correctness=0:1:0.25,verbosity=-1:0:0.25"`` — per attribute ``start:stop:step`` (inclusive of ``stop``)
or one value; the grid is their Cartesian product.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from steer_reward.config import ShapingConfig
from steer_reward.errors import InputError
from steer_reward.eval.accuracy import Accuracy, Bootstrap, accuracy_of
from steer_reward.eval.scored import ScoredPreferences
from steer_reward.schema import AttributeSchema
from steer_reward.shaping import RewardShaper, RunningStats

__all__ = ["MAX_POINTS", "SweepAxis", "parse_sweep", "check_sweep", "grid", "rewards_under", "evaluate_shaping",
           "SweepPoint", "run_sweep", "pareto_front"]

MAX_POINTS = 100_000
"""Largest grid accepted (each point is a few vector operations over the stored attributes)."""


@dataclass(frozen=True)
class SweepAxis:
    attribute: str
    values: tuple[float, ...]


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--sweep {where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"--sweep {where}: {text!r} is not finite")
    return value


def parse_sweep(spec: str) -> list[SweepAxis]:
    """Axes of a sweep spec; a malformed spec is an ``InputError`` naming the bad part.

    >>> [(a.attribute, a.values) for a in parse_sweep("correctness=0:1:0.5,verbosity=-0.4")]
    [('correctness', (0.0, 0.5, 1.0)), ('verbosity', (-0.4,))]
    """
    axes: list[SweepAxis] = []
    if not spec.strip():
        raise InputError("--sweep is empty; give e.g. correctness=0:1:0.25,verbosity=-1:0:0.25")
    for part in spec.split(","):
        if "=" not in part:
            raise InputError(f"--sweep {part.strip()!r}: expected ATTRIBUTE=START:STOP:STEP or ATTRIBUTE=VALUE")
        name, _, rng = (s.strip() for s in part.partition("="))
        if not name:
            raise InputError(f"--sweep {part.strip()!r}: no attribute name before '='")
        if name in {a.attribute for a in axes}:
            raise InputError(f"--sweep: attribute {name!r} appears twice")
        pieces = rng.split(":")
        if len(pieces) == 1:
            values = (_number(pieces[0], name),)
        elif len(pieces) == 3:
            start, stop, step = (_number(p, name) for p in pieces)
            if step <= 0:
                raise InputError(f"--sweep {name}: step must be positive, got {pieces[2]}")
            if stop < start:
                raise InputError(f"--sweep {name}: stop {pieces[1]} is below start {pieces[0]}")
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > MAX_POINTS:
                raise InputError(f"--sweep {name}: {count} values; at most {MAX_POINTS} grid points in all")
            # Rounded to the step's decimals so 0.1 steps give 0.3, not 0.30000000000000004.
            decimals = max(0, -math.floor(math.log10(step))) + 6
            values = tuple(round(start + i * step, decimals) for i in range(count))
        else:
            raise InputError(f"--sweep {name}={rng!r}: expected START:STOP:STEP (e.g. 0:1:0.25) or one value")
        axes.append(SweepAxis(name, values))
    size = math.prod(len(a.values) for a in axes)
    if size > MAX_POINTS:
        raise InputError(f"--sweep has {size} grid points; at most {MAX_POINTS}: use coarser steps")
    return axes


def check_sweep(axes: Sequence[SweepAxis], schema: AttributeSchema) -> None:
    """Every swept attribute must be a live output of ``schema`` (a ``SchemaError`` names the closest one)."""
    for axis in axes:
        schema.index(axis.attribute)  # unknown: SchemaError with a suggestion
        if schema.index(axis.attribute) not in schema.live:
            raise InputError(f"--sweep {axis.attribute}: not a trained output of schema {schema.name!r}; live "
                             f"attributes: {list(schema.live_names)}")


def grid(axes: Sequence[SweepAxis], base: Mapping[str, float]) -> list[dict[str, float]]:
    """Weights of every grid point: ``base`` (live attribute weights) with the swept ones replaced."""
    names = [a.attribute for a in axes]
    return [{**base, **dict(zip(names, values))} for values in itertools.product(*(a.values for a in axes))]


def rewards_under(scored: ScoredPreferences, shaping: ShapingConfig,
                  weights: Mapping[str, float] | str | None = None) -> torch.Tensor:
    """Rewards of every stored response under ``shaping`` (and ``weights`` in place of its own). Shape: ``(N,)``.

    Running normalization has no training history here: it uses the statistics of the scored data itself.
    The length penalty counts the reward model's completion tokens.
    """
    return _rewards(RewardShaper(scored.schema, shaping), scored, weights)


def _rewards(base: RewardShaper, scored: ScoredPreferences,
             weights: Mapping[str, float] | str | None = None) -> torch.Tensor:
    shaper = base if weights is None else base.with_weights(weights)
    if shaper.has_running_state:
        # Fresh statistics per weight vector: with_weights shares the base's, and the reward statistics depend on
        # the weights.
        shaper.attribute_stats = RunningStats(scored.schema.num_outputs)
        shaper.reward_stats = RunningStats(1)
    return shaper(scored.values, scored.lengths, update_stats=shaper.has_running_state)


def evaluate_shaping(scored: ScoredPreferences, shaping: ShapingConfig,
                     weights: Mapping[str, float] | str | None = None, bootstrap: Bootstrap | None = None) -> Accuracy:
    return accuracy_of(rewards_under(scored, shaping, weights), scored, bootstrap)


@dataclass
class SweepPoint:
    weights: dict[str, float]
    accuracy: Accuracy
    pareto: bool = False


def run_sweep(scored: ScoredPreferences, shaping: ShapingConfig, axes: Sequence[SweepAxis],
              metric: str = "overall") -> list[SweepPoint]:
    """Every grid point evaluated (no intervals; ``pareto`` marks the accuracy/length front on ``metric``)."""
    base = scored.schema.weight_dict(shaping.weights)
    shaper = RewardShaper(scored.schema, shaping)  # built once: a fixed stats_file is read once
    points = [SweepPoint(w, accuracy_of(_rewards(shaper, scored, w), scored)) for w in grid(axes, base)]
    for i in pareto_front([(p.accuracy.preferred_tokens, p.accuracy.metric(metric)) for p in points]):
        points[i].pareto = True
    return points


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (length, accuracy) points no other point beats: none is at most as long and at least as
    accurate with one of the two strictly better. Sorted by length."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
