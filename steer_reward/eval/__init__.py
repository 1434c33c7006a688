"""Pairwise evaluation of reward configs from attributes scored once: accuracy per subset, per RewardBench section
and overall with bootstrap intervals, weight sweeps and their accuracy/length Pareto front.

Layers: ``pairs`` (preference rows) → ``scored`` (one scoring pass and its cache file) → ``accuracy`` →
``sweep`` → ``report`` (table, JSON, plot). Only ``scored.score_preferences`` runs a model.
"""

from steer_reward.eval.accuracy import EXAMPLE_COUNTS, SUBSET_MAPPING, Accuracy, Bootstrap, accuracy_of
from steer_reward.eval.pairs import PreferenceData, PreferenceRow, load_preferences
from steer_reward.eval.report import EvalReport, build_report, format_report, plot_report, report_json
from steer_reward.eval.scored import ScoredPreferences, read_scored, score_preferences, write_scored
from steer_reward.eval.sweep import SweepAxis, parse_sweep, pareto_front, rewards_under, run_sweep

__all__ = [
    "EXAMPLE_COUNTS", "SUBSET_MAPPING", "Accuracy", "Bootstrap", "accuracy_of",
    "PreferenceData", "PreferenceRow", "load_preferences",
    "EvalReport", "build_report", "format_report", "plot_report", "report_json",
    "ScoredPreferences", "read_scored", "score_preferences", "write_scored",
    "SweepAxis", "parse_sweep", "pareto_front", "rewards_under", "run_sweep",
]  # fmt: skip
