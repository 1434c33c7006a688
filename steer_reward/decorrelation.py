"""Fitting the verbosity decorrelation coefficients of ``shaping.decorrelate`` (ArmoRM's rule).

For each live attribute k other than verbosity v, the smallest λ_k on a grid such that
Spearman(a_k − λ_k·a_v, a_v) ≤ threshold on a reference set of scored responses.
"""

from __future__ import annotations

import torch

from steer_reward.schema import AttributeSchema

__all__ = ["spearman", "fit_decorrelation"]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank). Shape: ``(n,)``."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (0 when either is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return 0.0 if denom == 0 else float((rx * ry).sum() / denom)


def fit_decorrelation(attributes: torch.Tensor, schema: AttributeSchema, threshold: float = 0.03,
                      grid: torch.Tensor | None = None) -> dict[str, float]:
    """``{attribute: λ}`` for ``shaping.decorrelate`` from reference attributes. Shape: ``(n, K)``.

    Attributes whose correlation with verbosity never falls to the threshold on the grid get the grid's last λ.
    """
    if schema.verbosity is None:
        raise ValueError(f"schema {schema.name!r} has no verbosity attribute to decorrelate from")
    grid = torch.linspace(0, 1, 101, dtype=torch.float64) if grid is None else grid.double()
    v = schema.index(schema.verbosity)
    verbosity = attributes[:, v].double()
    lambdas = {}
    for k in schema.live:
        if k == v:
            continue
        a_k = attributes[:, k].double()
        chosen = float(grid[-1])
        for lam in grid.tolist():
            if spearman(a_k - lam * verbosity, verbosity) <= threshold:
                chosen = lam
                break
        lambdas[schema.names[k]] = chosen
    return lambdas
