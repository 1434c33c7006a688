"""Cross-request dynamic batching: many small requests, one model worker thread, results to their own requests.

OpenRLHF (>= 0.9.1) sends every sample as its own request, all at once. Scoring them one by one leaves the model
idle between tiny forwards and recomputes each prompt for each of its samples; gathering the requests that are
waiting into one batch lets the scorer plan micro-batches and share prompt prefixes across requests.

Rules: a batch starts with the oldest waiting request and takes further requests in arrival order while they fit
``max_batch_tokens``, where a prompt already in the batch costs nothing again (the scorer runs each shared prompt
once, so the 8 one-sample requests of a GRPO group cost one prompt plus 8 completions); it waits at most ``max_wait_ms`` (counted from the oldest request's arrival) for more to
arrive. One worker thread runs the model (models are not thread-safe). Past ``max_queue`` waiting samples,
``submit`` refuses with ``QueueFull`` so the server can answer 503 at once instead of timing out.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from steer_reward.formatting import EncodedSample
from steer_reward.scoring import AttributeScores

__all__ = ["QueueFull", "BatcherStopped", "DynamicBatcher", "BatchStats"]


class QueueFull(RuntimeError):
    """More samples are waiting than ``max_queue``; retry after ``retry_after_s``."""

    def __init__(self, pending: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the server is busy: {pending} samples are waiting (limit {limit}); retry in "
                         f"{retry_after_s} s")
        self.retry_after_s = retry_after_s


class BatcherStopped(RuntimeError):
    """The batcher was stopped (server shutting down)."""


@dataclass
class _Request:
    samples: Sequence[EncodedSample]
    tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)
    prompts: tuple[tuple[int, int], ...] = ()
    """(hash of prompt ids, prompt length) per sample, for the prefix-aware token budget."""

    def cost(self, seen: set[int]) -> int:
        """Tokens this request adds to a batch whose prompts are ``seen``."""
        new_prompts = {h: n for h, n in self.prompts if h not in seen}
        return sum(len(s.completion_ids) for s in self.samples) + sum(new_prompts.values())


@dataclass
class BatchStats:
    """What one model batch held, for metrics."""

    requests: int
    samples: int
    tokens: int
    seconds: float


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away and its handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DynamicBatcher:
    """Batches encoded samples of concurrent requests into one scorer call each.

    ``score_encoded(samples) -> AttributeScores`` runs on the worker thread only; ``on_batch(BatchStats)`` is
    called there after each batch (metrics).
    """

    def __init__(self, score_encoded: Callable[[Sequence[EncodedSample]], AttributeScores], *,
                 max_wait_ms: float = 5.0, max_batch_tokens: int = 32768, max_queue: int = 4096,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.score_encoded = score_encoded
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._waiting: collections.deque[_Request] = collections.deque()
        self._pending_samples = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._samples_per_s = 0.0
        self._thread = threading.Thread(target=self._work, name="steer-reward-model-worker", daemon=True)
        self._thread.start()

    @property
    def pending_samples(self) -> int:
        """Samples submitted and not yet answered (waiting or in the running batch)."""
        return self._pending_samples

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def submit(self, samples: Sequence[EncodedSample]) -> AttributeScores:
        """Attributes of ``samples`` (in order), scored together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._condition:
            if self._stopping or not self._thread.is_alive():
                raise BatcherStopped("the server is shutting down" if self._stopping else
                                     "the model worker has stopped; restart the server")
            if self._pending_samples and self._pending_samples + len(samples) > self.max_queue:
                raise QueueFull(self._pending_samples, self.max_queue, self._retry_after())
            self._pending_samples += len(samples)
            self._waiting.append(_Request(samples, sum(len(s) for s in samples), future, loop,
                                          prompts=tuple((hash(s.prompt_ids), len(s.prompt_ids)) for s in samples)))
            self._condition.notify()
        return await future

    def _retry_after(self) -> int:
        # Seconds to drain the queue at the measured rate, at least 1 (Retry-After takes whole seconds).
        if self._samples_per_s <= 0:
            return 1
        return max(1, min(60, int(self._pending_samples / self._samples_per_s + 0.999)))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current batch; waiting requests fail with ``BatcherStopped``."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)
        with self._condition:
            while self._waiting:
                request = self._waiting.popleft()
                request.loop.call_soon_threadsafe(_resolve, request.future, None,
                                                  BatcherStopped("the server is shutting down"))

    # -- worker thread --------------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Request] | None:
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            self._drop_abandoned()
            if not self._waiting:
                return []
            batch = [self._waiting.popleft()]
            seen: set[int] = set()
            tokens = batch[0].cost(seen)
            seen.update(h for h, _ in batch[0].prompts)
            deadline = batch[0].arrived + self.max_wait_s
            while tokens < self.max_batch_tokens:
                self._drop_abandoned()
                if self._waiting:
                    cost = self._waiting[0].cost(seen)
                    if tokens + cost > self.max_batch_tokens:
                        break
                    request = self._waiting.popleft()
                    batch.append(request)
                    tokens += cost
                    seen.update(h for h, _ in request.prompts)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._condition.wait(remaining)
            return batch

    def _drop_abandoned(self) -> None:
        """Drop waiting requests whose handler is gone (client timeout or disconnect): a retry of the same sample
        is already queued, and computing both would double the work exactly when the server is overloaded.
        Called with the condition held."""
        while self._waiting and self._waiting[0].future.done():
            self._pending_samples -= len(self._waiting.popleft().samples)

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            samples = [s for request in batch for s in request.samples]
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                scores = self.score_encoded(samples)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting requests, the worker lives on
                error, scores = err, None
            seconds = time.perf_counter() - start
            offset = 0
            try:
                for request in batch:
                    n = len(request.samples)
                    part = None if scores is None else _slice(scores, offset, offset + n)
                    offset += n
                    try:
                        request.loop.call_soon_threadsafe(_resolve, request.future, part, error)
                    except RuntimeError:  # that request's event loop is closed: nobody is waiting
                        pass
            finally:
                with self._condition:
                    self._pending_samples -= len(samples)
            if seconds > 0:
                rate = len(samples) / seconds
                self._samples_per_s = rate if self._samples_per_s == 0 else 0.8 * self._samples_per_s + 0.2 * rate
            if self.on_batch is not None:
                try:
                    self.on_batch(BatchStats(len(batch), len(samples), sum(r.tokens for r in batch), seconds))
                except Exception:  # noqa: BLE001 - a metrics failure must not stop the model worker
                    pass


def _slice(scores: AttributeScores, start: int, stop: int) -> AttributeScores:
    return AttributeScores(
        values=scores.values[start:stop],
        names=scores.names,
        completion_lengths=scores.completion_lengths[start:stop],
        prompt_truncated=scores.prompt_truncated[start:stop],
        completion_truncated=scores.completion_truncated[start:stop],
    )
