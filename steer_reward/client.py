"""``RemoteScorer``: the HTTP client of ``steer-reward serve`` (sync and async), with retries and failover.

Failures that may pass (connection refused or reset, timeouts, 5xx, 429, 503 with Retry-After) are retried with
exponential backoff and jitter, moving round-robin to the next server and skipping servers that failed recently;
a 4xx means the request itself is wrong and is raised at once with the server's message.

Idle keep-alive connections are dropped after ``idle_timeout_s`` (4 s), before the server closes them
(``server.keep_alive_s``, 75 s). A request that still meets a connection closed under it (the server or a proxy
closed it first: "Server disconnected without sending a response", a reset) is sent again at once on a new
connection, once, without counting as a try or marking the server unhealthy: ``/score`` computes nothing that
a repeat would change.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from typing import Any, Mapping, Sequence

import torch

from steer_reward.errors import require_extra
from steer_reward.scoring import AttributeScores

__all__ = ["RemoteError", "RemoteScorer", "attribute_scores_from_reply"]

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RemoteError(RuntimeError):
    """A reward server refused a request, or no server answered within the retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def attribute_scores_from_reply(reply: Mapping) -> AttributeScores:
    """``AttributeScores`` from a ``/score`` reply (null values, sent for NaN, come back as NaN)."""
    names = tuple(reply["names"])
    columns = [[float("nan") if v is None else float(v) for v in reply["attributes"][name]] for name in names]
    n = len(reply["rewards"])
    values = torch.tensor(columns, dtype=torch.float32).T if columns else torch.empty((n, 0))
    return AttributeScores(
        values=values.reshape(n, len(names)).contiguous(),
        names=names,
        completion_lengths=torch.tensor(reply.get("completion_lengths", [0] * n), dtype=torch.long),
        prompt_truncated=torch.tensor(reply.get("prompt_truncated_tokens", [0] * n), dtype=torch.long),
        completion_truncated=torch.tensor(reply.get("completion_truncated_tokens", [0] * n), dtype=torch.long),
    )


def _error_message(response: Any) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:500]


class RemoteScorer:
    """Scores (prompt, completion) pairs on one or more ``steer-reward serve`` servers.

    >>> scorer = RemoteScorer(["http://127.0.0.1:8000", "http://127.0.0.1:8001"])  # doctest: +SKIP
    >>> scorer.score(["Hi"], ["Hello!"]).values.shape  # doctest: +SKIP
    torch.Size([1, 9])
    """

    def __init__(self, urls: str | Sequence[str], token: str | None = None, timeout: float = 180.0,
                 retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 10.0, unhealthy_s: float = 5.0,
                 max_items: int = 1024, idle_timeout_s: float = 4.0) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("RemoteScorer needs at least one server URL (remote.urls)")
        self.urls = [u.rstrip("/") for u in urls]
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.unhealthy_s = float(unhealthy_s)
        self.max_items = int(max_items)
        self.idle_timeout_s = float(idle_timeout_s)
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._unhealthy_until = {url: 0.0 for url in self.urls}
        self._client = None
        self._async_clients: dict[int, Any] = {}

    # Clients, locks and sockets do not pickle; TRL's async GRPO sends reward callables to other processes.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_lock", "_next", "_unhealthy_until", "_client", "_async_clients"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # -- server choice and retry timing -----------------------------------------------------------------------
    def _pick(self) -> str:
        """The next server round-robin, skipping those that failed within ``unhealthy_s`` (unless all did)."""
        now = time.monotonic()
        with self._lock:
            start = next(self._next)
            order = [self.urls[(start + i) % len(self.urls)] for i in range(len(self.urls))]
            healthy = [u for u in order if self._unhealthy_until[u] <= now]
            return healthy[0] if healthy else min(order, key=self._unhealthy_until.__getitem__)

    def _mark_unhealthy(self, url: str) -> None:
        with self._lock:
            self._unhealthy_until[url] = time.monotonic() + self.unhealthy_s

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:  # the server knows how long its queue takes to drain
                return float(retry_after) * random.uniform(1.0, 1.25)
            except ValueError:
                pass
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)

    def _outcome(self, url: str, response: Any, error: Exception | None) -> tuple[Any, str | None, str]:
        """One try's result as (reply JSON or None, Retry-After, what went wrong); raises on a 4xx.

        ``error`` is the transport error (connection refused, timeout) when no response came back.
        """
        if error is not None:
            self._mark_unhealthy(url)
            return None, None, f"{url}: {type(error).__name__}: {error}"
        if response.status_code == 200:
            return response.json(), None, ""
        if response.status_code in _RETRY_STATUS:
            if response.status_code != 429:
                self._mark_unhealthy(url)
            retry_after = response.headers.get("retry-after", "")
            return None, retry_after, f"{url}: busy or failing (Retry-After {retry_after or 'not given'})"
        raise RemoteError(f"{url} refused the request ({response.status_code}): {_error_message(response)}",
                          response.status_code)

    @staticmethod
    def _stale_connection(error: Exception | None) -> bool:
        """The connection was closed under the request (a reused keep-alive connection the server had just
        closed, or a reset): worth one immediate resend on a fresh connection."""
        httpx = require_extra("httpx", "server")
        return isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))

    def _limits(self, **extra: Any) -> Any:
        httpx = require_extra("httpx", "server")
        return httpx.Limits(keepalive_expiry=self.idle_timeout_s, **extra)

    def _give_up(self, path: str, last: str) -> RemoteError:
        return RemoteError(f"no reward server answered {path} after {self.retries} tries ({', '.join(self.urls)}); "
                           f"last error: {last}")

    # -- sync ---------------------------------------------------------------------------------------------------
    def _sync_client(self) -> Any:
        if self._client is None:
            httpx = require_extra("httpx", "server")
            self._client = httpx.Client(timeout=self.timeout, headers=self.headers, limits=self._limits())
        return self._client

    def request(self, method: str, path: str, payload: Any = None) -> dict:
        """One JSON request with retries and failover."""
        httpx = require_extra("httpx", "server")
        client, last, resent = self._sync_client(), "", False
        for attempt in range(self.retries):
            url = self._pick()
            try:
                response, error = client.request(method, url + path, json=payload), None
            except httpx.TransportError as err:
                response, error = None, err
            if not resent and self._stale_connection(error):
                resent = True
                try:
                    response, error = client.request(method, url + path, json=payload), None
                except httpx.TransportError as err:
                    response, error = None, err
            reply, retry_after, last = self._outcome(url, response, error)
            if reply is not None:
                return reply
            if attempt + 1 < self.retries:
                time.sleep(self._delay(attempt, retry_after))
        raise self._give_up(path, last)

    def info(self) -> dict:
        """The server's ``/info``: model, attribute names, live attributes, presets, active weights, limits."""
        return self.request("GET", "/info")

    def _payloads(self, prompts: Sequence, completions: Sequence, weights: Mapping | None,
                  preset: str | None) -> list[dict]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        extra = {k: v for k, v in (("weights", dict(weights) if weights else None), ("preset", preset)) if v}
        return [{"prompts": list(prompts[i:i + self.max_items]), "completions": list(completions[i:i + self.max_items]),
                 **extra} for i in range(0, max(len(prompts), 1), self.max_items)]

    def score(self, prompts: Sequence, completions: Sequence, weights: Mapping[str, float] | None = None,
              preset: str | None = None) -> AttributeScores:
        """Attributes of each (prompt, completion), in input order."""
        replies = [self.request("POST", "/score", p) for p in self._payloads(prompts, completions, weights, preset)]
        return self._combine(replies)

    @staticmethod
    def _combine(replies: list[dict]) -> AttributeScores:
        if not replies:
            raise ValueError("nothing to score")
        parts = [attribute_scores_from_reply(r) for r in replies]
        return parts[0] if len(parts) == 1 else AttributeScores.concat(parts)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- async --------------------------------------------------------------------------------------------------
    def _async_client(self) -> Any:
        # An httpx.AsyncClient belongs to the event loop it was first used on; keep one per loop.
        httpx = require_extra("httpx", "server")
        loop = asyncio.get_running_loop()
        key = id(loop)
        client = self._async_clients.get(key)
        if client is None or getattr(client, "_steer_loop", None) is not loop:
            limits = self._limits(max_connections=256, max_keepalive_connections=64)
            client = httpx.AsyncClient(timeout=self.timeout, headers=self.headers, limits=limits)
            client._steer_loop = loop
            self._async_clients[key] = client
        return client

    async def arequest(self, method: str, path: str, payload: Any = None) -> dict:
        """``request`` for async callers."""
        httpx = require_extra("httpx", "server")
        client, last, resent = self._async_client(), "", False
        for attempt in range(self.retries):
            url = self._pick()
            try:
                response, error = await client.request(method, url + path, json=payload), None
            except httpx.TransportError as err:
                response, error = None, err
            if not resent and self._stale_connection(error):
                resent = True
                try:
                    response, error = await client.request(method, url + path, json=payload), None
                except httpx.TransportError as err:
                    response, error = None, err
            reply, retry_after, last = self._outcome(url, response, error)
            if reply is not None:
                return reply
            if attempt + 1 < self.retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise self._give_up(path, last)

    async def ainfo(self) -> dict:
        return await self.arequest("GET", "/info")

    async def ascore(self, prompts: Sequence, completions: Sequence, weights: Mapping[str, float] | None = None,
                     preset: str | None = None) -> AttributeScores:
        """``score`` for async callers; chunks of a large batch are sent concurrently."""
        payloads = self._payloads(prompts, completions, weights, preset)
        replies = await asyncio.gather(*(self.arequest("POST", "/score", p) for p in payloads))
        return self._combine(list(replies))

    async def aclose(self) -> None:
        for client in self._async_clients.values():
            await client.aclose()
        self._async_clients.clear()
