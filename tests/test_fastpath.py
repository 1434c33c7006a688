"""Fast paths (prefix sharing, packing, min-padding planning) against a plain HF forward of each sequence alone."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from conftest import plain_hf_attributes
from steer_reward.backends.local import LocalBackend
from steer_reward.config import BatchingConfig, ConfigError, load_config
from steer_reward.formatting import EncodedSample
from steer_reward.forward import find_head
from steer_reward.packing import block_causal_mask, pack_rows
from steer_reward.planning import plan_microbatches, plan_min_padding
from steer_reward.prefix_sharing import group_by_prompt, prefix_sharing_unsupported

VOCAB, PAD = 300, 299
TOL = dict(atol=1e-4, rtol=0)


def tiny_model(model_type: str = "llama", attention: str = "sdpa") -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=9, pad_token_id=PAD,
        max_position_embeddings=2048, head_dim=16,
    )
    if model_type == "mistral":
        config.sliding_window = None
    config._attn_implementation = attention
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention).eval()


def ids(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(PAD) for _ in range(n))


def group_workload(seed: int = 0) -> list[EncodedSample]:
    """Mixed group sizes, groups of 1, a prompt that is a prefix of another, empty completions, shuffled so
    duplicates are not adjacent."""
    rng = random.Random(seed)
    base = ids(rng, 40)
    prompts = [base, base[:25], ids(rng, 7), ids(rng, 60), (5,)]
    sizes = [4, 3, 1, 2, 2]
    samples = [EncodedSample(p, ids(rng, rng.randint(0 if k == 1 else 1, 30)))
               for p, size in zip(prompts, sizes) for k in range(size)]
    samples.append(EncodedSample(prompts[0], ()))
    rng.shuffle(samples)
    return samples


def reference(model: nn.Module, samples) -> torch.Tensor:
    return torch.stack([plain_hf_attributes(model, s.input_ids) for s in samples])


@pytest.mark.parametrize("strategy", ["auto", "prefix", "packed", "padded"])
def test_every_strategy_matches_plain_forward_in_input_order(strategy):
    model = tiny_model()
    samples = group_workload()
    backend = LocalBackend(model, PAD, BatchingConfig(strategy=strategy, max_row_tokens=96, max_tokens=256,
                                                            forward_overhead_tokens=0))
    assert backend.strategy == strategy
    torch.testing.assert_close(backend.attributes(samples), reference(model, samples), **TOL)
    # plan() lists exactly the forwards attributes() runs, and covers every sample.
    plan = backend.plan(samples)
    assert backend.forward_calls == len(plan)
    assert sorted({i for batch in plan for i in batch}) == list(range(len(samples)))


@pytest.mark.parametrize("model_type,attention", [("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa")])
def test_prefix_sharing_on_other_supported_architectures(model_type, attention):
    model = tiny_model(model_type, attention)
    assert prefix_sharing_unsupported(model, find_head(model)) is None
    samples = group_workload(seed=1)
    for strategy in ("prefix", "packed"):
        got = LocalBackend(model, PAD, BatchingConfig(strategy=strategy)).attributes(samples)
        torch.testing.assert_close(got, reference(model, samples), **TOL)


def test_prefix_sharing_runs_each_prompt_once():
    model = tiny_model()
    rng = random.Random(2)
    prompts = [ids(rng, 50) for _ in range(3)]
    samples = [EncodedSample(p, ids(rng, rng.randint(1, 20))) for p in prompts for _ in range(8)]
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="auto"))
    backend.attributes(samples)
    # One prefill per prompt plus at least one completion batch per prompt.
    assert 6 <= backend.forward_calls == len(backend.plan(samples)) <= 3 + 24
    assert sum(1 for batch in backend.plan(samples) if len(batch) == 8) >= 3  # the three prefills
    torch.testing.assert_close(backend.attributes(samples), reference(model, samples), **TOL)


def test_auto_shares_a_prompt_only_when_it_saves_more_than_the_extra_forwards():
    model = tiny_model()
    rng = random.Random(4)
    short, long = ids(rng, 10), ids(rng, 200)
    samples = [EncodedSample(short, ids(rng, 5)) for _ in range(3)] + [EncodedSample(long, ids(rng, 5))
                                                                      for _ in range(3)]
    backend = LocalBackend(model, PAD, BatchingConfig(forward_overhead_tokens=128))
    plan = backend.plan(samples)
    # The long prompt (2 × 200 tokens saved) is prefilled once; the short one (2 × 10) rides in a padded batch.
    assert [3, 4, 5] in plan and all(set(batch) <= {0, 1, 2} for batch in plan if not set(batch) & {3, 4, 5})
    torch.testing.assert_close(backend.attributes(samples), reference(model, samples), **TOL)


def test_left_truncated_prompts_match(demo_scorer):
    """Prompts cut from the left by the formatter (the cut depends on the completion's length, so equal-length
    completions share a truncated prompt and others do not) still score exactly."""
    from steer_reward.formatting import RewardFormatter

    formatter = RewardFormatter(demo_scorer.tokenizer, max_length=48)
    long_prompt = "Explain the history of the printing press in detail, " * 8
    samples = formatter.encode([long_prompt] * 4 + ["Hi"], ["Short.", "Short.", "A longer answer, more words.", "",
                                                           "Yo"])
    assert all(s.prompt_truncated > 0 for s in samples[:4])
    assert max(len(g.members) for g in group_by_prompt(samples)) == 2
    model = demo_scorer.model
    backend = LocalBackend(model, demo_scorer.tokenizer.pad_token_id, BatchingConfig(strategy="prefix"))
    torch.testing.assert_close(backend.attributes(samples), reference(model, samples), **TOL)


def test_bfloat16_prefix_sharing_stays_close():
    model = tiny_model().to(torch.bfloat16)
    samples = group_workload(seed=3)
    got = LocalBackend(model, PAD, BatchingConfig(strategy="prefix")).attributes(samples)
    torch.testing.assert_close(got, reference(model, samples), atol=5e-2, rtol=0)


class CustomRewardModel(nn.Module):
    """A model outside Transformers (like ArmoRM's remote code): only the padded path applies."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"num_labels": 2})()
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        pooled = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
        return type("Output", (), {"logits": self.proj(pooled)})()


def test_custom_models_fall_back_to_padded():
    model = CustomRewardModel()
    assert "score head" in prefix_sharing_unsupported(model, find_head(model))
    assert LocalBackend(model, PAD).strategy == "padded"
    with pytest.warns(UserWarning, match="padded"):
        backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix"))
    samples = group_workload()
    got = backend.attributes(samples)
    expected = torch.stack([model(torch.tensor([s.input_ids]), torch.ones(1, len(s))).logits[0] for s in samples])
    torch.testing.assert_close(got, expected.detach(), **TOL)


def test_sliding_window_models_are_not_prefix_shared():
    model = tiny_model("mistral")
    model.config.sliding_window = 16
    assert "sliding" in prefix_sharing_unsupported(model, find_head(model))


def test_group_by_prompt_keeps_prefix_prompts_apart():
    samples = [EncodedSample((1, 2), (3,)), EncodedSample((1,), (2, 3)), EncodedSample((1, 2), ()),
               EncodedSample((), (1, 2))]
    assert [(g.prompt_ids, g.members) for g in group_by_prompt(samples)] == [((1, 2), [0, 2]), ((1,), [1]),
                                                                              ((), [3])]


def test_pack_rows_and_block_mask():
    lengths = [5, 3, 4, 2, 9]
    rows = pack_rows(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(5))
    assert all(sum(lengths[i] for i in row) <= 8 or len(row) == 1 for row in rows)
    mask, positions = block_causal_mask([2, 3], 6)
    assert positions.tolist() == [0, 1, 0, 1, 2, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]
    assert mask.any(dim=1).all()  # no query row fully masked (would be NaN)


@pytest.mark.parametrize("seed", range(5))
def test_min_padding_plan_is_a_partition_within_budget_and_never_pads_more(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 500) for _ in range(rng.randint(1, 40))]
    plan = plan_min_padding(lengths, max_tokens=2048, max_batch_size=8, overhead_tokens=0)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert all(len(b) <= 8 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 2048) for b in plan)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in plan)
    greedy = sum(max(lengths[i] for i in b) * len(b) for b in plan_microbatches(lengths, 2048, 8))
    assert padded <= greedy


def test_strategy_is_validated():
    with pytest.raises(ConfigError, match="did you mean 'packed'"):
        load_config({"batching": {"strategy": "packd"}})
    assert load_config({"batching": {"strategy": "prefix"}}).batching.strategy == "prefix"


def test_prompt_cache_runs_a_prompt_once_across_calls():
    """OpenRLHF's one-sample requests: the completions of one prompt arrive in different batches."""
    model = tiny_model()
    rng = random.Random(7)
    prompts = [ids(rng, 50) for _ in range(2)]
    samples = [EncodedSample(p, ids(rng, rng.randint(1, 20))) for p in prompts for _ in range(6)]
    first, second = samples[0::2], samples[1::2]  # each call holds half of each group
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="auto", prompt_cache_tokens=1000))
    torch.testing.assert_close(backend.attributes(first), reference(model, first), **TOL)
    planned = backend.plan(second)
    before = backend.forward_calls
    torch.testing.assert_close(backend.attributes(second), reference(model, second), **TOL)
    assert backend.forward_calls - before == len(planned)
    assert backend._prefix.cache_hits == 2
    # Without the cache the second call runs both prefills again.
    uncached = LocalBackend(model, PAD, BatchingConfig(strategy="prefix"))
    uncached.attributes(first)
    assert len(uncached.plan(second)) == len(planned) + 2


def test_prompt_cache_is_bounded_and_drops_the_least_recent():
    model = tiny_model()
    rng = random.Random(8)
    prompts = [ids(rng, 40) for _ in range(3)]
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix", prompt_cache_tokens=90))
    for p in prompts:
        backend.attributes([EncodedSample(p, ids(rng, 5))])
    cache = backend._prefix
    assert cache._cached_tokens <= 90
    assert not cache.is_cached(prompts[0]) and cache.is_cached(prompts[1]) and cache.is_cached(prompts[2])
    backend.set_prompt_cache_tokens(0)
    assert not cache.is_cached(prompts[2])
