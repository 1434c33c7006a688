"""``steer-reward`` command line: one subcommand per module under ``steer_reward.commands``.

Known user errors (bad config, missing model folder, bad input line, missing extra) print one clear line and
exit 2; nothing prints a traceback for a mistake in what the user gave.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

# Module names under steer_reward.commands; each defines register(subparsers).
COMMANDS = ["score", "demo", "serve", "openrlhf_func", "best_of_n", "reselect", "export_folded", "bench", "eval",
            "calibrate", "convert_nemo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steer-reward",
        description="Multi-attribute reward models as the reward of an RLHF loop.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"steer_reward.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from steer_reward.commands.common import quiet_unused_libraries
    from steer_reward.errors import USER_ERRORS

    quiet_unused_libraries()  # a deepspeed-backend run lets DeepSpeed speak again (reward_from_args)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"steer-reward {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `steer-reward demo | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
