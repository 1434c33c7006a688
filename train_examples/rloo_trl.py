"""RLOO with TRL, rewarded by a multi-attribute reward model through steer-reward.

    python train_examples/rloo_trl.py --tiny
    python train_examples/rloo_trl.py --reward-config configs/rewards/nemotron-340b.yaml \\
        --reward-model /models/Llama3-70B-SteerLM-RM --policy /models/my-policy --per-attribute

Same options as grpo_trl.py (the recipe is shared; only the trainer differs): RLOO's leave-one-out baseline
needs ``--num-generations`` >= 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_trl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(algorithm="rloo"))
