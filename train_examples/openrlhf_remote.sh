#!/usr/bin/env bash
# GRPO in OpenRLHF 0.11 with a steer-reward server as the remote reward model.
#
#   MODEL=/path/to/Llama3-70B-SteerLM-RM-hf POLICY=/path/to/policy DATA=/path/to/prompts.jsonl \
#     bash train_examples/openrlhf_remote.sh
#
# The server batches OpenRLHF's one-sample requests across requests and replies
# {"rewards", "scores", "extra_logs"} with one list per live attribute in extra_logs (logged by OpenRLHF).
# Without MODEL it serves the random-weight demo RM (plumbing only). The trainer part needs GPUs, Ray and vLLM.
set -euo pipefail

MODEL=${MODEL:-demo}
CONFIG=${CONFIG:-configs/rewards/steerlm-70b.yaml}
PORT=${PORT:-8000}
URL="http://127.0.0.1:${PORT}"

# Optional bearer token: export STEER_REWARD_TOKEN=... before starting. OpenRLHF's client sends no
# Authorization header, so leave it unset when OpenRLHF talks to the server directly on loopback.
# With POLICY set, the server reads the actor's own chat template from its tokenizer, to split OpenRLHF's
# queries exactly (Qwen3 thinking blocks, Llama-3.1 date headers, left-truncated prompts).
ACTOR_ARGS=()
if [[ -n "${POLICY:-}" ]]; then ACTOR_ARGS=(--actor-tokenizer "$POLICY"); fi
steer-reward serve --model "$MODEL" --config "$CONFIG" --port "$PORT" "${ACTOR_ARGS[@]}" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do
  if curl -sf "$URL/health" >/dev/null; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the reward server exited" >&2; exit 1; fi
  sleep 1
done
curl -sf "$URL/health" >/dev/null || { echo "the reward server did not come up on $URL" >&2; exit 1; }
curl -s "$URL/info"; echo

if [[ -z "${POLICY:-}" || -z "${DATA:-}" ]]; then
  echo "server is up at $URL; set POLICY and DATA to start OpenRLHF (Ctrl-C stops the server)" >&2
  wait "$SERVER_PID"
  exit 0
fi

# OpenRLHF 0.11.2 flag names (openrlhf/cli/train_ppo_ray.py). --data.apply_chat_template makes the actor
# template the prompt; the server parses the actor-templated queries back into (conversation, response) and
# re-templates them for the reward model.
python3 -m openrlhf.cli.train_ppo_ray \
  --actor.model_name_or_path "$POLICY" \
  --reward.remote_url "$URL/get_reward" \
  --data.prompt_dataset "$DATA" \
  --data.input_key prompt \
  --data.apply_chat_template \
  --data.max_len 2048 \
  --rollout.max_new_tokens 512 \
  --rollout.n_samples_per_prompt 8 \
  --rollout.batch_size 128 \
  --rollout.micro_batch_size 8 \
  --train.batch_size 128 \
  --train.micro_batch_size 4 \
  --train.max_epochs 1 \
  --train.num_episodes 1 \
  --algo.advantage.estimator group_norm \
  --actor.adam.lr 5e-7 \
  --ds.zero_stage 3 \
  --ds.param_dtype bf16 \
  --actor.gradient_checkpointing_enable \
  --vllm.num_engines 2 \
  --vllm.tensor_parallel_size 1 \
  --actor.num_gpus_per_node 4 \
  --ref.num_gpus_per_node 2 \
  --train.colocate_actor_ref \
  --ckpt.output_dir ./checkpoints/grpo-steer-reward

# Without a server: write a reward_func file and pass it as the remote URL instead:
#   steer-reward openrlhf-func --model "$MODEL" --config "$CONFIG" --actor-tokenizer "$POLICY" --out reward_func.py
#   ... --reward.remote_url reward_func.py
