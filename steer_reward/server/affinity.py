"""Prompt affinity for scale-out serving: which replica a request should go to, so its prompt's KV cache hits.

A replica keeps recent prompt prefills (``server.prompt_cache_tokens``); OpenRLHF sends the G samples of one prompt
as G separate requests, so they share one prefill only when they reach the same replica. The gateway reads just
enough of a request to name its prompt (``affinity_key``), and rendezvous (highest-random-weight) hashing maps
the key to a replica (``rendezvous_order``). Rendezvous hashing needs no shared state, so several gateway
processes agree on the replica; a replica that leaves moves only its own prompts, and one that joins takes about
1/N of them.

Nothing here imports Ray: the keys and the order are plain functions, tested on their own.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

__all__ = ["affinity_key", "rendezvous_order", "AFFINITY_PATHS"]

AFFINITY_PATHS = ("/score", "/get_reward")
"""The endpoints whose bodies carry prompts."""


def _digest(text: str) -> str:
    # A stable hash (not Python's salted hash()): every gateway process must compute the same key.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _prompt_of_query(query: str) -> Any:
    """The conversation part of an OpenRLHF query sent without ``prompts`` (None when it does not parse)."""
    from steer_reward.errors import InputError
    from steer_reward.server.openrlhf import parse_query

    try:
        return parse_query(query).prompt
    except InputError:
        return None


def affinity_key(path: str, body: bytes) -> str | None:
    """A stable key naming the prompt of a ``/score`` or ``/get_reward`` body, or None when there is none.

    ``/score``: the first item of ``prompts`` (a string or a message list). ``/get_reward``: the first item of
    OpenRLHF's ``prompts`` field, or, without it, the conversation part of the first ``query``. A request holding
    several prompts follows its first one. A body that does not parse has no key: it goes to the least-loaded
    replica, which answers the usual 4xx.

    >>> affinity_key("/get_reward", b'{"query": ["Q: 1+1? A: 2"], "prompts": ["Q: 1+1? A:"]}') == \\
    ...     affinity_key("/get_reward", b'{"query": ["Q: 1+1? A: 3"], "prompts": ["Q: 1+1? A:"]}')
    True
    """
    if path not in AFFINITY_PATHS:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        return None
    if not isinstance(data, dict):
        return None
    prompts = data.get("prompts")
    prompt: Any = prompts[0] if isinstance(prompts, list) and prompts else None
    if path == "/get_reward" and not (isinstance(prompt, str) and prompt):
        queries = data.get("query")
        query = queries[0] if isinstance(queries, list) and queries else None
        prompt = _prompt_of_query(query) if isinstance(query, str) and query else None
    if not prompt or not isinstance(prompt, (str, list)):
        return None
    if isinstance(prompt, str):
        return _digest(prompt)
    try:
        return _digest(json.dumps(prompt, sort_keys=True, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError):
        return None


def rendezvous_order(key: str, replicas: Iterable[str]) -> list[str]:
    """``replicas`` from the most to the least preferred for ``key`` (highest random weight first).

    >>> rendezvous_order("k", ["a", "b", "c"]) == rendezvous_order("k", ["c", "a", "b"])
    True
    """
    return sorted(replicas, key=lambda replica: _digest(f"{key}\x00{replica}"), reverse=True)
