"""GRPO with TRL, rewarded by a multi-attribute reward model through steer-reward.

    python train_examples/grpo_trl.py --tiny                          # CPU, demo models, under a minute
    python train_examples/grpo_trl.py --reward-config configs/rewards/steerlm-70b.yaml \\
        --reward-model /models/Llama3-70B-SteerLM-RM --policy /models/my-policy --per-attribute

With ``--per-attribute`` every live attribute is its own TRL reward function (one shared forward per batch) and
the config's weights become ``reward_weights``, so TRL logs ``rewards/<attribute>/mean``; otherwise one shaped
reward is logged as ``rewards/steer_reward/mean`` plus ``steer_reward/<attribute>`` batch means. The shaper's
running statistics are saved in each checkpoint and restored on ``--resume``.

Under ``accelerate launch`` with DeepSpeed, pass ``--set backend=deepspeed`` for a ZeRO-3 sharded reward model and
``--trainer-set`` for trainer options; ``trainer_config`` is the one place the trainer config is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # wandb_mode, beside this file


def parse_args(argv: list[str] | None = None, algorithm: str = "grpo") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"{algorithm.upper()} with a steer-reward reward (TRL)")
    parser.add_argument("--reward-config", default=str(ROOT / "configs/rewards/steerlm-70b.yaml"))
    parser.add_argument("--reward-model", help="reward model folder or 'demo' (overrides model.path)")
    parser.add_argument("--policy", help="policy (causal LM) folder or 'demo'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="reward config override, e.g. shaping.weights.verbosity=-1.0 or backend=deepspeed")
    parser.add_argument("--trainer-set", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer config field, value as YAML, e.g. gradient_accumulation_steps=4")
    parser.add_argument("--per-attribute", action="store_true", help="one TRL reward function per attribute")
    parser.add_argument("--prompts", help="JSONL with a 'prompt' per row (default: the bundled LLMBar prompts)")
    parser.add_argument("--output-dir", default=f"runs/{algorithm}-steer-reward")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="per-device train batch size")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--report-to", default="wandb",
                        help="wandb, none, ... (wandb logs offline unless W&B is set up: WANDB_API_KEY, wandb login)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--tiny", action="store_true",
                        help="demo RM + demo policy (random weights), 2 steps, tiny batches, CPU: a smoke run")
    args = parser.parse_args(argv)
    args.algorithm = algorithm
    if args.tiny:
        args.reward_model = args.reward_model or "demo"
        args.policy = args.policy or "demo"
        args.max_steps, args.batch_size, args.num_generations = 2, 4, 2
        args.max_completion_length, args.save_steps, args.learning_rate = 8, 1, 1e-5
    if args.policy is None:
        parser.error("--policy is required (a causal LM folder, or demo)")
    return args


def load_prompts(path: str | None) -> list:
    """Conversational prompts, so TRL applies the policy's chat template."""
    if path is None:
        from steer_reward.demo import sample_rows

        texts = [row["prompt"] for row in sample_rows()]
    else:
        texts = [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": t}] if isinstance(t, str) else t for t in texts]


def build_reward(args: argparse.Namespace) -> Any:
    from steer_reward.config import parse_override
    from steer_reward.reward import SteerReward

    overrides = dict(parse_override(o) for o in args.overrides)
    return SteerReward.from_config(args.reward_config, model=args.reward_model, overrides=overrides)


# -- accelerate launch + DeepSpeed (train_examples/grpo_trl_zero3.sh) ------------------------------------------------

def under_deepspeed() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def configure_deepspeed_state() -> None:
    """Create the distributed state before the reward and the trainer config, which both join it.

    DESIGN.md's recipe: trainers ignore ``ddp_backend`` under DeepSpeed, so on CPU the gloo state is made here and
    the trainer reuses it (``use_configured_state``); DeepSpeed's CPU shm op would otherwise JIT-compile first.
    """
    import torch
    from accelerate import PartialState

    from steer_reward.distributed import skip_cpu_shm_build

    skip_cpu_shm_build()
    PartialState(backend=None if torch.cuda.is_available() else "gloo")


# ----------------------------------------------------------------------------------------------------------------


def trainer_config(args: argparse.Namespace, reward_weights: list[float] | None) -> Any:
    """The GRPOConfig / RLOOConfig of this run: the only place it is built."""
    import trl

    fields = dict(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate, logging_steps=1, save_steps=args.save_steps, report_to=args.report_to,
        reward_weights=reward_weights, run_name=Path(args.output_dir).name, seed=0,
    )
    if args.tiny:
        fields.update(use_cpu=True, save_total_limit=1)
    if under_deepspeed():  # the state made by configure_deepspeed_state decides devices and backend
        import torch

        fields.update(use_cpu=False, bf16=torch.cuda.is_available(),
                      accelerator_config={"use_configured_state": True})
    for item in args.trainer_set:
        key, _, value = item.partition("=")
        fields[key.strip()] = yaml.safe_load(value)
    cls = trl.GRPOConfig if args.algorithm == "grpo" else trl.RLOOConfig
    return cls(**fields)


def build_trainer(args: argparse.Namespace) -> Any:
    """(trainer, reward) ready to ``train()``."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_reward.demo import demo_policy_dir
    from steer_reward.integrations.trl import ShaperStateCallback

    if under_deepspeed():
        configure_deepspeed_state()
    reward = build_reward(args)
    policy_path = str(demo_policy_dir()) if args.policy == "demo" else args.policy
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    if args.per_attribute:
        reward_funcs, weights = reward.trl_attribute_funcs(policy_pad_token_id=tokenizer.pad_token_id)
    else:
        reward_funcs, weights = [reward.for_trl(policy_pad_token_id=tokenizer.pad_token_id)], None
    trainer_cls = trl.GRPOTrainer if args.algorithm == "grpo" else trl.RLOOTrainer
    trainer = trainer_cls(
        model=policy, reward_funcs=reward_funcs, args=trainer_config(args, weights), processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": load_prompts(args.prompts)}),
        callbacks=[ShaperStateCallback(reward)],
    )
    return trainer, reward


def main(argv: list[str] | None = None, algorithm: str = "grpo") -> int:
    from steer_reward.demo import DEMO_POLICY_WARNING, DEMO_WARNING
    from wandb_mode import offline_unless_configured

    args = parse_args(argv, algorithm)
    offline_unless_configured(args.report_to)  # no W&B account needed: offline unless the user set it up
    if args.reward_model == "demo":
        print(DEMO_WARNING, file=sys.stderr)
    if args.policy == "demo":
        print(DEMO_POLICY_WARNING, file=sys.stderr)
    trainer, _ = build_trainer(args)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
