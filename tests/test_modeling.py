"""Loading: clear errors for bad folders, custom `.rewards` models, pickle opt-in, PEFT adapters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForSequenceClassification, LlamaForCausalLM,
                          LlamaForSequenceClassification, PretrainedConfig, PreTrainedModel)
from transformers.utils import ModelOutput

from steer_reward.config import ModelConfig
from steer_reward.modeling import ModelLoadError, load_reward_model
from steer_reward.reward import SteerReward
from steer_reward.schema import SchemaError


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*--model demo"):
        load_reward_model(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_reward_model(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="set model.path"):
        load_reward_model(ModelConfig(path=None))


def test_folder_without_a_sequence_classification_head(tmp_path, demo_model_path):
    from steer_reward.demo import _llama_config, build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    LlamaForCausalLM(_llama_config(tokenizer, architectures=["LlamaForCausalLM"])).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a sequence-classification reward model"):
        load_reward_model(ModelConfig(path=str(tmp_path)))


def test_head_size_not_matching_the_schema(tmp_path, demo_model_path):
    from steer_reward.demo import _llama_config, build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=5))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SchemaError, match="head has 5 outputs but schema 'steerlm9' expects 9"):
        SteerReward.from_config({"model": {"path": str(tmp_path), "schema": "steerlm9"}})
    with pytest.raises(SchemaError, match="cannot tell what the 5 outputs"):
        SteerReward.from_config({"model": {"path": str(tmp_path)}})


def test_pickle_weights_need_opt_in(tmp_path, demo_model_path):
    model = LlamaForSequenceClassification.from_pretrained(demo_model_path)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_reward_model(ModelConfig(path=str(tmp_path)))
    loaded, _, _ = load_reward_model(ModelConfig(path=str(tmp_path), allow_pickle=True))
    torch.testing.assert_close(loaded.score.weight, model.score.weight)


def test_unknown_attribute_in_weights_is_a_clear_error(demo_model_path):
    with pytest.raises(SchemaError, match="did you mean 'correctness'"):
        SteerReward.from_config({"model": {"path": demo_model_path}, "shaping": {"weights": {"corectness": 1}}})


class TinyArmoConfig(PretrainedConfig):
    model_type = "tiny-armo-test"

    def __init__(self, vocab_size=2048, hidden_size=16, num_objectives=4, **kwargs):
        self.vocab_size, self.hidden_size, self.num_objectives = vocab_size, hidden_size, num_objectives
        super().__init__(**kwargs)


@dataclass
class TinyArmoOutput(ModelOutput):
    rewards: torch.Tensor | None = None
    score: torch.Tensor | None = None


class TinyArmoForSequenceClassification(PreTrainedModel):
    """ArmoRM-shaped: per-objective `rewards` [B, K] from a linear head, a gated scalar `score`; no `.logits`."""

    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids).cumsum(1)
        last = (attention_mask.sum(1) - 1) if attention_mask is not None else torch.full(
            (input_ids.shape[0],), input_ids.shape[1] - 1)
        pooled = hidden[torch.arange(input_ids.shape[0]), last]
        rewards = self.regression_layer(pooled)
        score = (rewards * torch.softmax(self.gating(pooled), -1)).sum(-1)
        return TinyArmoOutput(rewards=rewards, score=score)


def test_custom_model_with_rewards_output(tmp_path, demo_model_path):
    AutoConfig.register("tiny-armo-test", TinyArmoConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(TinyArmoConfig, TinyArmoForSequenceClassification, exist_ok=True)
    torch.manual_seed(0)
    labels = {0: "helpfulness", 1: "correctness", 2: "safety", 3: "verbosity"}
    model = TinyArmoForSequenceClassification(TinyArmoConfig(id2label=labels, label2id={v: k for k, v in labels.items()},
                                                             num_labels=4))
    model.config.architectures = ["TinyArmoForSequenceClassification"]
    model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(tmp_path)
    reward = SteerReward.from_config({"model": {"path": str(tmp_path)},
                                      "shaping": {"weights": {"helpfulness": 1, "verbosity": -0.5}}})
    assert reward.schema.names == ("helpfulness", "correctness", "safety", "verbosity")
    prompts, completions = ["a question", "another, longer question"], ["short", "a much longer answer here"]
    scored = reward.score(prompts, completions)
    for i, sample in enumerate(reward.scorer.encode(prompts, completions)):
        with torch.no_grad():
            expected = model(torch.tensor([sample.input_ids])).rewards[0]
        torch.testing.assert_close(scored.attributes.values[i], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.rewards, scored.attributes.values[:, 0] - 0.5 * scored.attributes.values[:, 3])


def test_peft_adapter_is_merged_at_load(tmp_path, demo_model_path):
    peft = pytest.importorskip("peft")
    base = LlamaForSequenceClassification.from_pretrained(demo_model_path)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     task_type="SEQ_CLS", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    reward = SteerReward.from_config({"model": {"path": demo_model_path, "adapter": str(tmp_path / "adapter")}})
    (sample,) = reward.scorer.encode(["Hi"], ["Hello"])
    with torch.no_grad():
        expected = lora(torch.tensor([sample.input_ids])).logits[0]
    got = reward.scorer.score(["Hi"], ["Hello"]).values[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    unadapted = SteerReward.from_config({"model": {"path": demo_model_path}}).scorer.score(["Hi"], ["Hello"]).values[0]
    assert not torch.allclose(got, unadapted, atol=1e-4)  # the adapter changed something
    with pytest.raises(ModelLoadError, match="adapter folder"):
        SteerReward.from_config({"model": {"path": demo_model_path, "adapter": str(tmp_path / "missing")}})
