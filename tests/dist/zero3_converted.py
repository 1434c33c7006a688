"""Worker for tests/test_convert_faces.py, launched on 2 CPU ranks: a folder converted from NeMo (its reward head
has a bias, restored by steer-reward's loader) scored under ZeRO-3.

``python -m torch.distributed.run --nproc_per_node 2 tests/dist/zero3_converted.py MODEL_DIR OUT_DIR`` writes
``OUT_DIR/rank{r}.json``: this rank's (prompt, completion) pairs, their attributes and whether the engine's head
has a bias.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

PAIRS = [("What is 2+2?", "4"), ("Name a color.", "Blue, like the sky on a clear day."),
         ("Say hi.", "Hello!"), ("Write a haiku.", "Old pond / frog jumps in / splash"), ("Why?", "Because.")]


def main(model_dir: str, out_dir: str) -> None:
    from steer_reward.reward import SteerReward

    reward = SteerReward.from_config({"backend": "deepspeed", "model": {"path": model_dir},
                                      "deepspeed": {"timeout_s": 120}})
    rank = dist.get_rank()
    mine = PAIRS[:2] if rank == 0 else PAIRS[2:]
    scores = reward.scorer.score([p for p, _ in mine], [c for _, c in mine])
    head = reward.scorer.backend.engine.module.model.score
    report = {"rank": rank, "pairs": mine, "attributes": scores.values.tolist(), "head_has_bias": head.bias is not None,
              "bias_partitioned": hasattr(head.bias, "ds_tensor")}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], sys.argv[2])
