"""Worker for tests/test_deepspeed.py: a peer that is absent or dies must end in a clear error, not a hang.

``zero3_dead_peer.py absent OUT`` runs alone with WORLD_SIZE=2 set by the test: joining the group must fail
within ``deepspeed.timeout_s``. ``zero3_dead_peer.py dies OUT`` runs on 2 ranks: rank 1 exits right after the
model is built and rank 0's next scoring call must fail; ``stalls`` keeps rank 1 alive but silent, so rank 0
must give up after the timeout; ``fails_mid_forward`` makes rank 1's forward fail part-way and retries: the retry
must refuse at once, rank 0 give up after the timeout. The failing rank writes ``OUT/rank{r}.json``:
``{"error": type name, "message": str, "elapsed_s": seconds from the call that failed}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TIMEOUT_S = 8


def main(mode: str, out_dir: str) -> int:
    from steer_reward.distributed import DistributedError
    from steer_reward.reward import SteerReward

    config = {"backend": "deepspeed", "model": {"path": "demo"}, "deepspeed": {"timeout_s": TIMEOUT_S}}
    rank = int(os.environ["RANK"])
    start = time.monotonic()
    try:
        reward = SteerReward.from_config(config)
        if mode == "dies" and rank == 1:
            os._exit(0)  # vanish without a goodbye, like a rank killed by the OOM killer
        if mode == "stalls" and rank == 1:
            time.sleep(TIMEOUT_S * 6)  # alive but never joining the collective, like a rank stuck elsewhere
            os._exit(0)
        start = time.monotonic()
        if mode == "fails_mid_forward" and rank == 1:
            return retry_after_a_failed_forward(reward, out_dir)
        reward(["Say hi."], ["Hi!"])
    except DistributedError as err:
        result = {"error": type(err).__name__, "message": str(err), "elapsed_s": time.monotonic() - start}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        print(f"rank {rank}: {err}", file=sys.stderr)
        os._exit(3)  # skip interpreter teardown: destroying a broken process group can block
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"error": None}))
    return 0


def retry_after_a_failed_forward(reward, out_dir: str) -> int:
    """Rank 1's forward fails part-way (an out-of-memory the caller catches); its retry must refuse at once rather
    than join collectives that no longer pair with rank 0's (still inside the failed forward's all-gathers)."""
    import torch

    from steer_reward.distributed import DistributedError

    backend = reward.scorer.backend
    real = backend.engine.module.model.model.layers[0].forward

    def out_of_memory(*args, **kwargs):  # after the embedding's all-gather, inside the first layer
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    backend.engine.module.model.model.layers[0].forward = out_of_memory
    try:
        reward(["Say hi."], ["Hi!"])
    except torch.OutOfMemoryError:
        pass
    backend.engine.module.model.model.layers[0].forward = real
    start = time.monotonic()
    try:
        reward(["Say hi."], ["Hi!"])
        result = {"error": None}
    except DistributedError as err:
        result = {"error": type(err).__name__, "message": str(err), "elapsed_s": time.monotonic() - start}
    Path(out_dir, "rank1.json").write_text(json.dumps(result))
    os._exit(3)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main(sys.argv[1], sys.argv[2]))
