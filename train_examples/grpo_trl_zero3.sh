#!/usr/bin/env bash
# GRPO (TRL) with the policy and a colocated reward model both sharded by DeepSpeed ZeRO-3 on the same ranks.
#
#   GPUs:    train_examples/grpo_trl_zero3.sh --reward-model /models/Llama3-70B-SteerLM-RM --policy /models/policy
#   CPU:     NUM_PROCESSES=2 train_examples/grpo_trl_zero3.sh --tiny --report-to none     (demo models, 2 steps)
#
# Arguments go to train_examples/grpo_trl.py; the reward runs with backend=deepspeed (add --set model.dtype=bfloat16
# etc. as usual). NUM_PROCESSES defaults to 8, MAIN_PROCESS_PORT to 29500.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROCESSES="${NUM_PROCESSES:-8}"
launch=(--config_file configs/deepspeed/accelerate_zero3.yaml --num_processes "$NUM_PROCESSES"
        --main_process_port "${MAIN_PROCESS_PORT:-29500}")
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # CPU: DeepSpeed's CPU accelerator and full precision (the shipped config says bf16 for GPUs).
  export DS_ACCELERATOR=cpu
  launch+=(--mixed_precision no)
fi
exec accelerate launch "${launch[@]}" train_examples/grpo_trl.py --set backend=deepspeed "$@"
