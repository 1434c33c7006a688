"""Best-of-n rejection sampling with a multi-attribute reward, then a steerable ablation over weight configs.

    python train_examples/best_of_n.py --tiny
    python train_examples/best_of_n.py --policy /models/my-policy --reward-model /models/Llama3-70B-SteerLM-RM \\
        --reward-config configs/rewards/steerlm-70b.yaml --prompts prompts.jsonl --n 16 \\
        --compare configs/rewards/concise.yaml configs/rewards/helpfulness.yaml

Step 1 samples ``--n`` candidates per prompt and scores every one (attributes + reward) into ``--output``; step 2
re-picks under each ``--compare`` config from the stored attributes alone (no model runs) and prints how the
picks and the picked candidates' attributes move. Metrics go to wandb (``--report-to wandb``) as a table, offline
unless W&B is set up (``wandb login`` or WANDB_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # wandb_mode, beside this file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="best-of-n sampling and re-selection with steer-reward")
    parser.add_argument("--reward-config", default=str(ROOT / "configs/rewards/steerlm-70b.yaml"))
    parser.add_argument("--reward-model", help="reward model folder or 'demo'")
    parser.add_argument("--policy", help="causal LM folder or 'demo'")
    parser.add_argument("--prompts", help="JSONL with a 'prompt' per row (default: bundled LLMBar prompts)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--compare", nargs="*", default=[str(ROOT / f"configs/rewards/{n}.yaml")
                                                         for n in ("concise", "helpfulness", "nemotron-340b")])
    parser.add_argument("--output", default="runs/best-of-n/scored.jsonl")
    parser.add_argument("--report-to", default="wandb", choices=["wandb", "none"])
    parser.add_argument("--tiny", action="store_true", help="demo policy + demo RM (random weights), 4 prompts")
    args = parser.parse_args(argv)
    if args.tiny:
        args.reward_model, args.policy = args.reward_model or "demo", args.policy or "demo"
        args.n, args.max_new_tokens, args.limit = 4, 12, args.limit or 4
    if args.policy is None:
        parser.error("--policy is required (a causal LM folder, or demo)")
    return args


def main(argv: list[str] | None = None) -> int:
    from steer_reward.best_of_n import PolicySampler, SamplingConfig, load_policy, write_best_of_n
    from steer_reward.demo import DEMO_POLICY_WARNING, DEMO_WARNING, sample_rows
    from steer_reward.reselect import compare, format_table, load_scored
    from steer_reward.reward import SteerReward
    from wandb_mode import offline_unless_configured

    args = parse_args(argv)
    offline_unless_configured(args.report_to)  # no W&B account needed: offline unless the user set it up
    for flag, warning in ((args.reward_model, DEMO_WARNING), (args.policy, DEMO_POLICY_WARNING)):
        if flag == "demo":
            print(warning, file=sys.stderr)
    if args.prompts:
        rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        rows = [{"id": r["id"], "prompt": r["prompt"]} for r in sample_rows()]
    rows = rows[: args.limit] if args.limit else rows

    reward = SteerReward.from_config(args.reward_config, model=args.reward_model)
    policy, tokenizer = load_policy(args.policy)
    sampler = PolicySampler(policy, tokenizer, SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens))
    write_best_of_n(reward, sampler, rows, args.output)

    scored = load_scored(args.output)
    selections = compare(scored, {Path(c).stem: c for c in args.compare})
    print(format_table(scored, selections))
    if args.report_to == "wandb":
        import wandb

        run = wandb.init(project="steer-reward", job_type="best-of-n", config=vars(args))
        live = [scored.schema.names[k] for k in scored.schema.live]
        table = wandb.Table(columns=["config", "same_pick", *live, "tokens"])
        for sel in selections:
            same = sum(a == b for a, b in zip(sel.chosen, scored.original)) / len(scored.groups)
            table.add_data(sel.name, same, *(sel.chosen_means[n] for n in live), sel.chosen_tokens)
            run.summary.update({f"{sel.name}/chosen/{n}": sel.chosen_means[n] for n in live})
        run.log({"reselect": table})
        run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
