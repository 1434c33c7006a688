"""Rotary types whose frequencies follow the longest position of a forward (Transformers' ``dynamic`` and
``longrope``): a sample's score must not depend on which other samples share its forward."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import plain_hf_attributes
from steer_reward.backends.local import LocalBackend
from steer_reward.config import BatchingConfig
from steer_reward.formatting import EncodedSample
from steer_reward.forward import find_head
from steer_reward.planning import plan_microbatches, rope_alone_from
from steer_reward.prefix_sharing import prefix_sharing_unsupported
from test_fastpath import PAD, TOL, VOCAB, ids

ORIGINAL = 64
ROPES = {
    "dynamic": dict(max_position_embeddings=ORIGINAL, rope_parameters={"rope_type": "dynamic", "factor": 4.0}),
    "longrope": dict(max_position_embeddings=4 * ORIGINAL, rope_parameters={
        "rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
        "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}),
}


def rope_model(kind: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_labels=9,
                                  pad_token_id=PAD, head_dim=16, **ROPES[kind])
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize("strategy", ["auto", "padded", "prefix", "packed"])
def test_scores_do_not_depend_on_batch_mates_beyond_the_original_context(kind, strategy):
    model = rope_model(kind)
    rng = random.Random(1)
    prompt = ids(rng, 30)
    # Shared-prompt samples well inside the original context, and one sequence past it.
    samples = [EncodedSample(prompt, ids(rng, rng.randint(3, 12))) for _ in range(3)] + [
        EncodedSample(ids(rng, 20), ids(rng, 2 * ORIGINAL)), EncodedSample((), ids(rng, 20))]
    expected = torch.stack([plain_hf_attributes(model, s.input_ids) for s in samples])
    if strategy in ("prefix", "packed"):
        with pytest.warns(UserWarning, match="longest position"):
            backend = LocalBackend(model, PAD, BatchingConfig(strategy=strategy))
    else:
        backend = LocalBackend(model, PAD, BatchingConfig(strategy=strategy))
    assert backend.strategy == "padded"
    torch.testing.assert_close(backend.attributes(samples), expected, **TOL)


def test_rope_alone_from_reads_the_rotary_type():
    assert rope_alone_from(rope_model("dynamic").config) == ORIGINAL
    assert rope_alone_from(rope_model("longrope").config) == ORIGINAL + 1
    from test_fastpath import tiny_model

    model = tiny_model()
    assert rope_alone_from(model.config) is None and prefix_sharing_unsupported(model, find_head(model)) is None
    assert rope_alone_from(type("Config", (), {})()) is None  # custom code without rotary settings
    assert "longest position" in prefix_sharing_unsupported(rope_model("longrope"), find_head(rope_model("longrope")))


def test_sequences_from_the_limit_on_run_alone():
    lengths = [10, 70, 64, 63, 5, 80]
    plan = plan_microbatches(lengths, max_tokens=4096, max_batch_size=8, alone_from=64)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert all(len(batch) == 1 for batch in plan if any(lengths[i] >= 64 for i in batch))
    assert [5, 10, 63] == sorted(lengths[i] for batch in plan if len(batch) > 1 for i in batch)
