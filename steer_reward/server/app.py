"""The reward server's FastAPI app: ``/score``, OpenRLHF's ``/get_reward``, ``/health``, ``/info``, ``/metrics``.

Request handlers check and tokenize (on one encoder thread, so the event loop keeps accepting and the model
worker only runs forwards); the ``DynamicBatcher`` merges the samples of concurrent requests into one scorer call;
shaping runs back in the handler with the request's own weights. Every reply is JSON, errors included (OpenRLHF
retries 5 times and then drops the reward, so an error must say what was wrong, at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Mapping

from steer_reward.config import ServerConfig
from steer_reward.errors import InputError, require_extra
from steer_reward.formatting import FormattingError
from steer_reward.monitors import SERVER_WINDOW, LengthCorrelationWindow
from steer_reward.schema import SchemaError
from steer_reward.server.batcher import BatcherStopped, DynamicBatcher, QueueFull
from steer_reward.server.metrics import ServerMetrics
from steer_reward.server.actor_templates import ActorTemplate
from steer_reward.server.openrlhf import (QueryParser, SampleFailure, check_openrlhf_options, empty_reply,
                                          openrlhf_reply)
from steer_reward.server.requests import ApiError, parse_reward_request, parse_score_request, read_json

__all__ = ["RewardService", "create_app"]

logger = logging.getLogger("steer_reward.server")

_OPEN_PATHS = ("/health",)
"""Paths answered without the bearer token (load balancers probe them)."""


def _finite(values: list[float]) -> list[float | None]:
    return [v if v == v and abs(v) != float("inf") else None for v in values]


class RewardService:
    """The server's state: the reward, its batcher, encoder thread, metrics and limits."""

    def __init__(self, reward: Any, config: ServerConfig | None = None, token: str | None = None) -> None:
        self.reward = reward
        self.config = config or ServerConfig()
        self.token = token or None
        self.scorer = reward.scorer
        backend = getattr(self.scorer, "backend", None)
        if hasattr(backend, "set_prompt_cache_tokens"):
            # Only the model worker thread scores, so the cache needs no lock.
            backend.set_prompt_cache_tokens(self.config.prompt_cache_tokens)
        self.metrics = ServerMetrics(lambda: self.batcher.pending_samples)
        # OpenRLHF sends one sample per request: length correlations are taken over the last samples served.
        self.length_window = LengthCorrelationWindow(reward.schema.live_names, SERVER_WINDOW)
        self.metrics.watch_length(self.length_window)
        if hasattr(backend, "prompt_prefills"):
            self.metrics.count_prompt_prefills(lambda: backend.prompt_prefills)
        self.batcher = DynamicBatcher(self.scorer.score_encoded, max_wait_ms=self.config.max_wait_ms,
                                      max_batch_tokens=self.config.max_batch_tokens, max_queue=self.config.max_queue,
                                      on_batch=self.metrics.observe_batch)
        # One thread: Hugging Face fast tokenizers are not safe to call from several threads at once.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-reward-encoder")
        self._variants: dict[str, Any] = {}
        tokenizer = self.scorer.tokenizer
        self.end_tokens = tuple(t for t in (getattr(tokenizer, "eos_token", None),) if t)
        self.update_stats = reward.shaper.updates_in_training
        # /get_reward: the actor's chat template is read (and checked) now, not at the first request.
        check_openrlhf_options(self.config)
        actor = ActorTemplate.from_tokenizer(self.config.actor_tokenizer) if self.config.actor_tokenizer else None
        self.query_parser = QueryParser(actor, self.end_tokens, self.config.strip_reasoning)

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

    async def encode(self, prompts: list, completions: list) -> list:
        samples = await asyncio.get_running_loop().run_in_executor(self.encoder, self.scorer.encode, prompts,
                                                                    completions)
        limit = self.scorer.formatter.max_length
        for i, sample in enumerate(samples):
            if sample.completion_truncated:
                tokens = len(sample.completion_ids) + sample.completion_truncated
                raise ApiError(413, f"item {i}: the completion alone has {tokens} tokens, more than the model's {limit} "
                                    f"(model.max_length); it cannot be scored without cutting the response")
        return samples

    async def attributes(self, prompts: list, completions: list) -> Any:
        samples = await self.encode(prompts, completions)
        attributes = await self.batcher.submit(samples)
        truncated = int(attributes.prompt_truncated.sum())
        if truncated:
            self.metrics.prompt_truncated.inc(truncated)
        return attributes

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
            },
            "auth": self.token is not None,
        }

    def close(self) -> None:
        self.batcher.stop()
        self.encoder.shutdown(wait=False, cancel_futures=True)

    # -- endpoints ----------------------------------------------------------------------------------------
    async def score(self, request: Any) -> dict:
        body = parse_score_request(await read_json(request, self.config.max_body_bytes),
                                   self.config.max_items_per_request)
        variant = self.variant(body.weights, body.preset)
        names = list(self.reward.schema.names)
        if not body.prompts:
            return {"rewards": [], "attributes": {n: [] for n in names}, "names": names,
                    "completion_lengths": [], "prompt_truncated_tokens": []}
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
        from steer_reward.reward import ScoredBatch

        if not index:
            return [], None
        try:
            attributes = await self.attributes(prompts, completions)
        except _SAMPLE_ERRORS as batch_error:
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
                raise batch_error  # every sample encodes alone: the failure is not one sample's
            prompts, completions = [prompts[j] for j in keep], [completions[j] for j in keep]
            index = [index[j] for j in keep]
            if not index:
                return [], None
            attributes = await self.attributes(prompts, completions)
        scored = ScoredBatch(attributes, self.reward.rewards(attributes, update_stats=self.update_stats))
        self.monitor(attributes, scored.rewards)
        return index, scored


_SAMPLE_ERRORS = (ApiError, ValueError, TypeError)
"""What encoding one sample raises when that sample is at fault (FormattingError and InputError are ValueErrors;
the over-long check answers ApiError 413). QueueFull and BatcherStopped are not among them: the whole request
is answered 503 and retried."""


def _error_reply(JSONResponse: Any, status: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=dict(headers or {}))


def _endpoint(service: RewardService, name: str, handler: Callable[[Any], Awaitable[Any]], JSONResponse: Any,
              Request: type) -> Callable:
    """Wraps a handler: auth, error → JSON reply with the right status, request metrics. A handler returns a
    dict (sent as JSON) or a ready response."""

    async def run(request):
        start = time.perf_counter()
        try:
            service.authorize(request)
            result = await handler(request)
            reply = JSONResponse(result) if isinstance(result, dict) else result
        except ApiError as err:
            reply = _error_reply(JSONResponse, err.status, err.message, err.headers)
        except (SchemaError, FormattingError, InputError) as err:
            reply = _error_reply(JSONResponse, 422, str(err))
        except QueueFull as err:
            service.metrics.rejected.inc()
            reply = _error_reply(JSONResponse, 503, str(err), {"Retry-After": str(err.retry_after_s)})
        except BatcherStopped as err:
            reply = _error_reply(JSONResponse, 503, str(err), {"Retry-After": "1"})
        except Exception as err:  # noqa: BLE001 - a bug must still answer JSON, and the server keeps serving
            logger.exception("%s failed", name)
            reply = _error_reply(JSONResponse, 500, f"internal error: {type(err).__name__}: {err}")
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

    service = RewardService(reward, config, token)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="steer-reward", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    async def health(request) -> dict:
        if not service.batcher.alive:
            raise ApiError(503, "the model worker is not running")
        return {"status": "ok", "pending_samples": service.batcher.pending_samples}

    async def info(request) -> dict:
        return service.info()

    async def metrics(request) -> Any:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    for path, method, handler in (("/score", "POST", service.score), ("/get_reward", "POST", service.get_reward),
                                  ("/health", "GET", health), ("/info", "GET", info), ("/metrics", "GET", metrics)):
        app.add_api_route(path, _endpoint(service, path, handler, JSONResponse, Request), methods=[method])

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown path (404), wrong method (405): JSON like every other reply
        return _error_reply(JSONResponse, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                            getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        logger.exception("unhandled error")
        return _error_reply(JSONResponse, 500, f"internal error: {type(exc).__name__}")

    return app
