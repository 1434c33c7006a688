"""Cross-request dynamic batching: many small requests, one model worker thread, results to their own requests.

OpenRLHF (>= 0.9.1) sends every sample as its own request, all at once. Scoring them one by one leaves the model
idle between tiny forwards and recomputes each prompt for each of its samples; gathering the requests that are
waiting into one batch lets the scorer plan micro-batches and share prompt prefixes across requests.

Rules: a batch starts with the oldest waiting request and takes further requests in arrival order while they fit
the batch token budget (``max_batch_tokens``), where a prompt already in the batch costs nothing again (the
scorer runs each shared prompt once, so the 8 one-sample requests of a GRPO group cost one prompt plus 8
completions); it waits at most ``max_wait_ms`` (counted from the oldest request's arrival) for more to arrive. One
worker thread runs the model (models are not thread-safe). Past ``max_queue`` waiting samples, ``submit`` refuses
with ``QueueFull`` so the server can answer 503 at once instead of timing out.

One bad request never takes the others down: when a merged batch fails, it is split in halves and each half is
scored again, down to the single request that fails, which alone gets the error. An out-of-memory error also
halves the batch token budget, which doubles back after ``oom_recovery_s`` without another one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from steer_reward.formatting import EncodedSample
from steer_reward.scoring import AttributeScores

__all__ = ["QueueFull", "BatcherStopped", "DynamicBatcher", "BatchStats", "BatchPart", "is_out_of_memory"]

logger = logging.getLogger("steer_reward.server")


def is_out_of_memory(error: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (CUDA), the "out of memory" ``RuntimeError`` of other devices and
    versions, CPU allocation failures and ``MemoryError``."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if (oom is not None and isinstance(error, oom)) or isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


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
    tag: Any = None
    arrived: float = field(default_factory=time.monotonic)
    prompts: tuple[tuple[int, int], ...] = ()
    """(hash of prompt ids, prompt length) per sample, for the prefix-aware token budget."""

    def cost(self, seen: set[int]) -> int:
        """Tokens this request adds to a batch whose prompts are ``seen``."""
        new_prompts = {h: n for h, n in self.prompts if h not in seen}
        return sum(len(s.completion_ids) for s in self.samples) + sum(new_prompts.values())


def _tokens(requests: Sequence[_Request]) -> int:
    """Tokens of a group of requests, each shared prompt counted once."""
    seen: set[int] = set()
    total = 0
    for request in requests:
        total += request.cost(seen)
        seen.update(h for h, _ in request.prompts)
    return total


@dataclass
class BatchStats:
    """What one model batch held, for metrics."""

    requests: int
    samples: int
    tokens: int
    seconds: float
    failed_requests: int = 0
    """Requests of the batch that got an error (after isolation)."""
    retries: int = 0
    """Extra scorer calls made to isolate failing requests."""


@dataclass
class BatchPart:
    """One request's share of a scored batch, as handed to ``finish``."""

    tag: Any
    """What the request was submitted with (``submit(..., tag=)``)."""
    scores: AttributeScores


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
    called there after each batch (metrics). ``finish(parts) -> results`` (optional, worker thread) turns the
    successful requests of one batch, all at once, into what their ``submit`` calls return (default: their
    ``AttributeScores``); the server uses it to update normalization statistics once per batch.
    ``on_oom(tokens, budget)`` is called when an out-of-memory error shrinks the budget.
    """

    def __init__(self, score_encoded: Callable[[Sequence[EncodedSample]], AttributeScores], *,
                 max_wait_ms: float = 5.0, max_batch_tokens: int = 32768, max_queue: int = 4096,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 finish: Callable[[list[BatchPart]], list[Any]] | None = None,
                 oom_recovery_s: float = 60.0, on_oom: Callable[[int, int], None] | None = None) -> None:
        self.score_encoded = score_encoded
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.finish = finish
        self.oom_recovery_s = float(oom_recovery_s)
        self.on_oom = on_oom
        self._budget = self.max_batch_tokens
        self._last_oom = 0.0
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
    def batch_token_budget(self) -> int:
        """The token budget batches are cut to now: ``max_batch_tokens``, or less after an out-of-memory error."""
        return self._budget

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def submit(self, samples: Sequence[EncodedSample], tag: Any = None) -> Any:
        """Attributes of ``samples`` (in order), scored together with whatever else is waiting (or what
        ``finish`` made of them). Cancelling the call drops the request if it has not started."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._condition:
            if self._stopping or not self._thread.is_alive():
                raise BatcherStopped("the server is shutting down" if self._stopping else
                                     "the model worker has stopped; restart the server")
            if self._pending_samples and self._pending_samples + len(samples) > self.max_queue:
                raise QueueFull(self._pending_samples, self.max_queue, self._retry_after())
            self._pending_samples += len(samples)
            self._waiting.append(_Request(samples, sum(len(s) for s in samples), future, loop, tag,
                                          prompts=tuple((hash(s.prompt_ids), len(s.prompt_ids)) for s in samples)))
            self._condition.notify()
        return await future

    def _retry_after(self) -> int:
        # Seconds to drain the queue at the measured rate, at least 1 (Retry-After takes whole seconds).
        if self._samples_per_s <= 0:
            return 1
        return max(1, min(60, int(self._pending_samples / self._samples_per_s + 0.999)))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current batch; waiting requests fail with ``BatcherStopped`` at once.
        Waits up to ``timeout`` seconds for the current batch (0: returns at once)."""
        with self._condition:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._pending_samples -= sum(len(r.samples) for r in waiting)
            self._condition.notify_all()
        for request in waiting:
            _call_in_loop(request, None, BatcherStopped("the server is shutting down; retry on another server"))
        if timeout > 0:
            self._thread.join(timeout)

    # -- worker thread --------------------------------------------------------------------------------------
    def _current_budget(self) -> int:
        """The budget, doubled back towards ``max_batch_tokens`` after each quiet ``oom_recovery_s``."""
        if self._budget < self.max_batch_tokens and time.monotonic() - self._last_oom >= self.oom_recovery_s:
            self._budget = min(self.max_batch_tokens, self._budget * 2)
            self._last_oom = time.monotonic()  # the next doubling waits another quiet period
            logger.warning("batch token budget back up to %d (server.max_batch_tokens %d)", self._budget,
                           self.max_batch_tokens)
        return self._budget

    def _shrink_budget(self, tokens: int) -> None:
        self._budget = max(1, min(self._budget, tokens) // 2)
        self._last_oom = time.monotonic()
        logger.warning("out of memory on a batch of %d tokens: batch token budget now %d (server.max_batch_tokens "
                       "%d); it doubles back after %.0f s without another", tokens, self._budget,
                       self.max_batch_tokens, self.oom_recovery_s)
        if self.on_oom is not None:
            try:
                self.on_oom(tokens, self._budget)
            except Exception:  # noqa: BLE001 - a metrics failure must not stop the model worker
                pass

    def _take_batch(self) -> list[_Request] | None:
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            self._drop_abandoned()
            if not self._waiting:
                return []
            budget = self._current_budget()
            batch = [self._waiting.popleft()]  # the oldest request always goes, even alone over the budget
            seen: set[int] = set()
            tokens = batch[0].cost(seen)
            seen.update(h for h, _ in batch[0].prompts)
            deadline = batch[0].arrived + self.max_wait_s
            while tokens < budget:
                self._drop_abandoned()
                if self._waiting:
                    cost = self._waiting[0].cost(seen)
                    if tokens + cost > budget:
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

    def _score_isolating(self, batch: list[_Request]) -> tuple[list[tuple[_Request, AttributeScores]],
                                                                list[tuple[_Request, BaseException]], int,
                                                                list[_Request]]:
        """Score ``batch``; when a call fails, score each half again, down to the single requests that fail.

        Returns (request, its scores) for those that succeeded, in arrival order; (request, error) for those
        that failed alone; the number of extra scorer calls; and the requests of the first call (what the model
        was given). A request whose client left meanwhile is skipped. A poison sample costs about
        2·log2(requests) extra calls, not one per request.
        """
        done: list[tuple[_Request, AttributeScores]] = []
        failed: list[tuple[_Request, BaseException]] = []
        sent: list[_Request] = []
        groups, calls = [batch], 0
        while groups:
            group = [r for r in groups.pop() if not r.future.done()]
            if not group:
                continue
            if not calls:
                sent = group
            calls += 1
            try:
                scores = self.score_encoded([s for request in group for s in request.samples])
            except BaseException as err:  # noqa: BLE001 - handed to the failing request, the worker lives on
                if is_out_of_memory(err):
                    self._shrink_budget(_tokens(group))
                if len(group) == 1:
                    failed.append((group[0], err))
                    continue
                logger.warning("a batch of %d requests failed (%s: %s); scoring its halves apart to find the "
                               "request that fails", len(group), type(err).__name__, err)
                middle = len(group) // 2
                groups += [group[middle:], group[:middle]]  # the first half is scored first
                continue
            offset = 0
            for request in group:
                n = len(request.samples)
                done.append((request, _slice(scores, offset, offset + n)))
                offset += n
        return done, failed, max(0, calls - 1), sent

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            start = time.perf_counter()
            done: list[tuple[_Request, AttributeScores]] = []
            failed: list[tuple[_Request, BaseException]] = []
            sent: list[_Request] = batch
            retries = 0
            try:
                done, failed, retries, sent = self._score_isolating(batch)
                results: list[Any] = [scores for _, scores in done]
                if self.finish is not None and done:
                    try:
                        results = self.finish([BatchPart(request.tag, scores) for request, scores in done])
                    except BaseException as err:  # noqa: BLE001 - a shaping bug answers its requests, no hang
                        logger.exception("finishing a batch failed")
                        failed += [(request, err) for request, _ in done]
                        done, results = [], []
                for (request, _), result in zip(done, results):
                    _call_in_loop(request, result, None)
                for request, err in failed:
                    _call_in_loop(request, None, err)
            except BaseException as err:  # noqa: BLE001 - never leave a request waiting forever
                logger.exception("the model worker failed on a batch")
                for request in batch:
                    _call_in_loop(request, None, err)
            finally:
                with self._condition:
                    self._pending_samples -= sum(len(r.samples) for r in batch)
            if not sent:
                continue  # every client of the batch left before its forward: the model ran nothing
            # What the model was given: a request whose client left after the batch was cut but before its forward
            # is neither scored nor counted (samples scored counts the model's work).
            seconds = time.perf_counter() - start
            samples = sum(len(r.samples) for r in sent)
            if seconds > 0 and not failed:
                rate = samples / seconds
                self._samples_per_s = rate if self._samples_per_s == 0 else 0.8 * self._samples_per_s + 0.2 * rate
            if self.on_batch is not None:
                try:
                    self.on_batch(BatchStats(len(sent), samples, sum(r.tokens for r in sent), seconds,
                                             len(failed), retries))
                except Exception:  # noqa: BLE001 - a metrics failure must not stop the model worker
                    pass


def _call_in_loop(request: _Request, result: Any, error: BaseException | None) -> None:
    try:
        request.loop.call_soon_threadsafe(_resolve, request.future, result, error)
    except RuntimeError:  # that request's event loop is closed: nobody is waiting
        pass


def _slice(scores: AttributeScores, start: int, stop: int) -> AttributeScores:
    return AttributeScores(
        values=scores.values[start:stop],
        names=scores.names,
        completion_lengths=scores.completion_lengths[start:stop],
        prompt_truncated=scores.prompt_truncated[start:stop],
        completion_truncated=scores.completion_truncated[start:stop],
    )
