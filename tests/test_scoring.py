"""Scoring fidelity: every sample equals a plain Hugging Face forward of the same ids alone."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import plain_hf_attributes
from steer_reward.backends.local import LocalBackend
from steer_reward.config import BatchingConfig
from steer_reward.forward import forward_microbatch
from steer_reward.planning import plan_microbatches
from steer_reward.scoring import AttributeScorer


def _mixed_batch(seed: int = 0, n: int = 23):
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while reward models read every token".split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(n)]
    completions = [" ".join(rng.choices(words, k=rng.randint(0, 90))) for _ in range(n)]
    return prompts, completions


def test_plan_covers_every_index_once_and_respects_the_budget():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    plan = plan_microbatches(lengths, max_tokens=1024, max_batch_size=16)
    assert sorted(i for b in plan for i in b) == list(range(200))
    for batch in plan:
        assert len(batch) <= 16
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 1024


@pytest.mark.parametrize("max_tokens, max_batch_size", [(100_000, 256), (600, 4), (1, 1)])
def test_scores_equal_plain_hf_forward_of_each_sequence(demo_scorer, max_tokens, max_batch_size):
    prompts, completions = _mixed_batch()
    backend = LocalBackend(demo_scorer.model, demo_scorer.tokenizer.pad_token_id,
                           BatchingConfig(max_tokens=max_tokens, max_batch_size=max_batch_size))
    scorer = AttributeScorer(demo_scorer.formatter, backend, demo_scorer.schema, demo_scorer.model)
    samples = scorer.encode(prompts, completions)
    scores = scorer.score_encoded(samples)
    assert scores.values.shape == (len(prompts), 9) and scores.values.dtype == torch.float32
    for i, sample in enumerate(samples):  # row i belongs to sample i: order restored after length sorting
        torch.testing.assert_close(scores.values[i], plain_hf_attributes(demo_scorer.model, sample.input_ids),
                                   atol=1e-4, rtol=0)
    assert scores.completion_lengths.tolist() == [len(s.completion_ids) for s in samples]
    assert backend.forward_calls == len(backend.plan(samples))


def test_pad_id_inside_a_sequence_is_not_mistaken_for_padding(demo_scorer):
    """HF's pooling takes the last token != pad id; the head path reads the attention mask instead."""
    pad = demo_scorer.tokenizer.pad_token_id
    seqs = [[5, 6, 7, pad], [5, 6, 7, 8, 9, 10]]
    got = forward_microbatch(demo_scorer.model, seqs, pad_id=pad, head=demo_scorer.backend.head)
    with torch.no_grad():
        hidden = demo_scorer.model.model(torch.tensor([seqs[0]])).last_hidden_state
        expected = demo_scorer.model.score(hidden[0, -1])
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)


def test_empty_completion_is_scored(demo_scorer):
    scores = demo_scorer.score(["Say nothing."], [""])
    assert torch.isfinite(scores.values).all()


def test_empty_input_gives_empty_scores(demo_scorer):
    scores = demo_scorer.score([], [])
    assert scores.values.shape == (0, 9)
