"""Fitting the verbosity decorrelation coefficients of ``shaping.decorrelate`` (ArmoRM's rule), and Spearman
rank correlation.

For each live attribute k other than verbosity v, the smallest λ_k on a grid such that
Spearman(a_k − λ_k·a_v, a_v) ≤ threshold on a reference set of scored responses. This is
``find_proper_verbosity_penalties`` of ArmoRM's stage-2 training (RLHFlow/RLHF-Reward-Modeling,
``armo-rm/stage-2_train.py``): the same 24-value grid, ``<=`` against the threshold (0.03 by default there), and
for an attribute that no grid value brings down to the threshold the λ it was initialised with, **1.0**
(``np.ones(K)``), which lies past the grid's last value 0.95. ``fit_decorrelation_report`` says per attribute
whether the threshold was reached and what correlation remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from steer_reward.schema import AttributeSchema

__all__ = [
    "ARMORM_GRID",
    "UNREACHED_LAMBDA",
    "DecorrelationFit",
    "spearman",
    "spearman_columns",
    "fit_decorrelation",
    "fit_decorrelation_report",
]

ARMORM_GRID: tuple[float, ...] = (
    0.0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
    0.75, 0.8, 0.85, 0.9, 0.95,
)  # fmt: skip
"""ArmoRM's verbosity penalties, in the order it tries them (``verbosity_penalties`` in stage-2_train.py)."""

UNREACHED_LAMBDA = 1.0
"""λ of an attribute whose correlation never falls to the threshold on the grid: ArmoRM's initial value."""


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks, 0-based; tied values share the mean of their ranks (as ``scipy.stats.rankdata``).
    Shape: ``(n,)`` → ``(n,)`` float64."""
    x = x.double()
    sorted_x, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0)
    mean_rank = (ends - counts + ends - 1).double() / 2  # mean of positions start .. end-1 of each tie run
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[inverse]
    return ranks


def _pearson_of_ranks(rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of rank columns ``rx`` ``(n, K)`` with ranks ``ry`` ``(n,)``; 0 where a side is constant.
    Shape: ``(K,)``."""
    rx = rx - rx.mean(0)
    ry = ry - ry.mean()
    denominator = (rx.square().sum(0) * ry.square().sum()).sqrt()
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, (rx * ry[:, None]).sum(0) / safe, torch.zeros_like(denominator))


def spearman(x: torch.Tensor | Sequence[float], y: torch.Tensor | Sequence[float]) -> float:
    """Spearman rank correlation of two 1-D series (average ranks for ties, as scipy). 0 when either is constant,
    nan when either holds a non-finite value or there are fewer than 2 values.

    >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0]))
    0.5
    """
    return float(spearman_columns(torch.as_tensor(x)[:, None], torch.as_tensor(y))[0])


def spearman_columns(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of every column of ``x`` ``(n, K)`` with ``y`` ``(n,)``. Shape: ``(K,)`` float64.

    A constant column (or a constant ``y``) gives 0; a column with a non-finite value, or n < 2, gives nan.
    """
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x of shape (n, K) and y of shape (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    out = torch.full((x.shape[1],), math.nan, dtype=torch.float64)
    if x.shape[0] < 2 or not torch.isfinite(y).all():
        return out
    finite = torch.isfinite(x).all(0)
    if finite.any():
        columns = torch.nonzero(finite).flatten()
        rx = torch.stack([_ranks(x[:, k]) for k in columns.tolist()], 1)
        out[columns] = _pearson_of_ranks(rx, _ranks(y))
    return out


@dataclass(frozen=True)
class DecorrelationFit:
    """What the rule found for one attribute."""

    attribute: str
    lam: float
    """λ_k for ``shaping.decorrelate``."""
    reached: bool
    """Whether a grid value brought the correlation to the threshold (False: ``UNREACHED_LAMBDA``)."""
    before: float
    """Spearman(a_k, a_v)."""
    after: float
    """Spearman(a_k − λ_k·a_v, a_v) on the same data."""


def fit_decorrelation_report(attributes: torch.Tensor, schema: AttributeSchema, threshold: float = 0.03,
                             grid: Sequence[float] | torch.Tensor | None = None,
                             unreached: float = UNREACHED_LAMBDA) -> list[DecorrelationFit]:
    """ArmoRM's rule on reference attributes ``(n, K)``: one ``DecorrelationFit`` per live attribute other than
    verbosity, in schema order. ``grid`` defaults to ``ARMORM_GRID`` and is tried in ascending order."""
    if schema.verbosity is None:
        raise ValueError(f"schema {schema.name!r} has no verbosity attribute to decorrelate from")
    grid_values = sorted(float(g) for g in (ARMORM_GRID if grid is None else torch.as_tensor(grid).tolist()))
    if not grid_values:
        raise ValueError("the λ grid is empty")
    v = schema.index(schema.verbosity)
    values = torch.as_tensor(attributes).double()
    verbosity = values[:, v]
    ks = [k for k in schema.live if k != v]
    if not ks:
        return []
    a = values[:, ks]
    # Correlation at every grid value for every attribute: (len(grid), len(ks)).
    table = torch.stack([spearman_columns(a - lam * verbosity[:, None], verbosity) for lam in grid_values])
    before = spearman_columns(a, verbosity)
    fits = []
    for j, k in enumerate(ks):
        below = torch.nonzero(table[:, j] <= threshold).flatten()
        if len(below):
            lam, after = grid_values[int(below[0])], float(table[int(below[0]), j])
            reached = True
        else:
            lam, reached = float(unreached), False
            after = spearman(a[:, j] - lam * verbosity, verbosity)
        fits.append(DecorrelationFit(schema.names[k], lam, reached, float(before[j]), after))
    return fits


def fit_decorrelation(attributes: torch.Tensor, schema: AttributeSchema, threshold: float = 0.03,
                      grid: Sequence[float] | torch.Tensor | None = None,
                      unreached: float = UNREACHED_LAMBDA) -> dict[str, float]:
    """``{attribute: λ}`` for ``shaping.decorrelate`` from reference attributes. Shape: ``(n, K)``.

    ArmoRM's rule (see the module docstring); an attribute whose correlation with verbosity never falls to the
    threshold on the grid gets ``unreached`` (ArmoRM: 1.0). ``fit_decorrelation_report`` says which those are.
    """
    return {fit.attribute: fit.lam for fit in fit_decorrelation_report(attributes, schema, threshold, grid, unreached)}
