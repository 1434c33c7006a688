"""Worker for tests/test_deepspeed.py: a peer that is absent or dies must end in a clear error, not a hang.

``zero3_dead_peer.py absent OUT`` runs alone with WORLD_SIZE=2 set by the test: joining the group must fail
within ``deepspeed.timeout_s``. ``zero3_dead_peer.py dies OUT`` runs on 2 ranks: rank 1 exits right after the
model is built and rank 0's next scoring call must fail; ``stalls`` keeps rank 1 alive but silent, so rank 0
must give up after the timeout. The failing rank writes ``OUT/rank{r}.json``:
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
        reward(["Say hi."], ["Hi!"])
    except DistributedError as err:
        result = {"error": type(err).__name__, "message": str(err), "elapsed_s": time.monotonic() - start}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        print(f"rank {rank}: {err}", file=sys.stderr)
        os._exit(3)  # skip interpreter teardown: destroying a broken process group can block
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"error": None}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main(sys.argv[1], sys.argv[2]))
