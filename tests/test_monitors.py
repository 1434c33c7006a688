"""Length monitors: per-batch Spearman correlations with completion length, the server's rolling window, the
alarm and its driver attribute, and RewardMonitorCallback on logged values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import spearmanr

from steer_reward.monitors import (
    LengthCorrelationAlarm,
    LengthCorrelationWindow,
    RewardMonitorCallback,
    length_correlations,
    log_length_correlations,
)
from steer_reward.schema import STEERLM9

NAMES = list(STEERLM9.live_names)  # helpfulness, correctness, coherence, complexity, verbosity


def batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lengths with ties, rewards tracking length, attributes (n, 9) with verbosity = length + noise)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=g)
    attributes = torch.randn(n, 9, generator=g, dtype=torch.float64)
    attributes[:, STEERLM9.index("verbosity")] = lengths.double() + torch.randn(n, generator=g, dtype=torch.float64)
    rewards = 0.1 * lengths.double() + torch.randn(n, generator=g, dtype=torch.float64)
    return lengths, rewards, attributes


def test_correlations_match_scipy():
    lengths, rewards, attributes = batch()
    live = attributes[:, list(STEERLM9.live)]
    penalty = (lengths.double() - 10).clamp(min=0)
    got = length_correlations(lengths, rewards, live, NAMES, penalty)
    assert list(got) == ["reward", *NAMES, "length_penalty"]
    assert got["reward"] == pytest.approx(spearmanr(rewards, lengths)[0], abs=1e-12)
    for k, name in enumerate(NAMES):
        assert got[name] == pytest.approx(spearmanr(live[:, k], lengths)[0], abs=1e-12)
    assert got["length_penalty"] == pytest.approx(spearmanr(-penalty, lengths)[0], abs=1e-12)  # the term: −penalty
    assert got["verbosity"] > 0.9
    assert length_correlations([4, 4, 4], [1.0, 2.0, 3.0]) == {"reward": 0.0}  # constant length: 0, not nan


def test_log_length_correlations_sends_live_series_and_skips_nan():
    lengths, rewards, attributes = batch()
    logged = {}
    out = log_length_correlations(lambda k, v: logged.__setitem__(k, v), "steer_reward", lengths, rewards,
                                  attributes, STEERLM9)
    assert set(logged) == {f"steer_reward/length_spearman/{s}" for s in ["reward", *NAMES]}
    assert logged["steer_reward/length_spearman/reward"] == out["reward"]
    logged.clear()
    log_length_correlations(lambda k, v: logged.__setitem__(k, v), "rm", [5], [1.0], attributes[:1], STEERLM9)
    assert logged == {}  # one sample: no correlation, nothing sent (TRL would average a nan in)


def test_window_keeps_the_last_samples():
    lengths, rewards, attributes = batch(100)
    live = attributes[:, list(STEERLM9.live)]
    window = LengthCorrelationWindow(NAMES, window=40)
    assert all(math.isnan(v) for v in window.correlations().values())
    for i in range(0, 100, 7):  # uneven request sizes
        window.add(lengths[i:i + 7], rewards[i:i + 7], live[i:i + 7])
    assert len(window) == 40
    expected = length_correlations(lengths[60:], rewards[60:], live[60:], NAMES)
    assert window.correlations() == pytest.approx(expected, abs=1e-12)
    window.add([1000], [1000.0], live[:1])
    assert window.correlations() != pytest.approx(expected, abs=1e-12)  # recomputed after new samples


def test_alarm_fires_once_after_patience_and_resets_on_a_dip():
    alarm = LengthCorrelationAlarm(threshold=0.3, patience=3)
    seq = [0.5, 0.6, 0.1, 0.5, 0.5, float("nan"), 0.5, 0.5, 0.3]  # 0.3 is not above 0.3
    assert [alarm.update({"reward": v}) for v in seq] == [None] * 9  # never 3 in a row
    fired = [alarm.update({"reward": 0.8, "verbosity": 0.9}, step=s) for s in range(6)]
    assert fired[:2] == [None, None] and fired[3:] == [None] * 3
    assert "above 0.3 for 3 logged steps (step 2), now 0.80" in fired[2] and "'verbosity'" in fired[2]


def test_driver_weighs_correlations_by_the_shaping_weights():
    correlations = {"reward": 0.7, "helpfulness": 0.5, "verbosity": 0.9, "correctness": 0.1}
    weights = STEERLM9.weight_dict("steerlm-70b")  # verbosity weighs −0.4: it pulls the reward away from length
    assert LengthCorrelationAlarm(weights=weights).driver(correlations) == ("helpfulness", 0.5)
    assert LengthCorrelationAlarm().driver(correlations) == ("verbosity", 0.9)  # no weights: the largest ρ
    with_penalty = {**correlations, "length_penalty": 0.95}
    assert LengthCorrelationAlarm(weights=weights).driver(with_penalty) == ("length_penalty", 0.95)


def test_callback_reads_logged_correlations_per_reward_function(caplog):
    callback = RewardMonitorCallback(threshold=0.3, patience=2, weights=STEERLM9.weight_dict("steerlm-70b"))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    logs = [{"loss": 1.0, "steer_reward/length_spearman/reward": 0.9, "steer_reward/length_spearman/complexity": 0.8,
             "steer_reward/length_spearman/verbosity": 0.95, "other/length_spearman/reward": 0.1}] * 4
    with caplog.at_level("WARNING", logger="steer_reward.monitors"):
        for step, row in enumerate(logs, start=1):
            state.global_step = step
            callback.on_log(None, state, None, logs=row)
    assert len(callback.warnings) == 1 and callback.warnings[0].startswith("steer_reward: ")
    assert "(step 2)" in callback.warnings[0] and "'complexity'" in callback.warnings[0]
    assert [r.getMessage() for r in caplog.records] == callback.warnings
    quiet = RewardMonitorCallback(threshold=0.3, patience=1)
    quiet.on_log(None, SimpleNamespace(global_step=1, is_world_process_zero=False), None, logs=logs[0])
    assert quiet.warnings == []  # only the main process warns
    with pytest.raises(ValueError, match="patience"):
        RewardMonitorCallback(patience=0)


def test_callback_takes_weights_from_a_reward(make_reward):
    reward = make_reward({"weights": "nemotron-340b"})
    assert RewardMonitorCallback(reward=reward).weights == STEERLM9.weight_dict("nemotron-340b")
    assert RewardMonitorCallback(reward=reward.for_trl()).weights == STEERLM9.weight_dict("nemotron-340b")
    funcs, _ = reward.trl_attribute_funcs()
    assert RewardMonitorCallback(reward=funcs[0]).weights == STEERLM9.weight_dict("nemotron-340b")


@pytest.mark.slow
@pytest.mark.parametrize("per_attribute", [False, True])
def test_grpo_run_logs_length_correlations_and_warns_on_a_length_tracking_reward(per_attribute, demo_policy_path,
                                                                                 make_reward, tmp_path):
    """A real GRPOTrainer run (the tiny recipe of test_trl) whose reward is made to track length: a negative
    length penalty (+5 per token past the first). The correlations appear in the logs every step and the callback
    warns once, naming the length penalty's term as the driver."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(demo_policy_path)
    policy = AutoModelForCausalLM.from_pretrained(demo_policy_path)
    # Many stop tokens, so the random policy's completions end at different lengths (1 to 8 tokens).
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(100, 400)]
    reward = make_reward({"weights": "steerlm-70b", "length_penalty": {"alpha": -5.0, "target_tokens": 1}})
    if per_attribute:
        funcs, weights = reward.trl_attribute_funcs(policy_pad_token_id=tokenizer.pad_token_id)
        prefix = "steer_reward"
    else:
        funcs, weights = [reward.for_trl(policy_pad_token_id=tokenizer.pad_token_id)], None
        prefix = funcs[0].__name__
    callback = RewardMonitorCallback(threshold=0.3, patience=2, reward=reward)
    prompts = [[{"role": "user", "content": t}] for t in ("Say hi.", "Name a color.", "Count to three.", "Why?")]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), use_cpu=True, max_steps=3, per_device_train_batch_size=8,
                          num_generations=4, max_completion_length=8, logging_steps=1, report_to="none",
                          save_strategy="no", reward_weights=weights, seed=0, learning_rate=1e-5)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=funcs, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts * 4}), callbacks=[callback])
    trainer.train()
    logs = [row for row in trainer.state.log_history if f"{prefix}/length_spearman/reward" in row]
    assert len(logs) == 3
    for row in logs:
        assert row[f"{prefix}/length_spearman/reward"] > 0.3
        assert row[f"{prefix}/length_spearman/length_penalty"] == pytest.approx(1.0)  # −penalty = 5·(len − 1)
        for name in NAMES:
            assert -1.0 <= row[f"{prefix}/length_spearman/{name}"] <= 1.0
    assert len(callback.warnings) == 1
    assert callback.warnings[0].startswith(f"{prefix}: ") and "'length_penalty'" in callback.warnings[0]
    assert "(step 2)" in callback.warnings[0]


def test_server_exposes_length_correlations_of_the_samples_it_served(demo_model_path):
    """/metrics gauges equal the correlations of every sample served (under the server's weights, also for a
    request that asked for other weights)."""
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from steer_reward.reward import SteerReward
    from steer_reward.server.app import create_app

    reward = SteerReward.from_config({"model": {"path": demo_model_path, "device": "cpu"},
                                      "shaping": {"weights": "steerlm-70b"}})
    prompts = ["Say hi.", "Name a color.", "Why?", "Count to three.", "Say hi.", "Why?"]
    completions = ["Hi", "Blue, the colour of the sky on a clear day.", "Because it is.",
                   "One, two, three, and then four, five, six, seven.", "Hello there, nice to meet you!", "No."]
    with TestClient(create_app(reward)) as client:
        assert client.post("/score", json={"prompts": prompts[:4], "completions": completions[:4]}).status_code == 200
        assert client.post("/score", json={"prompts": prompts[4:], "completions": completions[4:],
                                           "preset": "helpfulness"}).status_code == 200
        text = client.get("/metrics").text
    gauges = {}
    for line in text.splitlines():
        if line.startswith("steer_reward_length_spearman{"):
            series = line.split('series="')[1].split('"')[0]
            gauges[series] = float(line.rsplit(" ", 1)[1])
    expected_scores = reward.score(prompts, completions)
    live = list(STEERLM9.live)
    expected = length_correlations(expected_scores.attributes.completion_lengths, expected_scores.rewards,
                                   expected_scores.attributes.values[:, live], NAMES)
    assert set(gauges) == {"reward", *NAMES}
    assert gauges == pytest.approx(expected, abs=1e-6)
