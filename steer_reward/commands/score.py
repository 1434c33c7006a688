"""``steer-reward score``: score a JSONL file, writing each chunk as soon as it is scored."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from steer_reward.commands.common import (add_reward_args, check_output, note_truncation, read_jsonl,
                                         reward_from_args, staged_output)
from steer_reward.errors import InputError
from steer_reward.formatting import FormattingError, normalize_messages

__all__ = ["register", "parse_row", "score_file"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "score", help="score a JSONL file of (prompt, completion) rows or preference pairs",
        description="Rows: {prompt, completion (or response)} | {messages} (last assistant turn is the completion) | "
                    "{prompt, chosen, rejected}. Output rows keep the input fields and add attributes and reward.",
    )
    add_reward_args(parser)
    parser.add_argument("--input", required=True, help="input JSONL")
    parser.add_argument("--output", required=True, help="output JSONL (written as rows are scored)")
    parser.add_argument("--chunk-size", type=int, default=64, help="rows scored (and written) together")
    parser.set_defaults(func=run)


def _split_messages(messages: Any, where: str) -> tuple[list, str]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise InputError(f"{where}: the last message must be an assistant turn with string content")
    return _check_prompt(messages[:-1], where), last["content"]


def _check_prompt(prompt: Any, where: str) -> Any:
    """The prompt, checked as the formatter will read it (every message a mapping with string role and content),
    so a bad message is an error naming its line now rather than a failed chunk later."""
    if not isinstance(prompt, (str, list)):
        raise InputError(f"{where}: 'prompt' must be a string or a list of messages")
    try:
        normalize_messages(prompt)
    except FormattingError as err:
        raise InputError(f"{where}: {err.reason}") from None
    return prompt


def parse_row(row: dict, where: str) -> list[tuple[str, Any, str]]:
    """[(field prefix, prompt, completion)] for one input row: one entry, or two for a preference pair."""
    if "chosen" in row or "rejected" in row:
        pairs = []
        for side in ("chosen", "rejected"):
            value = row.get(side)
            if isinstance(value, str):
                if "prompt" not in row:
                    raise InputError(f"{where}: a preference pair with string responses needs a 'prompt'")
                pairs.append((f"{side}_", _check_prompt(row["prompt"], where), value))
            elif isinstance(value, list):
                prompt, completion = _split_messages(value, f"{where}: {side!r}")
                pairs.append((f"{side}_", _check_prompt(row["prompt"], where) if "prompt" in row else prompt,
                              completion))
            else:
                raise InputError(f"{where}: {side!r} must be a string or a list of messages")
        return pairs
    if "messages" in row:
        prompt, completion = _split_messages(row["messages"], f"{where}: 'messages'")
        return [("", prompt, completion)]
    key = "completion" if "completion" in row else "response"  # HelpSteer2 rows call it response
    if "prompt" in row and key in row:
        completion = row[key]
        if not isinstance(completion, str):
            raise InputError(f"{where}: {key!r} must be a string")
        return [("", _check_prompt(row["prompt"], where), completion)]
    raise InputError(f"{where}: a row needs prompt+completion, messages, or prompt+chosen+rejected; "
                     f"got keys {sorted(row)}")


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def is_row_error(err: BaseException) -> bool:
    """Whether ``err`` is about the samples scored (so one row is to blame), not about the model or a server:
    a formatting refusal (bad text, over-long under ``model.overlong: reject``), or a server's 400/413/422."""
    return isinstance(err, FormattingError) or getattr(err, "status", None) in (400, 413, 422)


Pending = list[tuple[int, dict, list]]
"""Rows read but not yet written: (line number, row, parse_row's parts)."""


class _RowWriter:
    """Scores pending rows in one call and writes them, in input order; finds the row to blame when a chunk fails."""

    def __init__(self, reward: Any, input_path: Path, out: Any, bar: Any) -> None:
        self.reward, self.input_path, self.out, self.bar = reward, input_path, out, bar
        self.written = 0
        self.truncated = {"prompt": 0, "completion": 0}

    def _score(self, pending: Pending) -> Any:
        items = [item for _, _, parts in pending for item in parts]
        return self.reward.score([p for _, p, _ in items], [c for _, _, c in items])

    def write(self, pending: Pending) -> None:
        if not pending:
            return
        try:
            scored = self._score(pending)
        except Exception as err:
            if is_row_error(err):
                self._write_until_bad_row(pending, err)  # raises, naming the line
            raise
        self._write_scored(pending, scored)

    def _write_scored(self, pending: Pending, scored: Any) -> None:
        attributes, rewards = scored.attributes.to_dicts(), scored.rewards.tolist()
        prompt_cut = scored.attributes.prompt_truncated.tolist()
        completion_cut = scored.attributes.completion_truncated.tolist()
        k = 0
        for _, row, parts in pending:
            result = dict(row)
            for prefix, _, _ in parts:
                result[f"{prefix}attributes"] = attributes[k]
                result[f"{prefix}reward"] = rewards[k]
                # Always present, so a reader never mistakes a missing key for "not cut".
                result[f"{prefix}prompt_truncated_tokens"] = prompt_cut[k]
                result[f"{prefix}completion_truncated_tokens"] = completion_cut[k]
                self.truncated["prompt"] += prompt_cut[k] > 0
                self.truncated["completion"] += completion_cut[k] > 0
                k += 1
            self.out.write(json.dumps(result, ensure_ascii=False) + "\n")
        self.out.flush()
        self.bar.update(len(pending))
        self.written += len(pending)

    def _write_until_bad_row(self, pending: Pending, chunk_error: Exception) -> None:
        """Write the rows before the first one that fails alone, then raise an error naming that row's line.

        With an in-process scorer each row is only encoded to find it (no forward); a remote one scores rows
        one at a time (this is the error path only).
        """
        encode = getattr(self.reward.scorer, "encode", None)
        for i, (number, _, parts) in enumerate(pending):
            prompts, completions = [p for _, p, _ in parts], [c for _, _, c in parts]
            try:
                (encode or self.reward.score)(prompts, completions)
            except Exception as err:
                if not is_row_error(err):
                    raise
                self.write(pending[:i])
                raise InputError(f"{self.input_path}:{number}: {_describe(err, parts)}") from None
        raise chunk_error  # no row fails alone: not a row's fault


def _describe(err: Exception, parts: list) -> str:
    index = getattr(err, "index", None)
    reason = getattr(err, "reason", str(err))
    if index is not None and len(parts) > 1:  # a preference pair: say which side
        return f"{parts[index][0].rstrip('_')}: {reason}"
    return reason


def score_file(reward: Any, input_path: str | Path, output_path: str | Path, chunk_size: int = 64,
               progress: bool = True) -> int:
    """Score every row of ``input_path`` into ``output_path``; returns the number of rows written.

    Rows are scored chunk by chunk. A bad row (bad JSON, a row the formatter refuses, an over-long sample under
    ``model.overlong: reject``) is an ``InputError`` naming its line; the rows before it are scored and written.
    The output is staged beside ``output_path`` and renamed into place at the end (``staged_output``): an
    interrupted run leaves an existing output as it was, and the output may not be the input.
    """
    from tqdm import tqdm

    input_path = Path(input_path)
    rows = read_jsonl(input_path)  # a missing input fails here, before any output is touched
    with staged_output(output_path, inputs=[input_path], commit_on=(InputError,)) as stage, \
            stage.open("w", encoding="utf-8") as out, \
            tqdm(total=_count_lines(input_path), unit="row", disable=not progress, desc="scoring") as bar:
        writer = _RowWriter(reward, input_path, out, bar)
        pending: Pending = []
        try:
            for number, row in rows:
                pending.append((number, row, parse_row(row, f"{input_path}:{number}")))
                if len(pending) >= chunk_size:
                    writer.write(pending)
                    pending = []
        except InputError:
            writer.write(pending)  # every row before the bad line is scored and written
            raise
        writer.write(pending)
    note_truncation(writer.truncated)
    return writer.written


def run(args: argparse.Namespace) -> int:
    if args.chunk_size <= 0:
        raise InputError("--chunk-size must be positive")
    read_jsonl(args.input)  # before the model loads: a mistyped path or an output that is the input fail at once
    check_output(args.output, inputs=[args.input])
    reward = reward_from_args(args)
    written = score_file(reward, args.input, args.output, args.chunk_size)
    print(f"wrote {written} rows to {args.output}")
    return 0
