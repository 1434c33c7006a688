"""``SteerReward``: a multi-attribute scorer plus a reward shaper, the object every face is built on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import torch

from steer_reward.config import SteerRewardConfig, load_config
from steer_reward.formatting import Completion, Prompt
from steer_reward.schema import AttributeSchema
from steer_reward.scoring import AttributeScores
from steer_reward.shaping import MomentsSync, RewardShaper, lengths_tensor

__all__ = ["ScoredBatch", "SteerReward", "build_scorer"]


@dataclass
class ScoredBatch:
    """Attributes and shaped rewards of n samples, in input order."""

    attributes: AttributeScores
    rewards: torch.Tensor
    """Shape: ``(n,)``, float32."""

    def __len__(self) -> int:
        return len(self.rewards)


def build_scorer(config: SteerRewardConfig) -> Any:
    """The attribute scorer for ``config.backend``; heavy backends are imported only when chosen."""
    if config.backend == "deepspeed":
        from steer_reward.backends.deepspeed import build_deepspeed_scorer

        return build_deepspeed_scorer(config)
    if config.backend == "vllm":
        from steer_reward.backends.vllm import build_vllm_scorer

        return build_vllm_scorer(config)
    if config.backend == "remote":
        from steer_reward.backends.remote import RemoteAttributeScorer

        return RemoteAttributeScorer.from_config(config)
    from steer_reward.scoring import AttributeScorer

    return AttributeScorer.from_config(config)


class SteerReward:
    """Scores (prompt, completion) pairs per attribute and shapes them into one reward each.

    >>> reward = SteerReward.from_config("configs/rewards/steerlm-70b.yaml", model="demo")  # doctest: +SKIP
    >>> reward(["What is 2+2?"], ["4"])  # doctest: +SKIP
    [0.73...]
    """

    def __init__(self, scorer: Any, shaper: RewardShaper, config: SteerRewardConfig | None = None) -> None:
        self.scorer = scorer
        self.shaper = shaper
        self.config = config or SteerRewardConfig()

    @classmethod
    def from_config(cls, source: str | Path | Mapping | SteerRewardConfig | None = None, model: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> "SteerReward":
        """Build from a YAML path or dict; ``model`` replaces ``model.path`` ("demo" allowed); ``overrides`` are
        dotted keys like the CLI's ``--set`` (``{"shaping.weights.verbosity": -1.0}``)."""
        overrides = dict(overrides or {})
        if model is not None:
            overrides["model.path"] = str(model)
        config = load_config(source, overrides)
        scorer = build_scorer(config)
        shaper = RewardShaper(scorer.schema, config.shaping, sync=getattr(scorer, "moments_sync", None))
        return cls(scorer, shaper, config)

    @property
    def schema(self) -> AttributeSchema:
        return self.scorer.schema

    def rewards(self, attributes: AttributeScores, lengths: Sequence[int] | torch.Tensor | None = None,
                update_stats: bool = False, sync: MomentsSync | None = None) -> torch.Tensor:
        """Shaped rewards of already-scored attributes; runs no model. Shape: ``(n,)``.

        ``lengths`` replaces the reward model's completion token counts for the length penalty (e.g. the
        policy's own token counts). ``sync`` merges this update's batch moments across ranks (default: the
        shaper's own, set by the DeepSpeed backend); it is a collective, so every rank must make the same call, and
        lengths refused on one rank end the call on every rank (``fail_together``).
        """
        if lengths is None:
            lengths = attributes.completion_lengths
        else:
            lengths, error = self._checked_lengths(lengths, len(attributes))
            if error is not None:
                self.fail_together(error, "after scoring", update_stats, sync)
        return self.shaper(attributes.values, lengths, update_stats=update_stats, sync=sync)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion], *,
              lengths: Sequence[int] | torch.Tensor | None = None, update_stats: bool = False,
              sync: MomentsSync | None = None) -> ScoredBatch:
        """Attributes and rewards of each (prompt, completion), in input order.

        ``lengths`` are checked before scoring, so that when ranks score together (ZeRO-3) a refusal on one rank
        ends the call on every rank at once (``fail_together``).
        """
        lengths, error = self._checked_lengths(lengths, len(completions))
        attributes = self.score_attributes(prompts, completions, update_stats=update_stats, sync=sync, error=error)
        return ScoredBatch(attributes, self.rewards(attributes, lengths, update_stats, sync))

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[Completion], *,
                 lengths: Sequence[int] | torch.Tensor | None = None, update_stats: bool = False) -> list[float]:
        return self.score(prompts, completions, lengths=lengths, update_stats=update_stats).rewards.tolist()

    @staticmethod
    def _checked_lengths(lengths: Sequence[int] | torch.Tensor | None,
                         count: int) -> tuple[torch.Tensor | None, Exception | None]:
        """(``lengths`` as a tensor, None) when they give one count per each of ``count`` samples, else (None, the
        refusal)."""
        if lengths is None:
            return None, None
        try:
            return lengths_tensor(lengths, count), None
        except (TypeError, ValueError) as err:
            return None, err

    # -- a failure on one rank of several that call together ----------------------------------------------------

    @property
    def scores_together(self) -> bool:
        """Whether scoring is itself a collective across ranks (ZeRO-3), which agrees its own failures."""
        return getattr(self.scorer, "fail_together", None) is not None

    def score_attributes(self, prompts: Sequence[Prompt], completions: Sequence[Completion], *,
                         update_stats: bool = False, sync: MomentsSync | None = None,
                         error: BaseException | None = None) -> AttributeScores:
        """The attributes of each (prompt, completion), for a call whose rewards then update statistics as
        ``update_stats`` and ``sync`` say. ``error``: this rank already failed (e.g. a refused argument) and only
        joins what the other ranks are doing in this call, to end it on every rank (``fail_together``); a scorer's
        own failure on this rank ends it on every rank too."""
        if error is not None:
            self.fail_together(error, "before scoring", update_stats, sync)
        try:
            return self.scorer.score(prompts, completions)
        except Exception as err:  # noqa: BLE001 - a failure on this rank alone must reach the others
            self.fail_together(err, "scoring", update_stats, sync)

    def fail_together(self, error: BaseException, stage: str, update_stats: bool = False,
                      sync: MomentsSync | None = None) -> NoReturn:
        """Raise ``error``, met by this rank alone during a call that several ranks make together, on every rank.

        A rank raising alone would leave the others waiting in the call's next collective until the process group's
        timeout (``deepspeed.timeout_s``, or the trainer's: 30 minutes by default). Instead this rank joins that
        collective with a failure flag, and every rank raises the same error naming it, still in step for the next
        call. ``stage`` says where this rank stopped:

        - ``"before scoring"``: the others are about to score; a scorer that is a collective (ZeRO-3) carries the
          flag in its count agreement (``DeepSpeedAttributeScorer.fail_together``);
        - ``"scoring"``: the scorer raised it; a collective scorer has already agreed it with the other ranks (or is
          out of step with them), so it is raised as it is;
        - ``"after scoring"``, or a scorer that is no collective: the flag rides this update's first statistics merge
          when the call merges across ranks (``RewardShaper.fail_together``).

        In a single process, and in a call that merges nothing, ``error`` is simply raised.
        """
        if stage not in ("before scoring", "scoring", "after scoring"):
            raise ValueError(f"unknown stage {stage!r}")
        if self.scores_together:
            if stage == "scoring":
                raise error
            if stage == "before scoring":
                self.scorer.fail_together(error)
        self.shaper.fail_together(error, update_stats, sync)

    @property
    def is_async(self) -> bool:
        """True when the scorer is remote (has ``ascore``): faces should then be async."""
        return hasattr(self.scorer, "ascore")

    async def ascore_attributes(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> AttributeScores:
        """The attributes of each (prompt, completion) for async callers: awaits a remote scorer, or runs a local
        one in a worker thread."""
        if self.is_async:
            return await self.scorer.ascore(prompts, completions)
        import asyncio

        return await asyncio.to_thread(self.scorer.score, prompts, completions)

    async def ascore(self, prompts: Sequence[Prompt], completions: Sequence[Completion], *,
                     lengths: Sequence[int] | torch.Tensor | None = None, update_stats: bool = False,
                     sync: MomentsSync | None = None) -> ScoredBatch:
        """``score`` for async callers (see ``ascore_attributes``)."""
        lengths, error = self._checked_lengths(lengths, len(completions))
        if error is not None:
            self.fail_together(error, "before scoring", update_stats, sync)
        try:
            attributes = await self.ascore_attributes(prompts, completions)
        except Exception as err:  # noqa: BLE001 - a failure on this rank alone must reach the others
            self.fail_together(err, "scoring", update_stats, sync)
        return ScoredBatch(attributes, self.rewards(attributes, lengths, update_stats, sync))

    def for_trl(self, name: str | None = None, **options: Any) -> Any:
        """This reward as one TRL reward function (async when the scorer is remote); see
        ``steer_reward.integrations.trl.SteerRewardFunc`` for ``options``."""
        from steer_reward.integrations.trl import AsyncSteerRewardFunc, SteerRewardFunc

        return (AsyncSteerRewardFunc if self.is_async else SteerRewardFunc)(self, name=name, **options)

    def trl_attribute_funcs(self, **options: Any) -> tuple[list, list[float]]:
        """(one TRL reward function per live attribute sharing one forward per batch, their ``reward_weights``);
        see ``steer_reward.integrations.trl.attribute_reward_funcs``."""
        from steer_reward.integrations.trl import attribute_reward_funcs

        return attribute_reward_funcs(self, **options)

    def with_weights(self, weights: Mapping[str, float] | str) -> "SteerReward":
        """The same scorer and normalization state under other weights (no model is loaded again)."""
        return SteerReward(self.scorer, self.shaper.with_weights(weights), self.config)

    def state_dict(self) -> dict:
        return self.shaper.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.shaper.load_state_dict(state)
