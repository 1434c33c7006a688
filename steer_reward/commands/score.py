"""``steer-reward score``: score a JSONL file, writing each chunk as soon as it is scored."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from steer_reward.commands.common import add_reward_args, read_jsonl, reward_from_args
from steer_reward.errors import InputError

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
    return messages[:-1], last["content"]


def _check_prompt(prompt: Any, where: str) -> Any:
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
        return prompt
    raise InputError(f"{where}: 'prompt' must be a string or a list of messages")


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


def score_file(reward: Any, input_path: str | Path, output_path: str | Path, chunk_size: int = 64,
               progress: bool = True) -> int:
    """Score every row of ``input_path`` into ``output_path``; returns the number of rows written.

    Rows are written chunk by chunk, so an error on a later line loses nothing already scored.
    """
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    total = _count_lines(input_path) if input_path.is_file() else None
    written = 0
    pending: list[tuple[dict, list]] = []

    def flush(out) -> None:
        nonlocal written
        if not pending:
            return
        items = [item for _, parts in pending for item in parts]
        scored = reward.score([p for _, p, _ in items], [c for _, _, c in items])
        attributes, rewards = scored.attributes.to_dicts(), scored.rewards.tolist()
        truncated = scored.attributes.prompt_truncated.tolist()
        k = 0
        for row, parts in pending:
            result = dict(row)
            for prefix, _, _ in parts:
                result[f"{prefix}attributes"] = attributes[k]
                result[f"{prefix}reward"] = rewards[k]
                if truncated[k]:
                    result[f"{prefix}prompt_truncated_tokens"] = truncated[k]
                k += 1
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        bar.update(len(pending))
        written += len(pending)
        pending.clear()

    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", encoding="utf-8") as out, tqdm(total=total, unit="row", disable=not progress,
                                                              desc="scoring") as bar:
        try:
            for number, row in read_jsonl(input_path):
                pending.append((row, parse_row(row, f"{input_path}:{number}")))
                if len(pending) >= chunk_size:
                    flush(out)
        finally:
            flush(out)  # what was read before a bad line is still scored and written
    return written


def run(args: argparse.Namespace) -> int:
    if args.chunk_size <= 0:
        raise InputError("--chunk-size must be positive")
    reward = reward_from_args(args)
    written = score_file(reward, args.input, args.output, args.chunk_size)
    print(f"wrote {written} rows to {args.output}")
    return 0
