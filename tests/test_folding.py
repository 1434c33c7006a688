"""Folded one-output head: parity with the shaped reward, TRL's get_reward contract, OpenRLHF's own reward loader,
and what export-folded tells OpenRLHF users."""

from __future__ import annotations

import json

import pytest
import torch

from steer_reward.config import ConfigError
from steer_reward.folding import FOLDED_METADATA_KEY, export_folded, fold_head

PROMPTS = ["What is the capital of France?", "Name a prime number.", "Write a haiku about rain.",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]]
COMPLETIONS = ["Paris.", "Seven is prime, and so is eleven.", "Soft rain on the roof / the gutters hum",
               "Rayleigh scattering."]


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"helpfulness": {"mean": 0.3, "std": 0.7}, "correctness": {"mean": -0.2, "std": 1.9},
                                "verbosity": {"mean": 0.1, "std": 0.4}}))
    return str(path)


def _ids_batch(reward):
    samples = reward.scorer.encode(PROMPTS, COMPLETIONS)
    return samples, [list(s.input_ids) for s in samples]


def _right_pad(rows, pad_id):
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


SHAPINGS = {
    "preset": {"weights": "steerlm-70b"},
    "fixed+decorrelate+bias": {"weights": {"helpfulness": 0.7, "correctness": 1.0, "verbosity": -0.3},
                               "decorrelate": {"helpfulness": 0.25, "correctness": 0.1},
                               "normalization": "fixed", "bias": 0.5},
}


@pytest.mark.parametrize("case", list(SHAPINGS))
def test_folded_checkpoint_matches_shaped_reward(case, make_reward, stats_file, tmp_path):
    from transformers import AutoModelForSequenceClassification

    shaping = dict(SHAPINGS[case])
    if shaping.get("normalization") == "fixed":
        shaping["stats_file"] = stats_file
    reward = make_reward(shaping)
    expected = reward.score(PROMPTS, COMPLETIONS).rewards.double()
    folded = export_folded(reward, tmp_path / "folded")
    if case == "preset":
        assert folded.offset == 0.0  # Llama heads have no bias and nothing else adds a constant
    else:
        assert folded.offset != 0.0

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "folded").eval()
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1 and model.score.bias is None
    assert model.config.mean == pytest.approx(-folded.offset) and model.config.std == 1.0
    assert getattr(model.config, FOLDED_METADATA_KEY)["reward_offset"] == pytest.approx(folded.offset)
    samples, rows = _ids_batch(reward)
    with torch.no_grad():  # plain HF forward, one unpadded sequence at a time
        logits = torch.stack([model(torch.tensor([row])).logits[0, 0] for row in rows]).double()
    torch.testing.assert_close(logits + folded.offset, expected, atol=1e-4, rtol=0)
    # the in-memory model is untouched by the export
    assert reward.scorer.model.score.weight.shape[0] == 9 and reward.scorer.model.config.num_labels == 9
    torch.testing.assert_close(reward.score(PROMPTS, COMPLETIONS).rewards.double(), expected)


def test_get_reward_contract_reads_the_same_values(make_reward, tmp_path):
    """PPO's reward read (trl.experimental.utils.get_reward): backbone → model.score → value at the last
    non-pad token of right-padded policy ids."""
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.utils import get_reward

    reward = make_reward({"weights": "nemotron-340b"})
    expected = reward.score(PROMPTS, COMPLETIONS).rewards.double()
    folded = export_folded(reward, tmp_path / "folded")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "folded").eval()
    samples, rows = _ids_batch(reward)
    pad = reward.scorer.tokenizer.pad_token_id
    context_length = min(len(s.prompt_ids) for s in samples)
    with torch.no_grad():
        reward_logits, final_rewards, _ = get_reward(model, _right_pad(rows, pad), pad, context_length)
    assert reward_logits.shape[-1] == 1
    torch.testing.assert_close(final_rewards.double() + folded.offset, expected, atol=1e-4, rtol=0)


def test_openrlhf_loader_reads_the_folded_head_without_normalization(make_reward, stats_file, tmp_path):
    """OpenRLHF 0.11.2's own reward loader (openrlhf/models/model.py get_llm_for_sequence_regression, bf16 as
    OpenRLHF runs it, reward normalization off as export-folded tells users): the reward is the shaped reward
    minus the constant c, to bf16 precision."""
    from openrlhf_harness import OPENRLHF_DIR, ModuleSwap, load_reward_model_loader

    if OPENRLHF_DIR is None:
        pytest.skip("openrlhf is not installed")
    shaping = {"weights": "steerlm-70b", "normalization": "fixed", "stats_file": stats_file, "bias": -1.25}
    reward = make_reward(shaping)
    expected = reward.score(PROMPTS, COMPLETIONS).rewards.double()
    folded = export_folded(reward, tmp_path / "folded")
    assert folded.offset != 0.0
    swap = ModuleSwap()
    try:
        loader = load_reward_model_loader(swap)
        model = loader.get_llm_for_sequence_regression(str(tmp_path / "folded"), "reward", param_dtype="bf16",
                                                       normalize_reward=False, attn_implementation="eager").eval()
    finally:
        swap.restore()
    samples, rows = _ids_batch(reward)
    input_ids = _right_pad(rows, reward.scorer.tokenizer.pad_token_id)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        values = model(input_ids, attention_mask=attention_mask).double()
    torch.testing.assert_close(values + folded.offset, expected, atol=3e-2, rtol=0)  # bf16, not 1e-6


@pytest.mark.parametrize("shaping, message", [
    ({"normalization": "running"}, "running"),
    ({"length_penalty": {"alpha": 1.0}}, "length_penalty"),
    ({"reward_normalization": "running"}, "reward_normalization"),
    ({"clip": [-1, 1]}, "clip"),
])
def test_refuses_what_does_not_fold(make_reward, shaping, message):
    with pytest.raises(ConfigError, match=message):
        fold_head(make_reward(shaping))


def test_export_folded_cli(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from steer_reward.cli import main

    out = tmp_path / "folded"
    assert main(["export-folded", "--model", "demo", "--config", "configs/rewards/nemotron-340b.yaml",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "logits[:, 0] + 0" in printed
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    # OpenRLHF's reward normalization reads uninitialized buffers under transformers 5.x (without ZeRO-3): the
    # command says to keep it off, on screen, in config.json and in a README next to the checkpoint
    notes = json.loads((out / "config.json").read_text())[FOLDED_METADATA_KEY]["openrlhf"]
    readme = (out / "README.md").read_text()
    for text in (printed, " ".join(notes), readme):
        assert "normalization OFF" in text and "--reward.normalize_enable" in text and "bf16" in text
    out = tmp_path / "folded-bias"
    assert main(["export-folded", "--model", "demo", "--config", "configs/rewards/nemotron-340b.yaml",
                 "--set", "shaping.bias=0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shaped reward - c" in printed and "group_norm" in printed and "steer-reward serve" in printed
    assert main(["export-folded", "--model", "demo", "--config", "configs/rewards/concise.yaml",
                 "--out", str(tmp_path / "no")]) == 2
    assert "length_penalty" in capsys.readouterr().err
