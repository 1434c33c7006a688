"""Preference rows for pairwise evaluation, in RewardBench's forms.

RewardBench 1: ``{"prompt", "chosen", "rejected", "subset"?, "id"?}`` with string responses. RewardBench 2: the
same with ``"chosen": [one]`` and ``"rejected": [several]``; a row is correct only if its chosen response beats
every rejected one. Responses may also be message lists whose last turn is the assistant's (the conversation before
it is the prompt when the row has no ``prompt``), as ``steer-reward score`` reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer_reward.errors import InputError

__all__ = ["NO_SUBSET", "PreferenceRow", "PreferenceData", "load_preferences", "parse_preference_row"]

NO_SUBSET = "(none)"
"""Subset of rows that name none."""


@dataclass(frozen=True)
class PreferenceRow:
    """One preference row: the chosen response first, then every rejected one."""

    id: str
    subset: str
    prompts: tuple[Any, ...]
    """Prompt (string or message list) of each response; chosen first. Length: 1 + number rejected."""
    completions: tuple[str, ...]
    """Response texts; ``completions[0]`` is the chosen one."""
    line: int
    """Line number in the data file."""

    @property
    def num_rejected(self) -> int:
        return len(self.completions) - 1

    def key(self) -> str:
        """Content hash of what is scored (prompts and responses, in order), to match a scored file to the data."""
        text = json.dumps([list(self.prompts), list(self.completions)], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class PreferenceData:
    path: str
    rows: list[PreferenceRow]

    @property
    def subsets(self) -> list[str]:
        """Subset names in order of first appearance."""
        return list(dict.fromkeys(r.subset for r in self.rows))

    @property
    def num_responses(self) -> int:
        return sum(len(r.completions) for r in self.rows)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _response(value: Any, row: dict, where: str) -> tuple[Any, str]:
    """(prompt, completion) of one response: a string (the row's prompt) or a message list (its last turn)."""
    if isinstance(value, str):
        if "prompt" not in row:
            raise InputError(f"{where}: a string response needs the row's 'prompt'")
        return _prompt(row["prompt"], where), value
    if _is_messages(value):
        last = value[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise InputError(f"{where}: the last message must be an assistant turn with string content")
        return (_prompt(row["prompt"], where) if "prompt" in row else value[:-1]), last["content"]
    raise InputError(f"{where}: a response must be a string or a list of messages, got {type(value).__name__}")


def _prompt(prompt: Any, where: str) -> Any:
    if isinstance(prompt, str) or _is_messages(prompt):
        return prompt
    raise InputError(f"{where}: 'prompt' must be a string or a list of messages")


def _responses(value: Any, row: dict, where: str) -> list[tuple[Any, str]]:
    """One response (string, message list) or several (a list of those)."""
    if isinstance(value, str) or _is_messages(value):
        return [_response(value, row, where)]
    if isinstance(value, list):
        if not value:
            raise InputError(f"{where}: empty list of responses")
        return [_response(v, row, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InputError(f"{where}: must be a string, a list of messages or a list of responses, "
                     f"got {type(value).__name__}")


def parse_preference_row(row: dict, number: int, where: str) -> PreferenceRow:
    """A ``PreferenceRow`` from one JSON object, or an ``InputError`` naming ``where``."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise InputError(f"{where}: a preference row needs 'chosen' and 'rejected' (missing {missing}); "
                         f"got keys {sorted(row)}")
    chosen = _responses(row["chosen"], row, f"{where}: 'chosen'")
    if len(chosen) != 1:
        raise InputError(f"{where}: 'chosen' holds {len(chosen)} responses; rows with several correct responses "
                         "(RewardBench 2's Ties subset) are scored by another rule and are not supported")
    rejected = _responses(row["rejected"], row, f"{where}: 'rejected'")
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise InputError(f"{where}: 'subset' must be a string, got {subset!r}")
    responses = chosen + rejected
    return PreferenceRow(id=str(row.get("id", number)), subset=subset or NO_SUBSET,
                         prompts=tuple(p for p, _ in responses), completions=tuple(c for _, c in responses),
                         line=number)


def load_preferences(path: str | Path) -> PreferenceData:
    """Read a JSONL of preference rows; a bad row or an empty file is an ``InputError``."""
    from steer_reward.jsonl import read_jsonl

    rows = [parse_preference_row(row, number, f"{path}:{number}") for number, row in read_jsonl(path)]
    if not rows:
        raise InputError(f"{path}: no preference rows (the file is empty)")
    return PreferenceData(str(path), rows)
