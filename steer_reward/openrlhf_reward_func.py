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

from steer_reward.config import ConfigError, load_config
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
        self.forward_failure_streak = 0
        """Samples in a row answered the fallback reward because their forward failed; past
        ``server.fallback_streak_limit`` the model is taken for broken and the error is raised."""

    @property
    def reward(self) -> Any:
        """The ``SteerReward``, built on first use (once per process)."""
        if self._reward is None:
            with self._load_lock:
                if self._reward is None:
                    from steer_reward.reward import SteerReward
                    from steer_reward.server.actor_templates import ActorTemplate

                    overrides = dict(self.overrides)
                    if self.model is not None:
                        overrides["model.path"] = str(self.model)
                    config = load_config(self.config, overrides)
                    if config.backend in ("deepspeed", "remote"):
                        raise ConfigError(
                            f"a reward_func file runs its own model inside each OpenRLHF vLLM engine process; backend "
                            f"{config.backend!r} cannot (ZeRO-3 needs the training ranks; a remote reward is served to "
                            "OpenRLHF directly: --reward.remote_url http://HOST:PORT/get_reward). Use backend: local "
                            "or vllm"
                        )
                    reward = SteerReward.from_config(config)
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

    def _score(self, reward: Any, prompts: list, completions: list, index: list[int],
               failures: list[SampleFailure]) -> tuple[list[int], Any]:
        """(indices scored, their ``ScoredBatch``). The batch is encoded whole first; only when that fails is each
        sample encoded alone, to name the ones at fault (FormattingError, InputError: ValueErrors)."""
        if not index:
            return [], None
        scorer = reward.scorer
        try:
            samples = scorer.encode(prompts, completions)
        except (ValueError, TypeError):
            keep = []
            for j, (prompt, completion) in enumerate(zip(prompts, completions)):
                try:
                    scorer.encode([prompt], [completion])
                except (ValueError, TypeError) as err:
                    failures.append(SampleFailure(index[j], "format", f"query[{index[j]}]: {err}"))
                else:
                    keep.append(j)
            if len(keep) == len(index):
                raise  # every sample encodes alone: the failure is not one sample's
            if not keep:
                return [], None
            index = [index[j] for j in keep]
            samples = scorer.encode([prompts[j] for j in keep], [completions[j] for j in keep])
        update = reward.shaper.updates_in_training
        index, attributes = self._forward_or_fallback(reward, samples, index, failures)
        if attributes is None:
            return [], None
        from steer_reward.reward import ScoredBatch

        return index, ScoredBatch(attributes, reward.rewards(attributes, update_stats=update))

    def _forward_or_fallback(self, reward: Any, samples: list, index: list[int],
                             failures: list[SampleFailure]) -> tuple[list[int], Any]:
        """(indices scored, their ``AttributeScores``): a forward that fails is split down to the samples that fail
        alone, which get the fallback reward while the model still works (``server.fallback_streak_limit``)."""
        try:
            attributes = reward.scorer.score_encoded(samples)
        except Exception as err:  # noqa: BLE001 - a forward that fails on these samples
            if len(samples) > 1:
                half = len(samples) // 2
                parts = [self._forward_or_fallback(reward, samples[:half], index[:half], failures),
                         self._forward_or_fallback(reward, samples[half:], index[half:], failures)]
                parts = [(i, a) for i, a in parts if a is not None]
                if not parts:
                    return [], None
                from steer_reward.scoring import AttributeScores

                return [i for part, _ in parts for i in part], AttributeScores.concat([a for _, a in parts])
            self.forward_failure_streak += 1
            limit = reward.config.server.fallback_streak_limit
            if self.forward_failure_streak > limit:
                logger.error("reward_func: %d forwards failed in a row (server.fallback_streak_limit %d): the model "
                             "is taken for broken", self.forward_failure_streak, limit)
                raise
            failures.append(SampleFailure(index[0], "forward",
                                          f"query[{index[0]}]: the forward failed ({type(err).__name__}: {err})"))
            return [], None
        self.forward_failure_streak = 0
        return index, attributes


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
