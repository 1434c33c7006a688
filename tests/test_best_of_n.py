"""Best-of-n sampling and model-free re-selection."""

from __future__ import annotations

import json

import pytest
import torch

from steer_reward.best_of_n import PolicySampler, SamplingConfig, best_of_n_rows, load_policy
from steer_reward.cli import main
from steer_reward.reselect import compare, load_scored

ROWS = [{"prompt": "Say hi.", "id": 1}, {"prompt": [{"role": "user", "content": "Name a color."}], "id": 2},
        {"prompt": "Count to three.", "id": 3}]
CONFIGS = {"concise": "configs/rewards/concise.yaml", "helpfulness": "configs/rewards/helpfulness.yaml",
           "correctness-first": "configs/rewards/correctness-first.yaml"}


@pytest.fixture(scope="module")
def policy(demo_policy_path):
    return load_policy(demo_policy_path, "cpu")


@pytest.fixture(scope="module")
def scored_file(policy, demo_model_path, tmp_path_factory):
    """A best-of-4 file from the demo policy and demo RM under steerlm-70b weights."""
    from steer_reward.reward import SteerReward

    reward = SteerReward.from_config("configs/rewards/steerlm-70b.yaml", model=demo_model_path)
    sampler = PolicySampler(*policy, SamplingConfig(n=4, max_new_tokens=10, seed=3))
    path = tmp_path_factory.mktemp("bon") / "scored.jsonl"
    with path.open("w") as out:
        for row in best_of_n_rows(reward, sampler, ROWS, progress=False):
            out.write(json.dumps(row) + "\n")
    return path


def test_sampling_is_seeded_and_uses_the_policy_chat_template(policy):
    model, tokenizer = policy
    sampler = PolicySampler(model, tokenizer, SamplingConfig(n=3, max_new_tokens=6, seed=11))
    first, again = sampler.sample("Say hi.", 0), sampler.sample("Say hi.", 0)
    assert first == again and len(first) == 3 and all(1 <= len(c) <= 6 for c in first)
    assert sampler.sample("Say hi.", 1) != first  # prompt index enters the seed
    ids = sampler.prompt_ids("Say hi.")
    assert tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids.count(tokenizer.bos_token_id) == 1


def test_rows_hold_every_candidate_and_the_best(scored_file, demo_model_path):
    from steer_reward.reward import SteerReward

    reward = SteerReward.from_config("configs/rewards/steerlm-70b.yaml", model=demo_model_path)
    rows = [json.loads(line) for line in scored_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    for row in rows:
        candidates = row["candidates"]
        assert len(candidates) == 4 and row["schema"] == "steerlm9" and len(row["attribute_names"]) == 9
        rewards = [c["reward"] for c in candidates]
        assert row["chosen"] == rewards.index(max(rewards)) and row["chosen_text"] == candidates[row["chosen"]]["text"]
        again = reward.score([row["prompt"]] * 4, [c["text"] for c in candidates])
        for c, attributes in zip(candidates, again.attributes.to_dicts()):
            assert c["attributes"] == pytest.approx(attributes, abs=1e-5)
        assert again.rewards.tolist() == pytest.approx(rewards, abs=1e-5)


def test_reselect_agrees_with_scoring_from_scratch(scored_file, demo_model_path):
    from steer_reward.reward import SteerReward

    scored = load_scored(scored_file)
    rows = [json.loads(line) for line in scored_file.read_text().splitlines()]
    for selection in compare(scored, CONFIGS):
        if selection.name == "correctness-first":
            continue  # running normalization over the file's own statistics: checked below
        fresh = SteerReward.from_config(CONFIGS[selection.name], model=demo_model_path)
        for row, group, chosen in zip(rows, scored.groups, selection.chosen):
            texts = [c["text"] for c in row["candidates"]]
            lengths = [c["completion_tokens"] for c in row["candidates"]]
            rewards = fresh.score([row["prompt"]] * len(texts), texts, lengths=lengths).rewards
            assert selection.rewards[group.start:group.stop].float().tolist() == pytest.approx(rewards.tolist(),
                                                                                              abs=1e-5)
            assert chosen == int(rewards.argmax())


def test_reselect_running_normalization_uses_the_files_statistics(scored_file):
    from steer_reward.config import load_config
    from steer_reward.shaping import RewardShaper

    scored = load_scored(scored_file)
    (selection,) = compare(scored, {"c": CONFIGS["correctness-first"]})
    shaper = RewardShaper(scored.schema, load_config(CONFIGS["correctness-first"]).shaping)
    shaper.attribute_stats.update(scored.values)
    shaper.reward_stats.update(shaper(scored.values, scored.lengths)[:, None])  # reward stats of the same pass
    assert selection.rewards.tolist() == pytest.approx(shaper(scored.values, scored.lengths).tolist(), abs=1e-5)


def test_reselect_cli_runs_no_model(scored_file, tmp_path, monkeypatch, capsys):
    """Zero forwards: every nn.Module call is counted, and loading any model would fail."""
    import transformers

    import steer_reward.modeling

    calls = []
    original_call = torch.nn.Module.__call__
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda self, *a, **k: calls.append(self) or
                        original_call(self, *a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("reselect must not load a model")

    monkeypatch.setattr(steer_reward.modeling, "load_reward_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    plot = tmp_path / "picks.png"
    argv = ["reselect", "--scored", str(scored_file), "--plot", str(plot)]
    for path in CONFIGS.values():
        argv += ["--config", path]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "file's choice" in out and "concise" in out and "3/3" in out
    assert plot.is_file() and plot.stat().st_size > 1000


def test_reselect_reports_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    assert main(["reselect", "--scored", str(bad), "--config", CONFIGS["concise"]]) == 2
    assert "best-of-n" in capsys.readouterr().err


def test_best_of_n_cli_demo(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["best-of-n", "--policy", "demo", "--model", "demo", "--config", "configs/rewards/steerlm-70b.yaml",
                 "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "5", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "RANDOM" in err and "policy" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["candidates"]) == 3 for r in rows)
    assert main(["best-of-n", "--policy", "demo", "--model", "demo", "--prompts", str(prompts), "--n", "0",
                 "--output", str(out)]) == 2
