"""Worker for tests/test_deepspeed.py: 2 steps of TRL GRPOTrainer under accelerate + DeepSpeed ZeRO-3 on CPU, with
the reward model colocated through backend: deepspeed (policy and reward model both sharded).

``accelerate launch --config_file configs/deepspeed/accelerate_zero3.yaml --num_processes 2 --mixed_precision no
tests/dist/zero3_grpo.py OUT_DIR`` writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def cpu_deepspeed_state() -> None:
    """DESIGN.md's CPU recipe: the trainer ignores ``ddp_backend`` under DeepSpeed, so the gloo state is created
    first and the trainer told to use it (``accelerator_config={"use_configured_state": True}``)."""
    from accelerate import PartialState

    from steer_reward.distributed import skip_cpu_shm_build

    skip_cpu_shm_build()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from steer_reward.demo import demo_policy_dir, sample_rows
    from steer_reward.reward import SteerReward

    cpu_deepspeed_state()
    reward = SteerReward.from_config({
        "backend": "deepspeed",
        "model": {"path": "demo", "max_length": 128},
        "batching": {"max_tokens": 256, "max_batch_size": 4},
        "shaping": {"weights": "steerlm-70b", "normalization": "running"},
        "deepspeed": {"timeout_s": 120},
    })
    func = reward.for_trl()
    policy_path = str(demo_policy_dir())
    args = GRPOConfig(output_dir=str(Path(out_dir) / "run"), max_steps=2, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, logging_steps=1, report_to="none",
                      save_strategy="no", seed=0, learning_rate=1e-5, bf16=False,
                      accelerator_config={"use_configured_state": True})
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_path), reward_funcs=[func], args=args,
                          processing_class=AutoTokenizer.from_pretrained(policy_path),
                          train_dataset=Dataset.from_dict({"prompt": [r["prompt"][:200] for r in sample_rows()]}))
    trainer.train()

    rank = dist.get_rank()
    policy = trainer.model_wrapped
    logs = [row for row in trainer.state.log_history if any(k.startswith("rewards/") for k in row)]
    backend = reward.scorer.backend
    report = {
        "rank": rank,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "policy_numel": {"held": sum(p.ds_tensor.numel() for p in policy.module.parameters()),
                         "total": sum(p.ds_numel for p in policy.module.parameters())},
        "rm_numel": dict(zip(("held", "total"), backend.partition_numel())),
        "reward_means": [row[f"rewards/{func.__name__}/mean"] for row in logs],
        "steps": trainer.state.global_step,
        "forward_calls": backend.forward_calls,
        "dummy_calls": backend.dummy_calls,
        "state": reward.state_dict(),
    }
    report["finite"] = all(math.isfinite(v) for v in report["reward_means"])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
