"""Worker for tests/test_trl_ddp.py: 2 steps of TRL GRPOTrainer under plain DDP on 2 CPU ranks (gloo), with
evaluation after every step and the reward colocated through backend: local (no DeepSpeed, no ZeRO-3).

Faces: a shaped function, per-attribute functions, and two async shaped functions whose scoring finishes in
opposite orders on the two ranks (each rank delays a different one). Every face's running statistics must be
the same on both ranks and equal to statistics over all ranks' training samples.

``accelerate launch --multi_gpu --num_processes 2 --mixed_precision no tests/dist/ddp_grpo.py OUT_DIR`` writes
``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared test helpers
from recording import AsyncCallRecorder, CallRecorder  # noqa: E402

TRAIN = ["Say hi.", "Name a color.", "Count to three.", "Why?"]
EVAL = ["Evaluate this sentence.", "Evaluation prompt two."]


class DelayedScorer:
    """The demo scorer, answering ``delay_s`` late: makes async scoring finish in a chosen order."""

    def __init__(self, scorer, delay_s: float) -> None:
        self.scorer = scorer
        self.delay_s = delay_s
        self.schema = scorer.schema

    def score(self, prompts, completions):
        time.sleep(self.delay_s)
        return self.scorer.score(prompts, completions)


def main(out_dir: str) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True, backend="gloo")  # before the trainer, which then uses it (DESIGN.md, CPU notes)
    rank = state.process_index

    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from steer_reward.demo import demo_policy_dir
    from steer_reward.integrations.trl import AsyncSteerRewardFunc
    from steer_reward.reward import SteerReward

    shaping = {"weights": "steerlm-70b", "normalization": "running"}
    common = {"backend": "local", "model": {"path": "demo", "max_length": 128}}
    shaped = SteerReward.from_config({**common, "shaping": {**shaping, "reward_normalization": "running"}})
    per_attribute = SteerReward.from_config(
        {**common, "shaping": {**shaping, "length_penalty": {"alpha": 0.5, "target_tokens": 4}}})
    slow = SteerReward.from_config({**common, "shaping": shaping})
    fast = SteerReward.from_config({**common, "shaping": {**shaping, "weights": "helpfulness"}})
    # Opposite finishing orders on the two ranks: rank 0 delays the first async face, rank 1 the second.
    slow.scorer = DelayedScorer(slow.scorer, 1.5 if rank == 0 else 0.0)
    fast.scorer = DelayedScorer(fast.scorer, 0.0 if rank == 0 else 1.5)
    attribute_funcs, attribute_weights = per_attribute.trl_attribute_funcs()
    funcs = [CallRecorder(shaped.for_trl()), *[CallRecorder(f) for f in attribute_funcs],
             AsyncCallRecorder(AsyncSteerRewardFunc(slow)), AsyncCallRecorder(AsyncSteerRewardFunc(fast))]
    rewards = {"shaped": shaped, "per_attribute": per_attribute, "async_a": slow, "async_b": fast}
    recorders = {"shaped": funcs[0], "per_attribute": funcs[1], "async_a": funcs[-2], "async_b": funcs[-1]}

    chat = lambda texts: [[{"role": "user", "content": t}] for t in texts]  # noqa: E731
    policy_path = str(demo_policy_dir())
    torch.manual_seed(0)
    args = GRPOConfig(output_dir=str(Path(out_dir) / "run"), use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                      per_device_eval_batch_size=4, num_generations=2, max_completion_length=8,
                      eval_strategy="steps", eval_steps=1, logging_steps=1, report_to="none", save_strategy="no",
                      reward_weights=[1.0, *attribute_weights, 1.0, 1.0], seed=0, learning_rate=1e-5,
                      accelerator_config={"use_configured_state": True})
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_path), reward_funcs=funcs, args=args,
                          processing_class=AutoTokenizer.from_pretrained(policy_path),
                          train_dataset=Dataset.from_dict({"prompt": chat(TRAIN) * 4}),
                          eval_dataset=Dataset.from_dict({"prompt": chat(EVAL) * 2}))
    trainer.train()

    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "ddp": type(trainer.model_wrapped).__name__,
        "steps": trainer.state.global_step,
        "states": {name: reward.state_dict() for name, reward in rewards.items()},
        "calls": {name: rec.calls for name, rec in recorders.items()},
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
