"""Calibrating the shaping section from reference data: ArmoRM's verbosity decorrelation and fixed normalization.

From scored responses (any steer-reward scored file: ``eval --scored``, ``score``, ``best-of-n``):

1. for each live attribute k other than verbosity, ArmoRM's λ_k (``steer_reward.decorrelation``): the smallest
   grid value with Spearman(a_k − λ_k·a_v, a_v) ≤ threshold; when none reaches it, λ_k = 1.0 (ArmoRM's own
   fallback), reported as not reached;
2. per-attribute mean and std (population, as ``RunningStats``) of the **decorrelated** attributes: shaping
   decorrelates first and normalizes after (DESIGN.md "Shaping"), so these are the statistics
   ``normalization: fixed`` must divide by for the reference data to come out at mean 0, std 1.

The result is a ``shaping`` section (``decorrelate``, ``normalization: fixed``, ``stats_file``) written as YAML,
on its own or merged into a base config, plus the ``{attribute: {mean, std}}`` file ``load_fixed_stats`` reads.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from steer_reward.decorrelation import DecorrelationFit, fit_decorrelation_report
from steer_reward.errors import InputError
from steer_reward.schema import BUILTIN_SCHEMAS, AttributeSchema, schema_from_id2label

__all__ = ["ReferenceAttributes", "Calibration", "load_reference", "calibrate", "shaping_section",
           "write_calibration", "format_calibration", "plot_calibration"]


@dataclass
class ReferenceAttributes:
    schema: AttributeSchema
    values: torch.Tensor
    """Attributes of every reference response. Shape: ``(n, K)`` float64."""
    source: str
    """What kind of file they came from."""


def _schema_from_names(names: Sequence[str], where: str) -> AttributeSchema:
    for builtin in BUILTIN_SCHEMAS.values():
        if tuple(names) == builtin.names:
            return builtin
    if len(names) != len(set(names)):
        raise InputError(f"{where}: attribute names repeat")
    return schema_from_id2label(dict(enumerate(names)), name="id2label")


def _score_rows(path: Path) -> ReferenceAttributes:
    """``steer-reward score`` output: ``attributes`` per row, or ``chosen_attributes`` / ``rejected_attributes``."""
    from steer_reward.jsonl import read_jsonl

    names: list[str] | None = None
    values = []
    for number, row in read_jsonl(path):
        found = [row[k] for k in ("attributes", "chosen_attributes", "rejected_attributes") if k in row]
        if not found:
            raise InputError(f"{path}:{number}: no 'attributes' (or chosen_/rejected_attributes): not a scored row")
        for attributes in found:
            if not isinstance(attributes, dict) or not attributes:
                raise InputError(f"{path}:{number}: attributes must be a mapping {{name: value}}")
            if names is None:
                names = list(attributes)
            elif list(attributes) != names:
                raise InputError(f"{path}:{number}: attribute names differ from the first row's")
            try:
                values.append([float(attributes[n]) for n in names])
            except (TypeError, ValueError):
                raise InputError(f"{path}:{number}: attribute values must be numbers") from None
    assert names is not None
    return ReferenceAttributes(_schema_from_names(names, str(path)), torch.tensor(values, dtype=torch.float64),
                               "steer-reward score output")


def load_reference(path: str | Path) -> ReferenceAttributes:
    """Attributes of every response in a scored file: ``eval --scored``, ``best-of-n`` or ``score`` output."""
    from steer_reward.jsonl import read_jsonl

    path = Path(path)
    first = next(iter(read_jsonl(path)), None)
    if first is None:
        raise InputError(f"{path}: empty file: no scored responses")
    row = first[1]
    if "format" in row:
        from steer_reward.eval.scored import FORMAT, read_scored_attributes

        if row["format"] != FORMAT:
            raise InputError(f"{path}: unknown scored-file format {row['format']!r} (expected {FORMAT!r})")
        schema, values = read_scored_attributes(path)
        reference = ReferenceAttributes(schema, values, "steer-reward eval scored file")
    elif "candidates" in row:
        from steer_reward.reselect import load_scored

        scored = load_scored(path)
        reference = ReferenceAttributes(scored.schema, scored.values.double(), "steer-reward best-of-n output")
    else:
        reference = _score_rows(path)
    if not torch.isfinite(reference.values).all():
        raise InputError(f"{path}: some attribute values are not finite")
    return reference


@dataclass
class Calibration:
    schema: AttributeSchema
    count: int
    """Reference responses."""
    threshold: float
    fits: list[DecorrelationFit]
    mean: dict[str, float]
    """Per live attribute, of the decorrelated values."""
    std: dict[str, float]

    @property
    def lambdas(self) -> dict[str, float]:
        return {f.attribute: f.lam for f in self.fits}

    @property
    def unreached(self) -> list[DecorrelationFit]:
        return [f for f in self.fits if not f.reached]


def calibrate(reference: ReferenceAttributes, threshold: float = 0.03, grid: Sequence[float] | None = None,
              normalize: bool = True) -> Calibration:
    """λ per attribute (ArmoRM's rule) and the fixed-normalization statistics of the decorrelated attributes."""
    schema, values = reference.schema, reference.values
    if schema.verbosity is None:
        raise InputError(f"schema {schema.name!r} has no verbosity attribute: nothing to decorrelate from")
    if not math.isfinite(threshold) or not -1 <= threshold <= 1:
        raise InputError(f"--threshold must be a correlation in [-1, 1], got {threshold}")
    if values.shape[0] < 3:
        raise InputError(f"{values.shape[0]} reference responses: too few to estimate correlations")
    v = schema.index(schema.verbosity)
    if bool((values[:, v] == values[0, v]).all()):
        raise InputError(f"{schema.verbosity!r} is constant on the reference data: no correlation to remove")
    fits = fit_decorrelation_report(values, schema, threshold, grid)
    lambdas = torch.zeros(schema.num_outputs, dtype=torch.float64)
    for fit in fits:
        lambdas[schema.index(fit.attribute)] = fit.lam
    decorrelated = values - lambdas[None, :] * values[:, v:v + 1]  # the same arithmetic as RewardShaper
    mean, std = {}, {}
    if normalize:
        for k in schema.live:
            column = decorrelated[:, k]
            mu, sigma = float(column.mean()), float(column.var(unbiased=False).sqrt())
            if not sigma > 0:
                raise InputError(f"{schema.names[k]!r} is constant on the reference data: it cannot be normalized "
                                 "(use --no-normalization)")
            mean[schema.names[k]], std[schema.names[k]] = mu, sigma
    return Calibration(schema, int(values.shape[0]), threshold, fits, mean, std)


def shaping_section(calibration: Calibration, stats_file: str | None) -> dict[str, Any]:
    """The calibrated ``shaping`` keys (to merge over a config's shaping section)."""
    section: dict[str, Any] = {"decorrelate": {a: float(lam) for a, lam in calibration.lambdas.items()}}
    if stats_file is not None:
        section.update({"normalization": "fixed", "stats_file": stats_file})
    return section


def write_calibration(calibration: Calibration, out: str | Path, source: str, base: str | Path | None = None,
                      stats_out: str | Path | None = None) -> Path | None:
    """Write the YAML (``base`` config with the calibrated shaping keys, or a shaping section alone) and the
    stats file; returns the stats file's path (None without normalization)."""
    out = Path(out)
    stats_path = None
    if calibration.mean:
        stats_path = Path(stats_out) if stats_out else out.with_name(out.stem + ".stats.json")
        stats = {name: {"mean": calibration.mean[name], "std": calibration.std[name]} for name in calibration.mean}
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    data: dict[str, Any] = {}
    if base is not None:
        base_path = Path(base)
        if not base_path.is_file():
            raise InputError(f"config file {str(base_path)!r} does not exist")
        data = copy.deepcopy(yaml.safe_load(base_path.read_text()) or {})
        if not isinstance(data, dict):
            raise InputError(f"{base_path}: the top level must be a mapping of sections")
    shaping = data.get("shaping") or {}
    if not isinstance(shaping, dict):
        raise InputError(f"{base}: 'shaping' must be a mapping")
    if stats_path is None:
        for key in ("normalization", "stats_file"):
            shaping.pop(key, None)
    shaping.update(shaping_section(calibration, None if stats_path is None else str(stats_path)))
    data["shaping"] = shaping
    unreached = ", ".join(f.attribute for f in calibration.unreached)
    header = [
        f"# steer-reward calibrate: {calibration.count} responses of {source}, schema {calibration.schema.name}.",
        f"# decorrelate: ArmoRM's rule, smallest λ with Spearman(a_k - λ·a_{calibration.schema.verbosity}, "
        f"a_{calibration.schema.verbosity}) <= {calibration.threshold:g}.",
    ]
    if unreached:
        header.append(f"# not reached on the grid (λ = 1.0, ArmoRM's fallback): {unreached}.")
    if stats_path is not None:
        header.append("# normalization: fixed, mean/std of the decorrelated attributes (stats_file is read "
                      "relative to the working directory).")
    if base is not None:
        header.append(f"# Everything else from {base}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False))
    return stats_path


def format_calibration(calibration: Calibration) -> str:
    """Before/after Spearman table with λ, then the normalization statistics."""
    schema = calibration.schema
    width = max(12, *(len(n) for n in schema.live_names)) + 2
    lines = [f"{calibration.count} reference responses, schema {schema.name}; Spearman correlation with "
             f"{schema.verbosity!r}, threshold {calibration.threshold:g} (ArmoRM's rule)", "",
             f"{'attribute':<{width}}{'λ':>7}{'before':>9}{'after':>9}  reached"]
    for fit in calibration.fits:
        lines.append(f"{fit.attribute:<{width}}{fit.lam:>7.3f}{fit.before:>9.3f}{fit.after:>9.3f}  "
                     + ("yes" if fit.reached else "NO (λ = 1.0, ArmoRM's fallback)"))
    if calibration.mean:
        lines += ["", f"{'attribute':<{width}}{'mean':>9}{'std':>9}   (fixed normalization, after decorrelation)"]
        lines += [f"{n:<{width}}{calibration.mean[n]:>9.3f}{calibration.std[n]:>9.3f}" for n in calibration.mean]
    return "\n".join(lines)


def plot_calibration(calibration: Calibration, path: str | Path) -> None:
    """Bars of each attribute's Spearman correlation with verbosity before and after, and the threshold."""
    from steer_reward.errors import require_extra

    matplotlib = require_extra("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f.attribute for f in calibration.fits]
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.6))
    ax.bar([i - 0.2 for i in x], [f.before for f in calibration.fits], 0.4, label="before", color="0.6")
    ax.bar([i + 0.2 for i in x], [f.after for f in calibration.fits], 0.4, label="after (a_k − λ_k·a_v)",
           color="tab:blue")
    for i, f in enumerate(calibration.fits):
        ax.annotate(f"λ={f.lam:g}" + ("" if f.reached else " (!)"), (i, max(f.before, f.after, 0)),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.axhline(calibration.threshold, color="tab:red", linestyle="--", linewidth=0.8,
               label=f"threshold {calibration.threshold:g}")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax.set_ylabel(f"Spearman with {calibration.schema.verbosity}")
    ax.set_title(f"verbosity decorrelation on {calibration.count} responses", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
