"""``model.device_map``: the model placed by Hugging Face/Accelerate instead of moved to one device. On CPU, "auto"
and an explicit map of every module to "cpu" take the loading path of a multi-GPU map (the loader must not move
the model afterwards); every batching strategy must still give the scores of a plain forward of each sequence
alone. A map over several GPUs also runs Accelerate's hooks, which move activations between devices: the pooling
code reads the last hidden state on the device it comes out on (not tested here: no GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import plain_hf_attributes
from steer_reward.config import ConfigError, load_config
from steer_reward.modeling import ModelLoadError

pytest.importorskip("accelerate")

PROMPTS = ["What is the capital of France?", "What is the capital of France?", "Name a prime.",
           [{"role": "user", "content": "Tell me a joke."}]]
COMPLETIONS = ["Paris.", "It is Paris, a city on the Seine.", "7", "No."]


def _per_module_map(model_path: str) -> dict:
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    return {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(layers)},
            "model.norm": "cpu", "model.rotary_emb": "cpu", "score": "cpu"}


@pytest.mark.parametrize("strategy", ["padded", "prefix", "packed"])
@pytest.mark.parametrize("device_map", ["auto", "per-module"])
def test_device_map_scores_equal_a_plain_forward(demo_model_path, device_map, strategy):
    from transformers import AutoModelForSequenceClassification

    from steer_reward.scoring import AttributeScorer

    mapping = _per_module_map(demo_model_path) if device_map == "per-module" else device_map
    scorer = AttributeScorer.from_config(load_config({
        "model": {"path": demo_model_path, "device_map": mapping}, "batching": {"strategy": strategy}}))
    assert scorer.backend.strategy == strategy
    plain = AutoModelForSequenceClassification.from_pretrained(demo_model_path, dtype=torch.float32).eval()
    samples = scorer.encode(PROMPTS, COMPLETIONS)
    expected = torch.stack([plain_hf_attributes(plain, s.input_ids) for s in samples])
    torch.testing.assert_close(scorer.score_encoded(samples).values, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("value", [5, [], {}, ""])
def test_a_device_map_that_is_not_one_is_a_clear_error(demo_model_path, value):
    from steer_reward.modeling import load_reward_model

    with pytest.raises(ModelLoadError, match="model.device_map"):
        load_reward_model(load_config({"model": {"path": demo_model_path, "device_map": value}}).model)


def test_device_map_with_zero3_is_a_config_error(demo_model_path):
    from steer_reward.backends.deepspeed import build_deepspeed_scorer

    config = load_config({"backend": "deepspeed", "model": {"path": demo_model_path, "device_map": "auto"}})
    with pytest.raises(ConfigError, match="device_map"):
        build_deepspeed_scorer(config)


def test_device_map_keeps_the_score_bias_of_a_converted_checkpoint(demo_model_path, tmp_path):
    """A folder whose config.json says the head has a bias (``steer-reward convert-nemo`` writes them; the 70B
    SteerLM RM is one): the restored biased head sits where the map put the old one and the scores equal the
    single-device load."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from steer_reward.scoring import AttributeScorer

    folder = tmp_path / "biased"
    shutil.copytree(demo_model_path, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["score.bias"] = torch.linspace(-1.0, 1.0, weights["score.weight"].shape[0])
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["steer_reward"] = {"score_bias": True}
    (folder / "config.json").write_text(json.dumps(config))

    plain = AttributeScorer.from_config(load_config({"model": {"path": str(folder), "device": "cpu"}}))
    mapped = AttributeScorer.from_config(load_config({"model": {"path": str(folder),
                                                                "device_map": _per_module_map(str(folder))}}))
    torch.testing.assert_close(mapped.model.score.bias.detach(), weights["score.bias"])
    torch.testing.assert_close(mapped.score(PROMPTS, COMPLETIONS).values, plain.score(PROMPTS, COMPLETIONS).values,
                               atol=1e-5, rtol=1e-5)
