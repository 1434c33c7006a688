"""The remote backend: attributes come from ``steer-reward serve`` servers; shaping stays in this process.

``backend: remote`` in a config makes ``SteerReward`` use this scorer. It has ``ascore``, so the TRL faces are
async (TRL awaits async reward functions together, so the HTTP waits overlap). The attribute schema (names, live
outputs, presets) is read from the server's ``/info``, so weights are checked against the model actually served.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from steer_reward.client import RemoteScorer
from steer_reward.config import ConfigError, SteerRewardConfig
from steer_reward.schema import BUILTIN_SCHEMAS, AttributeSchema
from steer_reward.scoring import AttributeScores

__all__ = ["RemoteAttributeScorer", "schema_from_info"]


def schema_from_info(info: Mapping) -> AttributeSchema:
    """The ``AttributeSchema`` a server describes in ``/info`` (the built-in one when names match)."""
    names = tuple(info["names"])
    builtin = BUILTIN_SCHEMAS.get(info.get("schema", ""))
    if builtin is not None and builtin.names == names:
        return builtin
    value_range = info.get("value_range")
    return AttributeSchema(
        name=str(info.get("schema", "remote")), names=names, live=tuple(int(i) for i in info["live"]),
        value_range=tuple(value_range) if value_range else None,
        presets={k: dict(v) for k, v in (info.get("presets") or {}).items()}, verbosity=info.get("verbosity"),
    )


class RemoteAttributeScorer:
    """Scores (prompt, completion) pairs on reward servers; same ``score`` contract as ``AttributeScorer``."""

    model = None
    """No in-process model (folding a head or generating needs the local backend)."""

    def __init__(self, client: RemoteScorer, info: Mapping) -> None:
        self.client = client
        self.info = dict(info)
        self.schema = schema_from_info(info)

    @classmethod
    def from_config(cls, config: SteerRewardConfig) -> "RemoteAttributeScorer":
        remote = config.remote
        if not remote.urls:
            raise ConfigError("backend is 'remote' but remote.urls is empty; give the servers, e.g. "
                              "--set 'remote.urls=[http://127.0.0.1:8000]'")
        token = remote.token or os.environ.get(remote.token_env) or None
        client = RemoteScorer([str(u) for u in remote.urls], token=token, timeout=remote.timeout_s,
                              retries=remote.retries, backoff_s=remote.backoff_s,
                              idle_timeout_s=remote.idle_timeout_s)
        info = client.info()
        client.max_items = int(info.get("limits", {}).get("max_items_per_request", client.max_items))
        wanted = config.model.schema
        if wanted in BUILTIN_SCHEMAS and tuple(info["names"]) != BUILTIN_SCHEMAS[wanted].names:
            raise ConfigError(f"model.schema is {wanted!r} but the server at {client.urls[0]} serves outputs "
                              f"{info['names']}")
        return cls(client, info)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> AttributeScores:
        return self.client.score(prompts, completions)

    async def ascore(self, prompts: Sequence[Any], completions: Sequence[Any]) -> AttributeScores:
        return await self.client.ascore(prompts, completions)
