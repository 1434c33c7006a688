"""``steer-reward calibrate``: fit the verbosity decorrelation (ArmoRM's rule) and fixed normalization statistics on
scored reference data, and write them as a shaping section (no model is loaded)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from steer_reward.errors import InputError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit shaping.decorrelate (ArmoRM's rule) and fixed normalization on scored data",
        description="Reads the attributes of a scored file (steer-reward eval --scored, score or best-of-n output; "
                    "no model runs), fits per attribute the smallest λ on ArmoRM's grid with Spearman(a_k − "
                    "λ·a_verbosity, a_verbosity) <= threshold, and the mean/std of the decorrelated attributes. "
                    "Writes --out (YAML: the shaping section, or --config's file with it merged in) and a stats file "
                    "beside it.",
    )
    parser.add_argument("--scored", required=True, help="scored JSONL (reference data)")
    parser.add_argument("--out", required=True, metavar="SHAPING.yaml", help="YAML to write")
    parser.add_argument("--threshold", type=float, default=0.03, help="Spearman threshold (ArmoRM: 0.03)")
    parser.add_argument("--config", metavar="BASE.yaml",
                        help="merge the calibrated keys into this config's shaping section (weights etc. kept), "
                             "so --out is a complete config")
    parser.add_argument("--stats-out", metavar="FILE.json", help="stats file (default: next to --out)")
    parser.add_argument("--no-normalization", action="store_true",
                        help="fit the decorrelation only (no stats file, normalization left as it was)")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 2) when some attribute cannot reach the threshold on the grid")
    parser.add_argument("--plot", metavar="FILE.png", help="before/after correlation bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steer_reward.calibration import (calibrate, format_calibration, load_reference, plot_calibration,
                                          write_calibration)
    from steer_reward.commands.common import check_output, staged_output
    from steer_reward.config import load_config
    from steer_reward.shaping import RewardShaper

    # No output may be an input (--scored, --config); the YAML and the plot are renamed into place when complete.
    inputs = [args.scored, args.config]
    stats_out = args.stats_out or (None if args.no_normalization else
                                   str(Path(args.out).with_name(Path(args.out).stem + ".stats.json")))
    for flag, target in (("--out", args.out), ("--stats-out", stats_out), ("--plot", args.plot)):
        if target:
            check_output(target, inputs=inputs, flag=flag)
    reference = load_reference(args.scored)
    calibration = calibrate(reference, args.threshold, normalize=not args.no_normalization)
    print(format_calibration(calibration))
    if calibration.unreached:
        names = ", ".join(f"{f.attribute} (ρ {f.after:.3f} at λ 1.0)" for f in calibration.unreached)
        if args.strict:
            raise InputError(f"no λ on ArmoRM's grid brings these under {args.threshold:g}: {names}")
        print(f"warning: not reached on the grid, λ = 1.0 (ArmoRM's fallback): {names}", file=sys.stderr)
    with staged_output(args.out, inputs=inputs, flag="--out") as stage:
        stats = write_calibration(calibration, stage, f"{args.scored} ({reference.source})", args.config,
                                  stats_out)
        # The written files must load as a config and shape the reference data as fitted: build the shaper from
        # them (before --out is in place).
        config = load_config(stage)
        RewardShaper(calibration.schema, config.shaping)
    print(f"\nwrote {args.out}" + (f" and {stats}" if stats else "")
          + f"; use it as --config {args.out}" + ("" if args.config else
             " (other settings at their defaults), or pass --config BASE.yaml to merge it into your config"))
    if args.plot:
        with staged_output(args.plot, inputs=inputs, flag="--plot") as stage:
            plot_calibration(calibration, stage)
        print(f"wrote {args.plot}")
    return 0
