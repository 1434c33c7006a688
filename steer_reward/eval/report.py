"""An evaluation report: named reward configs and sweep points over one scored data set, as a terminal table,
a JSON object and a plot of accuracy against the length of the preferred responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from steer_reward.config import SteerRewardConfig
from steer_reward.eval.accuracy import SUBSET_MAPPING, Accuracy, Bootstrap, accuracy_of
from steer_reward.eval.scored import ScoredPreferences
from steer_reward.eval.sweep import SweepAxis, SweepPoint, run_sweep, rewards_under

__all__ = ["Evaluated", "EvalReport", "build_report", "format_report", "report_json", "plot_report"]


@dataclass
class Evaluated:
    """One named reward (a config, a preset or a sweep point) and its accuracies."""

    name: str
    weights: dict[str, float]
    """Weights over the live attributes."""
    accuracy: Accuracy


@dataclass
class EvalReport:
    data: str
    scored: ScoredPreferences
    metric: str
    """``overall`` or ``score``: what the sweep ranks by and the plot's y axis."""
    draws: int
    seed: int
    configs: list[Evaluated]
    presets: list[Evaluated]
    """The schema's weight presets under the base config's other shaping (marked on the plot)."""
    axes: list[SweepAxis] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    best: list[Evaluated] = field(default_factory=list)
    """The sweep's top points by ``metric``, with intervals."""
    chosen_tokens: float = 0.0
    """Mean token length of the chosen responses (what the labels prefer)."""


def build_report(data: str, scored: ScoredPreferences, configs: Sequence[tuple[str, SteerRewardConfig]],
                 axes: Sequence[SweepAxis] = (), metric: str = "auto", draws: int = 1000, seed: int = 0,
                 top: int = 10) -> EvalReport:
    """Evaluate every config, every schema preset and every sweep point from the stored attributes (no model).

    The first config is the sweep's base; ``metric`` ``auto`` ranks by the RewardBench score when any subset is a
    RewardBench subset, else by overall accuracy.
    """
    schema = scored.schema
    if metric == "auto":
        metric = "score" if any(s in _rewardbench_subsets() for s in scored.subset_names) else "overall"
    bootstrap = Bootstrap(scored.subsets, draws, seed)
    evaluated = [Evaluated(name, schema.weight_dict(config.shaping.weights),
                           accuracy_of(rewards_under(scored, config.shaping), scored, bootstrap))
                 for name, config in configs]
    base = configs[0][1].shaping
    presets = [Evaluated(name, schema.weight_dict(name),
                         accuracy_of(rewards_under(scored, base, name), scored, bootstrap)) for name in schema.presets]
    report = EvalReport(data, scored, metric, draws, seed, evaluated, presets,
                        chosen_tokens=float(scored.lengths[scored.chosen_index].double().mean()))
    if axes:
        report.axes = list(axes)
        report.sweep = run_sweep(scored, base, axes, metric)
        ranked = sorted(range(len(report.sweep)), key=lambda i: (-report.sweep[i].accuracy.metric(metric),
                                                                  report.sweep[i].accuracy.preferred_tokens))[:top]
        for i in ranked:  # intervals for the best points only: one shaping pass each
            point = report.sweep[i]
            accuracy = accuracy_of(rewards_under(scored, base, point.weights), scored, bootstrap)
            report.best.append(Evaluated(_point_name(point, axes), point.weights, accuracy))
    return report


def _rewardbench_subsets() -> set[str]:
    return {s for subsets in SUBSET_MAPPING.values() for s in subsets}


def _point_name(point: SweepPoint, axes: Sequence[SweepAxis]) -> str:
    return ",".join(f"{a.attribute}={point.weights[a.attribute]:g}" for a in axes)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _with_ci(acc: Accuracy, key: str, value: float | None) -> str:
    if value is None:
        return "-"
    lo_hi = acc.intervals.get(key)
    return _pct(value) if lo_hi is None else f"{_pct(value)} [{_pct(lo_hi[0])}, {_pct(lo_hi[1])}]"


def _summary_table(rows: Sequence[Evaluated], sections: Sequence[str], first: str) -> list[str]:
    width = max(len(first), *(len(r.name) for r in rows)) + 2
    with_score = len(sections) > 1  # with one section the score is that section
    columns = ["overall", *sections] + (["score"] if with_score else []) + ["pref. tokens"]
    cells = []
    for r in rows:
        a = r.accuracy
        line = [_with_ci(a, "overall", a.overall)]
        line += [_with_ci(a, f"section:{s}", a.sections.get(s)) for s in sections]
        if with_score:
            line.append(_with_ci(a, "score", a.score))
        line.append(f"{a.preferred_tokens:.1f}")
        cells.append(line)
    widths = [max(len(c), *(len(line[i]) for line in cells)) + 2 for i, c in enumerate(columns)]
    out = [f"{first:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    out += [f"{r.name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(line, widths)) for r, line in zip(rows, cells)]
    return out


def format_report(report: EvalReport, model_note: str = "") -> str:
    """The terminal table: data summary, configs (or presets), per-subset accuracies, then the sweep's best."""
    scored = report.scored
    sections = [s for s in SUBSET_MAPPING if any(s in e.accuracy.sections for e in report.configs + report.presets)]
    rejected = scored.values.shape[0] - scored.num_rows
    truncated = int(scored.truncated.sum())
    lines = [f"{scored.num_rows} preference rows from {report.data} ({len(scored.subset_names)} subsets, "
             f"{rejected} rejected responses), schema {scored.schema.name}{model_note}",
             "accuracy (%): chosen reward strictly above every rejected one, ties wrong; "
             f"[95% bootstrap interval, {report.draws} draws, seed {report.seed}]"
             if report.draws > 0 else "accuracy (%): chosen reward strictly above every rejected one, ties wrong"]
    if sections:
        lines.append("sections: subsets weighted by RewardBench's EXAMPLE_COUNTS; score = mean of the sections present "
                     f"({len(sections)} of 4" + (")" if len(sections) == 4 else ": not a full RewardBench score)"))
    if truncated:
        lines.append(f"warning: {truncated} responses were cut to model.max_length before scoring")
    lines.append(f"pref. tokens: mean reward-model tokens of the preferred responses (chosen: "
                 f"{report.chosen_tokens:.1f})")
    shown = report.configs if report.configs else report.presets
    lines += ["", *_summary_table(shown, sections, "config" if report.configs else "preset")]
    if len(scored.subset_names) > 1 or not sections:
        width = max(8, *(len(s) for s in scored.subset_names)) + 2
        names = [e.name for e in shown]
        cols = [max(len(n), 5) + 2 for n in names]
        lines += ["", f"{'subset':<{width}}{'rows':>6}" + "".join(f"{n:>{w}}" for n, w in zip(names, cols))]
        for subset in scored.subset_names:
            lines.append(f"{subset:<{width}}{shown[0].accuracy.counts[subset]:>6}"
                         + "".join(f"{_pct(e.accuracy.subsets[subset]):>{w}}" for e, w in zip(shown, cols)))
    if report.configs and report.presets:
        lines += ["", "presets under the first config's other shaping:",
                  *_summary_table(report.presets, sections, "preset")]
    if report.sweep:
        fixed = {k: v for k, v in report.sweep[0].weights.items() if k not in {a.attribute for a in report.axes}}
        on_front = sum(p.pareto for p in report.sweep)
        lines += ["", f"sweep: {len(report.sweep)} weight vectors ({', '.join(a.attribute for a in report.axes)}; "
                      f"fixed {', '.join(f'{k}={v:g}' for k, v in fixed.items()) or 'none'}), "
                      f"{on_front} on the accuracy/length Pareto front; best {len(report.best)} by {report.metric}:",
                  *_summary_table(report.best, sections, "weights")]
    return "\n".join(lines)


def _accuracy_json(acc: Accuracy) -> dict[str, Any]:
    return {"overall": acc.overall, "subsets": acc.subsets, "rows": acc.counts, "sections": acc.sections,
            "score": acc.score, "preferred_tokens": acc.preferred_tokens,
            "intervals": {k: list(v) for k, v in acc.intervals.items()}}


def report_json(report: EvalReport) -> dict[str, Any]:
    """Everything in the report as plain JSON types (fractions, not percentages)."""
    scored = report.scored
    out: dict[str, Any] = {
        "data": report.data, "rows": scored.num_rows, "responses": int(scored.values.shape[0]),
        "schema": scored.schema.name, "subsets": scored.subset_names, "metric": report.metric,
        "bootstrap": {"draws": report.draws, "seed": report.seed, "level": 0.95},
        "chosen_tokens": report.chosen_tokens, "truncated_responses": int(scored.truncated.sum()),
        "configs": [{"name": e.name, "weights": e.weights, **_accuracy_json(e.accuracy)} for e in report.configs],
        "presets": [{"name": e.name, "weights": e.weights, **_accuracy_json(e.accuracy)} for e in report.presets],
    }
    if report.sweep:
        out["sweep"] = {
            "axes": {a.attribute: list(a.values) for a in report.axes},
            "points": [{"weights": p.weights, "overall": p.accuracy.overall, "score": p.accuracy.score,
                        "preferred_tokens": p.accuracy.preferred_tokens, "pareto": p.pareto} for p in report.sweep],
            "best": [{"name": e.name, "weights": e.weights, **_accuracy_json(e.accuracy)} for e in report.best],
        }
    return out


def plot_report(report: EvalReport, path: str | Path, title_note: str = "") -> None:
    """Accuracy (``report.metric``) against mean preferred-response tokens: sweep points, their Pareto front, the
    presets and configs marked, the chosen responses' mean length as a dashed line (matplotlib, Agg)."""
    from steer_reward.errors import require_extra

    matplotlib = require_extra("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(acc: Accuracy) -> float:
        return 100 * acc.metric(report.metric)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if report.sweep:
        ax.scatter([p.accuracy.preferred_tokens for p in report.sweep], [y(p.accuracy) for p in report.sweep],
                   s=14, color="0.7", label=f"sweep ({len(report.sweep)} weight vectors)", zorder=1)
        front = sorted((p for p in report.sweep if p.pareto), key=lambda p: p.accuracy.preferred_tokens)
        ax.plot([p.accuracy.preferred_tokens for p in front], [y(p.accuracy) for p in front], "-o", color="tab:red",
                markersize=4, label="Pareto front (shorter and more accurate)", zorder=2)
    config_names = {e.name for e in report.configs}
    presets = [e for e in report.presets if e.name not in config_names]  # a config named like a preset is shown once
    for i, (group, marker, color, label) in enumerate(((presets, "s", "tab:blue", "weight presets"),
                                                        (report.configs, "D", "tab:green", "configs"))):
        if not group:
            continue
        ax.scatter([e.accuracy.preferred_tokens for e in group], [y(e.accuracy) for e in group], marker=marker, s=50,
                   color=color, zorder=3, edgecolors="black", linewidths=0.5, label=label)
        for j, e in enumerate(group):
            ax.annotate(e.name, (e.accuracy.preferred_tokens, y(e.accuracy)), textcoords="offset points",
                        xytext=(5, 4 + 9 * ((i + j) % 2)), fontsize=7)
    ax.axvline(report.chosen_tokens, color="0.4", linestyle="--", linewidth=0.8, label="chosen responses' mean")
    ax.set_xlabel("mean reward-model tokens of the preferred response")
    ax.set_ylabel(("RewardBench-style score" if report.metric == "score" else "accuracy") + " (%)")
    ax.set_title(f"{report.scored.num_rows} rows of {Path(report.data).name}{title_note}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
