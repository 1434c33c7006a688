"""The reward server's FastAPI app: ``/score``, OpenRLHF's ``/get_reward``, ``/health``, ``/info``, ``/metrics``.

Request handlers check and tokenize (on one encoder thread, so the event loop keeps accepting and the model
worker only runs forwards); the ``DynamicBatcher`` merges the samples of concurrent requests into one scorer call;
shaping runs back in the handler with the request's own weights (``/get_reward``'s running statistics are updated
and applied once per model batch, ``TrainingStatistics``). Every reply is JSON, errors included (OpenRLHF retries
5 times and then drops the reward, so an error must say what was wrong, at once).

Each POST handler runs as its own task, raced against its client: a body slower than ``server.read_timeout_s``
gets 408, and a client that disconnects has its work dropped (cancelled before the model sees it) and is counted
as 499 instead of being logged as a server error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import hmac
import inspect
import json
import logging
import time

import torch
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Mapping

from steer_reward.config import ServerConfig, check_section_numbers
from steer_reward.errors import InputError, require_extra
from steer_reward.formatting import FormattingError
from steer_reward.monitors import SERVER_WINDOW, LengthCorrelationWindow
from steer_reward.schema import SchemaError
from steer_reward.server.batcher import BatcherStopped, DynamicBatcher, QueueFull, is_out_of_memory
from steer_reward.server.metrics import ServerMetrics
from steer_reward.server.actor_templates import ActorTemplate
from steer_reward.server.openrlhf import (QueryParser, SampleFailure, check_openrlhf_options, empty_reply,
                                          openrlhf_reply)
from steer_reward.server.requests import ApiError, parse_reward_request, parse_score_request, read_json
from steer_reward.server.training_stats import TRAINING, TrainingStatistics

__all__ = ["RewardService", "ClientGone", "create_app", "check_server_config"]

logger = logging.getLogger("steer_reward.server")

_OPEN_PATHS = ("/health",)
"""Paths answered without the bearer token (load balancers probe them)."""

CLIENT_CLOSED = 499
"""Status recorded (never sent) for a request whose client disconnected first (nginx's convention)."""


class ClientGone(Exception):
    """The client disconnected before its reply; its work is dropped and nothing is sent."""


def check_server_config(config: ServerConfig) -> None:
    """ConfigError naming the ``server.*`` key whose value cannot work (the ranges of ``NUMERIC_LIMITS``, also
    for a ``ServerConfig`` built directly rather than loaded)."""
    check_section_numbers(config, "server")


def _finite(values: list[float]) -> list[float | None]:
    return [v if v == v and abs(v) != float("inf") else None for v in values]


class RewardService:
    """The server's state: the reward, its batcher, encoder thread, metrics and limits."""

    def __init__(self, reward: Any, config: ServerConfig | None = None, token: str | None = None) -> None:
        self.reward = reward
        self.config = config or ServerConfig()
        check_server_config(self.config)
        self.token = token or None
        self.scorer = reward.scorer
        backend = getattr(self.scorer, "backend", None)
        if hasattr(backend, "set_prompt_cache_tokens"):
            # Only the model worker thread scores, so the cache needs no lock.
            backend.set_prompt_cache_tokens(self.config.prompt_cache_tokens)
        self.update_stats = reward.shaper.updates_in_training
        self.training: TrainingStatistics | None = None
        if reward.shaper.has_running_state:
            # Loads server.state_file; saves it only when /get_reward updates the statistics.
            self.training = TrainingStatistics(reward, self.config.stats_warmup_samples,
                                               self.config.stats_warmup_wait_ms / 1000.0, self.config.state_file,
                                               self.config.state_save_s)
        self.metrics = ServerMetrics(lambda: self.batcher.pending_samples)
        # OpenRLHF sends one sample per request: length correlations are taken over the last samples served.
        self.length_window = LengthCorrelationWindow(reward.schema.live_names, SERVER_WINDOW)
        self.metrics.watch_length(self.length_window)
        if hasattr(backend, "prompt_prefills"):
            self.metrics.count_prompt_prefills(lambda: backend.prompt_prefills)
        self.batcher = DynamicBatcher(self.scorer.score_encoded, max_wait_ms=self.config.max_wait_ms,
                                      max_batch_tokens=self.config.max_batch_tokens, max_queue=self.config.max_queue,
                                      on_batch=self.metrics.observe_batch,
                                      finish=self.training.finish if self.training and self.update_stats else None,
                                      oom_recovery_s=self.config.oom_recovery_s, on_oom=self.metrics.observe_oom)
        self.metrics.batch_token_budget.set_function(lambda: self.batcher.batch_token_budget)
        if self.training is not None:
            self.metrics.stats_samples.set_function(lambda: self.training.samples_seen)
        # One thread: Hugging Face fast tokenizers are not safe to call from several threads at once.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-reward-encoder")
        self._variants: dict[str, Any] = {}
        tokenizer = self.scorer.tokenizer
        self.end_tokens = tuple(t for t in (getattr(tokenizer, "eos_token", None),) if t)
        # /get_reward: the actor's chat template is read (and checked) now, not at the first request.
        check_openrlhf_options(self.config)
        actor = ActorTemplate.from_tokenizer(self.config.actor_tokenizer) if self.config.actor_tokenizer else None
        self.query_parser = QueryParser(actor, self.end_tokens, self.config.strip_reasoning)
        self.overlong = getattr(reward.config.model, "overlong", "truncate")
        formatter = getattr(self.scorer, "formatter", None)
        self._truncating = copy.copy(formatter) if formatter is not None and self.overlong == "reject" else None
        if self._truncating is not None:
            self._truncating.overlong = "truncate"
        self.forward_failure_streak = 0
        """Samples in a row answered the fallback reward because their forward failed (reset by any forward that
        succeeds); past ``server.fallback_streak_limit`` the model is taken for broken."""
        self.draining = False
        """True once shutdown began: new scoring requests get 503 so clients go to another server."""
        self._readers: set[_BodyReader] = set()
        """The POST requests in flight (event loop only)."""
        self._closed = False

    # -- pieces the handlers share ------------------------------------------------------------------------
    def authorize(self, request: Any) -> None:
        if self.token is None or request.url.path in _OPEN_PATHS:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # Constant-time comparison: the reply time must not leak how much of the token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})

    def variant(self, weights: Mapping[str, float] | None, preset: str | None) -> Any:
        """The reward under a request's weights (no model reload); SchemaError for unknown names."""
        if weights is None and preset is None:
            return self.reward
        spec: Any = preset if weights is None else ({"preset": preset, **weights} if preset else dict(weights))
        key = json.dumps(spec, sort_keys=True)
        if key not in self._variants:
            if len(self._variants) >= 256:
                self._variants.clear()
            self._variants[key] = self.reward.with_weights(spec)
        return self._variants[key]

    async def encode(self, prompts: list, completions: list, item: str = "item") -> list:
        """Encoded samples. A sample the formatter refuses because it is over-long (``model.overlong: reject``)
        is a 413 naming its index (``item``: "item" for /score); other formatting errors stay 422s. Under
        ``truncate`` an over-long sample is scored cut and the cut is reported per sample."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.encoder, self.scorer.encode, prompts, completions)
        except FormattingError as err:
            i = err.index
            if i is not None and await loop.run_in_executor(self.encoder, self._cut_when_truncating, prompts[i],
                                                            completions[i]):
                raise ApiError(413, f"{item} {i}: {err.reason}") from None
            raise

    def _cut_when_truncating(self, prompt: Any, completion: Any) -> bool:
        """Whether ``truncate`` would cut this sample's completion: it is over-long, not malformed (encoder
        thread). The formatter owns the rule; a truncating copy of it answers."""
        if self._truncating is None:
            return False
        try:
            return bool(self._truncating.encode([prompt], [completion])[0].completion_truncated)
        except FormattingError:
            return False

    async def _submit(self, samples: list, tag: Any = None) -> Any:
        result = await self.batcher.submit(samples, tag)
        if isinstance(result, concurrent.futures.Future):  # held for the statistics' warm-up
            result = await asyncio.wrap_future(result)
        self.forward_failure_streak = 0
        attributes = getattr(result, "attributes", result)
        truncated = int(attributes.prompt_truncated.sum())
        if truncated:
            self.metrics.prompt_truncated.inc(truncated)
        cut = int(attributes.completion_truncated.sum())
        if cut:
            self.metrics.completion_truncated.inc(cut)
        return result

    async def attributes(self, prompts: list, completions: list) -> Any:
        """``AttributeScores`` of the pairs, scored in a shared batch (``/score``: statistics untouched)."""
        return await self._submit(await self.encode(prompts, completions))

    async def training_rewards(self, samples: list) -> Any:
        """``ScoredBatch`` of encoded samples for ``/get_reward``: with running normalization, the statistics are
        updated once per model batch with all of its /get_reward samples and every sample is shaped with them."""
        if self.training is not None and self.update_stats:
            return await self._submit(samples, TRAINING)
        from steer_reward.reward import ScoredBatch

        attributes = await self._submit(samples)
        return ScoredBatch(attributes, self.reward.rewards(attributes))

    def monitor(self, attributes: Any, rewards: Any) -> None:
        """Add served samples to the length-correlation window, under the server's own weights."""
        live = list(self.reward.schema.live)
        self.length_window.add(attributes.completion_lengths, rewards, attributes.values[:, live])

    def info(self) -> dict:
        schema = self.reward.schema
        weights = self.reward.shaper.weights.tolist()
        return {
            "model": self.reward.config.model.path,
            "schema": schema.name,
            "names": list(schema.names),
            "live": list(schema.live),
            "live_names": list(schema.live_names),
            "verbosity": schema.verbosity,
            "value_range": list(schema.value_range) if schema.value_range else None,
            "presets": {name: dict(w) for name, w in schema.presets.items()},
            "weights": {n: w for n, w in zip(schema.names, weights) if w != 0.0},
            "template": self.scorer.formatter.template,
            "limits": {
                "max_tokens_per_item": self.scorer.formatter.max_length,
                "max_items_per_request": self.config.max_items_per_request,
                "max_body_bytes": self.config.max_body_bytes,
                "max_batch_tokens": self.config.max_batch_tokens,
                "max_wait_ms": self.config.max_wait_ms,
                "max_queue": self.config.max_queue,
                "read_timeout_s": self.config.read_timeout_s,
                "keep_alive_s": self.config.keep_alive_s,
                "overlong": self.overlong,
            },
            "auth": self.token is not None,
        }

    def begin_shutdown(self, grace_s: float) -> None:
        """Shutdown began (SIGTERM): refuse new scoring requests with 503; at 3/4 of ``grace_s`` fail the
        requests still waiting for the model or still sending their body with 503 + Retry-After, so they are
        answered before the grace period ends (the batch in progress keeps the last quarter). Called on the event
        loop."""
        self.draining = True
        asyncio.get_running_loop().call_later(0.75 * grace_s, self._cut_waiting)

    def _cut_waiting(self) -> None:
        self.batcher.stop(timeout=0)
        for reader in list(self._readers):
            if not reader.complete.is_set() and reader.task is not None:
                reader.cut = True
                reader.task.cancel()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the model worker (waiting requests get 503), shape what the warm-up still holds, write the state."""
        if self._closed:
            return
        self._closed = True
        self.batcher.stop(timeout=timeout_s)
        if self.training is not None:
            self.training.close()
        self.encoder.shutdown(wait=False, cancel_futures=True)

    # -- endpoints ----------------------------------------------------------------------------------------
    async def score(self, request: Any) -> dict:
        body = parse_score_request(await read_json(request, self.config.max_body_bytes),
                                   self.config.max_items_per_request)
        variant = self.variant(body.weights, body.preset)
        names = list(self.reward.schema.names)
        if not body.prompts:
            return {"rewards": [], "attributes": {n: [] for n in names}, "names": names,
                    "completion_lengths": [], "prompt_truncated_tokens": [], "completion_truncated_tokens": []}
        attributes = await self.attributes(body.prompts, body.completions)
        rewards = variant.rewards(attributes)
        self.monitor(attributes, rewards if variant is self.reward else self.reward.rewards(attributes))
        return {
            "rewards": _finite(rewards.tolist()),
            "attributes": {n: _finite(attributes.column(n).tolist()) for n in names},
            "names": names,
            "live": list(self.reward.schema.live_names),
            "completion_lengths": attributes.completion_lengths.tolist(),
            "prompt_truncated_tokens": attributes.prompt_truncated.tolist(),
            "completion_truncated_tokens": attributes.completion_truncated.tolist(),
        }

    async def get_reward(self, request: Any) -> dict:
        body = parse_reward_request(await read_json(request, self.config.max_body_bytes),
                                    self.config.max_items_per_request)
        live = self.reward.schema.live_names
        if not body.queries:
            return empty_reply(live)
        # OpenRLHF fails the training step on an error reply, so a sample that cannot be scored gets the fallback
        # reward (reported per sample and counted) and only a malformed request as a whole gets a 4xx.
        failures: list[SampleFailure] = []
        prompts, completions, index = [], [], []
        for i, query in enumerate(body.queries):
            try:
                parsed = self.query_parser.parse(query, body.prompts[i] if body.prompts else None)
            except InputError as err:
                failures.append(SampleFailure(i, "query", f"query[{i}]: {err}"))
                continue
            prompts.append(parsed.prompt)
            completions.append(parsed.response)
            index.append(i)
        index, scored = await self._score_samples(prompts, completions, index, failures)
        fallback = self.config.fallback_reward
        reply = openrlhf_reply(len(body.queries), live, scored, index, failures, fallback,
                               self.config.openrlhf_scores)
        for failure in reply["failures"]:
            self.metrics.reward_failures.labels(failure["reason"]).inc()
            logger.warning("/get_reward answered the fallback reward %g: %s", fallback, failure["error"])
        return reply

    async def _score_samples(self, prompts: list, completions: list, index: list[int],
                             failures: list[SampleFailure]) -> tuple[list[int], Any]:
        """(indices scored, their ``ScoredBatch``); samples that cannot be encoded join ``failures``. The batch is
        encoded whole first; only when that fails is each sample tried alone, to name the ones at fault."""
        if not index:
            return [], None
        try:
            samples = await self.encode(prompts, completions, item="query")
        except _SAMPLE_ERRORS:
            keep = []
            for j, (prompt, completion) in enumerate(zip(prompts, completions)):
                try:
                    await self.encode([prompt], [completion])
                except _SAMPLE_ERRORS as err:
                    message = err.message if isinstance(err, ApiError) else str(err)
                    failures.append(SampleFailure(index[j], "format", f"query[{index[j]}]: {message}"))
                else:
                    keep.append(j)
            if len(keep) == len(index):
                raise  # every sample encodes alone: the failure is not one sample's
            index = [index[j] for j in keep]
            if not index:
                return [], None
            samples = await self.encode([prompts[j] for j in keep], [completions[j] for j in keep], item="query")
        index, scored = await self._forward_or_fallback(samples, index, failures)
        if scored is not None:
            self.monitor(scored.attributes, scored.rewards)
        return index, scored

    async def _forward_or_fallback(self, samples: list, index: list[int],
                                   failures: list[SampleFailure]) -> tuple[list[int], Any]:
        """(indices scored, their ``ScoredBatch``). The batcher already isolates a failing request; a request whose
        forward fails is split down to the samples that fail alone, which get the fallback reward while the model
        still works for others (see ``server.fallback_streak_limit``)."""
        try:
            return index, await self.training_rewards(samples)
        except (QueueFull, BatcherStopped, asyncio.CancelledError):
            raise  # the server is busy or stopping: the whole request is retried, elsewhere if need be
        except Exception as err:  # noqa: BLE001 - a forward that fails on these samples
            if len(samples) > 1:
                half = len(samples) // 2
                first_index, first = await self._forward_or_fallback(samples[:half], index[:half], failures)
                second_index, second = await self._forward_or_fallback(samples[half:], index[half:], failures)
                parts = [(i, s) for i, s in ((first_index, first), (second_index, second)) if s is not None]
                if not parts:
                    return [], None
                from steer_reward.reward import ScoredBatch
                from steer_reward.scoring import AttributeScores

                return ([i for part, _ in parts for i in part],
                        ScoredBatch(AttributeScores.concat([s.attributes for _, s in parts]),
                                    torch.cat([s.rewards for _, s in parts])))
            self.forward_failure_streak += 1
            if self.forward_failure_streak > self.config.fallback_streak_limit:
                logger.error("/get_reward: %d forwards failed in a row (server.fallback_streak_limit %d): the model "
                             "is taken for broken and errors are answered", self.forward_failure_streak,
                             self.config.fallback_streak_limit)
                raise
            kind = "out of memory even alone" if is_out_of_memory(err) else f"{type(err).__name__}: {err}"
            failures.append(SampleFailure(index[0], "forward", f"query[{index[0]}]: the forward failed ({kind})"))
            return [], None


_SAMPLE_ERRORS = (ApiError, ValueError, TypeError)
"""What encoding one sample raises when that sample is at fault (FormattingError and InputError are ValueErrors;
the over-long check answers ApiError 413). QueueFull and BatcherStopped are not among them: the whole request
is answered 503 and retried."""


def _error_reply(JSONResponse: Any, status: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=dict(headers or {}))


class _BodyReader:
    """The request's ASGI ``receive`` with a deadline on the body and an event set once the body is complete.

    uvicorn bounds nothing once the headers are in: a client that sends less than its Content-Length would hold
    the handler (and a graceful shutdown) for as long as it likes.
    """

    def __init__(self, receive: Callable[[], Awaitable[dict]], timeout_s: float) -> None:
        self.raw = receive
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.complete = asyncio.Event()
        self.task: asyncio.Task | None = None
        """The handler's task, once started."""
        self.cut = False
        """True when shutdown cancelled the handler (answered 503, not counted as a client leaving)."""

    async def __call__(self) -> dict:
        if self.complete.is_set():
            return await self.raw()
        try:
            message = await asyncio.wait_for(self.raw(), max(0.001, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                f"(server.read_timeout_s); send the whole body at once") from None
        if message["type"] == "http.disconnect":
            raise ClientGone()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.complete.set()
        return message

    async def client_left(self) -> None:
        """Returns when the client disconnects (ASGI ``http.disconnect``), watched once the body is read."""
        await self.complete.wait()
        while (await self.raw())["type"] != "http.disconnect":
            pass


async def _race_client(handler: Callable[[Any], Awaitable[Any]], request: Any, reader: _BodyReader) -> Any:
    """``handler(request)``, cancelled (its batcher entry dropped) if the client disconnects first."""
    task = reader.task = asyncio.ensure_future(handler(request))
    watcher = asyncio.ensure_future(reader.client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this request is being cancelled (end of the shutdown grace)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        if reader.cut:
            raise BatcherStopped("the server is shutting down; retry on another server")
        raise ClientGone()
    return task.result()


def _endpoint(service: RewardService, name: str, handler: Callable[[Any], Awaitable[Any]], JSONResponse: Any,
              Request: type, ClientDisconnect: type) -> Callable:
    """Wraps a handler: auth, body deadline, client disconnect, error → JSON reply with the right status, request
    metrics. A handler returns a dict (sent as JSON) or a ready response."""

    async def run(request):
        start = time.perf_counter()
        reader = _BodyReader(request.receive, service.config.read_timeout_s)
        try:
            service.authorize(request)
            if request.method == "POST":
                if service.draining:
                    raise ApiError(503, "the server is shutting down; retry on another server", {"Retry-After": "1"})
                service._readers.add(reader)
                try:
                    result = await _race_client(handler, Request(request.scope, reader), reader)
                finally:
                    service._readers.discard(reader)
            else:
                result = await handler(request)
            reply = JSONResponse(result) if isinstance(result, dict) else result
        except (ClientGone, ClientDisconnect):
            logger.info("%s: the client disconnected before its reply; its work was dropped", name)
            reply = _error_reply(JSONResponse, CLIENT_CLOSED, "the client closed the connection")
        except ApiError as err:
            reply = _error_reply(JSONResponse, err.status, err.message, err.headers)
        except (SchemaError, FormattingError, InputError) as err:
            reply = _error_reply(JSONResponse, 422, str(err))
        except QueueFull as err:
            service.metrics.rejected.inc()
            reply = _error_reply(JSONResponse, 503, str(err), {"Retry-After": str(err.retry_after_s)})
        except BatcherStopped as err:
            reply = _error_reply(JSONResponse, 503, str(err), {"Retry-After": "1"})
        except asyncio.CancelledError:
            # uvicorn cancels what is left when the shutdown grace period ends: fail it cleanly, in JSON.
            reply = _error_reply(JSONResponse, 503, "the server shut down before this request was scored; retry on "
                                                    "another server", {"Retry-After": "1"})
        except Exception as err:  # noqa: BLE001 - a bug must still answer JSON, and the server keeps serving
            if is_out_of_memory(err):
                logger.error("%s: out of memory even alone: %s", name, err)
                reply = _error_reply(JSONResponse, 503, f"the server ran out of memory scoring this request alone "
                                                        f"({err}); send fewer or shorter samples per request",
                                     {"Retry-After": "5"})
            else:
                logger.exception("%s failed", name)
                reply = _error_reply(JSONResponse, 500, f"internal error: {type(err).__name__}: {err}")
        has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
        if service.draining or (has_body and not reader.complete.is_set()):
            # Answered before the whole body was read: close, so the rest of it is neither parsed as a next request
            # nor allowed to trickle in forever.
            reply.headers["Connection"] = "close"
        service.metrics.requests.labels(name, str(reply.status_code)).inc()
        service.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return reply

    # FastAPI reads the signature to inject the request; the annotation must be the class itself.
    run.__signature__ = inspect.Signature([inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             annotation=Request)])
    run.__name__ = handler.__name__
    return run


def create_app(reward: Any, config: ServerConfig | None = None, token: str | None = None) -> Any:
    """A FastAPI app serving ``reward`` (a ``SteerReward`` with an in-process scorer).

    ``token``: bearer token every endpoint but ``/health`` requires (None: no auth).
    """
    require_extra("fastapi", "server")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    service = RewardService(reward, config, token)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.close)  # off the event loop: replies still being sent go out

    app = FastAPI(title="steer-reward", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    async def health(request) -> dict:
        if service.draining:
            raise ApiError(503, "the server is shutting down")
        if not service.batcher.alive:
            raise ApiError(503, "the model worker is not running")
        if service.forward_failure_streak > service.config.fallback_streak_limit:
            raise ApiError(503, f"the model's forward failed on {service.forward_failure_streak} samples in a row "
                                f"(server.fallback_streak_limit {service.config.fallback_streak_limit})")
        return {"status": "ok", "pending_samples": service.batcher.pending_samples}

    async def info(request) -> dict:
        return service.info()

    async def metrics(request) -> Any:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    for path, method, handler in (("/score", "POST", service.score), ("/get_reward", "POST", service.get_reward),
                                  ("/health", "GET", health), ("/info", "GET", info), ("/metrics", "GET", metrics)):
        app.add_api_route(path, _endpoint(service, path, handler, JSONResponse, Request, ClientDisconnect),
                          methods=[method])

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown path (404), wrong method (405): JSON like every other reply
        return _error_reply(JSONResponse, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                            getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logger.exception("unhandled error")
        return _error_reply(JSONResponse, 500, f"internal error: {type(exc).__name__}")

    return app
