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
from steer_reward.planning import fill_forwards
from steer_reward.prefix_sharing import (ForwardBudget, group_by_prompt, plan_group_forwards,
                                         prefix_sharing_unsupported)

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


_REFERENCES: dict = {}


def reference(model: nn.Module, samples) -> torch.Tensor:
    """Plain HF forwards of each sample alone; remembered per model (tests rebuild the same seeded models). The key
    holds the whole config and every parameter's shape: models of one seed but other shapes (head_dim, rotary
    scaling) share their first weights."""
    first = next(model.parameters())
    weights = (model.config.to_json_string(), model.config._attn_implementation, str(first.dtype),
               tuple(p.shape for p in model.parameters()), tuple(first.flatten()[:8].tolist()))
    for s in samples:
        if (weights, s.input_ids) not in _REFERENCES:
            _REFERENCES[weights, s.input_ids] = plain_hf_attributes(model, s.input_ids)
    return torch.stack([_REFERENCES[weights, s.input_ids] for s in samples])


def test_remembered_references_tell_models_of_one_seed_apart():
    """Same seed, same first weights, other rotary scaling: a reference of one must not be reused for the other."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    plain = tiny_model()
    config = AutoConfig.for_model("llama", **{k: getattr(plain.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "num_labels", "pad_token_id", "max_position_embeddings", "head_dim")},
        rope_parameters={"rope_type": "linear", "factor": 2.0})
    torch.manual_seed(0)
    scaled = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    samples = [EncodedSample(tuple(range(1, 30)), (40, 41))]
    assert not torch.equal(reference(plain, samples), reference(scaled, samples))
    torch.testing.assert_close(reference(scaled, samples)[0], plain_hf_attributes(scaled, samples[0].input_ids))


def check_plan(backend: LocalBackend, samples) -> None:
    """plan() lists exactly the forwards attributes() ran, and covers every sample."""
    plan = backend.plan(samples)
    assert sorted({i for batch in plan for i in batch}) == list(range(len(samples)))
    before = backend.forward_calls
    torch.testing.assert_close(backend.attributes(samples), reference(backend.model, samples), **TOL)
    assert backend.forward_calls - before == len(plan)


@pytest.mark.parametrize("strategy", ["auto", "prefix", "packed", "padded"])
@pytest.mark.parametrize("max_tokens", [4096, 80])
def test_every_strategy_matches_plain_forward_in_input_order(strategy, max_tokens):
    """A large budget puts every group in one wave; a small one splits prompts into several waves, completions of
    one group across forwards, and runs a sequence longer than the budget alone."""
    model = tiny_model()
    samples = group_workload()
    backend = LocalBackend(model, PAD, BatchingConfig(strategy=strategy, max_row_tokens=96, max_tokens=max_tokens,
                                                      forward_overhead_tokens=0))
    assert backend.strategy == strategy
    check_plan(backend, samples)


@pytest.mark.parametrize("call_tokens", [1, 16, 512])
def test_self_attention_buckets_are_exact(call_tokens):
    """One call per segment, padded buckets of similar lengths, and everything in one padded call (the GPU
    setting) give the same scores."""
    model = tiny_model()
    samples = group_workload(seed=5)
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix"))
    backend.groups.call_tokens = call_tokens
    check_plan(backend, samples)


@pytest.mark.parametrize("model_type,attention", [("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa"),
                                                  ("qwen3", "sdpa")])
def test_ragged_forwards_on_other_supported_architectures(model_type, attention):
    model = tiny_model(model_type, attention)
    assert prefix_sharing_unsupported(model, find_head(model)) is None
    samples = group_workload(seed=1)
    for strategy in ("prefix", "packed"):
        got = LocalBackend(model, PAD, BatchingConfig(strategy=strategy)).attributes(samples)
        torch.testing.assert_close(got, reference(model, samples), **TOL)
    assert model.config._attn_implementation == attention  # restored after every ragged forward


def test_many_groups_share_one_prefill_and_one_completion_forward():
    model = tiny_model()
    rng = random.Random(2)
    prompts = [ids(rng, rng.randint(30, 60)) for _ in range(4)]
    samples = [EncodedSample(p, ids(rng, rng.randint(1, 20))) for p in prompts for _ in range(8)]
    rng.shuffle(samples)
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="auto"))
    plan = backend.groups.plan(samples, "auto")
    assert [f.kind for f in plan.forwards] == ["prefill", "completion"]
    assert len(plan.forwards[0].segments) == 4  # each prompt once
    assert plan.forwards[1].tokens == sum(len(s.completion_ids) for s in samples)
    check_plan(backend, samples)


def forward_memory(plan, kv_cost: float) -> list[tuple[object, float]]:
    """(forward, tokens it computes + kv_cost · prompt tokens whose keys and values it holds) for each forward."""
    held, out = {}, []
    for forward in plan.forwards:
        kept = sum(len(s.tokens) for s in forward.segments if s.keep is not None)
        if forward.kind == "prefill":
            held[forward.wave] = kept
        out.append((forward, forward.tokens + kv_cost * (kept if forward.kind == "prefill" else held[forward.wave])))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_waves_keep_forwards_and_held_prompts_within_the_budget(seed):
    rng = random.Random(seed)
    samples = [EncodedSample(p, ids(rng, rng.randint(0, 40)))
               for p in [ids(rng, rng.randint(1, 90)) for _ in range(12)] for _ in range(rng.randint(1, 6))]
    budget = ForwardBudget(max_tokens=300, max_segments=7, kv_cost=1.5)
    groups = group_by_prompt(samples)
    shared = [g for g in groups if len(g.members) > 1]
    unshared = [i for g in groups if len(g.members) == 1 for i in g.members]
    plan = plan_group_forwards(samples, shared, unshared, budget)
    scored = sorted(i for f in plan.forwards for rows in f.scored for i in rows)
    assert scored == list(range(len(samples)))  # every sample scored exactly once
    for forward, memory in forward_memory(plan, budget.kv_cost):
        assert len(forward.segments) <= 7
        assert memory <= 300 or len(forward.segments) == 1, forward
        if forward.kind == "completion":
            assert all(s.prompt is not None and s.start == len(s.prompt) for s in forward.segments)


def test_auto_shares_prompts_only_when_it_saves_more_than_the_extra_forward():
    model = tiny_model()
    rng = random.Random(4)
    short = ids(rng, 6)
    few = [EncodedSample(short, ids(rng, 5)) for _ in range(3)]
    backend = LocalBackend(model, PAD, BatchingConfig(forward_overhead_tokens=128))
    # Sharing 6-token prompts saves 12 tokens but needs a completion forward: one forward of whole sequences.
    assert backend.plan(few) == [[0, 1, 2]]
    long = ids(rng, 200)
    many = few + [EncodedSample(long, ids(rng, 5)) for _ in range(3)]
    plan = backend.groups.plan(many, "auto")
    assert [f.kind for f in plan.forwards] == ["prefill", "completion"]
    check_plan(backend, few)
    check_plan(backend, many)
    # prefix shares even where it does not pay; packed never shares.
    assert len(LocalBackend(model, PAD, BatchingConfig(strategy="prefix")).plan(few)) == 2
    assert all(s.prompt is None and s.keep is None for f in backend.groups.plan(many, "packed").forwards
               for s in f.segments)


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


def test_bfloat16_ragged_forwards_stay_close(tmp_path):
    """bf16 against a reference loaded in bf16 (DESIGN.md: ``model.to(bf16)`` also casts RoPE's inv_freq)."""
    from transformers import AutoModelForSequenceClassification

    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    samples = group_workload(seed=3)
    expected = reference(model, samples)
    for strategy in ("prefix", "packed"):
        got = LocalBackend(model, PAD, BatchingConfig(strategy=strategy)).attributes(samples)
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=0)


def test_fused_attention_with_lse_equals_reference_math():
    from steer_reward.ragged import _math_attention_lse, attention_with_lse

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 11, 16, generator=generator)
    for keys, causal in ((11, True), (29, False)):
        k, v = torch.randn(3, 2, keys, 16, generator=generator), torch.randn(3, 2, keys, 16, generator=generator)
        out, lse = attention_with_lse(q, k, v, causal, 0.3)
        ref, ref_lse = _math_attention_lse(q, k, v, causal, 0.3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_ragged_attention_is_switched_off_after_a_failed_forward():
    from steer_reward.ragged import RaggedLayout, Segment, run_ragged

    model = tiny_model()
    layout = RaggedLayout([Segment((1, 2, 3), start=3, prompt="missing")])  # no prompt keys given
    with pytest.raises(KeyError):
        run_ragged(find_head(model).backbone, layout)
    assert model.config._attn_implementation == "sdpa"


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


@pytest.mark.parametrize("seed", range(5))
def test_fill_forwards_and_attention_buckets_are_partitions(seed):
    from steer_reward.ragged import plan_attention_buckets

    rng = random.Random(seed)
    lengths = [rng.randint(1, 500) for _ in range(rng.randint(1, 40))]
    forwards = fill_forwards(lengths, max_tokens=900, max_items=6)
    assert sorted(i for f in forwards for i in f) == list(range(len(lengths)))
    assert all(len(f) <= 6 and (len(f) == 1 or sum(lengths[i] for i in f) <= 900) for f in forwards)
    for call_tokens in (1, 64, 10_000):
        buckets = plan_attention_buckets(lengths, call_tokens)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert len(plan_attention_buckets(lengths, 10_000)) == 1
    assert len(plan_attention_buckets(lengths, 1)) == len(set(lengths))


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
    assert backend.forward_calls - before == len(planned) == 1  # one completion forward, no prefill
    assert backend.groups.cache_hits == 2
    # Without the cache the second call runs the prefill of both prompts again.
    uncached = LocalBackend(model, PAD, BatchingConfig(strategy="prefix"))
    uncached.attributes(first)
    assert [f.kind for f in uncached.groups.plan(second, "prefix").forwards] == ["prefill", "completion"]
    # An empty completion of a cached prompt is scored from the cache, with no forward at all.
    empty = [EncodedSample(prompts[0], ())]
    assert backend.plan(empty) == []
    torch.testing.assert_close(backend.attributes(empty), reference(model, empty), **TOL)


def test_prompt_cache_is_bounded_and_drops_the_least_recent():
    model = tiny_model()
    rng = random.Random(8)
    prompts = [ids(rng, 40) for _ in range(3)]
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix", prompt_cache_tokens=90))
    for p in prompts:
        backend.attributes([EncodedSample(p, ids(rng, 5))])
    cache = backend.groups
    assert cache._cached_tokens <= 90
    assert not cache.is_cached(prompts[0]) and cache.is_cached(prompts[1]) and cache.is_cached(prompts[2])
    backend.set_prompt_cache_tokens(0)
    assert not cache.is_cached(prompts[2])


def test_prompt_cache_size_changes_wait_for_the_scoring_call_in_flight():
    """A plan made with a prompt cached reads that prompt's keys and prompt-end scores until the call ends: a size
    change from another thread (a server's settings) must not evict them in between."""
    import threading

    model = tiny_model()
    rng = random.Random(9)
    prompt = ids(rng, 40)
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix", prompt_cache_tokens=1000))
    backend.attributes([EncodedSample(prompt, ids(rng, 5))])
    samples = [EncodedSample(prompt, ()), EncodedSample(prompt, ids(rng, 7))]
    assert backend.plan(samples) == [[1]]  # the empty completion from the cache, the other against cached keys
    planned, release = threading.Event(), threading.Event()
    plan = backend.groups.plan

    def plan_then_wait(*args):  # the scoring call holds its plan while the other thread shrinks the cache
        result = plan(*args)
        planned.set()
        release.wait(10)
        return result

    backend.groups.plan = plan_then_wait
    results: list = []
    scoring = threading.Thread(target=lambda: results.append(backend.attributes(samples)))
    scoring.start()
    assert planned.wait(10)
    shrink = threading.Thread(target=backend.set_prompt_cache_tokens, args=(0,))
    shrink.start()
    shrink.join(0.5)
    waited = shrink.is_alive()
    release.set()
    scoring.join(10)
    shrink.join(10)
    assert waited and len(results) == 1
    torch.testing.assert_close(results[0], reference(model, samples), **TOL)
    assert not backend.groups.is_cached(prompt)


@pytest.mark.parametrize("seed", range(40))
def test_no_forward_exceeds_the_budget_unless_one_sequence_alone_does(seed):
    """A prompt whose prefill (its tokens and kept keys and values) or whose longest completion next to those keys
    would overflow ``max_tokens`` runs whole instead (never more memory); waves leave room for their longest
    completion. Only a whole sequence longer than the budget may exceed it, alone."""
    from steer_reward.prefix_sharing import GroupScorer

    rng = random.Random(seed)
    max_tokens = rng.choice([100, 300, 1000])
    budget = ForwardBudget(max_tokens, rng.choice([2, 8, 64]), kv_cost=1.5)
    prompts = [ids(rng, rng.randint(1, max_tokens)) for _ in range(6)]
    samples = [EncodedSample(p, ids(rng, rng.randint(0, max_tokens // 3))) for p in prompts
               for _ in range(rng.randint(1, 5))]
    scorer = GroupScorer(lambda layout: None, budget, overhead_tokens=rng.choice([0, 16, 128]),
                         cache_tokens=10**6 if seed % 2 else 0)
    if seed % 2:  # some prompts cached: their completions read keys and values the cache holds
        for prompt in prompts[::2]:
            scorer._cache[prompt] = ([], torch.zeros(9))
    for strategy in ("auto", "prefix"):
        plan = scorer.plan(samples, strategy)
        scored = [i for f in plan.forwards for rows in f.scored for i in rows]
        assert sorted(scored + [i for _, members in plan.from_cache for i in members]) == list(range(len(samples)))
        for forward, memory in forward_memory(plan, budget.kv_cost):
            alone = forward.kind == "prefill" and len(forward.segments) == 1 and forward.segments[0].keep is None
            assert memory <= max_tokens or (alone and forward.tokens > max_tokens), (strategy, forward.kind, memory)


def test_a_prompt_too_long_to_share_within_the_budget_runs_whole():
    model = tiny_model()
    rng = random.Random(12)
    prompt = ids(rng, 85)
    samples = [EncodedSample(prompt, ids(rng, 10)) for _ in range(3)]
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix", max_tokens=100, forward_overhead_tokens=0))
    assert backend.groups.budget.kv_cost == 0.25  # the tiny model's keys and values per token, in forward tokens
    # Sharing: a prefill of 85 tokens holding their keys and values (106 > 100). Whole: 95 tokens per forward.
    forwards = backend.groups.plan(samples, "prefix").forwards
    assert all(f.kind == "prefill" and f.segments[0].keep is None for f in forwards)
    check_plan(backend, samples)
