"""``steer-reward convert-nemo`` and ``inspect-nemo``: NeMo SteerLM reward checkpoints → Hugging Face folders."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    convert = subparsers.add_parser(
        "convert-nemo", help="convert a NeMo reward model (.nemo or unpacked folder) to a Hugging Face folder",
        description="Converts a NeMo SteerLM regression reward model (torch_dist, zarr or legacy mp_rank weights) "
                    "into a LlamaForSequenceClassification folder, tensor by tensor. The reward head's bias is kept "
                    "as score.bias; steer-reward loads it (plain Transformers drops it).",
    )
    convert.add_argument("src", help=".nemo file or unpacked .nemo folder (holds model_config.yaml)")
    convert.add_argument("out", help="output folder (must not exist, or be empty)")
    convert.add_argument("--tokenizer", metavar="DIR",
                         help="Hugging Face tokenizer folder; needed when the checkpoint bundles none (Llama-3 RMs)")
    convert.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                         help="dtype of the written weights (default bfloat16)")
    convert.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(func=run_convert)

    inspect = subparsers.add_parser(
        "inspect-nemo", help="show a NeMo checkpoint's format, config, tensors and conversion memory",
        description="Reads model_config.yaml and the weight index only (no weights); exits 2 when the checkpoint "
                    "cannot be converted, saying why.",
    )
    inspect.add_argument("src", help=".nemo file or unpacked .nemo folder")
    inspect.set_defaults(func=run_inspect)


def run_convert(args: argparse.Namespace) -> int:
    from steer_reward.quiet import quiet_transformers
    from steer_reward.convert import convert_nemo

    quiet_transformers()
    result = convert_nemo(args.src, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                          shard_size=args.shard_size, progress=not args.no_progress)
    labels = ", ".join(result.labels)
    print(f"wrote {result.out}: LlamaForSequenceClassification, {result.parameters:,} parameters in "
          f"{result.shards} shard(s), {result.num_labels} outputs ({labels}) with the reward head's bias as score.bias")
    print(f"  from {result.format} weights; tokenizer {result.tokenizer_source}, vocab {result.vocab_size}, pad token "
          f"{result.pad_token!r}{' (added)' if result.pad_added else ''}; chat template set to SteerLM's")
    print(f"  score it: steer-reward score --model {result.out} --config configs/rewards/steerlm-70b.yaml ...")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from steer_reward.convert import inspect_nemo

    report = inspect_nemo(args.src)
    print(report.text())
    if report.problem:
        print(f"steer-reward inspect-nemo: error: {report.problem}", file=sys.stderr)
        return 2
    return 0
