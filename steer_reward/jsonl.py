"""Reading JSONL input files: one JSON object per line, every problem an ``InputError`` naming its line."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

from steer_reward.errors import InputError

__all__ = ["read_jsonl"]


def _check_row_text(value: object, where: str) -> None:
    """Strings must be valid Unicode: JSON's ``"\\ud800"`` escape decodes to a lone surrogate no tokenizer or
    output file can encode."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{where}: a string holds a lone surrogate escape ({err.object[err.start]!r}), which is "
                         "not valid Unicode; pair it or remove it") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a bad line is an ``InputError`` naming its number.

    The file is checked when this is called, not on the first row, so a missing input fails before any output
    is opened. A UTF-8 byte-order mark at the start is skipped (Windows editors write one).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {str(path)!r} does not exist" if not path.exists()
                         else f"input {str(path)!r} is not a file")
    return _rows(path)


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{number}: not valid UTF-8 (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise InputError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            if "\\u" in line:  # only escapes can make a lone surrogate
                _check_row_text(row, f"{path}:{number}")
            yield number, row
