"""OpenRLHF's ``reward_func`` file face: ``--reward.remote_url path/to/reward_func.py`` with no server.

OpenRLHF 0.11 loads ``reward_func(queries, prompts, labels)`` from the file and calls it positionally, with
one-item lists, from threads (``asyncio.to_thread``) inside each vLLM engine process. So the model is loaded once
per process, lazily, under a lock, and scoring is serialized (models are not thread-safe). The reply is the
same dict the server's ``/get_reward`` gives.

``steer-reward openrlhf-func --config C --model M --out reward_func.py`` writes such a file.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

from steer_reward.server.openrlhf import empty_reply, openrlhf_reply, parse_query

__all__ = ["OpenRLHFRewardFunc", "reward_func_source"]


class OpenRLHFRewardFunc:
    """A lazily loaded ``SteerReward`` answering OpenRLHF's ``reward_func(queries, prompts, labels)``.

    >>> func = OpenRLHFRewardFunc("configs/rewards/steerlm-70b.yaml", model="demo")  # doctest: +SKIP
    >>> func(["<|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>..."], [...], [None])  # doctest: +SKIP
    {'rewards': [0.41], 'scores': [0.41], 'extra_logs': {...}}
    """

    def __init__(self, config: str | Mapping | None = None, model: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.model = model
        self.overrides = dict(overrides or {})
        self._reward: Any = None
        self._load_lock = threading.Lock()
        self._score_lock = threading.Lock()

    @property
    def reward(self) -> Any:
        """The ``SteerReward``, built on first use (once per process)."""
        if self._reward is None:
            with self._load_lock:
                if self._reward is None:
                    from steer_reward.reward import SteerReward

                    self._reward = SteerReward.from_config(self.config, model=self.model, overrides=self.overrides)
        return self._reward

    def __call__(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                 labels: Sequence[Any] | None = None, **kwargs: Any) -> dict:
        reward = self.reward
        live = reward.schema.live_names
        if not queries:
            return empty_reply(live)
        eos = getattr(getattr(reward.scorer, "tokenizer", None), "eos_token", None)
        parsed = [parse_query(q, prompts[i] if prompts else None, (eos,) if eos else ())
                  for i, q in enumerate(queries)]
        with self._score_lock:
            scored = reward.score([p.prompt for p in parsed], [p.response for p in parsed],
                                  update_stats=reward.shaper.updates_in_training)
        return openrlhf_reply(scored, live)


def reward_func_source(config: str | None, model: str | None, overrides: Mapping[str, Any]) -> str:
    """The text of a ``reward_func.py`` for OpenRLHF that serves this reward in-process."""
    return (
        '"""OpenRLHF reward function written by `steer-reward openrlhf-func`.\n\n'
        "Use with: --reward.remote_url <this file>. The reward model loads once per process, on first call.\n"
        '"""\n\n'
        "from steer_reward.openrlhf_reward_func import OpenRLHFRewardFunc\n\n"
        f"_REWARD = OpenRLHFRewardFunc(config={config!r}, model={model!r}, overrides={dict(overrides)!r})\n\n\n"
        "def reward_func(queries, prompts, labels, **kwargs):\n"
        '    """{"rewards", "scores", "extra_logs"} for OpenRLHF, one value per query."""\n'
        "    return _REWARD(queries, prompts, labels, **kwargs)\n"
    )
