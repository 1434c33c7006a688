"""N scoring replicas behind one URL, on Ray Serve: the same HTTP API as ``steer-reward serve``.

OpenRLHF 0.9.1-0.11.1 sends empty lists to every ``--reward.remote_url`` but the first, so scale-out must sit
behind one URL. Layout (one Ray Serve application)::

    HTTP ─► Ray Serve proxy ─► RewardGateway (reads the prompt, no model) ─► RewardReplica × N
                                                                             (create_app: batcher, prompt cache)

- **Each replica runs the server's own FastAPI app** (``create_app``), called in-process through ASGI with the
  request's method, path, headers and body as received: validation, limits, auth, error bodies, cross-request
  batching and the prompt KV cache are exactly the single server's.
- **Prompt affinity** (``PromptAffinityRouter``, a Ray Serve request router): the gateway computes the prompt's key
  (``affinity.affinity_key``); the replica first in the key's rendezvous order gets the request, so the G samples
  of one prompt share one prefill; when that replica is full (``server.replica_max_ongoing``) or gone, the
  least-loaded other replica takes it. Requests without a key go to the least-loaded replica.
- **Nothing lost**: a replica that dies is replaced by Ray Serve; the gateway retries the requests it held
  (``server.replica_retries``, within ``server.replica_timeout_s``), then answers 503 with Retry-After, which
  OpenRLHF retries.
- ``/health`` and ``/metrics`` ask every replica (``/metrics`` adds a ``replica`` label to each sample);
  ``/info`` is one replica's, plus a ``scale_out`` section.

Entry points: ``steer-reward serve --replicas N``; ``serve run steer_reward.server.ray_serve:build_app
config=reward.yaml``; ``reward_application(config, token)`` for ``serve.run`` in Python.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Mapping

from steer_reward.errors import require_extra

ray = require_extra("ray", "ray")
require_extra("ray.serve", "ray")

from ray import serve  # noqa: E402
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica  # noqa: E402

from steer_reward.config import ConfigError, SteerRewardConfig, load_config  # noqa: E402
from steer_reward.server.affinity import affinity_key, rendezvous_order  # noqa: E402

__all__ = ["PromptAffinityRouter", "RewardReplica", "RewardGateway", "reward_application", "build_app",
           "check_scale_out", "APP_NAME"]

logger = logging.getLogger("steer_reward.server")

APP_NAME = "steer-reward"
REPLICA_NAME = "RewardReplica"
_HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
_FANOUT_TIMEOUT_S = 10.0
"""How long /health and /metrics wait for one replica (a replica busy loading or dead is reported, not waited on)."""
_DISCONNECT_GRACE_S = 5.0
"""How long a cancelled call waits for the app to drop the request's work and count it (it takes milliseconds: the
request's batcher entry is cancelled, not waited on) before the app's task is cancelled outright."""


# -- routing ------------------------------------------------------------------------------------------------------
class PromptAffinityRouter(RequestRouter):
    """Ray Serve request router: the prompt's rendezvous-first replica, else the least-loaded one.

    Reads the ``affinity`` keyword argument of the call (a prompt key; None: least-loaded). Returns ranks for Ray
    Serve's own selection, which probes queue lengths and skips a replica that is full: rank 1 is the preferred
    replica, rank 2 every other one (the least loaded is taken).
    """

    def initialize_state(self, affinity: bool = True) -> None:
        self.affinity = bool(affinity)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every replica is a candidate in every round: let Ray Serve back off between rounds.
            pending_request.routing_context.should_backoff = True
        kwargs = pending_request.kwargs if pending_request is not None else {}
        key = kwargs.get("affinity") if self.affinity else None
        if key is None or len(candidate_replicas) < 2:
            return [list(candidate_replicas)]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        first, *rest = rendezvous_order(key, by_id)
        return [[by_id[first]], [by_id[r] for r in rest]]


# -- replica ------------------------------------------------------------------------------------------------------
async def call_asgi(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One HTTP request through an ASGI ``app`` in this process: (status, headers, body).

    The body is delivered whole; the headers are passed as received (Content-Length included, so the app's own
    size check answers an oversize body exactly as the single server does).

    Cancelling the call is the client leaving: Ray Serve cancels a replica's call when the HTTP client of the
    request disconnects at the proxy (or the gateway gives up on it). The app is then told what the single server
    hears from uvicorn, an ``http.disconnect``, so it drops the request's work (before the model when its batch has
    not started; never touching the other requests of a batch) and counts it as 499, without a traceback. The
    cancellation goes on once the app has answered (within ``_DISCONNECT_GRACE_S``).
    """
    left = asyncio.Event()
    """Set once the reply is sent or the caller is gone: ``receive`` then answers ``http.disconnect``."""
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()  # nothing more to read; the client stays connected until the reply is sent or it leaves
        return {"type": "http.disconnect"}

    status, reply_headers, chunks = 500, [], []

    async def send(message: dict) -> None:
        nonlocal status, reply_headers
        if message["type"] == "http.response.start":
            status, reply_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    # Its own task: a cancellation of this call must reach the app as a disconnect, not as a CancelledError inside
    # the handler (which the app answers as a shutdown, 503).
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        left.set()
        if not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_GRACE_S)
        if not task.done():
            task.cancel()
        raise
    finally:
        left.set()
    return status, reply_headers, b"".join(chunks)


class RewardReplica:
    """One scoring replica: the server's FastAPI app (``create_app``) around one in-process model."""

    def __init__(self, config: Mapping, token: str | None = None) -> None:
        from steer_reward.quiet import quiet_transformers
        from steer_reward.reward import SteerReward
        from steer_reward.server.app import create_app

        quiet_transformers()
        reward = SteerReward.from_config(load_config(dict(config)))
        if reward.is_async:
            raise ConfigError("a replica needs an in-process model: backend 'remote' would forward to another server")
        self.app = create_app(reward, reward.config.server, token)
        self.service = self.app.state.service
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - built outside Ray Serve (a plain Python object)
            self.replica_id = "local"

    async def forward(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                      affinity: str | None = None) -> tuple:
        """The app's reply to one HTTP request: (status, headers, body). ``affinity`` is read by the router only."""
        return await call_asgi(self.app, method, path, query, headers, body)

    async def metrics(self, headers: list[tuple[bytes, bytes]]) -> tuple:
        """(this replica's id, its ``GET /metrics`` reply as (status, headers, body))."""
        return self.replica_id, await call_asgi(self.app, "GET", "/metrics", b"", headers, b"")

    def describe(self) -> dict:
        """This replica's id, whether its model worker runs, and its pending samples (for the gateway's /health)."""
        return {"replica": self.replica_id, "alive": self.service.batcher.alive,
                "pending_samples": self.service.batcher.pending_samples, "pid": os.getpid()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose model worker stopped is restarted."""
        if not self.service.batcher.alive:
            raise RuntimeError("the model worker is not running")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


# -- gateway ------------------------------------------------------------------------------------------------------
def _json_reply(status: int, payload: dict, headers: Mapping[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=dict(headers or {}))


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
    # The single server's error shape: every reply is JSON (OpenRLHF retries, then drops the reward).
    return _json_reply(status, {"error": message, "status": status}, headers)


async def _read_capped(request: Any, max_bytes: int) -> bytes:
    """The body, reading at most ``max_bytes + 1`` bytes: enough for the replica to refuse an oversize body with the
    single server's 413, without the gateway holding an unbounded body."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            break
    return bytes(body)


class _Families:
    """A prometheus_client collector returning metric families already built."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


def _app_path(scope: Mapping) -> str:
    """The request path below the application's route prefix (``serve.run(..., route_prefix="/rm")``)."""
    path, root = scope["path"], scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _raw_response(status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> Any:
    """A reply with a replica's status, headers and body as they were."""
    from starlette.responses import Response

    response = Response(content, status_code=status)
    response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(content)).encode())]
    return response


def merge_metrics(texts: Mapping[str, str]) -> bytes:
    """Prometheus text of several replicas as one exposition, each sample labelled with its ``replica``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def _cancel(call: Any) -> None:
    """Cancel a replica call nobody waits for any more (Ray Serve's ``DeploymentResponse.cancel``): still queued for
    a replica, it is never sent; sent, the replica's call is cancelled (``call_asgi`` turns that into the client's
    disconnect). Best effort: a call that already finished is left as it is."""
    try:
        call.cancel()
    except Exception as err:  # noqa: BLE001 - the request is over either way; the caller's outcome stands
        logger.debug("cancelling a replica call failed: %s", err)


class RewardGateway:
    """The one URL: reads each request's prompt, routes it to a replica, retries when that replica dies."""

    def __init__(self, replicas: Any, server: Mapping) -> None:
        self.replicas = replicas
        self.max_body_bytes = int(server["max_body_bytes"])
        self.retries = max(1, int(server["replica_retries"]))
        self.timeout_s = float(server["replica_timeout_s"])
        self.affinity = bool(server["affinity"])
        self.configured = int(server["replicas"])
        """``server.replicas``: the replicas started (with autoscaling, at start)."""
        self.retried = 0
        """Requests sent again because their replica died holding them."""
        self.client_closed = 0
        """Requests whose client disconnected before their reply (their replica call was cancelled)."""

    async def __call__(self, request: Any) -> Any:
        try:
            return await self._route(request)
        except asyncio.CancelledError:
            # The client disconnected at the proxy, which cancels this call; Ray Serve cancels the replica call
            # made in it too, and _send cancels it explicitly (the replica counts it as 499).
            self.client_closed += 1
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still answer JSON, and the gateway keeps serving
            logger.exception("the gateway failed")
            return _error(500, f"internal error: {type(err).__name__}: {err}")

    async def _route(self, request: Any) -> Any:
        from starlette.responses import Response

        method, path = request.method, _app_path(request.scope)
        if method == "GET" and path == "/health":
            return await self._health()
        if method == "GET" and path == "/metrics":
            return await self._metrics(request)
        body = await _read_capped(request, self.max_body_bytes) if method not in ("GET", "HEAD") else b""
        key = affinity_key(path, body) if method == "POST" and self.affinity else None
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS]
        reply = await self._send(method, path, request.url.query.encode(), headers, body, key)
        if isinstance(reply, Response):
            return reply
        status, reply_headers, content = reply
        if method == "GET" and path == "/info" and status == 200:
            content = await self._info(content)
        return _raw_response(status, reply_headers, content)

    async def _send(self, method: str, path: str, query: bytes, headers: list, body: bytes, key: str | None) -> Any:
        """The replica's (status, headers, body), retrying when the replica died holding the request; a JSON 503
        when no replica answered in time."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        deadline = time.monotonic() + self.timeout_s
        last = "no replica answered"
        for attempt in range(self.retries):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            call = self.replicas.forward.remote(method, path, query, headers, body, affinity=key)
            try:
                return await asyncio.wait_for(call, remaining)
            except asyncio.CancelledError:
                _cancel(call)  # the client left: drop the request's work in the replica, or its place in the queue
                raise
            except (RayActorError, ActorUnavailableError) as err:
                # The replica died (or is restarting) with this request in it, so its sample was not scored. Send
                # it again: the router picks a live replica (the prompt's next one in rendezvous order).
                last = type(err).__name__
                self.retried += 1
                logger.warning("a replica lost a request (%s); retrying (%d/%d)", last, attempt + 1, self.retries)
                await asyncio.sleep(min(0.2 * (attempt + 1), max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                # wait_for cancels only the local await; the replica would go on scoring a request answered 503.
                _cancel(call)
                last = f"no reply within {self.timeout_s:.0f} s"
                break
        return _error(503, f"no scoring replica could answer ({last}); retry shortly", {"Retry-After": "1"})

    async def _broadcast(self, method_name: str, *args: Any) -> list:
        """``method_name(*args)`` on every running replica: the results of those that answered in time."""
        try:
            results = await self.replicas.broadcast(method_name, *args).results_async(
                timeout_s=_FANOUT_TIMEOUT_S, return_exceptions=True)
        except Exception as err:  # noqa: BLE001 - no replica running (deployment unavailable) or none in time
            logger.warning("%s on every replica failed: %s", method_name, err)
            return []
        return [r for r in results if not isinstance(r, BaseException)]

    async def _health(self) -> Any:
        # Open like the single server's /health (load balancers probe it). 200 while one replica can score: the URL
        # still answers every request then, only slower, and a load balancer that took it out would turn fewer
        # replicas into none (OpenRLHF never probes; it retries what fails). The body says how many are up.
        replicas = await self._broadcast("describe")
        healthy = [r for r in replicas if r["alive"]]
        if not healthy:
            return _error(503, f"no scoring replica is healthy ({len(replicas)} answered, {self.configured} "
                               f"configured)")
        return _json_reply(200, {"status": "ok", "replicas_up": len(healthy), "replicas_configured": self.configured,
                                 "pending_samples": sum(r["pending_samples"] for r in healthy),
                                 "replicas": healthy})

    async def _metrics(self, request: Any) -> Any:
        from starlette.responses import Response

        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS | {b"content-length"}]
        replies = dict(await self._broadcast("metrics", headers))
        if not replies:
            return _error(503, "no scoring replica answered /metrics")
        refused = next((r for r in replies.values() if r[0] != 200), None)
        if refused is not None:  # e.g. a wrong token: the replica's own 401 reply
            return _raw_response(*refused)
        texts = {replica: reply[2].decode() for replica, reply in replies.items()}
        gateway = (f"# HELP steer_reward_gateway_retries_total Requests sent again because their replica died\n"
                   f"# TYPE steer_reward_gateway_retries_total counter\n"
                   f"steer_reward_gateway_retries_total {float(self.retried)}\n"
                   f"# HELP steer_reward_gateway_client_closed_total Requests whose client disconnected before the "
                   f"reply; their replica call was cancelled (a replica that held it counts it as code 499)\n"
                   f"# TYPE steer_reward_gateway_client_closed_total counter\n"
                   f"steer_reward_gateway_client_closed_total {float(self.client_closed)}\n").encode()
        return Response(merge_metrics(texts) + gateway, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _info(self, content: bytes) -> bytes:
        info = json.loads(content)
        info["scale_out"] = {"engine": "ray-serve", "replicas": len(await self._broadcast("describe")),
                             "routing": "prompt-affinity" if self.affinity else "least-loaded"}
        return json.dumps(info).encode()


# -- the application ----------------------------------------------------------------------------------------------
def check_scale_out(config: SteerRewardConfig) -> None:
    """ConfigError naming the key for scale-out settings that cannot work."""
    s = config.server
    if config.backend == "remote":
        raise ConfigError("server.replicas needs an in-process model: backend 'remote' would forward to another server")
    if config.backend == "deepspeed":
        raise ConfigError("server.replicas runs one model per replica: use backend 'local' (ZeRO-3 shards one model "
                          "over a training job's ranks)")
    if s.replicas < 1:
        raise ConfigError(f"server.replicas must be at least 1 for Ray Serve, got {s.replicas}")
    if (s.min_replicas is None) != (s.max_replicas is None):
        raise ConfigError("server.min_replicas and server.max_replicas go together (autoscaling limits)")
    if s.min_replicas is not None and not 0 <= s.min_replicas <= s.replicas <= s.max_replicas:
        raise ConfigError(f"server.min_replicas <= server.replicas <= server.max_replicas must hold, got "
                          f"{s.min_replicas} <= {s.replicas} <= {s.max_replicas}")
    for key, value in (("server.replica_max_ongoing", s.replica_max_ongoing), ("server.gateway_replicas",
                       s.gateway_replicas), ("server.replica_retries", s.replica_retries),
                       ("server.replica_timeout_s", s.replica_timeout_s)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    several = max(s.replicas, s.max_replicas or 0) > 1
    if several and "running" in (config.shaping.normalization, config.shaping.reward_normalization):
        # Each replica would keep its own statistics and normalize the same sample differently.
        raise ConfigError("running normalization keeps its statistics in one process, so several replicas would "
                          "shape the same sample differently: use shaping.normalization: fixed (stats_file) or one "
                          "replica")
    if s.replica_gpus < 0 or s.replica_cpus < 0:
        raise ConfigError("server.replica_gpus and server.replica_cpus must not be negative")


def reward_application(config: SteerRewardConfig, token: str | None = None) -> Any:
    """The Ray Serve application (gateway + replicas) serving ``config``; run it with ``serve.run``.

    Every replica builds its model from ``config`` (``model.path`` must exist on every node of the cluster).
    """
    from ray.serve.config import RequestRouterConfig

    check_scale_out(config)
    s = config.server
    if s.min_replicas is not None:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas, "initial_replicas": s.replicas,
            # A batching replica works best with many requests in it: scale up at half its capacity.
            "target_ongoing_requests": max(1, s.replica_max_ongoing // 2)}}
    else:
        scaling = {"num_replicas": s.replicas}
    replicas = serve.deployment(RewardReplica, name=REPLICA_NAME).options(
        max_ongoing_requests=s.replica_max_ongoing, max_queued_requests=-1,
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=PromptAffinityRouter,
                                                  request_router_kwargs={"affinity": s.affinity}),
        health_check_period_s=5.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=10.0, **scaling,
    ).bind(config.to_dict(), token)
    gateway = serve.deployment(RewardGateway, name="RewardGateway").options(
        num_replicas=s.gateway_replicas, max_ongoing_requests=max(s.max_queue, s.replica_max_ongoing * 4),
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(replicas, {k: getattr(s, k) for k in ("max_body_bytes", "replica_retries",
                                                              "replica_timeout_s", "affinity", "replicas")})


def build_app(args: Mapping[str, str]) -> Any:
    """Application builder for ``serve run steer_reward.server.ray_serve:build_app config=PATH [model=PATH]
    [replicas=N]``: the YAML config, with ``key=value`` arguments as overrides of ``server.*`` (and ``model``)."""
    from steer_reward.config import parse_override

    args = dict(args)
    overrides = {}
    if "model" in args:
        overrides["model.path"] = args.pop("model")
    config_path = args.pop("config", None)
    for key, value in args.items():
        overrides[key if "." in key else f"server.{key}"] = parse_override(f"x={value}")[1]
    config = load_config(config_path, overrides)
    if config.server.replicas == 0:
        config = load_config(config_path, {**overrides, "server.replicas": 1})
    token = os.environ.get(config.server.token_env) or None
    return reward_application(config, token)


def start_ray(config: SteerRewardConfig) -> None:
    """Join ``server.ray_address``, or start a local Ray instance sized for the replicas."""
    if ray.is_initialized():
        return
    s = config.server
    if s.ray_address:
        ray.init(address=s.ray_address, log_to_driver=False)
        return
    # Logical CPUs for the replicas even on a small machine (the gateway and proxy need none).
    cpus = max(os.cpu_count() or 1, int(s.replica_cpus * (s.max_replicas or s.replicas) + 0.999))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
