"""``steer-reward reselect``: pick again from a best-of-n file under other reward configs, with no model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from steer_reward.errors import InputError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reselect", help="re-pick best-of-n candidates under other weights (zero model forwards)",
        description="Reads the attributes stored by 'steer-reward best-of-n' and prints, per config, how often "
                    "its pick agrees with the file's and the picked candidates' attribute means.",
    )
    parser.add_argument("--scored", required=True, help="output JSONL of steer-reward best-of-n")
    parser.add_argument("--config", action="append", required=True, dest="configs", metavar="YAML",
                        help="reward config to compare (repeat for several)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the attribute means per config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from steer_reward.commands.common import check_output, staged_output
    from steer_reward.reselect import compare, format_table, load_scored, plot_selections

    if args.plot:
        check_output(args.plot, inputs=[args.scored, *args.configs], flag="--plot")
    scored = load_scored(args.scored)
    names = [Path(c).stem for c in args.configs]
    if len(set(names)) != len(names):
        names = list(args.configs)
    if len(set(names)) != len(names):
        raise InputError("the same --config is given twice")
    selections = compare(scored, dict(zip(names, args.configs)))
    print(format_table(scored, selections))
    if args.plot:
        with staged_output(args.plot, inputs=[args.scored, *args.configs], flag="--plot") as stage:
            plot_selections(scored, selections, stage)  # the staged name keeps the suffix savefig reads
        print(f"wrote {args.plot}")
    return 0
