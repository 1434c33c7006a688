"""Arguments and helpers shared by CLI subcommands: reward arguments, JSONL input, safe output, quiet start-up."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from steer_reward.config import load_config, parse_override
from steer_reward.errors import InputError
from steer_reward.jsonl import read_jsonl
from steer_reward.quiet import quiet_transformers

__all__ = ["add_reward_args", "reward_from_args", "read_jsonl", "quiet_transformers", "quiet_unused_libraries",
           "check_output", "staged_output", "note_truncation"]


def add_reward_args(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    parser.add_argument("--model", required=model_required,
                        help="reward model folder, or 'demo' (tiny random-weight model); overrides model.path")
    parser.add_argument("--config", help="YAML config (e.g. configs/rewards/steerlm-70b.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted name, e.g. shaping.weights.verbosity=-1.0")


class _AcceleratorNote(logging.Filter):
    """DeepSpeed's "Setting accelerator to CPU ..." warning (on stdout), logged when it is imported without a GPU.

    Accelerate imports DeepSpeed whenever it is installed (``save_pretrained`` unwraps models through it, e.g.
    when the demo models are built), so every command would print it though only ``backend: deepspeed`` uses
    DeepSpeed. Only that record is dropped; DeepSpeed's other messages pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


_ACCELERATOR_NOTE = _AcceleratorNote()


def quiet_unused_libraries(quiet: bool = True) -> None:
    """Silence DeepSpeed's accelerator note (``quiet``) or let it through again (a ``backend: deepspeed`` run).

    A filter on the "DeepSpeed" logger, not an import of DeepSpeed: DeepSpeed's logger factory reuses the logger
    object and keeps its filters, so this works before and after DeepSpeed is imported.
    """
    logger = logging.getLogger("DeepSpeed")
    if quiet:
        logger.addFilter(_ACCELERATOR_NOTE)
    else:
        logger.removeFilter(_ACCELERATOR_NOTE)


def reward_from_args(args: argparse.Namespace):
    from steer_reward.demo import DEMO_WARNING
    from steer_reward.reward import SteerReward

    quiet_transformers()
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.model is not None:
        overrides["model.path"] = str(args.model)
    config = load_config(args.config, overrides)
    quiet_unused_libraries(config.backend != "deepspeed")
    reward = SteerReward.from_config(config)
    if reward.config.model.path == "demo":
        print(DEMO_WARNING, file=sys.stderr)
    return reward


def note_truncation(counts: dict[str, int]) -> None:
    """One stderr line per part ("prompt", "completion") that was cut in some samples to fit model.max_length."""
    for part, count in counts.items():
        if count:
            print(f"note: {count} samples had their {part} cut to fit the reward model's max_length; see "
                  f"{part}_truncated_tokens in the output", file=sys.stderr)


# -- output -------------------------------------------------------------------------------------------------------

def _same_or_inside(target: Path, other: Path) -> bool:
    """Whether ``other`` is ``target`` (through symlinks, relative paths or hard links) or lies inside it."""
    try:
        if target.exists() and other.exists() and os.path.samefile(target, other):
            return True
    except OSError:
        pass
    real_target, real_other = Path(os.path.realpath(target)), Path(os.path.realpath(other))
    return real_other == real_target or real_target in real_other.parents


def _stage_name(target: Path, kind: str) -> Path:
    # Hidden, beside the target (same file system, so the final rename is atomic); the suffix is kept for
    # writers that pick a format from it (matplotlib's savefig).
    return target.with_name(f".{target.stem}.{kind}-{secrets.token_hex(4)}{target.suffix}")


def check_output(target: str | Path, *, inputs: Iterable[str | Path | None] = (), directory: bool = False,
                 replaceable: str | None = None, flag: str = "--output") -> None:
    """An ``InputError`` when writing ``target`` would destroy an input or a folder it does not own; commands
    call it before loading a model, ``staged_output`` again before writing."""
    target = Path(target)
    for source in inputs:
        if source is not None and _same_or_inside(target, Path(source)):
            raise InputError(f"{flag} {str(target)!r} is the input {str(source)!r}"
                             f"{' (or holds it)' if directory else ''}; writing it would destroy the input: "
                             f"choose another {flag}")
    if target.exists() and not target.is_file() and not target.is_dir():
        return  # a device or pipe
    real = Path(os.path.realpath(target))
    if directory:
        if real.is_file():
            raise InputError(f"{flag} {str(target)!r} is a file; give a folder")
        if real.is_dir() and any(real.iterdir()) and not (replaceable and (real / replaceable).is_file()):
            raise InputError(f"{flag} {str(target)!r} is a folder with other files in it; give a new or empty "
                             "folder (it is replaced as a whole)")
    elif real.is_dir():
        raise InputError(f"{flag} {str(target)!r} is a folder; give a file name")


@contextmanager
def staged_output(target: str | Path, *, inputs: Iterable[str | Path | None] = (), directory: bool = False,
                  commit_on: tuple[type[BaseException], ...] = (), replaceable: str | None = None,
                  flag: str = "--output") -> Iterator[Path]:
    """A temporary path to write ``target`` to; it becomes ``target`` (one rename) only when the block succeeds.

    So a failed or interrupted run never destroys an existing output, and an output can never be one of the
    ``inputs`` (checked first, through symlinks, relative paths and hard links; an input inside an output folder
    counts too). On an exception of a ``commit_on`` type (a bad input line: what was written before it is
    complete and the command promises it) a non-empty file is still renamed into place. On any other exception
    a non-empty file is kept as ``TARGET.partial`` (said on stderr) and ``target`` is left as it was.

    ``directory``: the path is a folder (created empty). An existing non-empty ``target`` folder is replaced
    only when it holds the file named by ``replaceable`` (an earlier output of the same command); any other
    folder is refused rather than emptied. A target that exists and is neither a file nor a folder (a pipe,
    ``/dev/stdout``) is written directly.
    """
    target = Path(target)
    check_output(target, inputs=inputs, directory=directory, replaceable=replaceable, flag=flag)
    if target.exists() and not target.is_file() and not target.is_dir():
        yield target  # a device or pipe: nothing to replace
        return
    real = Path(os.path.realpath(target))  # write through a symlink to the file it names
    real.parent.mkdir(parents=True, exist_ok=True)
    stage = _stage_name(real, "tmp")
    if directory:
        os.mkdir(stage)  # the umask applies, as for any folder the user makes
    else:
        os.close(os.open(stage, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield stage
    except BaseException as err:
        written = stage.is_file() and stage.stat().st_size > 0
        if directory:
            shutil.rmtree(stage, ignore_errors=True)
        elif isinstance(err, commit_on) and written:
            _commit_file(stage, real)
        elif written:
            partial = real.with_name(real.name + ".partial")
            os.replace(stage, partial)
            print(f"note: {str(target)!r} was left as it was; what was written before the failure is in "
                  f"{str(partial)!r}", file=sys.stderr)
        else:
            stage.unlink(missing_ok=True)
        raise
    if directory:
        _commit_folder(stage, real)
    else:
        _commit_file(stage, real)


def _commit_file(stage: Path, real: Path) -> None:
    if real.is_file():  # keep the old file's permissions (a new one got the umask's)
        os.chmod(stage, real.stat().st_mode & 0o7777)
    os.replace(stage, real)


def _commit_folder(stage: Path, real: Path) -> None:
    if not real.exists():
        os.replace(stage, real)
        return
    old = _stage_name(real, "old")
    os.replace(real, old)
    os.replace(stage, real)
    shutil.rmtree(old, ignore_errors=True)
