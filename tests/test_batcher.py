"""The server's dynamic batcher: a shared prompt counts once against the batch token budget."""

from __future__ import annotations

import asyncio

import torch

from steer_reward.formatting import EncodedSample
from steer_reward.scoring import AttributeScores
from steer_reward.server.batcher import DynamicBatcher


def test_requests_sharing_a_prompt_fit_one_batch_and_get_their_own_rows():
    batches: list[int] = []

    def score(samples):
        batches.append(len(samples))
        values = torch.tensor([[float(s.completion_ids[0])] for s in samples])
        return AttributeScores.from_samples(values, ("a",), samples)

    prompt = tuple(range(100))
    # 8 one-sample requests of 110 tokens each: 880 tokens counted naively, 100 + 8 * 10 = 180 with the prompt
    # counted once, which fits a 200-token budget.
    samples = [EncodedSample(prompt, (i,) * 10) for i in range(8)]
    batcher = DynamicBatcher(score, max_wait_ms=200, max_batch_tokens=200)

    async def send_all():
        return await asyncio.gather(*[batcher.submit([s]) for s in samples])

    try:
        results = asyncio.run(send_all())
    finally:
        batcher.stop()
    assert [r.values.item() for r in results] == [float(i) for i in range(8)]
    assert sum(batches) == 8 and max(batches) == 8


def test_a_request_whose_client_went_away_is_not_computed():
    import threading

    started, release, scored = threading.Event(), threading.Event(), []

    def score(samples):
        scored.append([s.completion_ids[0] for s in samples])
        started.set()
        release.wait(10)
        return AttributeScores.from_samples(torch.zeros(len(samples), 1), ("a",), samples)

    batcher = DynamicBatcher(score, max_wait_ms=0, max_batch_tokens=1000)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit([EncodedSample((1,), (1,))]))
        while not started.is_set():  # the worker is busy with the first request
            await asyncio.sleep(0.01)
        abandoned = asyncio.ensure_future(batcher.submit([EncodedSample((2,), (2,))]))
        kept = asyncio.ensure_future(batcher.submit([EncodedSample((3,), (3,))]))
        await asyncio.sleep(0.05)
        abandoned.cancel()  # e.g. the client's timeout fired; its retry is another request
        await asyncio.sleep(0.05)
        release.set()
        await first
        await kept

    try:
        asyncio.run(scenario())
    finally:
        batcher.stop()
    assert scored == [[1], [3]]
    assert batcher.pending_samples == 0


def test_requests_that_left_after_their_batch_was_cut_are_not_counted_as_scored():
    """Samples scored counts what the model was given: a request taken into a batch that is still waiting for more
    (``max_wait_ms``) and abandoned before its forward is skipped, and not reported as model work."""
    scored, stats = [], []

    def score(samples):
        scored.append([s.completion_ids[0] for s in samples])
        return AttributeScores.from_samples(torch.zeros(len(samples), 1), ("a",), samples)

    batcher = DynamicBatcher(score, max_wait_ms=400, max_batch_tokens=1000, on_batch=stats.append)

    async def scenario():
        kept = asyncio.ensure_future(batcher.submit([EncodedSample((1,), (1,))]))
        left = asyncio.ensure_future(batcher.submit([EncodedSample((2,), (2,)), EncodedSample((2,), (3,))]))
        await asyncio.sleep(0.1)  # both are in the batch being cut, which waits for more until 400 ms
        left.cancel()
        await kept
        alone = asyncio.ensure_future(batcher.submit([EncodedSample((4,), (4,))]))
        await asyncio.sleep(0.1)
        alone.cancel()  # a batch whose every request left: no forward, no batch reported
        await asyncio.sleep(0.6)

    try:
        asyncio.run(scenario())
    finally:
        batcher.stop()
    assert scored == [[1]]
    assert [(s.requests, s.samples, s.retries) for s in stats] == [(1, 1, 0)]
    assert batcher.pending_samples == 0


# -- faults, on the real demo reward model ------------------------------------------------------------------------
import math  # noqa: E402

import pytest  # noqa: E402
from fault_injection import POISON, MemoryCappedScorer, poison_model  # noqa: E402

from steer_reward.config import load_config  # noqa: E402
from steer_reward.scoring import AttributeScorer  # noqa: E402

PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(12)]
COMPLETIONS = [f"It is {2 * i}, since {i} + {i} = {2 * i}." for i in range(12)]


@pytest.fixture(scope="module")
def real_scorer(demo_model_path):
    """A scorer of its own (faults are hooked into its model; the shared demo_scorer must stay clean)."""
    return AttributeScorer.from_config(load_config({"model": {"path": demo_model_path, "device": "cpu"}}))


def _send_one_sample_requests(batcher, samples):
    async def send_all():
        return await asyncio.gather(*(batcher.submit([s]) for s in samples), return_exceptions=True)

    try:
        return asyncio.run(send_all())
    finally:
        batcher.stop()


def test_a_poison_request_fails_alone_and_every_other_request_of_its_batch_gets_its_scores(real_scorer):
    completions = list(COMPLETIONS)
    completions[5] = f"It is {POISON} ten."
    samples = real_scorer.encode(PROMPTS, completions)
    good = [s for i, s in enumerate(samples) if i != 5]
    expected = real_scorer.score_encoded(good).values  # before the hook: the same model, no poison in these
    poison_model(real_scorer)
    with pytest.raises(RuntimeError, match="poison"):
        real_scorer.score_encoded(samples)  # the real forward fails on the merged batch
    calls, batches = [], []

    def score(batch):
        calls.append(len(batch))
        return real_scorer.score_encoded(batch)

    batcher = DynamicBatcher(score, max_wait_ms=500, max_batch_tokens=100_000, on_batch=batches.append)
    results = _send_one_sample_requests(batcher, samples)
    assert calls[0] == 12  # one merged batch, which fails
    assert [i for i, r in enumerate(results) if isinstance(r, BaseException)] == [5]
    assert "poison" in str(results[5])
    got = torch.cat([r.values for i, r in enumerate(results) if i != 5])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(calls) <= 1 + 2 * math.ceil(math.log2(12))  # bisection, not one call per request
    assert batches[0].failed_requests == 1 and batches[0].retries == len(calls) - 1


def test_out_of_memory_halves_the_batch_budget_scores_everything_and_the_budget_recovers(real_scorer):
    samples = real_scorer.encode(PROMPTS, COMPLETIONS)
    expected = real_scorer.score_encoded(samples).values
    one = max(len(s) for s in samples)
    capped = MemoryCappedScorer(real_scorer, cap_tokens=4 * one)  # fits 4 samples of 12
    events = []
    batcher = DynamicBatcher(capped.score_encoded, max_wait_ms=500, max_batch_tokens=100_000, oom_recovery_s=0.5,
                             on_oom=lambda tokens, budget: events.append((tokens, budget)))

    async def scenario():
        first = await asyncio.gather(*(batcher.submit([s]) for s in samples))
        shrunk, errors_first = batcher.batch_token_budget, len(events)
        again = await asyncio.gather(*(batcher.submit([s]) for s in samples))  # within the recovery period
        errors_again = len(events) - errors_first
        await asyncio.sleep(0.6)
        await batcher.submit([samples[0]])  # a quiet period passed: the budget doubles
        return first, shrunk, again, errors_again, batcher.batch_token_budget

    try:
        first, shrunk, again, errors_again, recovered = asyncio.run(scenario())
    finally:
        batcher.stop()
    torch.testing.assert_close(torch.cat([r.values for r in first]), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r.values for r in again]), expected, atol=1e-4, rtol=1e-4)
    assert events and shrunk <= events[0][0] // 2
    assert shrunk <= capped.cap_tokens  # halved until a batch fits
    assert errors_again == 0  # while shrunk, batches are cut to the budget: no further out-of-memory error
    assert max(capped.calls[-13:-1]) <= shrunk  # the second round's batches
    assert recovered == min(100_000, 2 * shrunk)
