"""OpenRLHF's ``reward_func`` file face: ``--reward.remote_url path/to/reward_func.py`` with no server.

OpenRLHF 0.11 loads ``reward_func(queries, prompts, labels)`` from the file and calls it positionally, with
one-item lists, from threads (``asyncio.to_thread``) inside each vLLM engine process. So the model is loaded once
per process, lazily, under a lock, and scoring is serialized (models are not thread-safe). The reply is the
same dict the server's ``/get_reward`` gives.

``steer-reward openrlhf-func --config C --model M --out reward_func.py`` writes such a file.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Sequence

from steer_reward.errors import InputError
from steer_reward.server.openrlhf import (QueryParser, SampleFailure, check_openrlhf_options, empty_reply,
                                          openrlhf_reply)

__all__ = ["OpenRLHFRewardFunc", "reward_func_source"]

logger = logging.getLogger("steer_reward.openrlhf")


class OpenRLHFRewardFunc:
    """A lazily loaded ``SteerReward`` answering OpenRLHF's ``reward_func(queries, prompts, labels)``.

    Reads the OpenRLHF options of ``server`` in the config (``actor_tokenizer``, ``strip_reasoning``,
    ``fallback_reward``, ``openrlhf_scores``) like the server's ``/get_reward``: a sample that cannot be scored
    gets the fallback reward and ``reward_failed`` = 1, because OpenRLHF fails the step when reward_func raises.

    >>> func = OpenRLHFRewardFunc("configs/rewards/steerlm-70b.yaml", model="demo")  # doctest: +SKIP
    >>> func(["<|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>..."], [...], [None])  # doctest: +SKIP
    {'rewards': [0.41], 'scores': [0.6], 'extra_logs': {...}, 'failures': []}
    """

    def __init__(self, config: str | Mapping | None = None, model: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.model = model
        self.overrides = dict(overrides or {})
        self._reward: Any = None
        self._parser: QueryParser | None = None
        self._load_lock = threading.Lock()
        self._score_lock = threading.Lock()

    @property
    def reward(self) -> Any:
        """The ``SteerReward``, built on first use (once per process)."""
        if self._reward is None:
            with self._load_lock:
                if self._reward is None:
                    from steer_reward.reward import SteerReward
                    from steer_reward.server.actor_templates import ActorTemplate

                    reward = SteerReward.from_config(self.config, model=self.model, overrides=self.overrides)
                    server = reward.config.server
                    check_openrlhf_options(server)
                    actor = ActorTemplate.from_tokenizer(server.actor_tokenizer) if server.actor_tokenizer else None
                    eos = getattr(getattr(reward.scorer, "tokenizer", None), "eos_token", None)
                    self._parser = QueryParser(actor, (eos,) if eos else (), server.strip_reasoning)
                    self._reward = reward
        return self._reward

    def __call__(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                 labels: Sequence[Any] | None = None, **kwargs: Any) -> dict:
        reward = self.reward
        live = reward.schema.live_names
        if not queries:
            return empty_reply(live)
        failures: list[SampleFailure] = []
        texts, responses, index = [], [], []
        for i, query in enumerate(queries):
            try:
                if not isinstance(query, str):
                    raise InputError(f"the query is a {type(query).__name__}, not a string")
                prompt = prompts[i] if prompts is not None and i < len(prompts) else None
                parsed = self._parser.parse(query, prompt if isinstance(prompt, str) else None)
            except InputError as err:
                failures.append(SampleFailure(i, "query", f"query[{i}]: {err}"))
                continue
            texts.append(parsed.prompt)
            responses.append(parsed.response)
            index.append(i)
        with self._score_lock:
            index, scored = self._score(reward, texts, responses, index, failures)
        server = reward.config.server
        reply = openrlhf_reply(len(queries), live, scored, index, failures, server.fallback_reward,
                               server.openrlhf_scores)
        for failure in reply["failures"]:
            logger.warning("reward_func answered the fallback reward %g: %s", server.fallback_reward,
                           failure["error"])
        return reply

    @staticmethod
    def _score(reward: Any, prompts: list, completions: list, index: list[int],
               failures: list[SampleFailure]) -> tuple[list[int], Any]:
        """(indices scored, their ``ScoredBatch``); the batch is scored whole first, and only when that fails is
        each sample encoded alone, to name the ones at fault (FormattingError, InputError: ValueErrors)."""
        if not index:
            return [], None
        update = reward.shaper.updates_in_training
        try:
            return index, reward.score(prompts, completions, update_stats=update)
        except (ValueError, TypeError) as batch_error:
            keep = []
            for j, (prompt, completion) in enumerate(zip(prompts, completions)):
                try:
                    reward.scorer.encode([prompt], [completion])
                except (ValueError, TypeError) as err:
                    failures.append(SampleFailure(index[j], "format", f"query[{index[j]}]: {err}"))
                else:
                    keep.append(j)
            if len(keep) == len(index):
                raise batch_error  # every sample encodes alone: the failure is not one sample's
        if not keep:
            return [], None
        kept = [index[j] for j in keep]
        return kept, reward.score([prompts[j] for j in keep], [completions[j] for j in keep], update_stats=update)


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
