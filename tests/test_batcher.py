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
