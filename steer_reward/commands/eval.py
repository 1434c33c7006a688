"""``steer-reward eval``: pairwise accuracy of reward configs and weight sweeps on preference data, scoring the data
once (cached in ``--scored``) and evaluating every weight vector from the stored attributes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from steer_reward.config import load_config, parse_override
from steer_reward.errors import InputError

__all__ = ["register", "load_configs"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="pairwise accuracy of reward configs and weight sweeps (data scored once)",
        description="Rows: {prompt, chosen, rejected, subset?, id?} (RewardBench), rejected may be a list (correct "
                    "only if chosen beats all, as RewardBench 2); responses may be message lists. The data is "
                    "scored once (cached in --scored and reused without a model next time); every --config, preset "
                    "and --sweep point is evaluated from the stored attributes.",
    )
    parser.add_argument("--data", required=True, help="preference JSONL")
    parser.add_argument("--config", action="append", default=[], dest="configs", metavar="YAML",
                        help="reward config to evaluate (repeat to compare; the first is the sweep's base and the "
                             "one the data is scored with). Default: the schema's weight presets")
    parser.add_argument("--model", help="reward model folder, or 'demo' (random weights); overrides model.path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every config, e.g. model.dtype=bfloat16")
    parser.add_argument("--scored", metavar="S.jsonl",
                        help="cache of the scored attributes: written on the first run, read (no model) after")
    parser.add_argument("--sweep", metavar="SPEC",
                        help="grid over weights, e.g. 'correctness=0:1:0.25,verbosity=-1:0:0.25' (start:stop:step, "
                             "inclusive, or one value); other weights from the first config")
    parser.add_argument("--metric", choices=["auto", "overall", "score"], default="auto",
                        help="what the sweep ranks by: overall accuracy, or the RewardBench-style score (auto: the "
                             "score when any subset is a RewardBench subset)")
    parser.add_argument("--top", type=int, default=10, help="sweep points shown (with intervals)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS", help="bootstrap draws (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="accuracy against preferred-response length")
    parser.add_argument("--chunk-size", type=int, default=64, help="rows scored together")
    parser.set_defaults(func=run)


def load_configs(paths: list[str], model: str | None, overrides: list[str]) -> list[tuple[str, Any]]:
    """(name, config) per ``--config`` (the file's stem, or its path when stems collide); one default config when
    none is given. ``--model`` and ``--set`` apply to every config."""
    values = dict(parse_override(o) for o in overrides)
    if model is not None:
        values["model.path"] = model
    if not paths:
        return [("default", load_config(None, values))]
    if len(set(paths)) != len(paths):
        raise InputError("the same --config is given twice")
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        names = list(paths)
    return [(name, load_config(path, values)) for name, path in zip(names, paths)]


def _scored_data(args: argparse.Namespace, data: Any, configs: list, axes: list) -> Any:
    """The scored preferences: read from ``--scored`` when it exists (no model), else scored now."""
    from steer_reward.eval.scored import check_same_scoring, is_demo_model, read_scored, score_preferences, write_scored

    check_same_scoring(configs)
    scoring = configs[0][1]
    if args.scored and Path(args.scored).is_file():
        scored = read_scored(args.scored, data, scoring)
        _check(scored.schema, configs, axes)
        return scored
    if scoring.model.path is None:
        raise InputError("no model to score the data with: pass --model PATH|demo (or model.path in the first "
                         "--config), or --scored with a file from an earlier run")
    from steer_reward.quiet import quiet_transformers
    from steer_reward.demo import DEMO_WARNING
    from steer_reward.reward import SteerReward

    quiet_transformers()
    reward = SteerReward.from_config(scoring)
    if is_demo_model(scoring.model.path):
        print(DEMO_WARNING, file=sys.stderr)
    _check(reward.schema, configs, axes)  # before the forwards: a typo should not cost a scoring pass
    scored = score_preferences(reward, data, args.chunk_size, progress=not args.json)
    if args.scored:
        write_scored(args.scored, scored, data)
        print(f"wrote the scored attributes to {args.scored}; later runs read them without a model",
              file=sys.stderr)
    return scored


def _check(schema: Any, configs: list, axes: list) -> None:
    """Weights of every config and every swept attribute must fit the schema (errors name the key)."""
    from steer_reward.eval.sweep import check_sweep
    from steer_reward.shaping import RewardShaper

    for _, config in configs:
        RewardShaper(schema, config.shaping)
    check_sweep(axes, schema)


def run(args: argparse.Namespace) -> int:
    from steer_reward.eval.pairs import load_preferences
    from steer_reward.eval.report import build_report, format_report, plot_report, report_json
    from steer_reward.eval.scored import is_demo_model
    from steer_reward.eval.sweep import parse_sweep

    for flag, value, low in (("--top", args.top, 1), ("--bootstrap", args.bootstrap, 0),
                             ("--chunk-size", args.chunk_size, 1)):
        if value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    from steer_reward.commands.common import check_output, staged_output

    inputs = [args.data, *args.configs]  # no output may be one of them
    for flag, target in (("--scored", args.scored), ("--plot", args.plot)):
        if target:
            check_output(target, inputs=inputs, flag=flag)
    axes = parse_sweep(args.sweep) if args.sweep is not None else []
    data = load_preferences(args.data)
    configs = load_configs(args.configs, args.model, args.overrides)
    scored = _scored_data(args, data, configs, axes)
    report = build_report(args.data, scored, configs if args.configs else configs[:1], axes, args.metric,
                          args.bootstrap, args.seed, args.top)
    if not args.configs:
        report.configs = []  # only the presets: the default config is the schema's first preset
    demo = is_demo_model(scored.settings.get("path"))
    note = ", model demo (RANDOM weights: the numbers show the plumbing, not quality)" if demo else ""
    if args.json:
        print(json.dumps(report_json(report), indent=1))
    else:
        print(format_report(report, note))
    if args.plot:
        with staged_output(args.plot, inputs=[*inputs, args.scored], flag="--plot") as stage:
            plot_report(report, stage, " — demo model, RANDOM weights" if demo else "")
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
