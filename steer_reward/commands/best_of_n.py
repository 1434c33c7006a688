"""``steer-reward best-of-n``: sample n candidates per prompt, score them all, keep the best."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from steer_reward.commands.common import (add_reward_args, check_output, note_truncation, read_jsonl,
                                         reward_from_args, staged_output)
from steer_reward.errors import InputError
from steer_reward.formatting import FormattingError, normalize_messages

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "best-of-n", help="sample n candidates per prompt from a causal LM, score them, keep the best",
        description="Input rows: {prompt: str | messages, ...}. Output rows keep the input fields and add every "
                    "candidate (text, attributes, completion_tokens, reward), the chosen index and the schema, so "
                    "'steer-reward reselect' can pick again under other weights without any model.",
    )
    add_reward_args(parser)
    parser.add_argument("--policy", required=True, help="causal LM folder, or 'demo' (tiny RANDOM policy)")
    parser.add_argument("--prompts", required=True, help="input JSONL with a 'prompt' per row")
    parser.add_argument("--output", required=True, help="output JSONL (one line per prompt, written as it is done)")
    parser.add_argument("--n", type=int, default=8, help="candidates per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest candidate in policy tokens")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples after manual_seed(seed + i)")
    parser.add_argument("--device", default="auto", help="policy device: cpu, cuda, cuda:N or auto")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from steer_reward.best_of_n import PolicySampler, SamplingConfig, load_policy, write_best_of_n
    from steer_reward.demo import DEMO_POLICY_WARNING

    try:
        sampling = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise InputError(f"--{str(err).split()[0].replace('_', '-')}: {err}") from None
    rows = []
    for number, row in read_jsonl(args.prompts):
        if "prompt" not in row or not isinstance(row["prompt"], (str, list)):
            raise InputError(f"{args.prompts}:{number}: a row needs a 'prompt' (string or list of messages)")
        try:
            normalize_messages(row["prompt"])
        except FormattingError as err:
            raise InputError(f"{args.prompts}:{number}: {err.reason}") from None
        rows.append(row)
    check_output(args.output, inputs=[args.prompts])
    reward = reward_from_args(args)
    if args.policy == "demo":
        print(DEMO_POLICY_WARNING, file=sys.stderr)
    policy, tokenizer = load_policy(args.policy, args.device)
    # Staged: an existing --output is replaced only when every prompt is done (a failure keeps the finished
    # prompts in OUTPUT.partial).
    with staged_output(args.output, inputs=[args.prompts]) as stage:
        written = write_best_of_n(reward, PolicySampler(policy, tokenizer, sampling), rows, stage)
    cut = {"prompt": 0, "completion": 0}
    for _, row in read_jsonl(args.output):
        for candidate in row["candidates"]:
            for part in cut:
                cut[part] += candidate[f"{part}_truncated_tokens"] > 0
    note_truncation(cut)
    print(f"wrote {written} prompts x {args.n} candidates to {args.output}")
    return 0
